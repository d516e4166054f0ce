// alexnet_momentum_update: the paper's momentum rule (optim.paper_momentum) on
// every parameter in one pass over its weights, velocity and gradient:
//   delta = lr * (g + wd * w)
//   v'    = momentum * v - delta
//   w'    = w + (nesterov ? momentum * v' - delta : v')
// Operands: lr (f32[]), then w, v, g of each parameter (float32); results: w'
// and v' of each parameter, aliased to w and v (input_output_aliases), so the
// update is written in place. Attributes: momentum, nesterov, and decay, each
// parameter's wd (0 for those the decay mask leaves out).
//
// XLA CPU computes the rule as two loops (v', then w' from v'), since it will
// not give one loop two outputs: 7 passes over the parameters (fc6 alone has
// 151 MB) against 5 here. Every operation is rounded as XLA CPU's loops round
// it: g + wd * w and momentum * v - delta as fused multiply-adds, nothing else
// contracted. The values are the same bits (tests/optim_test.py).
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace alexnet {
std::mutex& ExecMutex();  // onednn_conv.cc: one kernel call at a time
}  // namespace alexnet

namespace {

struct Leaf {
  float* w;
  float* v;
  const float* g;
  int64_t n;
  float wd;
};

// std::fma is one instruction where the CPU has FMA3, as this one does. Without
// it std::fma is exact in software while XLA would not contract: an ulp apart.
template <bool kNesterov>
__attribute__((optimize("fp-contract=off")))
void Update(const std::vector<Leaf>& leaves, float lr, float momentum) {
#pragma omp parallel
  for (const Leaf& p : leaves) {
    float* __restrict w = p.w;
    float* __restrict v = p.v;
    const float* __restrict g = p.g;
    const float wd = p.wd;
#pragma omp for simd schedule(static) nowait
    for (int64_t i = 0; i < p.n; ++i) {
      const float delta = lr * std::fma(wd, w[i], g[i]);
      const float v_new = std::fma(momentum, v[i], -delta);
      v[i] = v_new;
      w[i] = w[i] + (kNesterov ? std::fma(momentum, v_new, -delta) : v_new);
    }
  }
}

ffi::Error MomentumUpdate(ffi::RemainingArgs args, ffi::RemainingRets rets, float momentum,
                          bool nesterov, ffi::Span<const float> decay) {
  const size_t count = decay.size();
  if (args.size() != 1 + 3 * count || rets.size() != 2 * count)
    return ffi::Error::InvalidArgument(
        "momentum_update: operands lr, then w, v, g per parameter; results w', v'");
  auto lr = args.get<ffi::Buffer<ffi::F32>>(0);
  if (!lr.has_value() || lr->element_count() != 1)
    return ffi::Error::InvalidArgument("momentum_update: lr must be a float32 scalar");
  std::vector<Leaf> leaves;
  for (size_t i = 0; i < count; ++i) {
    auto w = args.get<ffi::Buffer<ffi::F32>>(1 + 3 * i);
    auto v = args.get<ffi::Buffer<ffi::F32>>(2 + 3 * i);
    auto g = args.get<ffi::Buffer<ffi::F32>>(3 + 3 * i);
    auto w_out = rets.get<ffi::Buffer<ffi::F32>>(2 * i);
    auto v_out = rets.get<ffi::Buffer<ffi::F32>>(2 * i + 1);
    if (!w.has_value() || !v.has_value() || !g.has_value() || !w_out.has_value() ||
        !v_out.has_value())
      return ffi::Error::InvalidArgument("momentum_update: every array must be float32");
    const int64_t n = w->element_count();
    if (v->element_count() != n || g->element_count() != n ||
        (*w_out)->element_count() != n || (*v_out)->element_count() != n)
      return ffi::Error::InvalidArgument("momentum_update: w, v and g must match in size");
    if ((*w_out)->typed_data() != w->typed_data() || (*v_out)->typed_data() != v->typed_data())
      return ffi::Error::InvalidArgument("momentum_update: w' and v' must alias w and v");
    leaves.push_back({w->typed_data(), v->typed_data(), g->typed_data(), n, decay[i]});
  }
  std::lock_guard<std::mutex> running(alexnet::ExecMutex());
  const float rate = *lr->typed_data();
  (nesterov ? Update<true> : Update<false>)(leaves, rate, momentum);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(alexnet_momentum_update, MomentumUpdate,
                              ffi::Ffi::Bind()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<float>("momentum")
                                  .Attr<bool>("nesterov")
                                  .Attr<ffi::Span<const float>>("decay"));
