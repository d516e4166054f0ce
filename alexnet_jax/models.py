"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012) as a pure Flax Linen module.

The network is written as the paper's two "towers" (one per GPU in the
original): every layer's kernels are split in `towers` equal halves. Grouped
layers (conv2, conv4, conv5) see only their own tower's maps; conv3 and the
fully connected layers see the maps of all towers.

Parameters are stored in the ordinary grouped-convolution layout (the layout of
Caffe and PyTorch): a conv kernel is `(kh, kw, in_channels / groups, out)` and
tower `t` owns output channels `[t * out / towers, (t + 1) * out / towers)`.
The layout therefore does not depend on how the towers are computed or placed
on devices, and a checkpoint is portable between layouts.

On the CPU (`conv_impl` 'auto', 'onednn' or 'winograd') the convolutions are oneDNN's, a
grouped layer is one oneDNN call with feature groups on an array that holds
both towers, and ReLU, LRN and max pooling run as one fused kernel
(`onednn.relu_lrn_pool`), whose backward pass also sums the bias gradient of
the convolution before it (`onednn.conv_relu_lrn_pool`). With XLA's convolutions (GPUs, `conv_impl='xla'`),
whose `feature_group_count=2` is several times slower on CPU than two ordinary
convolutions, each tower is one convolution of its own array and the towers
stay separate arrays between layers (see `TowerConv`). Two more CPU-driven
choices, each exact: max pooling and the conv bias add have hand-written
gradients (`max_pool`, `add_bias`), because XLA CPU's select_and_scatter and
its reduce-window trees for bias gradients were large parts of the step.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import config_lib
from alexnet_jax import onednn

Dtype = Any


# Towers of at most this many channels sum their LRN windows with a banded
# matrix product; wider ones with a reduce-window. On XLA CPU (forward and
# backward, batch 128) the product took 23% less time for 16-channel towers
# at 28x28 and 13% less for the paper's 48-channel conv1 towers, and 27% more
# for its 128-channel conv2 towers, whose band matrix is mostly zeros.
_BANDED_MAX_CHANNELS = 64


def _band_matrix(channels: int, lo: int, hi: int) -> np.ndarray:
  """M[i, j] = 1 where input channel i lies in output channel j's window."""
  i, j = np.indices((channels, channels))
  return ((i >= j - lo) & (i <= j + hi)).astype(np.float32)


