"""CPU kernels for XLA, as FFI custom calls: oneDNN convolutions, fused ReLU-LRN-pool,
the one-pass momentum update.

XLA CPU runs convolutions with Eigen's kernels, 1.3-1.8x slower than oneDNN's
on AlexNet's layers and 2-7x on the demo network's (docs/performance.md, "The convolution
kernels, and what limits the step"), and ReLU, LRN and max pooling as
several loops over whole arrays. This module compiles `csrc/onednn_conv.cc`
(against the system's oneDNN, Debian's `libdnnl-dev`), `csrc/relu_lrn_pool.cc`,
`csrc/after_all.cc` and `csrc/momentum.cc` into one library the first time it
is needed, registers their handlers with XLA, and exposes
  conv_nhwc      a convolution in the NHWC / HWIO layout, with feature groups,
                 whose forward pass and both gradients are oneDNN primitives;
  relu_lrn_pool  max_pool(local_response_norm(relu(x))) in one pass per
                 direction;
  after_all      a tree whose readers wait for all of it (no data moves);
  momentum_update  the paper's momentum rule, computed and applied in one
                 pass over each parameter.

`cpu.ops.OneDNNOps` implements the network's operations with them
(`backend.select_ops` chooses it when `config.conv_impl` is 'onednn' or
'winograd', or 'auto' (the default) and JAX runs on the CPU). The
library is built once per source, jaxlib, oneDNN version and CPU into
$ALEXNET_BUILD_DIR (default ~/.cache/alexnet_jax) with an atomic rename, so
concurrent processes may build it at once; $CXX and $CXXFLAGS choose the
compiler and add flags.

  python -m alexnet_jax.cpu.onednn     # builds it and checks it against the reference ops
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shlex
import shutil
import subprocess
import tempfile
import threading
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import ops as ops_lib

SOURCES = tuple(pathlib.Path(__file__).parent / 'csrc' / f
                for f in ('onednn_conv.cc', 'relu_lrn_pool.cc', 'after_all.cc', 'momentum.cc'))
HEADER = pathlib.Path('/usr/include/oneapi/dnnl/dnnl.hpp')
TARGETS = ('onednn_conv_fwd', 'onednn_conv_fwd_bias', 'onednn_conv_bwd_data',
           'onednn_conv_bwd_weights', 'relu_lrn_pool_fwd', 'relu_lrn_pool_bwd',
           'relu_lrn_pool_bwd_bias', 'after_all',
           'momentum_update')
INSTALL_HINT = ('install a C++ compiler and oneDNN (Debian: `apt-get install g++ '
                'libdnnl-dev`; launch/setup.sh does this), or set '
                "--config.conv_impl=xla to use the reference (XLA) operations")

_lock = threading.Lock()
_state: dict[str, object] = {}


class OneDNNUnavailable(RuntimeError):
  """The oneDNN convolution library cannot be built or loaded here."""


def build_dir() -> pathlib.Path:
  default = pathlib.Path(os.environ.get('XDG_CACHE_HOME', pathlib.Path.home() / '.cache'))
  return pathlib.Path(os.environ.get('ALEXNET_BUILD_DIR', default / 'alexnet_jax'))


def _compile_command(out: pathlib.Path) -> list[str]:
  # -march=native: the library is built on the machine that runs it (its
  # name is keyed by the CPU's instruction sets, see library_path). $CXXFLAGS
  # come last, e.g. -mno-avx512f for the kernels' portable loops.
  cxx = os.environ.get('CXX', 'g++')
  return [cxx, '-O3', '-march=native', '-fno-math-errno', '-fopenmp', '-std=c++17',
          '-shared', '-fPIC', '-w', f'-I{jax.ffi.include_dir()}', *map(str, SOURCES),
          '-o', str(out), '-ldnnl', *shlex.split(os.environ.get('CXXFLAGS', ''))]


def _cpu_flags() -> bytes:
  try:
    with open('/proc/cpuinfo', 'rb') as f:
      return next((line for line in f if line.startswith(b'flags')), b'')
  except OSError:
    return b''


def library_path() -> pathlib.Path:
  """Where the library for these sources, jaxlib, oneDNN header and CPU lives."""
  key = hashlib.sha256()
  for source in SOURCES:
    key.update(source.read_bytes())
  key.update(importlib.metadata.version('jaxlib').encode())
  if HEADER.exists():
    key.update(HEADER.read_bytes())
  key.update(' '.join(_compile_command(pathlib.Path('x'))).encode())
  key.update(_cpu_flags())
  return build_dir() / f'onednn_conv-{key.hexdigest()[:16]}.so'


def build() -> pathlib.Path:
  """Compiles the library unless it is built already; returns its path."""
  out = library_path()
  if out.exists():
    return out
  cmd0 = _compile_command(out)
  if shutil.which(cmd0[0]) is None:
    raise OneDNNUnavailable(f'no C++ compiler {cmd0[0]!r} on PATH: {INSTALL_HINT}')
  if not HEADER.exists():
    raise OneDNNUnavailable(f'oneDNN headers not found ({HEADER}): {INSTALL_HINT}')
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)
  except OSError as e:
    raise OneDNNUnavailable(f'cannot write the library into {out.parent} ({e}); set '
                            'ALEXNET_BUILD_DIR to a writable directory') from e
  os.close(fd)
  cmd = _compile_command(pathlib.Path(tmp))
  logging.info('Building the oneDNN convolutions: %s', shlex.join(cmd))
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    os.unlink(tmp)
    raise OneDNNUnavailable(
        f'building {" and ".join(s.name for s in SOURCES)} failed ({shlex.join(cmd)}):\n'
        f'{proc.stderr[-3000:]}\n{INSTALL_HINT}')
  os.replace(tmp, out)
  return out


def load() -> ctypes.CDLL:
  """Builds if needed, loads and registers the handlers (once per process)."""
  with _lock:
    if 'lib' in _state:
      return _state['lib']
    if 'error' in _state:
      raise _state['error']
    try:
      path = build()
      try:
        lib = ctypes.CDLL(str(path))
      except OSError as e:
        raise OneDNNUnavailable(f'cannot load {path}: {e}. {INSTALL_HINT}') from e
      for t in TARGETS:
        jax.ffi.register_ffi_target(f'alexnet_{t}', jax.ffi.pycapsule(getattr(lib, f'alexnet_{t}')),
                                    platform='cpu')
    except OneDNNUnavailable as e:
      _state['error'] = e
      raise
    _state['lib'] = lib
    return lib


def available() -> bool:
  try:
    load()
    return True
  except OneDNNUnavailable:
    return False


def unavailable_reason() -> str | None:
  return None if available() else str(_state['error'])


def describe() -> str:
  """The implementation oneDNN chose for every primitive built so far."""
  lib = load()
  n = lib.alexnet_onednn_describe(None, 0)
  buf = ctypes.create_string_buffer(n + 1)
  lib.alexnet_onednn_describe(buf, n + 1)
  return buf.value.decode()


def version() -> str:
  """The version of the oneDNN library the convolutions run on, e.g. '2.6.3'."""
  v = (ctypes.c_int * 3)()
  load().alexnet_onednn_version(v)
  return '.'.join(str(x) for x in v)


def fused_lanes() -> int:
  """Float32 lanes of the fused kernel's LRN loops: 16 with AVX-512, else 1."""
  return load().alexnet_relu_lrn_pool_lanes()


