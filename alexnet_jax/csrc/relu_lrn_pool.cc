// ReLU -> local response normalisation (optional) -> max pooling, fused, as
// XLA FFI custom calls on NHWC float32 or bfloat16 activations (computed in
// float32, as models.local_response_norm does):
//   alexnet_relu_lrn_pool_fwd  x -> (y, arg)   arg: the window tap (row-major,
//                                               uint8) each maximum came from
//   alexnet_relu_lrn_pool_bwd  (x, arg, dy) -> dx
// Each image is read once per direction and its normalised maps stay in a
// per-thread buffer, where XLA runs the three operations as several loops
// over whole arrays and keeps the LRN's intermediates for the backward pass.
//
// LRN (models.local_response_norm): b_c = a_c / (k + scale * S_c) ** beta,
// S_c = sum of a_j^2 over j in [c - size / 2, c + (size - 1) / 2] within c's
// tower of C / towers channels; size = 0 turns it off. Pooling
// (models.max_pool): windows of `window` x `window` taps every `stride`
// pixels, padded by pad_top / pad_left with -inf; ties go to the first
// maximum in row-major window order. The ReLU's gradient at 0 is 0.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <mutex>
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

// The LRN of one pixel's C channels at a time. Each channel's window is
// clipped to its tower by 0/1 masks, so that every step is one loop over the
// C channels, vectorised (with the window unrolled for kTaps = size > 0).
template <int kTaps>
class Lrn {
 public:
  explicit Lrn(const Params& p)
      : p_(p), taps_(kTaps ? kTaps : p.size), lo_(p.size / 2), hi_((p.size - 1) / 2),
        fwd_mask_(taps_ * p.c), bwd_mask_(taps_ * p.c), r_(p.c + taps_),
        u_(p.c + taps_), d_(p.c), inv_(p.c) {
    const int64_t per = p.c / p.towers;
    for (int64_t t = 0; t < taps_; ++t) {
      for (int64_t i = 0; i < p.c; ++i) {
        const int64_t f = i % per + t - lo_, b = i % per + t - hi_;
        fwd_mask_[t * p.c + i] = f >= 0 && f < per;
        bwd_mask_[t * p.c + i] = b >= 0 && b < per;
      }
    }
  }

  // out = r * d ** -beta, r = relu(x): the LRN's output.
  void Forward(const float* x, float* out) {
    Normalise(x);
    const float* r = r_.data() + lo_;
    for (int64_t i = 0; i < p_.c; ++i) out[i] = r[i] * inv_[i];
  }

  // dx from x and g, the gradient of the LRN's output:
  // dr_i = g_i inv_i - 2 beta scale r_i sum_{c: i in W(c)} g_c r_c inv_c / d_c.
  void Backward(const float* x, const float* g, float* dx) {
    Normalise(x);
    const float* r = r_.data() + lo_;
    float* u = u_.data() + hi_;  // zero-padded: hi in front, lo behind
    for (int64_t i = 0; i < p_.c; ++i) u[i] = g[i] * r[i] * inv_[i] / d_[i];
    const float two_beta_scale = 2.0f * p_.beta * p_.scale;
    const float* mask = bwd_mask_.data();
    for (int64_t i = 0; i < p_.c; ++i) {
      float s = 0.0f;
      for (int64_t t = 0; t < Taps(); ++t) s += mask[t * p_.c + i] * u_[i + t];
      const float dr = g[i] * inv_[i] - two_beta_scale * r[i] * s;
      dx[i] = x[i] > 0.0f ? dr : 0.0f;
    }
  }

 private:
  int64_t Taps() const { return kTaps ? kTaps : taps_; }

  // r_ = relu(x) (zero-padded: lo in front, hi behind), d_ = k + scale * S,
  // inv_ = d_ ** -beta (for the paper's 0.75 as models._inverse_power has it).
  void Normalise(const float* x) {
    float* r = r_.data() + lo_;
    for (int64_t i = 0; i < p_.c; ++i) r[i] = std::max(x[i], 0.0f);
    const float* mask = fwd_mask_.data();
    for (int64_t i = 0; i < p_.c; ++i) {
      float s = 0.0f;
      for (int64_t t = 0; t < Taps(); ++t) s += mask[t * p_.c + i] * (r_[i + t] * r_[i + t]);
      d_[i] = p_.k + p_.scale * s;
    }
    if (p_.beta == 0.75f) {
      for (int64_t i = 0; i < p_.c; ++i) {
        const float root = std::sqrt(d_[i]);
        inv_[i] = 1.0f / (root * std::sqrt(root));
      }
    } else {
      for (int64_t i = 0; i < p_.c; ++i) inv_[i] = std::pow(d_[i], -p_.beta);
    }
  }

  const Params& p_;
  const int64_t taps_, lo_, hi_;
  std::vector<float> fwd_mask_, bwd_mask_, r_, u_, d_, inv_;
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
        for (int64_t i = 0; i < image; ++i) b[i] = std::max(xn[i], 0.0f);
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
              const bool more = v[ch] > best[ch];
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
          lrn.Backward(xn + px * c, g.data() + px * c, dxn + px * c);
      } else {
        for (int64_t i = 0; i < image; ++i) dxn[i] = xn[i] > 0.0f ? g[i] : 0.0f;
      }
      if constexpr (!kFloat) {
        for (int64_t i = 0; i < image; ++i) dxs[n * image + i] = Narrow<T>(dxn[i]);
      }
    }
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
