// ReLU -> local response normalisation (optional) -> max pooling, fused, as
// XLA FFI custom calls on NHWC float32 or bfloat16 activations (computed in
// float32, as models.local_response_norm does):
//   alexnet_relu_lrn_pool_fwd  x -> (y, arg)   arg: the window tap (row-major,
//                                               uint8) each maximum came from
//   alexnet_relu_lrn_pool_bwd  (x, arg, dy) -> dx
// Each image is read once per direction and its normalised maps stay in a
// per-thread buffer, where XLA runs the three operations as several loops
// over whole arrays and keeps the LRN's intermediates for the backward pass.
// In float32, dx, which the convolution's gradients read only later, is
// written around the caches (streaming stores) when its vectors are aligned;
// in bfloat16 it goes to a per-thread buffer that is rounded at once.
//
// LRN (models.local_response_norm): b_c = a_c / (k + scale * S_c) ** beta,
// S_c = sum of a_j^2 over j in [c - size / 2, c + (size - 1) / 2] within c's
// tower of C / towers channels; size = 0 turns it off. Pooling
// (models.max_pool): windows of `window` x `window` taps every `stride`
// pixels, padded by pad_top / pad_left with -inf; ties go to the first
// maximum in row-major window order, and a NaN counts as a maximum (XLA's
// max passes NaNs on). The ReLU's gradient at 0 is 0.
#include <omp.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <new>
#include <optional>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace alexnet {
std::mutex& ExecMutex();  // onednn_conv.cc: one kernel call at a time
}  // namespace alexnet

namespace {

struct Params {
  int64_t n, h, w, c, oh, ow;
  int64_t size, towers, window, stride, pad_top, pad_left;
  float k, scale, beta;
};

// Allocates floats on 64-byte boundaries, for whole-vector loads and stores.
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const AlignedAllocator<U>&) const { return false; }
};

// Lanes of float32 for the LRN's loops: 16 with AVX-512, else 1. Max(0, x)
// keeps a NaN x, as XLA's ReLU does. InvPow075 returns d ** -0.75 and sets
// recip = 1 / d, for d > 0. Shift<k>(p), p the start of a vector in a buffer
// padded by a vector on each side, is the vector k lanes further on (|k| < 16):
// shifted in registers, since an unaligned load of values just stored cannot
// be forwarded from the pending stores and waits for them. StoreAs<true>
// writes values that will not be read again soon (streaming when the vector is
// whole and aligned), StoreAs<false> as Store.
#ifdef __AVX512F__
struct Lanes {
  using V = __m512;
  using M = __mmask16;
  static constexpr int64_t kWidth = 16;
  static M Mask(int64_t left) {
    return left >= 16 ? static_cast<M>(0xffff) : static_cast<M>((1u << left) - 1);
  }
  static V Load(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static void Store(float* p, V v, M m) { _mm512_mask_storeu_ps(p, m, v); }
  static V LoadAt(const float* p) { return _mm512_load_ps(p); }
  static V LoadAnywhere(const float* p) { return _mm512_loadu_ps(p); }
  static void StoreAt(float* p, V v) { _mm512_store_ps(p, v); }
  static void StoreOnce(float* p, V v, M m) {
    if (m == 0xffff && (reinterpret_cast<uintptr_t>(p) & 63) == 0) _mm512_stream_ps(p, v);
    else _mm512_mask_storeu_ps(p, m, v);
  }
  template <bool kOnce>
  static void StoreAs(float* p, V v, M m) { kOnce ? StoreOnce(p, v, m) : Store(p, v, m); }
  template <int k>
  static V Shift(const float* p) {
    static_assert(k > -16 && k < 16, "LRN windows reach at most 15 channels");
    if constexpr (k == 0) {
      return LoadAt(p);
    } else if constexpr (k > 0) {
      return Cast(_mm512_alignr_epi32(Cast(LoadAt(p + 16)), Cast(LoadAt(p)), k));
    } else {
      return Cast(_mm512_alignr_epi32(Cast(LoadAt(p)), Cast(LoadAt(p - 16)), 16 + k));
    }
  }
  static V Set(float v) { return _mm512_set1_ps(v); }
  static V Add(V a, V b) { return _mm512_add_ps(a, b); }
  static V Mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V MulAdd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }      // a b + c
  static V NegMulAdd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
  static V Max(V a, V b) { return _mm512_max_ps(a, b); }  // b where either is NaN
  static V IfPositive(V x, V v) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ), v);
  }
  // The 14-bit reciprocal square root refined by one Newton step (relative
  // error about 1e-7, as the division and square roots it replaces have):
  // y = d ** -0.5, z = (d y) ** -0.5 = d ** -0.25, d ** -0.75 = y z, 1 / d = y y.
  static V Rsqrt(V a) {
    const V y = _mm512_rsqrt14_ps(a);
    return Mul(Mul(Set(0.5f), y), NegMulAdd(Mul(a, y), y, Set(3.0f)));
  }
  static V InvPow075(V d, V* recip) {
    const V y = Rsqrt(d);
    *recip = Mul(y, y);
    return Mul(y, Rsqrt(Mul(d, y)));
  }
  static V InvPow(V d, float beta, V* recip) {  // beta other than the paper's
    alignas(64) float v[16];
    _mm512_store_ps(v, d);
    for (float& e : v) e = std::pow(e, -beta);
    *recip = _mm512_div_ps(Set(1.0f), d);
    return _mm512_load_ps(v);
  }

 private:
  static __m512i Cast(V v) { return _mm512_castps_si512(v); }
  static V Cast(__m512i v) { return _mm512_castsi512_ps(v); }
};
#else
struct Lanes {
  using V = float;
  using M = bool;
  static constexpr int64_t kWidth = 1;
  static M Mask(int64_t) { return true; }
  static V Load(const float* p, M) { return *p; }
  static void Store(float* p, V v, M) { *p = v; }
  static V LoadAt(const float* p) { return *p; }
  static V LoadAnywhere(const float* p) { return *p; }
  static void StoreAt(float* p, V v) { *p = v; }
  template <bool kOnce>
  static void StoreAs(float* p, V v, M) { *p = v; }
  template <int k>
  static V Shift(const float* p) { return p[k]; }
  static V Set(float v) { return v; }
  static V Add(V a, V b) { return a + b; }
  static V Mul(V a, V b) { return a * b; }
  static V MulAdd(V a, V b, V c) { return a * b + c; }
  static V NegMulAdd(V a, V b, V c) { return c - a * b; }
  static V Max(V a, V b) { return a > b ? a : b; }
  static V IfPositive(V x, V v) { return x > 0.0f ? v : 0.0f; }
  static V InvPow075(V d, V* recip) {
    const float root = std::sqrt(d);
    *recip = 1.0f / d;
    return 1.0f / (root * std::sqrt(root));
  }
  static V InvPow(V d, float beta, V* recip) {
    *recip = 1.0f / d;
    return std::pow(d, -beta);
  }
};
#endif

