// Convolutions for XLA CPU through oneDNN, as XLA FFI custom calls.
//
// Three handlers, all on NHWC activations and HWIO kernels (the layout of
// ops.conv_nhwc), float32 or bfloat16, explicit padding, and `groups`
// feature groups (group g: input channels [g C/G, (g+1) C/G), output channels
// [g O/G, (g+1) O/G), the kernel's I axis holding C/G channels):
//   alexnet_onednn_conv_fwd          y  = conv(x, w)
//   alexnet_onednn_conv_fwd_bias     y  = conv(x, w) + b, the bias added by
//                                    oneDNN's kernels (a separate pass would
//                                    read and write y once more)
//   alexnet_onednn_conv_bwd_data     dx = conv_transpose(dy, w)
//   alexnet_onednn_conv_bwd_weights  dw = correlation of x and dy
// oneDNN picks its own blocked kernel layout; kernels are reordered to and
// from HWIO around each call. Primitives are built once per shape and cached.
// The attribute `algorithm` chooses oneDNN's direct kernels (0) or its
// Winograd F(4x4, 3x3) kernels (1, float32 3x3 stride-1 layers; other
// geometries, or ones oneDNN declines, keep the direct kernels). The Winograd
// kernels work on channel-blocked activations, so each call reorders its
// activations from and to NHWC, one feature group at a time (oneDNN 2.6 runs
// them ungrouped).
//
// One call runs at a time (alexnet::ExecMutex), each on all of OpenMP's threads. XLA
// runs independent operations on several threads at once; Debian's oneDNN
// 2.6 (GNU OpenMP) hung in the Fashion-MNIST step when two towers' kernel
// gradients ran concurrently, and two teams would share the cores anyway.
#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace alexnet {
// Held by every call of the library's kernels (relu_lrn_pool.cc too).
std::mutex& ExecMutex() {
  static std::mutex mutex;
  return mutex;
}
}  // namespace alexnet