def after_all(tree):
  """`tree`, each leaf available only once every leaf is computed (CPU).

  One FFI call takes all the leaves and returns them, each result aliased to
  its operand (no data moves). Whatever reads the result waits for the whole
  tree, and reads each leaf as it was materialised. The one-device train step
  applies it to the gradients, where a multi-device step has its all-reduce:
  XLA CPU otherwise starts each parameter's update as soon as its gradient is
  ready, its loops take a core from the oneDNN convolutions of the rest of the
  backward pass, and oneDNN's statically partitioned kernels wait for the
  slowed thread; in bfloat16 it also fused the transposition and widening of
  fc6's gradient into the update loops, which then read it column by column.
  (`lax.optimization_barrier` is dropped by XLA CPU.)
  """
  load()
  leaves, treedef = jax.tree.flatten(tree)
  if not leaves:
    return tree
  out = jax.ffi.ffi_call(
      'alexnet_after_all', [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves],
      input_output_aliases={i: i for i in range(len(leaves))})(*leaves)
  return treedef.unflatten(list(out))


def momentum_update(params, velocity, grads, lr, *, momentum: float, decay,
                    nesterov: bool = False):
  """(params', velocity') of `optim.paper_momentum`'s rule, one pass per parameter (CPU).

  delta = lr * (g + wd * w), v' = momentum * v - delta, w' = w + v' (or, with
  `nesterov`, w + momentum * v' - delta); `decay` is a tree of each
  parameter's wd, like `params`. One FFI call updates every float32
  parameter, writing w' and v' over w and v (aliased): each element of w, v
  and g is read once, where XLA's two loops (v', then w' from v') read the
  parameters and velocities twice. The values are the same bits (every
  operation rounded as XLA rounds it). The call takes every gradient, so no
  parameter is updated before the whole backward pass has ended.
  """
  load()
  leaves, treedef = jax.tree.flatten(params)
  if not leaves:
    return params, velocity
  v_leaves, g_leaves = treedef.flatten_up_to(velocity), treedef.flatten_up_to(grads)
  wds = np.asarray(treedef.flatten_up_to(decay), np.float32)
  operands = [jax.numpy.asarray(lr, np.float32)]
  for w, v, g in zip(leaves, v_leaves, g_leaves):
    operands += [w, v, g]
  results = [jax.ShapeDtypeStruct(a.shape, a.dtype) for w in leaves for a in (w, w)]
  aliases = {1 + 3 * i + k: 2 * i + k for i in range(len(leaves)) for k in (0, 1)}
  out = jax.ffi.ffi_call('alexnet_momentum_update', results, input_output_aliases=aliases)(
      *operands, momentum=np.float32(momentum), nesterov=bool(nesterov), decay=wds)
  return treedef.unflatten(out[0::2]), treedef.unflatten(out[1::2])


