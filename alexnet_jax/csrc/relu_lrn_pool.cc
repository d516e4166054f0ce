// ReLU -> local response normalisation (optional) -> max pooling, fused, as
// XLA FFI custom calls on NHWC float32 activations:
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
#include <limits>
#include <mutex>
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

// One pixel's C channels: r = relu(x), d = k + scale * S (window sums of r^2
// within each tower), inv = d ** -beta (for the paper's beta = 0.75 as
// models._inverse_power computes it). pad: a scratch row of C + size floats.
void Normalise(const Params& p, const float* x, float* r, float* d, float* inv,
               float* pad) {
  const int64_t c = p.c;
  for (int64_t i = 0; i < c; ++i) r[i] = std::max(x[i], 0.0f);
  if (p.size == 0) return;
  const int64_t lo = p.size / 2, hi = (p.size - 1) / 2, per = c / p.towers;
  for (int64_t t = 0; t < p.towers; ++t) {
    const float* rt = r + t * per;
    std::fill(pad, pad + lo, 0.0f);
    for (int64_t i = 0; i < per; ++i) pad[lo + i] = rt[i] * rt[i];
    std::fill(pad + lo + per, pad + lo + per + hi, 0.0f);
    float* dt = d + t * per;
    for (int64_t i = 0; i < per; ++i) dt[i] = 0.0f;
    for (int64_t j = 0; j <= lo + hi; ++j)
      for (int64_t i = 0; i < per; ++i) dt[i] += pad[i + j];
  }
  for (int64_t i = 0; i < c; ++i) d[i] = p.k + p.scale * d[i];
  if (p.beta == 0.75f) {  // vectorised: two square roots and a division
    for (int64_t i = 0; i < c; ++i) {
      const float root = std::sqrt(d[i]);
      inv[i] = 1.0f / (root * std::sqrt(root));
    }
  } else {
    for (int64_t i = 0; i < c; ++i) inv[i] = std::pow(d[i], -p.beta);
  }
}

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

ffi::Error Fwd(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
               ffi::ResultBuffer<ffi::U8> arg, int64_t size, int64_t towers,
               int64_t window, int64_t stride, int64_t pad_top,
               int64_t pad_left, float k, float scale, float beta) {
  const Params p = Read(x.dimensions(), y->dimensions(), size, towers, window,
                        stride, pad_top, pad_left, k, scale, beta);
  if (auto e = Check(p); e.failure()) return e;
  std::lock_guard<std::mutex> running(alexnet::ExecMutex());
  const float* xs = x.typed_data();
  float* ys = y->typed_data();
  uint8_t* args = arg->typed_data();
  const int64_t c = p.c, image = p.h * p.w * c, pooled = p.oh * p.ow * c;
#pragma omp parallel
  {
    std::vector<float> b(image), d(c), inv(c), pad(c + p.size), best(c);
    std::vector<uint8_t> at(c);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < p.n; ++n) {
      const float* xn = xs + n * image;
      for (int64_t px = 0; px < p.h * p.w; ++px) {
        float* bp = b.data() + px * c;
        Normalise(p, xn + px * c, bp, d.data(), inv.data(), pad.data());
        if (p.size)
          for (int64_t i = 0; i < c; ++i) bp[i] *= inv[i];
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
          std::copy(best.begin(), best.end(), ys + o);
          std::copy(at.begin(), at.end(), args + o);
        }
      }
    }
  }
  return ffi::Error::Success();
}

ffi::Error Bwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> arg,
               ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
               int64_t size, int64_t towers, int64_t window, int64_t stride,
               int64_t pad_top, int64_t pad_left, float k, float scale,
               float beta) {
  const Params p = Read(x.dimensions(), dy.dimensions(), size, towers, window,
                        stride, pad_top, pad_left, k, scale, beta);
  if (auto e = Check(p); e.failure()) return e;
  std::lock_guard<std::mutex> running(alexnet::ExecMutex());
  const float* xs = x.typed_data();
  const uint8_t* args = arg.typed_data();
  const float* dys = dy.typed_data();
  float* dxs = dx->typed_data();
  const int64_t c = p.c, image = p.h * p.w * c, pooled = p.oh * p.ow * c;
  const int64_t lo = p.size / 2, hi = (p.size - 1) / 2, per = c / p.towers;
#pragma omp parallel
  {
    // g: the gradient reaching the pooling's input; then per pixel r, d, inv
    // as in the forward pass and u = g r inv / d, summed over the mirrored
    // window: dr_i = g_i inv_i - 2 beta scale r_i sum_{c: i in W(c)} u_c.
    std::vector<float> g(image), r(c), d(c), inv(c), pad(c + p.size), u(c + p.size);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < p.n; ++n) {
      std::fill(g.begin(), g.end(), 0.0f);
      for (int64_t oi = 0; oi < p.oh; ++oi) {
        for (int64_t oj = 0; oj < p.ow; ++oj) {
          const int64_t o = n * pooled + (oi * p.ow + oj) * c;
          const float* go = dys + o;
          const uint8_t* ao = args + o;
          ForEachTap(p, oi, oj, [&](uint8_t tap, int64_t pixel) {
            float* gp = g.data() + pixel * c;
            for (int64_t ch = 0; ch < c; ++ch) gp[ch] += ao[ch] == tap ? go[ch] : 0.0f;
          });
        }
      }
      const float* xn = xs + n * image;
      float* dxn = dxs + n * image;
      for (int64_t px = 0; px < p.h * p.w; ++px) {
        const float* xp = xn + px * c;
        const float* gp = g.data() + px * c;
        float* out = dxn + px * c;
        if (p.size == 0) {
          for (int64_t i = 0; i < c; ++i) out[i] = xp[i] > 0.0f ? gp[i] : 0.0f;
          continue;
        }
        Normalise(p, xp, r.data(), d.data(), inv.data(), pad.data());
        const float two_beta_scale = 2.0f * p.beta * p.scale;
        for (int64_t t = 0; t < p.towers; ++t) {
          const int64_t o = t * per;
          // u over the tower, zero-padded so that the mirrored window
          // [i - hi, i + lo] of every channel i is in range.
          std::fill(u.begin(), u.begin() + hi, 0.0f);
          for (int64_t i = 0; i < per; ++i)
            u[hi + i] = gp[o + i] * r[o + i] * inv[o + i] / d[o + i];
          std::fill(u.begin() + hi + per, u.begin() + hi + per + lo, 0.0f);
          float* s = pad.data();  // the sums over the mirrored windows
          for (int64_t i = 0; i < per; ++i) s[i] = 0.0f;
          for (int64_t j = 0; j <= lo + hi; ++j)
            for (int64_t i = 0; i < per; ++i) s[i] += u[i + j];
          for (int64_t i = 0; i < per; ++i) {
            const float dr = gp[o + i] * inv[o + i] - two_beta_scale * r[o + i] * s[i];
            out[o + i] = xp[o + i] > 0.0f ? dr : 0.0f;
          }
        }
      }
    }
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
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>() ALEXNET_POOL_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(alexnet_relu_lrn_pool_bwd, Bwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() ALEXNET_POOL_ATTRS);