// The LRN of one pixel's C channels at a time, one tower after another. A
// tower's squares (and, backward, its terms u) are stored as whole vectors in
// a buffer zero-padded on both sides beyond the window's reach, so that every
// channel sums the same taps and each step is one pass of whole vectors. For
// kTaps = size > 0 the taps are shifts in registers; otherwise loads.
template <int kTaps>
class Lrn {
  using L = Lanes;
  using V = L::V;
  static constexpr int64_t kW = L::kWidth;

 public:
  explicit Lrn(const Params& p)
      : p_(p), lo_(p.size / 2), hi_((p.size - 1) / 2), per_(p.c / p.towers),
        vectors_((per_ + kW - 1) / kW), pad_((std::max(lo_, hi_) + kW - 1) / kW * kW),
        sq_(Buffer()), u_(Buffer()), ginv_(Buffer()) {}

  // out = r * d ** -beta, r = relu(x): the LRN's output.
  void Forward(const float* x, float* out) {
    for (int64_t o = 0; o < p_.c; o += per_) {
      Normalise(x + o, [&](int64_t j, typename L::M m, V r, V inv, V) {
        L::Store(out + o + j * kW, L::Mul(r, inv), m);
      });
    }
  }

  // dx from x and g, the gradient of the LRN's output:
  // dr_i = g_i inv_i - 2 beta scale r_i sum_{c: i in W(c)} u_c, u_c = g_c r_c inv_c / d_c.
  // kOnce: dx is not read again soon.
  template <bool kOnce>
  void Backward(const float* x, const float* g, float* dx) {
    const V two_beta_scale = L::Set(2.0f * p_.beta * p_.scale);
    for (int64_t o = 0; o < p_.c; o += per_) {
      Normalise(x + o, [&](int64_t j, typename L::M m, V r, V inv, V recip) {
        const V ginv = L::Mul(L::Load(g + o + j * kW, m), inv);
        L::StoreAt(At(ginv_, j), ginv);
        L::StoreAt(At(u_, j), L::Mul(L::Mul(ginv, r), recip));
      });
      for (int64_t j = 0; j < vectors_; ++j) {
        const auto m = L::Mask(per_ - j * kW);
        const V xj = L::Load(x + o + j * kW, m);
        const V r = L::Max(L::Set(0.0f), xj);
        // u_c for c in [i - hi, i + lo]: the channels whose windows hold i.
        const V s = kTaps ? Sum<-(kTaps - 1) / 2, kTaps / 2>(At(u_, j)) : Sum(At(u_, j), -hi_, lo_);
        const V dr = L::NegMulAdd(L::Mul(two_beta_scale, r), s, L::LoadAt(At(ginv_, j)));
        L::template StoreAs<kOnce>(dx + o + j * kW, L::IfPositive(xj, dr), m);
      }
    }
  }

