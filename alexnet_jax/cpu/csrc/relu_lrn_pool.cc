// ReLU -> local response normalisation (optional) -> max pooling, fused, as
// XLA FFI custom calls on NHWC float32 or bfloat16 activations (computed in
// float32, as ops.local_response_norm does):
//   alexnet_relu_lrn_pool_fwd  x -> (y, arg)   arg: the window tap (row-major,
//                                               uint8) each maximum came from
//   alexnet_relu_lrn_pool_bwd  (x, arg, dy) -> dx
//   alexnet_relu_lrn_pool_bwd_bias  (x, arg, dy) -> (dx, db)   db: float32, the
//                                 sum of dx over N, H and W (the gradient of
//                                 the bias of the convolution that made x)
// Each image is read once per direction, where XLA runs the three operations
// as several loops over whole arrays and keeps the LRN's intermediates for the
// backward pass. Forward, an image goes by output rows: the input rows an
// output row pools are normalised into a per-thread ring of rows, which stays
// in the core's caches, and each window's maxima and taps are kept in
// registers. Backward, it goes by input pixels: the gradient reaching a pixel
// is gathered from the outputs whose windows hold it (in registers, in the
// outputs' order, so the sums are those of a scatter), then taken through the
// LRN and ReLU at once. In float32, dx, which the convolution's gradients read
// only later, is written around the caches (streaming stores) when its
// vectors are aligned; bfloat16 is rounded as it is stored.
//
// LRN (ops.local_response_norm): b_c = a_c / (k + scale * S_c) ** beta,
// S_c = sum of a_j^2 over j in [c - size / 2, c + (size - 1) / 2] within c's
// tower of C / towers channels; size = 0 turns it off. Pooling
// (ops.max_pool): windows of `window` x `window` taps every `stride`
// pixels, padded by pad_top / pad_left with -inf; ties go to the first
// maximum in row-major window order, and a NaN counts as a maximum (XLA's
// max passes NaNs on). The ReLU's gradient at 0 is 0.
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define ALEXNET_AVX512 1
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