namespace {

enum Kind : int64_t { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

// kind, dtype, N, H, W, C, KH, KW, O, OH, OW, stride h/w, pads t/b/l/r, groups,
// bias, algorithm
using Key = std::array<int64_t, 20>;

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow;
  int64_t sh, sw, pt, pb, pl, pr, groups;
  bool bias = false;      // the forward pass adds b
  bool winograd = false;  // oneDNN's Winograd kernels, one group at a time
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Entry {
  dnnl::primitive conv;
  dnnl::memory::desc user_src, user_wei, user_dst;  // NHWC / HWIO views
  dnnl::memory::desc bias;                           // (O,) if Geometry::bias
  dnnl::memory::desc prim_wei;                       // oneDNN's kernel layout
  std::optional<dnnl::reorder> wei_reorder;          // HWIO <-> prim_wei
  std::string impl;
  dnnl::memory::desc scratch;  // the scratch memory a call gives the primitive
  // Winograd only: the primitive is one group's, user_* are one group's
  // views into the whole arrays (advanced by group_* elements per group), and
  // the activations are reordered to and from oneDNN's layouts prim_*.
  bool per_group = false;
  dnnl::memory::desc prim_src, prim_dst;
  int64_t group_src = 0, group_wei = 0, group_dst = 0;
};

// ScratchMemory: every primitive gets its scratch memory from the call that
// runs it (scratchpad_mode::user, allocated per call; `scratch` in Entry).
// oneDNN's own (scratchpad_mode::library) is, for some kernels (the Winograd
// ones, and the GEMM-based kernel gradients it picks on CPUs without AVX2), a
// buffer per thread, which oneDNN requires to be the thread that built the
// primitive. XLA runs a call on whichever of its threads is free, and such a
// primitive built on another thread crashed. Per call, the step was as fast.

std::mutex cache_mutex;
std::map<Key, std::shared_ptr<Entry>>& Cache() {
  static auto* cache = new std::map<Key, std::shared_ptr<Entry>>();
  return *cache;
}

// The Winograd primitive for one feature group, or nullptr where oneDNN has
// no Winograd kernel for the geometry.
std::shared_ptr<Entry> BuildWinograd(Kind kind, dnnl::memory::data_type dt,
                                     const Geometry& g) {
  using dnnl::memory;
  auto e = std::make_shared<Entry>();
  const int64_t cg = g.c / g.groups, og = g.o / g.groups;
  // One group's NHWC activations and HWIO kernel, strided within the whole.
  e->user_src = memory::desc({g.n, cg, g.h, g.w}, dt, memory::dims{g.h * g.w * g.c, 1, g.w * g.c, g.c});
  e->user_dst = memory::desc({g.n, og, g.oh, g.ow}, dt,
                             memory::dims{g.oh * g.ow * g.o, 1, g.ow * g.o, g.o});
  e->user_wei = memory::desc({og, cg, g.kh, g.kw}, dt,
                             memory::dims{1, g.o, g.kw * cg * g.o, cg * g.o});
  e->group_src = cg;
  e->group_dst = og;
  e->group_wei = og;
  e->per_group = true;
  if (g.bias) e->bias = memory::desc({og}, dt, memory::format_tag::a);
  const memory::desc src_any({g.n, cg, g.h, g.w}, dt, memory::format_tag::any);
  const memory::desc dst_any({g.n, og, g.oh, g.ow}, dt, memory::format_tag::any);
  const memory::desc wei_any({og, cg, g.kh, g.kw}, dt, memory::format_tag::any);
  const memory::dims strides = {g.sh, g.sw}, pad_l = {g.pt, g.pl}, pad_r = {g.pb, g.pr};
  const auto wino = dnnl::algorithm::convolution_winograd;
  auto& eng = Engine();
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // see ScratchMemory
  try {
    dnnl::convolution_forward::primitive_desc fwd_pd(
        dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, wino, src_any,
                                        wei_any, e->bias, dst_any, strides, pad_l, pad_r),
        attr, eng);
    // The primitive and oneDNN's layouts of its activations (x or dx, y or
    // dy) and kernel (w or dw); RunPerGroup reorders to and from them.
    auto take = [&](dnnl::primitive conv, const dnnl::primitive_desc& pd, memory::desc src,
                    memory::desc dst, memory::desc wei) {
      e->conv = conv;
      e->impl = pd.impl_info_str();
      e->scratch = pd.scratchpad_desc();
      e->prim_src = src, e->prim_dst = dst, e->prim_wei = wei;
    };
    if (kind == kFwd) {
      take(dnnl::convolution_forward(fwd_pd), fwd_pd, fwd_pd.src_desc(), fwd_pd.dst_desc(),
           fwd_pd.weights_desc());
    } else if (kind == kBwdData) {
      dnnl::convolution_backward_data::primitive_desc pd(
          dnnl::convolution_backward_data::desc(wino, src_any, wei_any, dst_any, strides,
                                                pad_l, pad_r),
          attr, eng, fwd_pd);
      take(dnnl::convolution_backward_data(pd), pd, pd.diff_src_desc(), pd.diff_dst_desc(),
           pd.weights_desc());
    } else {
      dnnl::convolution_backward_weights::primitive_desc pd(
          dnnl::convolution_backward_weights::desc(wino, src_any, wei_any, dst_any, strides,
                                                   pad_l, pad_r),
          attr, eng, fwd_pd);
      take(dnnl::convolution_backward_weights(pd), pd, pd.src_desc(), pd.diff_dst_desc(),
           pd.diff_weights_desc());
    }
  } catch (const dnnl::error&) {
    return nullptr;  // no Winograd kernel here: the direct ones run instead
  }
  return e;
}

std::shared_ptr<Entry> Build(Kind kind, dnnl::memory::data_type dt,
                             const Geometry& g) {
  if (g.winograd) {
    if (auto e = BuildWinograd(kind, dt, g)) return e;
  }
  using tag = dnnl::memory::format_tag;
  using dnnl::memory;
  auto e = std::make_shared<Entry>();
  memory::dims src_dims = {g.n, g.c, g.h, g.w};
  memory::dims dst_dims = {g.n, g.o, g.oh, g.ow};
  memory::dims strides = {g.sh, g.sw};
  memory::dims pad_l = {g.pt, g.pl}, pad_r = {g.pb, g.pr};
  e->user_src = memory::desc(src_dims, dt, tag::nhwc);
  e->user_dst = memory::desc(dst_dims, dt, tag::nhwc);
  memory::dims wei_dims;
  if (g.groups == 1) {
    wei_dims = {g.o, g.c, g.kh, g.kw};
    e->user_wei = memory::desc(wei_dims, dt, tag::hwio);
  } else {  // (G, O/G, I/G, KH, KW) over HWIO memory whose O axis is (G, O/G)
    const int64_t og = g.o / g.groups, ig = g.c / g.groups;
    wei_dims = {g.groups, og, ig, g.kh, g.kw};
    e->user_wei = memory::desc(wei_dims, dt,
                               memory::dims{og, 1, g.o, g.kw * ig * g.o, ig * g.o});
  }
  memory::desc wei_any(wei_dims, dt, tag::any);
  if (g.bias) e->bias = memory::desc({g.o}, dt, tag::a);
  auto& eng = Engine();
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // see ScratchMemory
  // A zero bias descriptor leaves the bias out.
  dnnl::convolution_forward::desc fwd_d(
      dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      e->user_src, wei_any, e->bias, e->user_dst, strides, pad_l, pad_r);
  dnnl::convolution_forward::primitive_desc fwd_pd(fwd_d, attr, eng);
  // Kernels are reordered from HWIO before the forward pass and the input
  // gradient, and the kernel gradient back to HWIO after it.
  auto finish = [&](dnnl::primitive conv, const dnnl::primitive_desc& pd,
                    const memory::desc& prim_wei, bool from_user) {
    e->conv = conv;
    e->impl = pd.impl_info_str();
    e->prim_wei = prim_wei;
    e->scratch = pd.scratchpad_desc();
    if (prim_wei == e->user_wei) return;
    memory user(e->user_wei, eng), prim(prim_wei, eng);
    e->wei_reorder = from_user ? dnnl::reorder(user, prim) : dnnl::reorder(prim, user);
  };
  if (kind == kFwd) {
    finish(dnnl::convolution_forward(fwd_pd), fwd_pd, fwd_pd.weights_desc(), true);
  } else if (kind == kBwdData) {
    dnnl::convolution_backward_data::desc d(
        dnnl::algorithm::convolution_direct, e->user_src, wei_any, e->user_dst,
        strides, pad_l, pad_r);
    dnnl::convolution_backward_data::primitive_desc pd(d, attr, eng, fwd_pd);
    finish(dnnl::convolution_backward_data(pd), pd, pd.weights_desc(), true);
  } else {
    dnnl::convolution_backward_weights::desc d(
        dnnl::algorithm::convolution_direct, e->user_src, wei_any, e->user_dst,
        strides, pad_l, pad_r);
    dnnl::convolution_backward_weights::primitive_desc pd(d, attr, eng, fwd_pd);
    finish(dnnl::convolution_backward_weights(pd), pd, pd.diff_weights_desc(), false);
  }
  return e;
}

std::shared_ptr<Entry> Lookup(Kind kind, dnnl::memory::data_type dt,
                              const Geometry& g) {
  Key key = {kind, static_cast<int64_t>(dt), g.n, g.h, g.w, g.c, g.kh, g.kw,
             g.o, g.oh, g.ow, g.sh, g.sw, g.pt, g.pb, g.pl, g.pr, g.groups, g.bias,
             g.winograd};
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto& cache = Cache();
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto e = Build(kind, dt, g);
  cache.emplace(key, e);
  return e;
}

// A Winograd entry's call: for each group, the activations and kernel
// reordered into oneDNN's layouts, the primitive, and the result reordered
// back into its place in the whole NHWC or HWIO array. a, b and out as in
// Run; bias: the forward pass's b or nullptr.
void RunPerGroup(const Entry& e, Kind kind, int64_t groups, size_t esize, char* a, char* b,
                 char* out, char* bias, dnnl::stream& s) {
  using dnnl::memory;
  auto& eng = Engine();
  auto into = [&](const memory::desc& from, char* p, const memory::desc& to) {
    memory user(from, eng, p), prim(to, eng);
    dnnl::reorder(user, prim).execute(s, user, prim);
    return prim;
  };
  auto back = [&](memory prim, const memory::desc& to, char* p) {
    memory user(to, eng, p);
    dnnl::reorder(prim, user).execute(s, prim, user);
  };
  memory scratch(e.scratch, eng);
  for (int64_t gi = 0; gi < groups; ++gi) {
    // This group's place in the whole arrays: x or dx, y or dy, w or dw.
    const auto at = [&](char* p, int64_t per_group) { return p + gi * per_group * esize; };
    char* src = at(kind == kBwdData ? out : a, e.group_src);
    char* dst = at(kind == kFwd ? out : kind == kBwdData ? a : b, e.group_dst);
    char* wei = at(kind == kBwdWeights ? out : b, e.group_wei);
    if (kind == kFwd) {
      memory x = into(e.user_src, src, e.prim_src), w = into(e.user_wei, wei, e.prim_wei);
      memory y(e.prim_dst, eng);
      std::unordered_map<int, memory> args = {
          {DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, y},
          {DNNL_ARG_SCRATCHPAD, scratch}};
      if (bias) args[DNNL_ARG_BIAS] = memory(e.bias, eng, at(bias, e.group_dst));
      e.conv.execute(s, args);
      back(y, e.user_dst, dst);
    } else if (kind == kBwdData) {
      memory dy = into(e.user_dst, dst, e.prim_dst), w = into(e.user_wei, wei, e.prim_wei);
      memory dx(e.prim_src, eng);
      e.conv.execute(s, {{DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DIFF_SRC, dx},
                         {DNNL_ARG_SCRATCHPAD, scratch}});
      back(dx, e.user_src, src);
    } else {
      memory x = into(e.user_src, src, e.prim_src), dy = into(e.user_dst, dst, e.prim_dst);
      memory dw(e.prim_wei, eng);
      e.conv.execute(s, {{DNNL_ARG_SRC, x}, {DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_DIFF_WEIGHTS, dw},
                         {DNNL_ARG_SCRATCHPAD, scratch}});
      back(dw, e.user_wei, wei);
    }
  }
}

std::optional<dnnl::memory::data_type> DnnlType(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return dnnl::memory::data_type::f32;
    case ffi::DataType::BF16: return dnnl::memory::data_type::bf16;
    default: return std::nullopt;
  }
}