# `algorithm` of the custom calls: oneDNN's direct kernels, or its Winograd
# F(4x4, 3x3) kernels where it has them (float32, 3x3, stride 1; the library
# keeps the direct ones elsewhere).
DIRECT, WINOGRAD = 0, 1


def _call(target, result_shape, dtype, operands, stride, pads, groups, algorithm=DIRECT):
  (pt, pb), (pl, pr) = pads
  return jax.ffi.ffi_call(
      f'alexnet_onednn_conv_{target}', jax.ShapeDtypeStruct(result_shape, dtype),
      vmap_method='sequential')(
          *operands, stride_h=np.int64(stride), stride_w=np.int64(stride),
          pad_top=np.int64(pt), pad_bottom=np.int64(pb), pad_left=np.int64(pl),
          pad_right=np.int64(pr), groups=np.int64(groups), algorithm=np.int64(algorithm))


def _out_shape(x_shape, w_shape, stride, pads) -> tuple[int, ...]:
  n, h, w, _ = x_shape
  kh, kw, _, o = w_shape
  (pt, pb), (pl, pr) = pads
  return n, (h + pt + pb - kh) // stride + 1, (w + pl + pr - kw) // stride + 1, o


def _forward(x, w, stride, pads, groups, bias=None, algorithm=DIRECT):
  """The forward convolution's custom call (adding `bias` if given)."""
  shape = _out_shape(x.shape, w.shape, stride, pads)
  if bias is None:
    return _call('fwd', shape, x.dtype, (x, w), stride, pads, groups, algorithm)
  return _call('fwd_bias', shape, x.dtype, (x, w, bias), stride, pads, groups, algorithm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, stride, pads, groups, algorithm):
  return _forward(x, w, stride, pads, groups, algorithm=algorithm)


def _conv_fwd(x, w, stride, pads, groups, algorithm):
  return _forward(x, w, stride, pads, groups, algorithm=algorithm), (x, w)


def _transposed_kernel(w, groups):
  """The kernel turned by 180 degrees with each group's in and out swapped."""
  kh, kw, i, o = w.shape
  w = jax.numpy.flip(w, (0, 1)).reshape(kh, kw, i, groups, o // groups)
  return w.transpose(0, 1, 4, 3, 2).reshape(kh, kw, o // groups, groups * i)


def _input_grad(dy, w, x_shape, stride, pads, groups, algorithm=DIRECT):
  """The input gradient; for stride 1, as a forward convolution.

  With stride 1 the input gradient is the output gradient convolved with the
  kernel turned by 180 degrees, its in and out channels swapped, and pads
  k - 1 - p. oneDNN 2.6 runs forward convolutions with its brgemm kernels and
  the backward-data primitive with older ones, 1.2-1.5x slower on AlexNet's
  3x3 and 5x5 layers.
  """
  kh, kw = w.shape[:2]
  (pt, pb), (pl, pr) = pads
  turned = ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr))
  if algorithm == WINOGRAD:  # the Winograd kernels' own input gradient
    return _call('bwd_data', x_shape, dy.dtype, (dy, w), stride, pads, groups, algorithm)
  if stride == 1 and min(min(p) for p in turned) >= 0:
    return _forward(dy, _transposed_kernel(w, groups), 1, turned, groups)
  return _call('bwd_data', x_shape, dy.dtype, (dy, w), stride, pads, groups)


