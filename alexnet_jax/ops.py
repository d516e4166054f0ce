"""The operations AlexNet is made of, defined in pure JAX.

`Ops` is the interface the model (`model.AlexNet`) and the train step
(`train.train_step`) call, and this class is its reference implementation: it
defines what every operation computes and runs on any backend. Faster
implementations of the same interface (`alexnet_jax/cpu`) must equal it; one
implementation is chosen per run (`backend.select_ops`).

The operations:
  conv                a convolution with feature groups, plus a bias;
  relu_lrn_pool       max_pool(local_response_norm(relu(x))), the block that
                      follows conv1, conv2 (with LRN) and conv5 (without);
  conv_relu_lrn_pool  the two above in sequence;
  dense               a fully connected layer;
  mean_over_devices   the gradient all-reduce of the train step;
  apply_optimizer     the optimiser's update, applied to the parameters.

Arrays are NHWC, kernels HWIO (I = input channels per group).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class LRN:
  """Local response normalisation (section 3.3): k, n = size, alpha, beta.

  b_c = a_c / (k + alpha' * sum_{j in window(c)} a_j^2) ** beta, with
  alpha' = alpha as printed in the paper, or alpha / size with
  `alpha_over_size` (the convention of Caffe, PyTorch and cuda-convnet's code).
  """
  size: int = 5
  k: float = 2.0
  alpha: float = 1e-4
  beta: float = 0.75
  alpha_over_size: bool = False

  @property
  def scale(self) -> float:
    """The factor alpha' that multiplies the window's sum of squares."""
    return self.alpha / self.size if self.alpha_over_size else self.alpha


@dataclasses.dataclass(frozen=True)
class Pool:
  """Max pooling over `window` x `window` patches `stride` apart (section 3.4)."""
  window: int = 3
  stride: int = 2
  padding: str = 'VALID'  # or 'SAME', 'CEIL' (see `pool_pads`)


POOL_PADDINGS = ('VALID', 'SAME', 'CEIL')


def pool_pads(size: int, window: int, stride: int, padding: str) -> tuple[int, int]:
  """(before, after) pads of one spatial axis, padded with -inf.

  'VALID': none, floor((size - window) / stride) + 1 outputs. 'SAME': as
  XLA's, ceil(size / stride) outputs. 'CEIL': none before, and the last window
  may run past the end, ceil((size - window) / stride) + 1 outputs, but
  every window starts inside the map: the pooling of Caffe and of PyTorch's
  `ceil_mode=True`, which networks trained there (bvlc_alexnet) need at
  sizes where the windows do not tile the map exactly.
  """
  if padding == 'VALID':
    return 0, 0
  if padding == 'CEIL':
    out = -(-max(size - window, 0) // stride) + 1
    if (out - 1) * stride >= size:
      out -= 1
    return 0, max((out - 1) * stride + window - size, 0)
  if padding != 'SAME':
    raise ValueError(f'padding={padding!r}; use one of {POOL_PADDINGS}')
  total = max((-(-size // stride) - 1) * stride + window - size, 0)
  return total // 2, total - total // 2


def conv_pads(padding, in_hw, kernel_hw, stride) -> tuple[tuple[int, int], ...]:
  """Explicit ((top, bottom), (left, right)) pads: from an int, a string or pairs."""
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(in_hw, kernel_hw, (stride, stride), padding)
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_nhwc(x: jax.Array, kernel: jax.Array, stride: int, padding,
              groups: int = 1) -> jax.Array:
  """A convolution in NHWC / HWIO with `groups` feature groups.

  Group g convolves input channels block g with output channels block g of
  the kernel (`feature_group_count=groups` of `lax.conv_general_dilated`),
  written as one convolution per group, as the paper's towers ran: XLA
  compiles these faster than one feature-grouped convolution, whose kernel
  gradient it computes many times slower on CPUs.
  """
  conv = functools.partial(
      jax.lax.conv_general_dilated, window_strides=(stride, stride),
      padding=conv_pads(padding, x.shape[1:3], kernel.shape[:2], stride),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  if groups == 1:
    return conv(x, kernel)
  if x.shape[-1] % groups or kernel.shape[-1] % groups:
    raise ValueError(f'{x.shape[-1]} input and {kernel.shape[-1]} output channels do not '
                     f'make {groups} groups')
  return jnp.concatenate([conv(xg, kg) for xg, kg in zip(jnp.split(x, groups, axis=-1),
                                                         jnp.split(kernel, groups, axis=-1))],
                         axis=-1)


def _window_sum(x_BHWC: jax.Array, size: int, towers: int) -> jax.Array:
  """Sum over channel windows `[c - size // 2, c + (size - 1) // 2]`.

  Windows are clipped to their own tower: in the two-GPU network each GPU
  normalises only the maps it holds.
  """
  b, h, w, c = x_BHWC.shape
  x = x_BHWC.reshape(b, h, w, towers, c // towers)
  s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 1, 1, 1, size), (1, 1, 1, 1, 1),
                            [(0, 0)] * 4 + [(size // 2, (size - 1) // 2)])
  return s.reshape(b, h, w, c)


def local_response_norm(x_BHWC: jax.Array, *, size: int = 5, k: float = 2.0,
                        alpha: float = 1e-4, beta: float = 0.75,
                        alpha_over_size: bool = False, towers: int = 1) -> jax.Array:
  """Local response normalisation across channels (see `LRN`), within each tower.

  The window of channel c is `[c - size // 2, c + (size - 1) // 2]` (the
  paper's for odd sizes, and `torch.nn.LocalResponseNorm`'s), clipped to c's
  tower of `channels / towers` maps. Computed in float32 whatever the input
  dtype.
  """
  scale = LRN(size, k, alpha, beta, alpha_over_size).scale
  x = x_BHWC.astype(jnp.float32)
  denom = k + scale * _window_sum(jnp.square(x), size, towers)
  return (x * denom ** -beta).astype(x_BHWC.dtype)


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
  # The gradient goes to the first maximum of each window in row-major order,
  # as XLA's select_and_scatter does, but without it: XLA:GPU has no
  # deterministic select_and_scatter, so with overlapping windows the
  # autodiff of max pooling is what stops `--xla_gpu_deterministic_ops`.
  # Written per phase of the stride: input rows (cols) r = stride * p + a,
  # a < stride, form `stride` phases, and tap (i, j) of output (p, q) lands
  # on phase (i % stride, j % stride) at (p + i // stride, q + j // stride).
  # Each phase is a sum of masked, shifted copies (plain pads), and the
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
  order gets the gradient), with a backward pass of masked pads instead of
  XLA's select_and_scatter (see `_max_pool_bwd`).
  """
  pads = [pool_pads(size, window, stride, padding) for size in x_BHWC.shape[1:3]]
  if padding != 'VALID':
    x_BHWC = jnp.pad(x_BHWC, [(0, 0)] + pads + [(0, 0)], constant_values=-jnp.inf)
  return _max_pool_valid(x_BHWC, window, stride)


@dataclasses.dataclass(frozen=True)
class Ops:
  """The reference implementation of every operation: pure JAX, any backend."""

  name = 'xla'

  def conv(self, x: jax.Array, kernel: jax.Array, bias: jax.Array, *, stride: int,
           padding, groups: int = 1) -> jax.Array:
    """conv_nhwc(x, kernel) + bias; x and kernel share a dtype, bias is cast to it.

    `padding`: an int (every side), 'SAME' / 'VALID', or ((top, bottom),
    (left, right)).
    """
    y = conv_nhwc(x, kernel, stride, padding, groups)
    return y + bias.astype(y.dtype)

  def relu_lrn_pool(self, x: jax.Array, *, lrn: LRN | None, pool: Pool,
                    towers: int = 1) -> jax.Array:
    """max_pool(lrn(relu(x))), or max_pool(relu(x)) with lrn=None.

    x holds `towers` towers side by side; each normalises only its own maps,
    as each GPU did in the paper.
    """
    x = jax.nn.relu(x)
    if lrn is not None:
      x = local_response_norm(x, size=lrn.size, k=lrn.k, alpha=lrn.alpha, beta=lrn.beta,
                              alpha_over_size=lrn.alpha_over_size, towers=towers)
    return max_pool(x, pool.window, pool.stride, pool.padding)

  def conv_relu_lrn_pool(self, x: jax.Array, kernel: jax.Array, bias: jax.Array, *,
                         stride: int, padding, groups: int, lrn: LRN | None, pool: Pool,
                         towers: int = 1) -> jax.Array:
    """relu_lrn_pool(conv(x, kernel, bias)): a convolution and its block."""
    y = self.conv(x, kernel, bias, stride=stride, padding=padding, groups=groups)
    return self.relu_lrn_pool(y, lrn=lrn, pool=pool, towers=towers)

  def dense(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """x @ kernel + bias over the last axis (operands of one dtype)."""
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y + bias

  def mean_over_devices(self, tree: Any, axis_name: str,
                        axis_index_groups: list[list[int]] | None = None) -> Any:
    """`lax.pmean` of every leaf over `axis_name` (within each group, if given)."""
    return jax.lax.pmean(tree, axis_name, axis_index_groups=axis_index_groups)

  def apply_optimizer(self, tx: optax.GradientTransformationExtraArgs, grads: Any,
                      opt_state: Any, params: Any, lr: jax.Array) -> tuple[Any, Any]:
    """(new params, new optimiser state): `tx`'s update at learning rate `lr`."""
    updates, opt_state = tx.update(grads, opt_state, params, learning_rate=lr)
    return optax.apply_updates(params, updates), opt_state


REFERENCE = Ops()