// a: NHWC activations (x or dy), b: the other operand, out: the result;
// bias: the forward pass's b, if any.
ffi::Error Run(Kind kind, ffi::AnyBuffer a, ffi::AnyBuffer b,
               ffi::Result<ffi::AnyBuffer> out, std::optional<ffi::AnyBuffer> bias,
               int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
               int64_t pr, int64_t groups, int64_t algorithm) {
  auto dt = DnnlType(a.element_type());
  if (!dt || b.element_type() != a.element_type() ||
      out->element_type() != a.element_type() ||
      (bias && bias->element_type() != a.element_type()))
    return ffi::Error::InvalidArgument(
        "onednn conv: operands must all be float32 or all bfloat16");
  if (a.dimensions().size() != 4 || b.dimensions().size() != 4 ||
      out->dimensions().size() != 4)
    return ffi::Error::InvalidArgument("onednn conv: operands must be rank 4");
  Geometry g;
  auto ad = a.dimensions(), bd = b.dimensions(), od = out->dimensions();
  if (kind == kFwd) {  // a = x (NHWC), b = w (HWIO), out = y (NHWC)
    g = {ad[0], ad[1], ad[2], ad[3], bd[0], bd[1], bd[3], od[1], od[2]};
  } else if (kind == kBwdData) {  // a = dy, b = w, out = dx
    g = {od[0], od[1], od[2], od[3], bd[0], bd[1], bd[3], ad[1], ad[2]};
  } else {  // a = x, b = dy, out = dw (HWIO)
    g = {ad[0], ad[1], ad[2], ad[3], od[0], od[1], od[3], bd[1], bd[2]};
  }
  g.sh = sh; g.sw = sw; g.pt = pt; g.pb = pb; g.pl = pl; g.pr = pr;
  g.groups = groups;
  g.bias = bias.has_value();
  if (algorithm != 0 && algorithm != 1)
    return ffi::Error::InvalidArgument("onednn conv: algorithm must be 0 (direct) or 1 (Winograd)");
  g.winograd = algorithm == 1 && *dt == dnnl::memory::data_type::f32 && g.kh == 3 &&
               g.kw == 3 && g.sh == 1 && g.sw == 1;
  if (groups < 1 || g.c % groups || g.o % groups)
    return ffi::Error::InvalidArgument("onednn conv: channels do not split into groups");
  if (bias && (bias->dimensions().size() != 1 || bias->dimensions()[0] != g.o))
    return ffi::Error::InvalidArgument("onednn conv: the bias must have one value per output channel");
  try {
    auto e = Lookup(kind, *dt, g);
    std::lock_guard<std::mutex> running(alexnet::ExecMutex());
    auto& eng = Engine();
    dnnl::stream s(eng);
    using dnnl::memory;
    if (e->per_group) {
      const size_t esize = *dt == memory::data_type::f32 ? 4 : 2;
      RunPerGroup(*e, kind, g.groups, esize, static_cast<char*>(a.untyped_data()),
                  static_cast<char*>(b.untyped_data()), static_cast<char*>(out->untyped_data()),
                  bias ? static_cast<char*>(bias->untyped_data()) : nullptr, s);
    } else if (kind == kFwd || kind == kBwdData) {
      memory scratch(e->scratch, eng);
      memory act(kind == kFwd ? e->user_src : e->user_dst, eng,
                 a.untyped_data());
      memory wei(e->user_wei, eng, b.untyped_data());
      memory res(kind == kFwd ? e->user_dst : e->user_src, eng,
                 out->untyped_data());
      memory pw = wei;
      if (e->wei_reorder) {
        pw = memory(e->prim_wei, eng);
        e->wei_reorder->execute(s, wei, pw);
      }
      if (kind == kFwd && bias)
        e->conv.execute(s, {{DNNL_ARG_SRC, act}, {DNNL_ARG_WEIGHTS, pw},
                            {DNNL_ARG_BIAS, memory(e->bias, eng, bias->untyped_data())},
                            {DNNL_ARG_DST, res}, {DNNL_ARG_SCRATCHPAD, scratch}});
      else if (kind == kFwd)
        e->conv.execute(s, {{DNNL_ARG_SRC, act}, {DNNL_ARG_WEIGHTS, pw},
                            {DNNL_ARG_DST, res}, {DNNL_ARG_SCRATCHPAD, scratch}});
      else
        e->conv.execute(s, {{DNNL_ARG_DIFF_DST, act}, {DNNL_ARG_WEIGHTS, pw},
                            {DNNL_ARG_DIFF_SRC, res}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      memory scratch(e->scratch, eng);
      memory src(e->user_src, eng, a.untyped_data());
      memory ddst(e->user_dst, eng, b.untyped_data());
      memory dw(e->user_wei, eng, out->untyped_data());
      memory pdw = dw;
      if (e->wei_reorder) pdw = memory(e->prim_wei, eng);
      e->conv.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, ddst},
                          {DNNL_ARG_DIFF_WEIGHTS, pdw}, {DNNL_ARG_SCRATCHPAD, scratch}});
      if (e->wei_reorder) e->wei_reorder->execute(s, pdw, dw);
    }
    s.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("onednn conv: ") + err.what());
  }
  return ffi::Error::Success();
}