def _conv_bwd(stride, pads, groups, algorithm, res, dy):
  x, w = res
  dx = _input_grad(dy, w, x.shape, stride, pads, groups, algorithm)
  dw = _call('bwd_weights', w.shape, w.dtype, (x, dy), stride, pads, groups, algorithm)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


# With a bias, added by the forward call's kernels (a separate pass would read
# and write y once more). Its gradient, the sum of dy over N, H and W, is XLA's
# (`sum_to_last_axis`): oneDNN 2.6 computes it inside the kernel
# gradient's call, but slower (conv1's kernel gradient at batch 64 took 43
# against 35 ms with it), and the whole step was 1.5% slower. Followed by
# `relu_lrn_pool`, the fused kernel's backward pass sums it instead
# (`conv_relu_lrn_pool`).
def sum_to_last_axis(g: jax.Array) -> jax.Array:
  """Sums every axis but the last, in float32, one leading axis at a time.

  XLA CPU turns a sum over (B, H, W) into a tree of reduce-windows that
  runs 10x slower than these leading-axis sums over contiguous rows; the
  barriers keep it from merging them back into one reduction.
  """
  g = g.astype(jnp.float32)
  while g.ndim > 1:
    g = jax.lax.optimization_barrier(
        jnp.sum(g.reshape(g.shape[0], -1), axis=0)).reshape(g.shape[1:])
  return g


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _conv_bias(x, w, b, stride, pads, groups, algorithm):
  return _forward(x, w, stride, pads, groups, b, algorithm)


def _conv_bias_fwd(x, w, b, stride, pads, groups, algorithm):
  return _forward(x, w, stride, pads, groups, b, algorithm), (x, w, b)


def _conv_bias_bwd(stride, pads, groups, algorithm, res, dy):
  x, w, b = res
  dx, dw = _conv_bwd(stride, pads, groups, algorithm, (x, w), dy)
  return dx, dw, sum_to_last_axis(dy).astype(b.dtype)


_conv_bias.defvjp(_conv_bias_fwd, _conv_bias_bwd)


def _conv_pads(x, kernel, stride, padding, groups, bias) -> tuple[tuple[int, int], ...]:
  """The explicit pads of `conv_nhwc`'s convolution, after checking its operands."""
  load()
  if (x.dtype != kernel.dtype or x.dtype not in (np.float32, jax.numpy.bfloat16)
      or (bias is not None and bias.dtype != x.dtype)):
    raise TypeError(f'oneDNN convolution takes float32 or bfloat16 operands of one '
                    f'dtype, got {x.dtype} and {kernel.dtype}'
                    + ('' if bias is None else f' and {bias.dtype}'))
  if bias is not None and bias.shape != kernel.shape[3:]:
    raise ValueError(f'the bias has shape {bias.shape}; the kernel has '
                     f'{kernel.shape[3]} output channels')
  if x.shape[-1] != kernel.shape[2] * groups or kernel.shape[3] % groups:
    raise ValueError(f'input has {x.shape[-1]} channels and the kernel {kernel.shape[2]} '
                     f'inputs and {kernel.shape[3]} outputs per group: they do not '
                     f'make {groups} groups')
  return ops_lib.conv_pads(padding, x.shape[1:3], kernel.shape[:2], stride)


def _algorithm(winograd: bool, x, kernel, stride) -> int:
  """WINOGRAD where oneDNN 2.6 has Winograd kernels (float32 3x3 stride 1), else DIRECT."""
  return WINOGRAD if (winograd and x.dtype == np.float32 and kernel.shape[:2] == (3, 3)
                      and stride == 1) else DIRECT