 private:
  using Aligned = std::vector<float, AlignedAllocator<float>>;
  Aligned Buffer() const { return Aligned((vectors_ * kW + 2 * pad_), 0.0f); }
  float* At(Aligned& b, int64_t j) const { return b.data() + pad_ + j * kW; }

  // f(j, m, r, inv, recip) for the vectors j of the tower x starts: their
  // lanes m, r = relu(x), inv = d ** -beta and recip = 1 / d.
  template <typename F>
  void Normalise(const float* x, F f) {
    Squares(x);
    for (int64_t j = 0; j < vectors_; ++j) {
      const auto m = L::Mask(per_ - j * kW);
      V recip;
      const V inv = Inverse(j, &recip);
      f(j, m, L::Max(L::Set(0.0f), L::Load(x + j * kW, m)), inv, recip);
    }
  }

  // sq_ = relu(x) ** 2 of one tower, zero beyond it.
  void Squares(const float* x) {
    for (int64_t j = 0; j < vectors_; ++j) {
      const V r = L::Max(L::Set(0.0f), L::Load(x + j * kW, L::Mask(per_ - j * kW)));
      L::StoreAt(At(sq_, j), L::Mul(r, r));
    }
  }

  // The sum of the values from kFrom to kTo lanes away from p's.
  template <int kFrom, int kTo>
  static V Sum(const float* p) {
    if constexpr (kFrom == kTo) {
      return L::Shift<kFrom>(p);
    } else {
      return L::Add(L::Shift<kFrom>(p), Sum<kFrom + 1, kTo>(p));
    }
  }
  static V Sum(const float* p, int64_t from, int64_t to) {
    V s = L::LoadAnywhere(p + from);
    for (int64_t k = from + 1; k <= to; ++k) s = L::Add(s, L::LoadAnywhere(p + k));
    return s;
  }

  // d ** -beta and 1 / d, d = k + scale * S, for the tower's vector j in sq_.
  V Inverse(int64_t j, V* recip) {
    const float* sq = At(sq_, j);
    const V s = kTaps ? Sum<-kTaps / 2, (kTaps - 1) / 2>(sq) : Sum(sq, -lo_, hi_);
    const V d = L::MulAdd(L::Set(p_.scale), s, L::Set(p_.k));
    // The paper's beta, as models._inverse_power has it.
    return p_.beta == 0.75f ? L::InvPow075(d, recip) : L::InvPow(d, p_.beta, recip);
  }

  const Params& p_;
  const int64_t lo_, hi_, per_, vectors_, pad_;
  Aligned sq_, u_, ginv_;
};

// f(tap, pixel) for the in-bounds taps of output (oi, oj)'s window, in
// row-major order; pixel = i * W + j of the input.
template <typename F>
void ForEachTap(const Params& p, int64_t oi, int64_t oj, F f) {
  for (int64_t ti = 0; ti < p.window; ++ti) {
    const int64_t i = oi * p.stride + ti - p.pad_top;
    if (i < 0 || i >= p.h) continue;
    for (int64_t tj = 0; tj < p.window; ++tj) {
      const int64_t j = oj * p.stride + tj - p.pad_left;
      if (j >= 0 && j < p.w) f(static_cast<uint8_t>(ti * p.window + tj), i * p.w + j);
    }
  }
}

ffi::Error Check(const Params& p) {
  if (p.size < 0 || p.towers < 1 || p.c % p.towers || p.window < 1 ||
      p.window * p.window > 256 || p.stride < 1)
    return ffi::Error::InvalidArgument("relu_lrn_pool: bad attributes");
  return ffi::Error::Success();
}

Params Read(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> yd,
            int64_t size, int64_t towers, int64_t window, int64_t stride,
            int64_t pad_top, int64_t pad_left, float k, float scale,
            float beta) {
  return {xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], size, towers, window,
          stride, pad_top, pad_left, k, scale, beta};
}