#define ALEXNET_BIND(ARGS_AND_RETS)                                         \
  ffi::Ffi::Bind() ARGS_AND_RETS                                            \
      .Attr<int64_t>("stride_h")                                            \
      .Attr<int64_t>("stride_w")                                            \
      .Attr<int64_t>("pad_top")                                             \
      .Attr<int64_t>("pad_bottom")                                          \
      .Attr<int64_t>("pad_left")                                            \
      .Attr<int64_t>("pad_right")                                           \
      .Attr<int64_t>("groups")                                              \
      .Attr<int64_t>("algorithm")

#define ALEXNET_ATTRS                                                       \
  int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,   \
      int64_t groups, int64_t algorithm

ffi::Error Fwd(ffi::AnyBuffer a, ffi::AnyBuffer b,
               ffi::Result<ffi::AnyBuffer> out, ALEXNET_ATTRS) {
  return Run(kFwd, a, b, out, std::nullopt, sh, sw, pt, pb, pl, pr, groups, algorithm);
}
ffi::Error FwdBias(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer bias,
                   ffi::Result<ffi::AnyBuffer> out, ALEXNET_ATTRS) {
  return Run(kFwd, a, b, out, bias, sh, sw, pt, pb, pl, pr, groups, algorithm);
}
ffi::Error BwdData(ffi::AnyBuffer a, ffi::AnyBuffer b,
                   ffi::Result<ffi::AnyBuffer> out, ALEXNET_ATTRS) {
  return Run(kBwdData, a, b, out, std::nullopt, sh, sw, pt, pb, pl, pr, groups, algorithm);
}
ffi::Error BwdWeights(ffi::AnyBuffer a, ffi::AnyBuffer b,
                      ffi::Result<ffi::AnyBuffer> out, ALEXNET_ATTRS) {
  return Run(kBwdWeights, a, b, out, std::nullopt, sh, sw, pt, pb, pl, pr, groups, algorithm);
}

}  // namespace