def conv_nhwc(x: jax.Array, kernel: jax.Array, stride: int, padding,
              groups: int = 1, bias: jax.Array | None = None,
              winograd: bool = False) -> jax.Array:
  """`lax.conv_general_dilated` in NHWC / HWIO on oneDNN (CPU only), plus `bias`.

  x, kernel and bias (one value per output channel, optional) must share a
  dtype, float32 or bfloat16; padding is 'SAME', 'VALID' or ((top, bottom),
  (left, right)); `groups` is XLA's `feature_group_count` (the kernel's I axis
  holds C / groups channels). `winograd`: float32 3x3 stride-1 convolutions
  (forward and both gradients) run on oneDNN's Winograd F(4x4, 3x3) kernels,
  1.15-1.5x faster on AlexNet's conv3-conv5 here, with rounding errors up to
  about four times the direct kernels'; other layers, and geometries oneDNN
  declines, keep the direct kernels (`describe` tells which ran).
  """
  pads = _conv_pads(x, kernel, stride, padding, groups, bias)
  algorithm = _algorithm(winograd, x, kernel, stride)
  if bias is None:
    return _conv(x, kernel, int(stride), pads, int(groups), algorithm)
  return _conv_bias(x, kernel, bias, int(stride), pads, int(groups), algorithm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _relu_lrn_pool(x, y_shape, attrs):
  return _relu_lrn_pool_fwd(x, y_shape, attrs)[0]


def _relu_lrn_pool_fwd(x, y_shape, attrs):
  y, arg = jax.ffi.ffi_call(
      'alexnet_relu_lrn_pool_fwd',
      (jax.ShapeDtypeStruct(y_shape, x.dtype), jax.ShapeDtypeStruct(y_shape, np.uint8)),
      vmap_method='sequential')(x, **dict(attrs))
  return y, (x, arg)


def _relu_lrn_pool_bwd(y_shape, attrs, res, dy):
  del y_shape
  x, arg = res
  return (jax.ffi.ffi_call('alexnet_relu_lrn_pool_bwd', jax.ShapeDtypeStruct(x.shape, x.dtype),
                           vmap_method='sequential')(x, arg, dy, **dict(attrs)),)


_relu_lrn_pool.defvjp(_relu_lrn_pool_fwd, _relu_lrn_pool_bwd)


# A convolution with its bias, then ReLU, LRN and pooling: the bias is added
# by oneDNN's forward kernels, and its gradient summed by the fused kernel's
# backward pass as it writes dx (XLA's separate reduction over the map, run
# beside oneDNN's calls and competing with them for the cores, is gone).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _conv_relu_lrn_pool(x, w, b, stride, pads, groups, algorithm, y_shape, attrs):
  return _conv_relu_lrn_pool_fwd(x, w, b, stride, pads, groups, algorithm, y_shape, attrs)[0]


def _conv_relu_lrn_pool_fwd(x, w, b, stride, pads, groups, algorithm, y_shape, attrs):
  a = _forward(x, w, stride, pads, groups, b, algorithm)
  y, (_, arg) = _relu_lrn_pool_fwd(a, y_shape, attrs)
  return y, (x, w, b, a, arg)


def _conv_relu_lrn_pool_bwd(stride, pads, groups, algorithm, y_shape, attrs, res, dy):
  del y_shape
  x, w, b, a, arg = res
  da, db = jax.ffi.ffi_call(
      'alexnet_relu_lrn_pool_bwd_bias',
      (jax.ShapeDtypeStruct(a.shape, a.dtype), jax.ShapeDtypeStruct(b.shape, np.float32)),
      vmap_method='sequential')(a, arg, dy, **dict(attrs))
  dx, dw = _conv_bwd(stride, pads, groups, algorithm, (x, w), da)
  return dx, dw, db.astype(b.dtype)


_conv_relu_lrn_pool.defvjp(_conv_relu_lrn_pool_fwd, _conv_relu_lrn_pool_bwd)


_POOL_ARGS = ('window', 'stride', 'padding', 'lrn', 'towers')  # of relu_lrn_pool


def _pool_attrs(x_shape, dtype, window, stride, padding='VALID', lrn=None, towers=1):
  """(y_shape, attrs) of `relu_lrn_pool`'s custom calls, after checking them."""
  load()
  if dtype not in (np.float32, jax.numpy.bfloat16) or len(x_shape) != 4:
    raise TypeError(f'relu_lrn_pool takes NHWC float32 or bfloat16, got {dtype}'
                    f'{list(x_shape)}')
  if x_shape[-1] % towers or window * window > 256:
    raise ValueError(f'{x_shape[-1]} channels in {towers} towers, window {window}: '
                     'channels must split evenly and windows hold at most 256 taps')
  n, h, w, c = x_shape
  pt, pb = ops_lib.pool_pads(h, window, stride, padding)
  pl, pr = ops_lib.pool_pads(w, window, stride, padding)
  y_shape = (n, (h + pt + pb - window) // stride + 1, (w + pl + pr - window) // stride + 1, c)
  lrn = lrn or {'size': 0, 'k': 0.0, 'scale': 0.0, 'beta': 0.0}
  attrs = (('size', np.int64(lrn['size'])), ('towers', np.int64(towers)),
           ('window', np.int64(window)), ('stride', np.int64(stride)),
           ('pad_top', np.int64(pt)), ('pad_left', np.int64(pl)),
           ('k', np.float32(lrn['k'])), ('scale', np.float32(lrn['scale'])),
           ('beta', np.float32(lrn['beta'])))
  return y_shape, attrs


def relu_lrn_pool(x: jax.Array, *, window: int, stride: int, padding: str = 'VALID',
                  lrn: dict | None = None, towers: int = 1) -> jax.Array:
  """`max_pool(local_response_norm(relu(x)))` of `alexnet_jax.ops`, fused (CPU).

  The three operations run as one pass over each image per direction
  (`csrc/relu_lrn_pool.cc`); only x and the window tap of every maximum (one
  byte) are kept for the backward pass. x is float32 or bfloat16; the LRN is
  computed in float32 either way, and in bfloat16 its output is rounded
  before the pooling, as in the reference. `lrn`: None, or the LRN's `size`,
  `k`, `scale` (the alpha that multiplies the window sum) and `beta`, its
  windows clipped to each of `towers` channel blocks. Pooling as
  `ops.max_pool` (ties: the first maximum in row-major order; a NaN is
  a maximum, and passes on, as in XLA).
  """
  y_shape, attrs = _pool_attrs(x.shape, x.dtype, window, stride, padding, lrn, towers)
  return _relu_lrn_pool(x, y_shape, attrs)


def conv_relu_lrn_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int,
                       padding, groups: int, pool: dict, winograd: bool = False) -> jax.Array:
  """`relu_lrn_pool(conv_nhwc(x, kernel, stride, padding, groups, bias, winograd), **pool)`.

  The same values and gradients as the two calls, but the bias's gradient is
  summed by the fused kernel's backward pass as it writes the gradient of the
  convolution's output: in float32 (a bfloat16 gradient as rounded), in a
  fixed order (per image, then per thread, then over the threads).
  """
  if bias is None:
    raise ValueError("conv_relu_lrn_pool needs the convolution's bias")
  pads = _conv_pads(x, kernel, stride, padding, groups, bias)
  unknown = sorted(set(pool) - set(_POOL_ARGS))
  if unknown:
    raise TypeError(f'unknown relu_lrn_pool arguments {unknown}')
  y_shape, attrs = _pool_attrs(_out_shape(x.shape, kernel.shape, stride, pads), x.dtype,
                               **pool)
  return _conv_relu_lrn_pool(x, kernel, bias, int(stride), pads, int(groups),
                             _algorithm(winograd, x, kernel, stride), y_shape, attrs)


def main():
  start = time.perf_counter()
  path = build()
  print(f'CPU kernels: {path} ({time.perf_counter() - start:.1f} s)')
  key = jax.random.key(0)
  x = jax.random.normal(key, (2, 13, 13, 8))
  w = jax.random.normal(jax.random.key(1), (3, 3, 8, 16))
  ref = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  err = float(np.max(np.abs(np.asarray(conv_nhwc(x, w, 1, 'SAME') - ref))))
  print(f'max |oneDNN - XLA| on a 3x3 convolution: {err:.2e}')
  print(describe(), end='')
  a = jax.nn.relu(ref)
  a = ops_lib.max_pool(ops_lib.local_response_norm(a, towers=2), 3, 2)
  b = relu_lrn_pool(ref, window=3, stride=2, towers=2,
                    lrn={'size': 5, 'k': 2.0, 'scale': 1e-4, 'beta': 0.75})
  fused_err = float(np.max(np.abs(np.asarray(a - b))))
  print(f'max |fused - XLA| of ReLU, LRN and pooling: {fused_err:.2e} '
        f'({fused_lanes()} float32 lanes)')
  if not (err < 1e-4 and fused_err < 1e-4):
    raise SystemExit('the CPU kernels and XLA disagree')


if __name__ == '__main__':
  main()
