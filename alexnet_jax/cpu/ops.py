"""`OneDNNOps`: the network's operations on this package's CPU kernels.

The same functions as the reference `alexnet_jax.ops.Ops` (the tests hold
each one to it), computed by oneDNN's convolutions and the fused kernels of
`onednn.py`, plus two changes to the train step's plumbing that XLA CPU needs
to run it fast. README.md in this folder says why each exists and what it
gained.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from alexnet_jax import ops as ops_lib
from alexnet_jax import optim
from alexnet_jax.cpu import onednn


def _pool_args(lrn: ops_lib.LRN | None, pool: ops_lib.Pool, towers: int) -> dict:
  """`onednn.relu_lrn_pool`'s keyword arguments."""
  return dict(window=pool.window, stride=pool.stride, padding=pool.padding, towers=towers,
              lrn=None if lrn is None else dict(size=lrn.size, k=lrn.k, scale=lrn.scale,
                                                beta=lrn.beta))


@dataclasses.dataclass(frozen=True)
class OneDNNOps(ops_lib.Ops):
  """`Ops` on oneDNN and the fused kernels; float32 or bfloat16, CPU backend only.

  winograd: float32 3x3 stride-1 convolutions run on oneDNN's Winograd
  kernels (other rounding; see `onednn.conv_nhwc`).
  """
  winograd: bool = False

  @property
  def name(self) -> str:
    return 'winograd' if self.winograd else 'onednn'

  def conv(self, x, kernel, bias, *, stride, padding, groups=1):
    # The bias is added by the convolution's own kernels.
    return onednn.conv_nhwc(x, kernel, stride, padding, groups, bias=bias.astype(x.dtype),
                            winograd=self.winograd)

  def relu_lrn_pool(self, x, *, lrn, pool, towers=1):
    return onednn.relu_lrn_pool(x, **_pool_args(lrn, pool, towers))

  def conv_relu_lrn_pool(self, x, kernel, bias, *, stride, padding, groups, lrn, pool,
                         towers=1):
    # One op, so that the fused kernel's backward pass also sums the bias's
    # gradient, which XLA would reduce from the map in a pass of its own.
    return onednn.conv_relu_lrn_pool(x, kernel, bias.astype(x.dtype), stride, padding, groups,
                                     _pool_args(lrn, pool, towers), winograd=self.winograd)

  def mean_over_devices(self, tree, axis_name, axis_index_groups=None):
    """The all-reduce; over groups of one device, `onednn.after_all` instead.

    The same values, and the same order as the all-reduce gave the step
    (nothing reads a leaf before every leaf is computed), without the copy of
    every operand that XLA CPU's all-reduce makes even over one device.
    """
    size = (len(axis_index_groups[0]) if axis_index_groups
            else jax.lax.axis_size(axis_name))
    if size == 1:
      return onednn.after_all(tree)
    return super().mean_over_devices(tree, axis_name, axis_index_groups)

  def apply_optimizer(self, tx, grads, opt_state, params, lr):
    """The reference's values, bit for bit, with XLA CPU's copies avoided.

    Inside `jax.pmap` every per-device array reaches the step without its
    leading axis of 1, and XLA CPU will not write a fusion's result over an
    operand it reads through that reshape: it copied every parameter and
    velocity each step. The update therefore runs on `a[None]` views, where
    the reshapes cancel. The paper's momentum rule on float32 parameters runs
    as one pass per parameter (`onednn.momentum_update`).
    """
    expand = lambda tree: jax.tree.map(lambda a: a[None], tree)
    squeeze = lambda tree: jax.tree.map(lambda a: a[0], tree)
    if (isinstance(tx, optim.PaperMomentum)
        and all(a.dtype == jnp.float32 for a in jax.tree.leaves((params, grads, opt_state)))):
      rule = tx.rule
      params, velocity = onednn.momentum_update(
          expand(params), expand(opt_state.velocity), expand(grads), lr,
          momentum=rule.momentum, decay=optim.decay_rates(rule, params),
          nesterov=rule.nesterov)
      return squeeze(params), optim.PaperMomentumState(squeeze(velocity))
    params, opt_state = super().apply_optimizer(tx, expand(grads), expand(opt_state),
                                                expand(params), lr)
    return squeeze(params), squeeze(opt_state)