// (a, b) -> out; the forward pass with a bias takes (x, w, b).
#define ALEXNET_2_TO_1 .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
XLA_FFI_DEFINE_HANDLER_SYMBOL(alexnet_onednn_conv_fwd, Fwd, ALEXNET_BIND(ALEXNET_2_TO_1));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    alexnet_onednn_conv_fwd_bias, FwdBias,
    ALEXNET_BIND(.Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                     .Ret<ffi::AnyBuffer>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(alexnet_onednn_conv_bwd_data, BwdData,
                              ALEXNET_BIND(ALEXNET_2_TO_1));
XLA_FFI_DEFINE_HANDLER_SYMBOL(alexnet_onednn_conv_bwd_weights, BwdWeights,
                              ALEXNET_BIND(ALEXNET_2_TO_1));


// The implementation oneDNN chose for each cached primitive, for benchmarks.
extern "C" int alexnet_onednn_describe(char* buf, int size) {
  std::string s;
  std::lock_guard<std::mutex> lock(cache_mutex);
  for (auto& [k, e] : Cache()) {
    s += std::to_string(k[0]) + " " + std::to_string(k[5]) + "->" +
         std::to_string(k[8]) + " " + std::to_string(k[6]) + "x" +
         std::to_string(k[7]) +
         (k[17] > 1 ? " groups=" + std::to_string(k[17]) : "") +
         (k[18] ? " bias" : "") + (k[19] ? " winograd" : "") + ": " +
         e->impl + "\n";
  }
  int n = static_cast<int>(s.size());
  if (buf && size > 0) {
    int m = n < size - 1 ? n : size - 1;
    s.copy(buf, m);
    buf[m] = 0;
  }
  return n;
}

// The oneDNN library's version, for benchmark records.
extern "C" void alexnet_onednn_version(int* major_minor_patch) {
  const dnnl_version_t* v = dnnl_version();
  major_minor_patch[0] = v->major;
  major_minor_patch[1] = v->minor;
  major_minor_patch[2] = v->patch;
}