// bfloat16 values are handled as their bits; the kernels compute in float32.
using Bf16 = uint16_t;
inline float Widen(float v) { return v; }
inline float Widen(Bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
template <typename T>
T Narrow(float v);
template <>
float Narrow<float>(float v) { return v; }
template <>
Bf16 Narrow<Bf16>(float v) {  // round to nearest even, as XLA's convert
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<Bf16>((u >> 16) | 0x40);  // NaN
  return static_cast<Bf16>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// One image of T as float32: itself, or widened into buf.
template <typename T>
const float* AsFloat(const T* x, int64_t size, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    for (int64_t i = 0; i < size; ++i) buf[i] = Widen(x[i]);
    return buf.data();
  }
}

template <int kTaps, typename T>
void Forward(const Params& p, const T* xs, T* ys, uint8_t* args) {
  const int64_t c = p.c, image = p.h * p.w * c, pooled = p.oh * p.ow * c;
#pragma omp parallel
  {
    std::vector<float> xf(std::is_same_v<T, float> ? 0 : image), b(image), best(c);
    std::vector<uint8_t> at(c);
    Lrn<kTaps> lrn(p);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < p.n; ++n) {
      const float* xn = AsFloat(xs + n * image, image, xf);
      if (p.size) {
        for (int64_t px = 0; px < p.h * p.w; ++px) lrn.Forward(xn + px * c, b.data() + px * c);
      } else {
        for (int64_t i = 0; i < image; ++i) b[i] = xn[i] < 0.0f ? 0.0f : xn[i];  // keeps NaN
      }
      if constexpr (!std::is_same_v<T, float>) {
        // Pool the values the LRN returns in T (ties as XLA sees them).
        for (int64_t i = 0; i < image; ++i) b[i] = Widen(Narrow<T>(b[i]));
      }
      for (int64_t oi = 0; oi < p.oh; ++oi) {
        for (int64_t oj = 0; oj < p.ow; ++oj) {
          std::fill(best.begin(), best.end(), -std::numeric_limits<float>::infinity());
          std::fill(at.begin(), at.end(), 0);
          ForEachTap(p, oi, oj, [&](uint8_t tap, int64_t pixel) {
            const float* v = b.data() + pixel * c;
            for (int64_t ch = 0; ch < c; ++ch) {
              // A NaN is a maximum, the first one kept, as XLA's max keeps NaNs.
              const bool more = !(v[ch] <= best[ch]) && best[ch] == best[ch];
              best[ch] = more ? v[ch] : best[ch];
              at[ch] = more ? tap : at[ch];
            }
          });
          const int64_t o = n * pooled + (oi * p.ow + oj) * c;
          for (int64_t ch = 0; ch < c; ++ch) ys[o + ch] = Narrow<T>(best[ch]);
          std::copy(at.begin(), at.end(), args + o);
        }
      }
    }
  }
}

template <int kTaps, typename T>
void Backward(const Params& p, const T* xs, const uint8_t* args, const T* dys, T* dxs) {
  const int64_t c = p.c, image = p.h * p.w * c, pooled = p.oh * p.ow * c;
  constexpr bool kFloat = std::is_same_v<T, float>;
#pragma omp parallel
  {
    std::vector<float> g(image);  // the gradient reaching the pooling's input
    std::vector<float> xf(kFloat ? 0 : image), dxf(kFloat ? 0 : image);
    Lrn<kTaps> lrn(p);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < p.n; ++n) {
      std::fill(g.begin(), g.end(), 0.0f);
      for (int64_t oi = 0; oi < p.oh; ++oi) {
        for (int64_t oj = 0; oj < p.ow; ++oj) {
          const int64_t o = n * pooled + (oi * p.ow + oj) * c;
          const T* go = dys + o;
          const uint8_t* ao = args + o;
          ForEachTap(p, oi, oj, [&](uint8_t tap, int64_t pixel) {
            float* gp = g.data() + pixel * c;
            for (int64_t ch = 0; ch < c; ++ch) gp[ch] += ao[ch] == tap ? Widen(go[ch]) : 0.0f;
          });
        }
      }
      const float* xn = AsFloat(xs + n * image, image, xf);
      float* dxn;
      if constexpr (kFloat) {
        dxn = dxs + n * image;
      } else {
        dxn = dxf.data();
      }
      if (p.size) {
        for (int64_t px = 0; px < p.h * p.w; ++px)
          lrn.template Backward<kFloat>(xn + px * c, g.data() + px * c, dxn + px * c);
      } else {
        for (int64_t i = 0; i < image; i += Lanes::kWidth) {
          const auto m = Lanes::Mask(image - i);
          const auto xi = Lanes::Load(xn + i, m);
          Lanes::StoreAs<kFloat>(dxn + i, Lanes::IfPositive(xi, Lanes::Load(g.data() + i, m)), m);
        }
      }
      if constexpr (!kFloat) {
        for (int64_t i = 0; i < image; ++i) dxs[n * image + i] = Narrow<T>(dxn[i]);
      }
    }
#ifdef __AVX512F__
    _mm_sfence();
#endif
  }
}

