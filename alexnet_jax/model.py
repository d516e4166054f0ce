"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012), section 3 of the paper, in Flax Linen.

Five convolutional layers and three fully connected ones. The kernels of
every layer are split between two "towers", one per GPU in the paper: conv2,
conv4 and conv5 are grouped convolutions (each tower sees only its own
tower's maps), while conv3 and the fully connected layers see the maps of
both towers, the only places where the GPUs communicated (section 3.2).
ReLU follows every layer but fc8 (3.1); local response normalisation follows
the ReLUs of conv1 and conv2 (3.3); overlapping 3x3 max pooling with stride 2
follows the normalisations and conv5 (3.4); dropout with p = 0.5 follows fc6
and fc7 (4.2); weights start from N(0, 0.01), the biases of conv2, conv4,
conv5 and the hidden fully connected layers from 1, the others from 0 (5).

Parameters are stored in the grouped-convolution layout of Caffe and
PyTorch: a conv kernel is `(kh, kw, in_channels / groups, out)`, and tower t
owns output channels `[t * out / towers, (t + 1) * out / towers)`.

Two fields leave the network as it is and change where it runs:
  ops       the implementation of its operations (`alexnet_jax.ops.Ops`),
            chosen once per run (`backend.select_ops`);
  split     how many devices hold its towers, one tower each (1: all on one
            device); `exchange` then gathers the towers' maps at the four
            points where the paper's GPUs exchanged them, and every layer
            holds `1 / split` of its units (`alexnet_jax.parallel`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from alexnet_jax import ops as ops_lib

Dtype = Any


def no_exchange(x: jax.Array) -> jax.Array:
  """The exchange of a network held on one device: every map is here already."""
  return x


def kernel_init(init: str, std: float) -> nn.initializers.Initializer:
  """'paper': N(0, std) (section 5); 'he': He et al.'s fan-in scaling, for small nets."""
  if init == 'paper':
    return nn.initializers.normal(stddev=std)
  if init == 'he':
    return nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
  raise ValueError(f"model.init must be 'paper' or 'he', got {init!r}")


def _kernel_and_bias(layer: nn.Module, kernel_shape: tuple[int, ...]):
  """A layer's float32 `kernel` of `kernel_shape` and its `bias`, one per output unit."""
  kernel = layer.param('kernel', layer.kernel_init, kernel_shape, jnp.float32)
  bias = layer.param('bias', nn.initializers.constant(layer.bias_init), kernel_shape[-1:],
                     jnp.float32)
  return kernel, bias


class Conv(nn.Module):
  """A convolution with `groups` feature groups and a bias, then ReLU;
  with `pool`, then LRN (if `lrn`) and max pooling."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  groups: int = 1
  lrn: ops_lib.LRN | None = None
  pool: ops_lib.Pool | None = None
  towers: int = 1  # channel blocks the LRN's windows stay within
  bias_init: float = 0.0
  kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.01)
  dtype: Dtype = jnp.float32
  ops: ops_lib.Ops = ops_lib.REFERENCE

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel, bias = _kernel_and_bias(self, (k, k, x.shape[-1] // self.groups, self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    conv = dict(stride=self.stride, padding=self.padding, groups=self.groups)
    if self.pool is None:
      return nn.relu(self.ops.conv(x, kernel, bias, **conv))
    return self.ops.conv_relu_lrn_pool(x, kernel, bias, **conv, lrn=self.lrn,
                                       pool=self.pool, towers=self.towers)


class Dense(nn.Module):
  """A fully connected layer (parameters float32, computed in `dtype`)."""
  features: int
  bias_init: float = 0.0
  kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.01)
  dtype: Dtype = jnp.float32
  ops: ops_lib.Ops = ops_lib.REFERENCE

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, bias = _kernel_and_bias(self, (x.shape[-1], self.features))
    return self.ops.dense(x.astype(self.dtype), kernel.astype(self.dtype),
                          bias.astype(self.dtype))


class AlexNet(nn.Module):
  """AlexNet; the defaults are the paper's network for 227x227 RGB images."""
  num_classes: int = 1000
  towers: int = 2
  features: Sequence[int] = (96, 256, 384, 384, 256)
  kernel_sizes: Sequence[int] = (11, 5, 3, 3, 3)
  conv1_stride: int = 4
  conv1_padding: int = 0
  pool: ops_lib.Pool = ops_lib.Pool(window=3, stride=2)
  lrn: ops_lib.LRN | None = ops_lib.LRN(size=5, k=2.0, alpha=1e-4, beta=0.75)
  # False: each tower normalises over its own maps (the paper's GPUs). True:
  # the LRN windows span all maps of the layer, as in Caffe's bvlc_alexnet,
  # whose LRN layers see the concatenated output of both groups.
  lrn_across_towers: bool = False
  fc_features: Sequence[int] = (4096, 4096)
  dropout_rate: float = 0.5
  weight_init: str = 'paper'  # see `kernel_init`
  init_std: float = 0.01
  dtype: Dtype = jnp.float32
  ops: ops_lib.Ops = ops_lib.REFERENCE
  split: int = 1
  exchange: Callable[[jax.Array], jax.Array] = no_exchange

  @nn.compact
  def __call__(self, images_BHWC: jax.Array, *, train: bool) -> jax.Array:
    init = kernel_init(self.weight_init, self.init_std)
    towers = self.towers // self.split  # towers on this device
    width = lambda n: n // self.split   # units of a layer on this device
    if self.lrn_across_towers and self.split > 1:
      raise ValueError('lrn_across_towers normalises across the towers, which a split '
                       'network holds on different devices: use split=1')
    lrn_blocks = 1 if self.lrn_across_towers else towers  # channel blocks of the LRN windows
    conv = functools.partial(Conv, kernel_init=init, dtype=self.dtype, ops=self.ops,
                             towers=lrn_blocks)
    dense = functools.partial(Dense, kernel_init=init, dtype=self.dtype, ops=self.ops)
    f, k = self.features, self.kernel_sizes

    x = conv(width(f[0]), k[0], self.conv1_stride, self.conv1_padding, lrn=self.lrn,
             pool=self.pool, name='conv1')(images_BHWC)
    x = conv(width(f[1]), k[1], padding=k[1] // 2, groups=towers, lrn=self.lrn,
             pool=self.pool, bias_init=1.0, name='conv2')(x)
    x = self.exchange(x)  # conv3 sees the maps of both towers
    x = conv(width(f[2]), k[2], padding=k[2] // 2, name='conv3')(x)
    x = conv(width(f[3]), k[3], padding=k[3] // 2, groups=towers, bias_init=1.0,
             name='conv4')(x)
    x = conv(width(f[4]), k[4], padding=k[4] // 2, groups=towers, pool=self.pool,
             bias_init=1.0, name='conv5')(x)
    # Gathered before flattening: fc6's rows follow the (h, w, c) order of
    # the whole network's maps.
    x = self.exchange(x)
    x = x.reshape((x.shape[0], -1))
    for i, units in enumerate(self.fc_features):
      x = nn.relu(dense(width(units), bias_init=1.0, name=f'fc{i + 6}')(x))
      # On a split network each device drops its own units, before the exchange.
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = self.exchange(x)
    x = dense(width(self.num_classes), name=f'fc{len(self.fc_features) + 6}')(x)
    return self.exchange(x).astype(jnp.float32)


def create_model(config, ops: ops_lib.Ops = ops_lib.REFERENCE) -> AlexNet:
  """The network of a run's config (`config.model`, `config.dataset`, `config.dtype`)."""
  m = config.model
  lrn = ops_lib.LRN(size=m.lrn.size, k=m.lrn.k, alpha=m.lrn.alpha, beta=m.lrn.beta,
                    alpha_over_size=m.lrn.alpha_over_size)
  return AlexNet(
      num_classes=config.dataset.num_classes, towers=m.towers,
      features=tuple(m.features), kernel_sizes=tuple(m.kernel_sizes),
      conv1_stride=m.conv1_stride, conv1_padding=m.conv1_padding,
      pool=ops_lib.Pool(m.pool_window, m.pool_stride, m.pool_padding),
      lrn=lrn if m.lrn.enabled else None, lrn_across_towers=m.lrn.across_towers,
      fc_features=tuple(m.fc_features),
      dropout_rate=m.dropout_rate, weight_init=m.init, init_std=m.init_std,
      dtype=jnp.dtype(config.dtype), ops=ops)