// Lanes of float32 for the kernels' loops: 16 with AVX-512, else 1. Max(0, x)
// keeps a NaN x, as XLA's ReLU does. InvPow075 returns d ** -0.75 and sets
// recip = 1 / d, for d > 0. Shift<k>(p), p the start of a vector in a buffer
// padded by a vector on each side, is the vector k lanes further on (|k| < 16):
// shifted in registers, since an unaligned load of values just stored cannot
// be forwarded from the pending stores and waits for them. StoreOnce
// writes values that will not be read again soon (streaming when the vector is
// whole and aligned). Taps are the pooling's
// window taps (uint8) of the same lanes. Masked loads and stores cost more
// than plain ones on some CPUs (AMD Zen 4) even with every lane set, and
// cannot take values from pending stores: whole vectors take plain ones where
// that was measured to pay (LoadPlain, LoadWhole, the bfloat16 and tap loads
// and stores).
#ifdef ALEXNET_AVX512
struct Lanes {
  using V = __m512;
  using M = __mmask16;
  using Taps = __m128i;
  static constexpr int64_t kWidth = 16;
  static M Mask(int64_t left) {
    return left >= 16 ? static_cast<M>(0xffff) : static_cast<M>((1u << left) - 1);
  }
  static V Load(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static V LoadPlain(const float* p, M m) {
    return m == 0xffff ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
  }
  static V LoadPlain(const Bf16* p, M m) { return Load(p, m); }
  static V Load(const Bf16* p, M m) {
    const __m256i h = m == 0xffff ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                  : _mm256_maskz_loadu_epi16(m, p);
    return Cast(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static void Store(float* p, V v, M m) { _mm512_mask_storeu_ps(p, m, v); }
  // Values that bfloat16 holds exactly (the pooled maxima), as bfloat16.
  static void Store(Bf16* p, V v, M m) { StoreHalves(p, _mm512_srli_epi32(Cast(v), 16), m); }
  // Any values rounded to bfloat16 as Narrow<Bf16> rounds them.
  static void StoreRounded(Bf16* p, V v, M m) { StoreHalves(p, RoundedBits(v), m); }
  static V Rounded(V v) { return Cast(_mm512_slli_epi32(RoundedBits(v), 16)); }
  static V LoadAt(const float* p) { return _mm512_load_ps(p); }
  // Load(p, m) from memory readable for a whole vector: a masked load waits
  // for pending stores to the same place, a whole one takes their values.
  static V LoadWhole(const float* p, M m) { return _mm512_maskz_mov_ps(m, _mm512_loadu_ps(p)); }
  static V LoadAnywhere(const float* p) { return _mm512_loadu_ps(p); }
  static void StoreAnywhere(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void StoreAt(float* p, V v) { _mm512_store_ps(p, v); }
  static void StoreOnce(float* p, V v, M m) {
    if (m == 0xffff && (reinterpret_cast<uintptr_t>(p) & 63) == 0) _mm512_stream_ps(p, v);
    else _mm512_mask_storeu_ps(p, m, v);
  }
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
  static V AddWhere(M where, V a, V b) { return _mm512_mask_add_ps(a, where, a, b); }
  // Where v takes a window's maximum over from best: v greater, or v NaN and
  // best not (the first NaN stays, as XLA's max passes NaNs on).
  static M Beats(V v, V best) {
    return _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(best, best, _CMP_ORD_Q), v, best,
                                   _CMP_NLE_UQ);
  }
  static V Where(M where, V a, V b) { return _mm512_mask_mov_ps(b, where, a); }
  static Taps LoadTaps(const uint8_t* p, M m) {
    return m == 0xffff ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                       : _mm_maskz_loadu_epi8(m, p);
  }
  static void StoreTaps(uint8_t* p, Taps t, M m) { _mm_mask_storeu_epi8(p, m, t); }
  static Taps NoTaps() { return _mm_setzero_si128(); }
  static M Hits(Taps t, uint8_t tap, M m) {
    return _mm_mask_cmpeq_epi8_mask(m, t, _mm_set1_epi8(static_cast<char>(tap)));
  }
  static Taps TapWhere(M where, uint8_t tap, Taps t) {
    return _mm_mask_mov_epi8(t, where, _mm_set1_epi8(static_cast<char>(tap)));
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
  static void StoreHalves(Bf16* p, __m512i v, M m) {  // the low halves of v's lanes
    const __m256i h = _mm512_cvtepi32_epi16(v);
    if (m == 0xffff) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    else _mm256_mask_storeu_epi16(p, m, h);
  }
  static __m512i RoundedBits(V v) {  // in the low half of each lane
    const __m512i u = Cast(v), high = _mm512_srli_epi32(u, 16);
    const __m512i lsb = _mm512_and_si512(high, _mm512_set1_epi32(1));
    const __m512i even = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_mov_epi32(even, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40)));
  }
  static __m512i Cast(V v) { return _mm512_castps_si512(v); }
  static V Cast(__m512i v) { return _mm512_castsi512_ps(v); }
};
#else
struct Lanes {
  using V = float;
  using M = bool;
  using Taps = uint8_t;
  static constexpr int64_t kWidth = 1;
  static M Mask(int64_t) { return true; }
  static V Load(const float* p, M) { return *p; }
  template <typename T>
  static V LoadPlain(const T* p, M m) { return Load(p, m); }
  static V Load(const Bf16* p, M) { return Widen(*p); }
  static void Store(float* p, V v, M) { *p = v; }
  static void Store(Bf16* p, V v, M) { *p = Narrow<Bf16>(v); }
  static void StoreRounded(Bf16* p, V v, M) { *p = Narrow<Bf16>(v); }
  static V Rounded(V v) { return Widen(Narrow<Bf16>(v)); }
  static V LoadAt(const float* p) { return *p; }
  static V LoadWhole(const float* p, M) { return *p; }
  static V LoadAnywhere(const float* p) { return *p; }
  static void StoreAnywhere(float* p, V v) { *p = v; }
  static void StoreAt(float* p, V v) { *p = v; }
  static void StoreOnce(float* p, V v, M) { *p = v; }
  template <int k>
  static V Shift(const float* p) { return p[k]; }
  static V Set(float v) { return v; }
  static V Add(V a, V b) { return a + b; }
  static V Mul(V a, V b) { return a * b; }
  static V MulAdd(V a, V b, V c) { return a * b + c; }
  static V NegMulAdd(V a, V b, V c) { return c - a * b; }
  static V Max(V a, V b) { return a > b ? a : b; }
  static V IfPositive(V x, V v) { return x > 0.0f ? v : 0.0f; }
  static V AddWhere(M where, V a, V b) { return where ? a + b : a; }
  static M Beats(V v, V best) { return !(v <= best) && best == best; }
  static V Where(M where, V a, V b) { return where ? a : b; }
  static Taps LoadTaps(const uint8_t* p, M) { return *p; }
  static void StoreTaps(uint8_t* p, Taps t, M) { *p = t; }
  static Taps NoTaps() { return 0; }
  static M Hits(Taps t, uint8_t tap, M) { return t == tap; }
  static Taps TapWhere(M where, uint8_t tap, Taps t) { return where ? tap : t; }
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

// Stores a gradient dx = v as T: float32 around the caches where it can (the
// convolution's gradients read dx only later), bfloat16 rounded. If db is not
// null, also adds dx as stored to db's whole vector at the same channel
// (lanes past m hold 0).
template <typename T>
void PutGradient(T* dx, float* db, Lanes::V v, Lanes::M m) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  if constexpr (kFloat) {
    Lanes::StoreOnce(dx, v, m);
  } else {
    Lanes::StoreRounded(dx, v, m);
  }
  if (db) Lanes::StoreAnywhere(db, Lanes::Add(Lanes::LoadAnywhere(db), kFloat ? v : Lanes::Rounded(v)));
}

// The LRN of one pixel's C channels at a time, each pass over every tower
// (more independent work in flight than one tower at a time: conv1's LRN, 3
// vectors per tower, 1 ms faster per batch of 64). Each tower's squares (and,
// backward, its terms u) are stored as whole vectors in a buffer zero-padded
// between towers beyond the window's reach, so that every channel sums the
// same taps and each step is one pass of whole vectors. For kTaps = size > 0
// the taps are shifts in registers; otherwise loads.
template <int kTaps>
class Lrn {
  using L = Lanes;
  using V = L::V;
  static constexpr int64_t kW = L::kWidth;

 public:
  explicit Lrn(const Params& p)
      : p_(p), lo_(p.size / 2), hi_((p.size - 1) / 2), per_(p.c / p.towers),
        vectors_((per_ + kW - 1) / kW), pad_((std::max(lo_, hi_) + kW - 1) / kW * kW),
        stride_(vectors_ * kW + pad_), sq_(Buffer()), u_(Buffer()), ginv_(Buffer()) {}

  // out = r * d ** -beta, r = relu(x): the LRN's output (rounded to In, the
  // type of x).
  template <typename In>
  void Forward(const In* x, float* out) {
    Squares(x);
    ForEachVector([&](int64_t t, int64_t j, int64_t c, typename L::M m) {
      V recip;
      const V b = L::Mul(Relu(x + c, m), Inverse(t, j, &recip));
      L::Store(out + c, std::is_same_v<In, float> ? b : L::Rounded(b), m);
    });
  }

  // dx from x and g, the gradient of the LRN's output:
  // dr_i = g_i inv_i - 2 beta scale r_i sum_{c: i in W(c)} u_c, u_c = g_c r_c inv_c / d_c.
  // g is readable for a whole vector past its last channel; db, if not null,
  // is summed into as PutGradient does.
  template <typename T>
  void Backward(const T* x, const float* g, T* dx, float* db) {
    Squares(x);
    ForEachVector([&](int64_t t, int64_t j, int64_t c, typename L::M m) {
      V recip;
      const V ginv = L::Mul(L::LoadWhole(g + c, m), Inverse(t, j, &recip));
      L::StoreAt(At(ginv_, t, j), ginv);
      L::StoreAt(At(u_, t, j), L::Mul(L::Mul(ginv, Relu(x + c, m)), recip));
    });
    const V two_beta_scale = L::Set(2.0f * p_.beta * p_.scale);
    ForEachVector([&](int64_t t, int64_t j, int64_t c, typename L::M m) {
      const V xc = L::Load(x + c, m);
      // u_c for c in [i - hi, i + lo]: the channels whose windows hold i.
      const float* u = At(u_, t, j);
      const V s = kTaps ? Sum<-(kTaps - 1) / 2, kTaps / 2>(u) : Sum(u, -hi_, lo_);
      const V dr = L::NegMulAdd(L::Mul(two_beta_scale, L::Max(L::Set(0.0f), xc)), s,
                                L::LoadAt(At(ginv_, t, j)));
      PutGradient(dx + c, db ? db + c : nullptr, L::IfPositive(xc, dr), m);
    });
  }

 private:
  using Aligned = std::vector<float, AlignedAllocator<float>>;
  // Every tower's vectors, each tower after a zero pad and the last before one.
  Aligned Buffer() const { return Aligned(p_.towers * stride_ + pad_, 0.0f); }
  float* At(Aligned& b, int64_t t, int64_t j) const {
    return b.data() + pad_ + t * stride_ + j * kW;
  }

  // f(t, j, c, m) for vector j of tower t, which starts at channel c and has
  // lanes m: all towers in each pass, for more independent work in flight.
  template <typename F>
  void ForEachVector(F f) const {
    for (int64_t t = 0; t < p_.towers; ++t) {
      for (int64_t j = 0; j < vectors_; ++j) f(t, j, t * per_ + j * kW, L::Mask(per_ - j * kW));
    }
  }

  template <typename In>
  static V Relu(const In* x, typename L::M m) { return L::Max(L::Set(0.0f), L::Load(x, m)); }

  // sq_ = relu(x) ** 2, zero beyond each tower.
  template <typename In>
  void Squares(const In* x) {
    ForEachVector([&](int64_t t, int64_t j, int64_t c, typename L::M m) {
      const V r = Relu(x + c, m);
      L::StoreAt(At(sq_, t, j), L::Mul(r, r));
    });
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

  // d ** -beta and 1 / d, d = k + scale * S, for vector j of tower t in sq_.
  V Inverse(int64_t t, int64_t j, V* recip) {
    const float* sq = At(sq_, t, j);
    const V s = kTaps ? Sum<-kTaps / 2, (kTaps - 1) / 2>(sq) : Sum(sq, -lo_, hi_);
    const V d = L::MulAdd(L::Set(p_.scale), s, L::Set(p_.k));
    // The paper's beta, computed as d^-0.5 * d^-0.25.
    return p_.beta == 0.75f ? L::InvPow075(d, recip) : L::InvPow(d, p_.beta, recip);
  }

  const Params& p_;
  const int64_t lo_, hi_, per_, vectors_, pad_, stride_;
  Aligned sq_, u_, ginv_;
};

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

// Max pooling of output (oi, oj): rows[ti] points to the normalised input
// row of window row ti (nullptr outside the image); the maxima go to y,
// their taps to arg.
template <typename T>
void PoolWindow(const Params& p, const float* const* rows, int64_t oj, T* y, uint8_t* arg) {
  using L = Lanes;
  const int64_t j0 = oj * p.stride - p.pad_left;
  const int64_t tj0 = std::max<int64_t>(0, -j0), tj1 = std::min(p.window, p.w - j0);
#ifdef ALEXNET_AVX512
  // 16 channels at a time, the maxima and their taps held in registers.
  for (int64_t ch = 0; ch < p.c; ch += L::kWidth) {
    const auto m = L::Mask(p.c - ch);
    L::V best = L::Set(-std::numeric_limits<float>::infinity());
    L::Taps at = L::NoTaps();
    for (int64_t ti = 0; ti < p.window; ++ti) {
      if (!rows[ti]) continue;
      const float* v = rows[ti] + j0 * p.c + ch;
      for (int64_t tj = tj0; tj < tj1; ++tj) {
        const L::V x = L::Load(v + tj * p.c, m);
        const auto more = L::Beats(x, best);
        best = L::Where(more, x, best);
        at = L::TapWhere(more, static_cast<uint8_t>(ti * p.window + tj), at);
      }
    }
    L::Store(y + ch, best, m);
    L::StoreTaps(arg + ch, at, m);
  }
#else
  // Loops over the channels, for the compiler to vectorise.
  float best[256];
  for (int64_t ch0 = 0; ch0 < p.c; ch0 += 256) {
    const int64_t n = std::min<int64_t>(256, p.c - ch0);
    std::fill(best, best + n, -std::numeric_limits<float>::infinity());
    std::fill(arg + ch0, arg + ch0 + n, 0);
    for (int64_t ti = 0; ti < p.window; ++ti) {
      if (!rows[ti]) continue;
      for (int64_t tj = tj0; tj < tj1; ++tj) {
        const float* v = rows[ti] + (j0 + tj) * p.c + ch0;
        const auto tap = static_cast<uint8_t>(ti * p.window + tj);
        for (int64_t ch = 0; ch < n; ++ch) {
          const bool more = L::Beats(v[ch], best[ch]);
          best[ch] = more ? v[ch] : best[ch];
          arg[ch0 + ch] = more ? tap : arg[ch0 + ch];
        }
      }
    }
    for (int64_t ch = 0; ch < n; ++ch) y[ch0 + ch] = Narrow<T>(best[ch]);
  }
#endif
}

// The outputs along one axis whose windows hold each input index i:
// [first[i], last[i]].
struct Reach {
  std::vector<int64_t> first, last;
  Reach(int64_t inputs, int64_t pad, int64_t window, int64_t stride, int64_t outputs)
      : first(inputs), last(inputs) {
    for (int64_t i = 0; i < inputs; ++i) {
      first[i] = std::max<int64_t>(0, (i + pad - window + stride) / stride);
      last[i] = std::min(outputs - 1, (i + pad) / stride);
    }
  }
};

// g = the gradient reaching input pixel (i, j) of one image from the pooling:
// the sum of dy over the outputs [oi0, oi1] x [oj0, oj1] whose maximum came
// from the pixel, in the outputs' row-major order. Each vector of channels
// sums in a register, its dy loaded whole (ahead of the comparisons).
template <typename T>
void PoolGradient(const Params& p, const T* dy, const uint8_t* arg, int64_t i, int64_t j,
                  int64_t oi0, int64_t oi1, int64_t oj0, int64_t oj1, float* g) {
  using L = Lanes;
  int64_t at[256];
  uint8_t taps[256];
  int64_t reach = 0;
  for (int64_t oi = oi0; oi <= oi1; ++oi) {
    for (int64_t oj = oj0; oj <= oj1; ++oj, ++reach) {
      at[reach] = (oi * p.ow + oj) * p.c;
      taps[reach] = static_cast<uint8_t>((i + p.pad_top - oi * p.stride) * p.window + j +
                                         p.pad_left - oj * p.stride);
    }
  }
  for (int64_t ch = 0; ch < p.c; ch += L::kWidth) {
    const auto m = L::Mask(p.c - ch);
    L::V sum = L::Set(0.0f);
    for (int64_t r = 0; r < reach; ++r) {
      const auto hit = L::Hits(L::LoadTaps(arg + at[r] + ch, m), taps[r], m);
      sum = L::AddWhere(hit, sum, L::LoadPlain(dy + at[r] + ch, m));
    }
    L::StoreAt(g + ch, sum);
  }
}

using Aligned = std::vector<float, AlignedAllocator<float>>;

// Each image by output rows: the `window` input rows an output row reads are
// normalised into a ring of rows (input row i in slot i % window), which
// stays in the core's caches while it is pooled.
template <int kTaps, typename T>
void Forward(const Params& p, const T* xs, T* ys, uint8_t* args) {
  const int64_t c = p.c, row = p.w * c, image = p.h * row, pooled = p.oh * p.ow * c;
#pragma omp parallel
  {
    Aligned ring(p.window * row);
    std::vector<const float*> rows(p.window);
    Lrn<kTaps> lrn(p);
    const auto slot = [&](int64_t i) { return ring.data() + i % p.window * row; };
#pragma omp for schedule(static)
    for (int64_t n = 0; n < p.n; ++n) {
      int64_t next = 0;  // the next input row to normalise
      for (int64_t oi = 0; oi < p.oh; ++oi) {
        const int64_t last = std::min(p.h - 1, oi * p.stride + p.window - 1 - p.pad_top);
        for (next = std::max(next, oi * p.stride - p.pad_top); next <= last; ++next) {
          const T* x = xs + n * image + next * row;
          float* b = slot(next);
          if (p.size) {
            // Rounded to T: the pooling sees the ties XLA's would.
            for (int64_t px = 0; px < p.w; ++px) lrn.Forward(x + px * c, b + px * c);
          } else {
            for (int64_t e = 0; e < row; e += Lanes::kWidth) {
              const auto m = Lanes::Mask(row - e);
              Lanes::Store(b + e, Lanes::Max(Lanes::Set(0.0f), Lanes::Load(x + e, m)), m);
            }
          }
        }
        for (int64_t ti = 0; ti < p.window; ++ti) {
          const int64_t i = oi * p.stride + ti - p.pad_top;
          rows[ti] = i >= 0 && i < p.h ? slot(i) : nullptr;
        }
        for (int64_t oj = 0; oj < p.ow; ++oj) {
          const int64_t o = n * pooled + (oi * p.ow + oj) * c;
          PoolWindow(p, rows.data(), oj, ys + o, args + o);
        }
      }
    }
  }
}

// Each input pixel in turn: its gradient from the pooling (gathered from the
// outputs that reach it), then through the LRN and ReLU. db, if not null,
// gets the sum of dx over N, H and W: per image, then per thread, then over
// the threads in their order (the same bits on every run with as many
// threads).
template <int kTaps, typename T>
void Backward(const Params& p, const T* xs, const uint8_t* args, const T* dys, T* dxs,
              float* db) {
  const int64_t c = p.c, image = p.h * p.w * c, pooled = p.oh * p.ow * c;
  // Per-channel buffers in whole vectors and one more (a tower's last vector
  // may start mid-vector).
  const int64_t padded = (c + Lanes::kWidth - 1) / Lanes::kWidth * Lanes::kWidth + Lanes::kWidth;
  std::vector<Aligned> thread_dbs(db ? omp_get_max_threads() : 0, Aligned(padded, 0.0f));
#pragma omp parallel
  {
    Aligned g(padded), image_db(db ? padded : 0);  // one pixel's gradient; one image's db
    float* to = db ? image_db.data() : nullptr;
    Lrn<kTaps> lrn(p);
    const Reach down(p.h, p.pad_top, p.window, p.stride, p.oh);
    const Reach across(p.w, p.pad_left, p.window, p.stride, p.ow);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < p.n; ++n) {
      std::fill(image_db.begin(), image_db.end(), 0.0f);
      for (int64_t i = 0; i < p.h; ++i) {
        for (int64_t j = 0; j < p.w; ++j) {
          const int64_t at = n * image + (i * p.w + j) * c;
          PoolGradient(p, dys + n * pooled, args + n * pooled, i, j, down.first[i],
                       down.last[i], across.first[j], across.last[j], g.data());
          if (p.size) {
            lrn.Backward(xs + at, g.data(), dxs + at, to);
          } else {
            for (int64_t ch = 0; ch < c; ch += Lanes::kWidth) {
              const auto m = Lanes::Mask(c - ch);
              const auto xi = Lanes::Load(xs + at + ch, m);
              PutGradient(dxs + at + ch, to ? to + ch : nullptr,
                          Lanes::IfPositive(xi, Lanes::LoadAt(g.data() + ch)), m);
            }
          }
        }
      }
      if (db) {
        float* sum = thread_dbs[omp_get_thread_num()].data();
        for (int64_t ch = 0; ch < c; ++ch) sum[ch] += image_db[ch];
      }
    }
#ifdef ALEXNET_AVX512
    _mm_sfence();
#endif
  }
  if (db) {
    std::fill(db, db + c, 0.0f);
    for (const Aligned& sum : thread_dbs)
      for (int64_t ch = 0; ch < c; ++ch) db[ch] += sum[ch];
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

// The backward pass; db (db_count float32 values, one per channel) or nullptr.
ffi::Error RunBwd(ffi::AnyBuffer x, ffi::Buffer<ffi::U8> arg, ffi::AnyBuffer dy,
                  ffi::Result<ffi::AnyBuffer> dx, float* db, size_t db_count, int64_t size,
                  int64_t towers, int64_t window, int64_t stride, int64_t pad_top,
                  int64_t pad_left, float k, float scale, float beta) {
  const Params p = Read(x.dimensions(), dy.dimensions(), size, towers, window,
                        stride, pad_top, pad_left, k, scale, beta);
  if (auto e = Check(p); e.failure()) return e;
  if (db && db_count != static_cast<size_t>(p.c))
    return ffi::Error::InvalidArgument("relu_lrn_pool: db needs one value per channel");
  const auto type = Floating({x.element_type(), dy.element_type(), dx->element_type()});
  if (!type) return ffi::Error::InvalidArgument(kTypeError);
  std::lock_guard<std::mutex> running(alexnet::ExecMutex());
  const uint8_t* a = arg.typed_data();
  if (*type == ffi::DataType::F32) {
    auto* xs = static_cast<const float*>(x.untyped_data());
    auto* dys = static_cast<const float*>(dy.untyped_data());
    auto* dxs = static_cast<float*>(dx->untyped_data());
    (p.size == 5 ? Backward<5, float> : Backward<0, float>)(p, xs, a, dys, dxs, db);
  } else {
    auto* xs = static_cast<const Bf16*>(x.untyped_data());
    auto* dys = static_cast<const Bf16*>(dy.untyped_data());
    auto* dxs = static_cast<Bf16*>(dx->untyped_data());
    (p.size == 5 ? Backward<5, Bf16> : Backward<0, Bf16>)(p, xs, a, dys, dxs, db);
  }
  return ffi::Error::Success();
}

ffi::Error Bwd(ffi::AnyBuffer x, ffi::Buffer<ffi::U8> arg, ffi::AnyBuffer dy,
               ffi::Result<ffi::AnyBuffer> dx, int64_t size, int64_t towers,
               int64_t window, int64_t stride, int64_t pad_top,
               int64_t pad_left, float k, float scale, float beta) {
  return RunBwd(x, arg, dy, dx, nullptr, 0, size, towers, window, stride, pad_top, pad_left,
                k, scale, beta);
}

ffi::Error BwdBias(ffi::AnyBuffer x, ffi::Buffer<ffi::U8> arg, ffi::AnyBuffer dy,
                   ffi::Result<ffi::AnyBuffer> dx, ffi::ResultBuffer<ffi::F32> db,
                   int64_t size, int64_t towers, int64_t window, int64_t stride,
                   int64_t pad_top, int64_t pad_left, float k, float scale, float beta) {
  return RunBwd(x, arg, dy, dx, db->typed_data(), db->element_count(), size, towers, window,
                stride, pad_top, pad_left, k, scale, beta);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(alexnet_relu_lrn_pool_bwd_bias, BwdBias,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>() ALEXNET_POOL_ATTRS);