// The element type shared by the activations, or an error.
std::optional<ffi::DataType> Floating(std::initializer_list<ffi::DataType> types) {
  const ffi::DataType t = *types.begin();
  for (ffi::DataType u : types)
    if (u != t) return std::nullopt;
  if (t != ffi::DataType::F32 && t != ffi::DataType::BF16) return std::nullopt;
  return t;
}

const char kTypeError[] = "relu_lrn_pool: activations must all be float32 or all bfloat16";

ffi::Error Fwd(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
               ffi::ResultBuffer<ffi::U8> arg, int64_t size, int64_t towers,
               int64_t window, int64_t stride, int64_t pad_top,
               int64_t pad_left, float k, float scale, float beta) {
  const Params p = Read(x.dimensions(), y->dimensions(), size, towers, window,
                        stride, pad_top, pad_left, k, scale, beta);
  if (auto e = Check(p); e.failure()) return e;
  const auto type = Floating({x.element_type(), y->element_type()});
  if (!type) return ffi::Error::InvalidArgument(kTypeError);
  std::lock_guard<std::mutex> running(alexnet::ExecMutex());
  uint8_t* a = arg->typed_data();
  if (*type == ffi::DataType::F32) {
    auto* xs = static_cast<const float*>(x.untyped_data());
    auto* ys = static_cast<float*>(y->untyped_data());
    (p.size == 5 ? Forward<5, float> : Forward<0, float>)(p, xs, ys, a);
  } else {
    auto* xs = static_cast<const Bf16*>(x.untyped_data());
    auto* ys = static_cast<Bf16*>(y->untyped_data());
    (p.size == 5 ? Forward<5, Bf16> : Forward<0, Bf16>)(p, xs, ys, a);
  }
  return ffi::Error::Success();
}

ffi::Error Bwd(ffi::AnyBuffer x, ffi::Buffer<ffi::U8> arg, ffi::AnyBuffer dy,
               ffi::Result<ffi::AnyBuffer> dx, int64_t size, int64_t towers,
               int64_t window, int64_t stride, int64_t pad_top,
               int64_t pad_left, float k, float scale, float beta) {
  const Params p = Read(x.dimensions(), dy.dimensions(), size, towers, window,
                        stride, pad_top, pad_left, k, scale, beta);
  if (auto e = Check(p); e.failure()) return e;
  const auto type = Floating({x.element_type(), dy.element_type(), dx->element_type()});
  if (!type) return ffi::Error::InvalidArgument(kTypeError);
  std::lock_guard<std::mutex> running(alexnet::ExecMutex());
  const uint8_t* a = arg.typed_data();
  if (*type == ffi::DataType::F32) {
    auto* xs = static_cast<const float*>(x.untyped_data());
    auto* dys = static_cast<const float*>(dy.untyped_data());
    auto* dxs = static_cast<float*>(dx->untyped_data());
    (p.size == 5 ? Backward<5, float> : Backward<0, float>)(p, xs, a, dys, dxs);
  } else {
    auto* xs = static_cast<const Bf16*>(x.untyped_data());
    auto* dys = static_cast<const Bf16*>(dy.untyped_data());
    auto* dxs = static_cast<Bf16*>(dx->untyped_data());
    (p.size == 5 ? Backward<5, Bf16> : Backward<0, Bf16>)(p, xs, a, dys, dxs);
  }
  return ffi::Error::Success();
}

}  // namespace

// How many float32 lanes the LRN's loops use (16 with AVX-512, else 1).
extern "C" int alexnet_relu_lrn_pool_lanes() { return static_cast<int>(Lanes::kWidth); }

#define ALEXNET_POOL_ATTRS   \
  .Attr<int64_t>("size")     \
      .Attr<int64_t>("towers")   \
      .Attr<int64_t>("window")   \
      .Attr<int64_t>("stride")   \
      .Attr<int64_t>("pad_top")  \
      .Attr<int64_t>("pad_left") \
      .Attr<float>("k")          \
      .Attr<float>("scale")      \
      .Attr<float>("beta")

XLA_FFI_DEFINE_HANDLER_SYMBOL(alexnet_relu_lrn_pool_fwd, Fwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::U8>>() ALEXNET_POOL_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(alexnet_relu_lrn_pool_bwd, Bwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() ALEXNET_POOL_ATTRS);