def _window_sum(x_BHWC: jax.Array, size: int, towers: int,
                reverse: bool = False) -> jax.Array:
  """Sum over channel windows `[c - size // 2, c + (size - 1) // 2]`.

  Windows are clipped to their own tower: in the two-GPU network each GPU
  normalises only the maps it holds. `reverse=True` mirrors the window, which
  is the transpose of the operation (used by the backward pass).
  """
  b, h, w, c = x_BHWC.shape
  lo, hi = size // 2, (size - 1) // 2
  if reverse:
    lo, hi = hi, lo
  x = x_BHWC.reshape(b, h, w, towers, c // towers)
  if c // towers <= _BANDED_MAX_CHANNELS:
    band = jnp.asarray(_band_matrix(c // towers, lo, hi), x.dtype)
    s = jnp.einsum('bhwtc,cd->bhwtd', x, band, precision=jax.lax.Precision.HIGHEST)
  else:
    s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 1, 1, 1, size),
                              (1, 1, 1, 1, 1), [(0, 0)] * 4 + [(lo, hi)])
  return s.reshape(b, h, w, c)


def _inverse_power(d: jax.Array, beta: float) -> jax.Array:
  if beta == 0.75:
    # Two vectorised square roots and a division: on XLA CPU 3x faster than
    # rsqrt-based forms and 5x faster than `d ** -0.75`.
    root = jnp.sqrt(d)
    return 1.0 / (root * jnp.sqrt(root))
  return d ** (-beta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _lrn(x, size, k, scale, beta, towers):
  return _lrn_fwd(x, size, k, scale, beta, towers)[0]


def _lrn_fwd(x, size, k, scale, beta, towers):
  denom = k + scale * _window_sum(jnp.square(x), size, towers)
  inv = _inverse_power(denom, beta)
  return x * inv, (x, denom, inv)


def _lrn_bwd(size, k, scale, beta, towers, res, g):
  # y_c = x_c d_c^-beta, d_c = k + scale * sum_{j in W(c)} x_j^2, so
  # dL/dx_i = g_i d_i^-beta - 2 beta scale x_i sum_{c: i in W(c)} g_c x_c d_c^(-beta-1)
  del k
  x, denom, inv = res
  t = g * x * inv / denom
  dx = g * inv - (2.0 * beta * scale) * x * _window_sum(t, size, towers, reverse=True)
  return (dx,)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)


def local_response_norm(x_BHWC: jax.Array, *, size: int = 5, k: float = 2.0,
                        alpha: float = 1e-4, beta: float = 0.75,
                        alpha_over_size: bool = False,
                        towers: int = 1) -> jax.Array:
  """Local response normalisation across channels (section 3.3 of the paper).

  b_c = a_c / (k + alpha' * sum_{j in window(c)} a_j^2) ** beta

  `alpha' = alpha` as printed in the paper; `alpha' = alpha / size` with
  `alpha_over_size=True`, the convention of Caffe and PyTorch. The window of
  channel c is `[c - size // 2, c + (size - 1) // 2]` (the paper's for odd
  sizes, and `torch.nn.LocalResponseNorm`'s), within c's tower.

  Computed in float32 whatever the input dtype, with a hand-written backward
  pass that reuses the forward's denominator (one windowed sum each way).
  """
  scale = alpha / size if alpha_over_size else alpha
  x32 = x_BHWC.astype(jnp.float32)
  return _lrn(x32, size, float(k), float(scale), float(beta), towers).astype(x_BHWC.dtype)


def _pool_taps(x_BHWC: jax.Array, window: int, stride: int) -> list[jax.Array]:
  """The window*window strided views whose elementwise max is the pooling."""
  b, h, w, c = x_BHWC.shape
  oh, ow = (h - window) // stride + 1, (w - window) // stride + 1
  return [jax.lax.slice(x_BHWC, (0, i, j, 0),
                        (b, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                        (1, stride, stride, 1))
          for i in range(window) for j in range(window)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool_valid(x, window, stride):
  return functools.reduce(jnp.maximum, _pool_taps(x, window, stride))


def _max_pool_fwd(x, window, stride):
  y = _max_pool_valid(x, window, stride)
  return y, (x, y)


def _max_pool_bwd(window, stride, res, g):
  # The gradient goes to the first maximum of each window in row-major
  # order, as XLA's select_and_scatter does (3-5x slower on XLA CPU).
  # Written per phase: the input rows (cols) r = stride * p + a, a < stride,
  # form `stride` phases, and tap (i, j) of output (p, q) lands on phase
  # (i % stride, j % stride) at (p + i // stride, q + j // stride). Each
  # phase is a sum of masked, shifted copies (plain pads, which fuse into
  # one loop even when an LRN's backward consumes the result; strided pads
  # with interior padding did not, nine loops instead of one), and the
  # phases are interleaved at the end.
  x, y = res
  b, h, w, c = x.shape
  oh, ow = y.shape[1:3]
  rows, cols = -(-h // stride), -(-w // stride)  # per-phase extents
  taken = jnp.zeros(y.shape, bool)
  zero = jnp.zeros((), x.dtype)
  phases = {}
  for k, tap in enumerate(_pool_taps(x, window, stride)):
    i, j = divmod(k, window)
    hit = (tap == y) & ~taken
    taken = taken | hit
    di, dj = i // stride, j // stride
    part = jax.lax.pad(jnp.where(hit, g, zero), zero,
                       [(0, 0, 0), (di, rows - oh - di, 0), (dj, cols - ow - dj, 0), (0, 0, 0)])
    key = (i % stride, j % stride)
    phases[key] = part if key not in phases else phases[key] + part
  empty = jnp.zeros((b, rows, cols, c), x.dtype)  # phases no tap reaches
  grid = jnp.stack([jnp.stack([phases.get((a, e), empty) for e in range(stride)], axis=3)
                    for a in range(stride)], axis=2)  # (b, rows, a, cols, e, c)
  dx = grid.reshape(b, rows * stride, cols * stride, c)
  return (dx[:, :h, :w, :],)


_max_pool_valid.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x_BHWC: jax.Array, window: int, stride: int,
             padding: str = 'VALID') -> jax.Array:
  """Max pooling over `window` x `window` patches, as `flax.linen.max_pool`.

  The same values and gradients (ties: the first maximum in row-major window
  order gets the gradient); the backward pass is a fused masked scatter
  per phase of the stride instead of XLA's select_and_scatter.
  """
  pads = [onednn.pool_pads(size, window, stride, padding) for size in x_BHWC.shape[1:3]]
  if padding == 'SAME':
    x_BHWC = jnp.pad(x_BHWC, [(0, 0)] + pads + [(0, 0)], constant_values=-jnp.inf)
  return _max_pool_valid(x_BHWC, window, stride)


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


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """`y + bias` over the last axis, with a fast bias gradient (see above)."""
  return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
  return add_bias(y, bias), jnp.zeros((0,), bias.dtype)


def _add_bias_bwd(bias_dtype_carrier, g):
  return g, sum_to_last_axis(g).astype(bias_dtype_carrier.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def _kernel_init(init: str, std: float):
  if init == 'paper':
    return nn.initializers.normal(stddev=std)
  if init == 'he':
    return nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
  raise ValueError(f"model.init must be 'paper' or 'he', got {init!r}")


@functools.cache
def _warn_no_onednn(reason: str) -> None:
  logging.warning("conv_impl='auto': using XLA's convolutions, 1.3-7x slower on "
                  'CPU than oneDNN\'s, because %s', reason)


def uses_onednn(impl: str, dtype=jnp.float32) -> bool:
  """Whether `conv_nhwc` runs on oneDNN for this setting, here and now.

  'xla': never. 'onednn' and 'winograd' (the same with oneDNN's Winograd
  kernels where it has them, `onednn.conv_nhwc`): on the CPU backend, and an
  error if the library cannot be built. 'auto': on the CPU backend when it
  can be built, else XLA with a warning. GPUs always keep XLA's convolutions.
  """
  if impl not in config_lib.KNOWN_CONV_IMPLS:
    raise ValueError(f'conv_impl={impl!r}; use one of {config_lib.KNOWN_CONV_IMPLS}')
  if impl == 'xla' or jax.default_backend() != 'cpu':
    return False
  if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
    if impl in config_lib.FORCED_ONEDNN_IMPLS:
      raise ValueError(f"conv_impl={impl!r} runs float32 and bfloat16, not {dtype}")
    return False
  if impl in config_lib.FORCED_ONEDNN_IMPLS:
    onednn.load()  # raises OneDNNUnavailable saying what to install
    return True
  reason = onednn.unavailable_reason()
  if reason:
    _warn_no_onednn(reason)
  return reason is None


def conv_nhwc(x, kernel, stride, padding, impl: str = 'auto', groups: int = 1,
              bias: jax.Array | None = None, then_pool: dict | None = None):
  """A convolution in the NHWC / HWIO layout used throughout, plus `bias`.

  On the CPU it runs on oneDNN's kernels (`onednn.conv_nhwc`, which add the
  bias themselves) unless `impl` is 'xla'; see `uses_onednn`. `groups` is
  XLA's `feature_group_count`. `then_pool`, on oneDNN's path only: the
  keyword arguments of the `onednn.relu_lrn_pool` that follows, run with the
  convolution as one `onednn.conv_relu_lrn_pool` (whose fused kernel also
  sums the bias's gradient); the result is then the pooled map.
  """
  if uses_onednn(impl, x.dtype):
    bias = None if bias is None else bias.astype(x.dtype)
    winograd = impl == 'winograd'
    if then_pool is not None:
      return onednn.conv_relu_lrn_pool(x, kernel, bias, stride, padding, groups, then_pool,
                                       winograd=winograd)
    return onednn.conv_nhwc(x, kernel, stride, padding, groups, bias=bias, winograd=winograd)
  if then_pool is not None:
    raise ValueError("then_pool is for oneDNN's convolutions; "
                     'apply AlexNet.relu_lrn_pool to the output instead')
  y = jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)
  return y if bias is None else add_bias(y, bias)


class TowerConv(nn.Module):
  """A convolution whose output channels are split into `towers` towers.

  Tower t owns output channels `[t * n / towers, (t + 1) * n / towers)` of
  the canonical kernel. grouped=True: tower t sees only input channel block t
  (conv2, conv4, conv5); grouped=False: every tower sees all inputs (conv1,
  conv3).

  Takes and returns a list of arrays that hold the towers' channels side by
  side, in tower order (a single array is taken as a list of one). What the
  list holds depends on where the convolutions run:
  - oneDNN (the CPU default): one array with all towers. oneDNN's grouped
    convolutions are as fast as separate ones, and every ReLU, LRN and pool
    is then one loop over both towers, as in the single-tower network. The
    bias is added by the convolution's own kernels. With `then_pool` (see
    `conv_nhwc`) the ReLU, LRN and pool that follow run with it, and the
    result is the pooled map.
  - XLA: one array per tower, each convolved on its own. XLA's grouped
    convolutions are several times slower than separate ones, and towers
    kept as separate arrays, as the two GPUs of the paper keep them, are
    materialised once each: sliced from one array, the ReLU, LRN and pool in
    front of a grouped convolution were recomputed for every slice.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: Any = 'SAME'
  towers: int = 1
  grouped: bool = False
  bias_init_value: float = 0.0
  weight_init: str = 'paper'
  init_std: float = 0.01
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'  # see `uses_onednn`
  then_pool: dict | None = None  # oneDNN's path only: see `conv_nhwc`

  @nn.compact
  def __call__(self, xs: jax.Array | Sequence[jax.Array]) -> list[jax.Array]:
    towers = self.towers
    xs = [xs] if not isinstance(xs, (list, tuple)) else list(xs)
    in_ch = sum(x.shape[-1] for x in xs)
    groups = towers if self.grouped else 1
    if in_ch % groups or self.features % towers:
      raise ValueError(
          f'{self.name}: {in_ch} input / {self.features} output channels do not '
          f'split into {towers} towers')
    kh = kw = self.kernel_size
    kernel = self.param('kernel', _kernel_init(self.weight_init, self.init_std),
                        (kh, kw, in_ch // groups, self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.constant(self.bias_init_value),
                      (self.features,), jnp.float32)
    kernel = kernel.astype(self.dtype)
    pad = self.padding
    if isinstance(pad, int):
      pad = [(pad, pad), (pad, pad)]
    # conv_nhwc refuses then_pool on XLA's path.
    conv = functools.partial(conv_nhwc, stride=self.stride, padding=pad,
                             impl=self.conv_impl, then_pool=self.then_pool)
    join = lambda arrays: arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays, -1)
    if uses_onednn(self.conv_impl, self.dtype):
      return [conv(join(xs).astype(self.dtype), kernel, groups=groups, bias=bias)]
    if self.grouped:
      if len(xs) == 1:
        xs = jnp.split(xs[0], towers, axis=-1)
      if len(xs) != towers:
        raise ValueError(f'{self.name}: {len(xs)} tower inputs for {towers} towers')
      ys = [conv(x.astype(self.dtype), k)
            for x, k in zip(xs, jnp.split(kernel, towers, axis=-1))]
    else:
      y = conv(join(xs).astype(self.dtype), kernel)
      ys = [y] if towers == 1 else jnp.split(y, towers, axis=-1)
    return [add_bias(y, b) for y, b in zip(ys, jnp.split(bias, towers))]


class AlexNet(nn.Module):
  """AlexNet; defaults are the paper's network for 227x227 RGB input."""
  num_classes: int = 1000
  towers: int = 2
  features: Sequence[int] = (96, 256, 384, 384, 256)
  kernel_sizes: Sequence[int] = (11, 5, 3, 3, 3)
  conv1_stride: int = 4
  conv1_padding: Any = 0
  pool_window: int = 3
  pool_stride: int = 2
  pool_padding: str = 'VALID'
  fc_features: Sequence[int] = (4096, 4096)
  dropout_rate: float = 0.5
  use_lrn: bool = True
  lrn_size: int = 5
  lrn_k: float = 2.0
  lrn_alpha: float = 1e-4
  lrn_beta: float = 0.75
  lrn_alpha_over_size: bool = False
  weight_init: str = 'paper'
  init_std: float = 0.01
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'  # 'auto' | 'xla' | 'onednn' | 'winograd': see `uses_onednn`

  def _conv(self, i: int, grouped: bool, bias: float, stride: int = 1,
            padding: Any = None, then_pool: dict | None = None):
    k = self.kernel_sizes[i]
    return TowerConv(
        features=self.features[i], kernel_size=k, stride=stride,
        padding=k // 2 if padding is None else padding, towers=self.towers,
        grouped=grouped, bias_init_value=bias, weight_init=self.weight_init,
        init_std=self.init_std, dtype=self.dtype, conv_impl=self.conv_impl,
        then_pool=then_pool, name=f'conv{i + 1}')

  def conv_block(self, xs, i: int, grouped: bool, bias: float, lrn: bool,
                 **conv_args) -> list[jax.Array]:
    """relu_lrn_pool(conv_i(xs)) for each array of towers.

    On oneDNN's path as one op per array (`onednn.conv_relu_lrn_pool`): the
    fused kernel's backward pass also sums the conv bias's gradient, which
    XLA would otherwise reduce from the map in a pass of its own.
    """
    if uses_onednn(self.conv_impl, self.dtype):
      pool = self.pool_args(lrn, towers=self.towers)
      return self._conv(i, grouped, bias, then_pool=pool, **conv_args)(xs)
    ys = self._conv(i, grouped, bias, **conv_args)(xs)
    return [self.relu_lrn_pool(y, lrn, self.towers // len(ys)) for y in ys]

  def pool_args(self, lrn: bool, towers: int) -> dict:
    """`onednn.relu_lrn_pool`'s keyword arguments for `relu_lrn_pool`."""
    scale = self.lrn_alpha / self.lrn_size if self.lrn_alpha_over_size else self.lrn_alpha
    params = dict(size=self.lrn_size, k=self.lrn_k, scale=scale, beta=self.lrn_beta)
    return dict(window=self.pool_window, stride=self.pool_stride, padding=self.pool_padding,
                lrn=params if lrn and self.use_lrn else None, towers=towers)

  def relu_lrn_pool(self, x: jax.Array, lrn: bool, towers: int) -> jax.Array:
    """pool(lrn(relu(x))), or pool(relu(x)) with lrn=False, for one array.

    x holds `towers` towers side by side; each normalises only its own maps,
    as each GPU did in the paper. On oneDNN's path the three run fused
    (`onednn.relu_lrn_pool`). Uses no parameters (`parallel` calls it too).
    """
    if uses_onednn(self.conv_impl, x.dtype):
      return onednn.relu_lrn_pool(x, **self.pool_args(lrn, towers))
    lrn = lrn and self.use_lrn
    w, s, pad = self.pool_window, self.pool_stride, self.pool_padding
    x = nn.relu(x)
    if lrn:
      x = local_response_norm(x, size=self.lrn_size, k=self.lrn_k, alpha=self.lrn_alpha,
                              beta=self.lrn_beta, alpha_over_size=self.lrn_alpha_over_size,
                              towers=towers)
    return max_pool(x, w, s, pad)

  @nn.compact
  def __call__(self, images_BHWC: jax.Array, *, train: bool) -> jax.Array:
    # Activations are lists of arrays holding the towers side by side (see
    # TowerConv).
    each = lambda f, xs: [f(x) for x in xs]
    # Biases of conv2, conv4, conv5 and the hidden FC layers start at 1 so
    # that the ReLUs receive positive inputs early on (section 5).
    xs = self.conv_block(images_BHWC, 0, grouped=False, bias=0.0, lrn=True,
                         stride=self.conv1_stride, padding=self.conv1_padding)
    xs = self.conv_block(xs, 1, grouped=True, bias=1.0, lrn=True)
    xs = each(nn.relu, self._conv(2, grouped=False, bias=0.0)(xs))
    xs = each(nn.relu, self._conv(3, grouped=True, bias=1.0)(xs))
    xs = self.conv_block(xs, 4, grouped=True, bias=1.0, lrn=False)
    # Side by side before flattening: fc6's kernel rows follow the canonical
    # (h, w, c) order of the single-array network.
    x = xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=-1)
    x = x.reshape((x.shape[0], -1))
    dense = functools.partial(
        nn.Dense, kernel_init=_kernel_init(self.weight_init, self.init_std),
        dtype=self.dtype, param_dtype=jnp.float32)
    for i, width in enumerate(self.fc_features):
      x = dense(width, bias_init=nn.initializers.ones, name=f'fc{i + 6}')(x)
      x = nn.relu(x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = dense(self.num_classes, bias_init=nn.initializers.zeros,
              name=f'fc{len(self.fc_features) + 6}')(x)
    return x.astype(jnp.float32)


def create_model(model_config, num_classes: int, dtype: str = 'float32',
                 conv_impl: str = 'auto') -> AlexNet:
  """Builds the module from a `config.model` ConfigDict."""
  m = model_config
  return AlexNet(
      num_classes=num_classes, towers=m.towers, features=tuple(m.features),
      kernel_sizes=tuple(m.kernel_sizes), conv1_stride=m.conv1_stride,
      conv1_padding=m.conv1_padding, pool_window=m.pool_window,
      pool_stride=m.pool_stride, pool_padding=m.pool_padding,
      fc_features=tuple(m.fc_features), dropout_rate=m.dropout_rate,
      use_lrn=m.lrn.enabled, lrn_size=m.lrn.size, lrn_k=m.lrn.k,
      lrn_alpha=m.lrn.alpha, lrn_beta=m.lrn.beta,
      lrn_alpha_over_size=m.lrn.alpha_over_size, weight_init=m.init,
      init_std=m.init_std, dtype=jnp.dtype(dtype), conv_impl=conv_impl)
