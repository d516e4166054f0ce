"""Model parallelism of the two towers, combined with data parallelism.

The paper trained its network on two GPUs, one tower per GPU; the GPUs
exchanged activations only at the inputs of conv3, fc6, fc7 and fc8. This
module reproduces that split inside one `jax.pmap` over all devices, which
form (data replica, tower) pairs:

    device d holds tower d % towers of data replica d // towers

so with 4 devices and 2 towers, devices 0 and 1 are the two towers of replica
0 and see the same images, devices 2 and 3 those of replica 1. Each device
computes only its own tower. The towers of a replica all-gather activations
at the four exchange points above (`Layout.tower_groups`); gradients are
averaged over the replicas holding the same tower (`Layout.replica_groups`).
A single pmap with `axis_index_groups` is used because nested pmaps (data x
model) fail on the jax version this project runs on.

Parameter layout. A tower's parameters are the canonical (single-device)
parameters of `models.AlexNet` sliced along their last axis: tower t owns
output channels / units `[t * n / towers, (t + 1) * n / towers)` of every
conv kernel, dense kernel and bias. For the grouped convolutions that slice is
exactly the tower's group; for conv1, conv3 and the dense layers it is the
tower's half of the output units, fed by the gathered inputs of all towers.
fc8 is split the same way (each tower computes the logits of half the classes)
and the logits are all-gathered: one rule for every leaf, no duplicated fc8
computation or gradient, and the extra exchange is only B * classes / towers
floats. Checkpoints keep the canonical layout (`merge_state`), so they do not
depend on the device layout that trained them.

Every leaf optimiser statistic that has the shape of the parameters is split
like the parameters; scalar leaves (step, lr scale, Adam's count) are copied
to every device. Optimisers must be element-wise (the paper's momentum and
AdamW are); one that reduces over all parameters, such as global-norm
clipping, would see only a tower's share.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from alexnet_jax import models
from alexnet_jax import train as train_lib

# `train` is used only inside functions, so that train.py can import this
# module at its top without an import cycle failing.


@dataclasses.dataclass(frozen=True)
class Layout:
  """How `num_devices` devices are divided into towers and data replicas."""
  num_devices: int
  towers: int = 2

  def __post_init__(self):
    if self.towers < 1 or self.num_devices % self.towers:
      raise ValueError(f'{self.num_devices} devices do not divide into '
                       f'{self.towers} towers')

  @property
  def replicas(self) -> int:
    """Number of data-parallel replicas (each a group of `towers` devices)."""
    return self.num_devices // self.towers

  @property
  def tower_groups(self) -> list[list[int]]:
    """Devices that exchange activations: the towers of one replica."""
    return [[r * self.towers + t for t in range(self.towers)]
            for r in range(self.replicas)]

  @property
  def replica_groups(self) -> list[list[int]]:
    """Devices that hold the same tower: their gradients are averaged."""
    return [[r * self.towers + t for r in range(self.replicas)]
            for t in range(self.towers)]


# ---------------------------------------------------------------- layouts


def split_params(params, towers: int) -> list[Any]:
  """Canonical params -> one params tree per tower (last axis sliced)."""
  def piece(x, t):
    n = x.shape[-1]
    if n % towers:
      raise ValueError(f'a parameter of shape {x.shape} does not split into '
                       f'{towers} towers along its last axis')
    size = n // towers
    return x[..., t * size:(t + 1) * size]
  return [jax.tree.map(functools.partial(piece, t=t), params)
          for t in range(towers)]


def merge_params(tower_params: Sequence[Any]):
  """Inverse of `split_params`: concatenates the towers' slices."""
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=-1), *tower_params)


def _is_params_like(params):
  treedef = jax.tree.structure(params)
  return lambda node: jax.tree.structure(node) == treedef


def split_state(state, towers: int) -> list[Any]:
  """Canonical train state -> one state per tower.

  The params and every optimiser subtree with the structure of the params
  (momentum velocity, Adam's moments) are split; other leaves are copied.
  """
  is_params = _is_params_like(state.params)
  nodes, treedef = jax.tree.flatten(state, is_leaf=is_params)
  pieces = [split_params(n, towers) if is_params(n) else [n] * towers
            for n in nodes]
  return [treedef.unflatten([p[t] for p in pieces]) for t in range(towers)]


def merge_state(tower_states: Sequence[Any]):
  """Inverse of `split_state`; copied leaves are taken from tower 0."""
  is_params = _is_params_like(tower_states[0].params)
  flat = [jax.tree.flatten(s, is_leaf=is_params)[0] for s in tower_states]
  treedef = jax.tree.flatten(tower_states[0], is_leaf=is_params)[1]
  nodes = [merge_params(group) if is_params(group[0]) else group[0]
           for group in zip(*flat)]
  return treedef.unflatten(nodes)


def to_devices(tower_trees: Sequence[Any], layout: Layout, devices: Sequence[Any]):
  """Per-tower trees -> pmap input: device d gets tower d % towers."""
  if len(devices) != layout.num_devices or len(tower_trees) != layout.towers:
    raise ValueError(f'{len(devices)} devices and {len(tower_trees)} towers do '
                     f'not match {layout}')
  mesh = jax.sharding.Mesh(np.array(devices), (train_lib.AXIS,))
  sharding = jax.NamedSharding(mesh, jax.P(train_lib.AXIS))

  def stack(*per_tower):
    host = [np.asarray(x) for x in per_tower]
    return jax.device_put(
        np.stack([host[d % layout.towers] for d in range(layout.num_devices)]),
        sharding)

  return jax.tree.map(stack, *tower_trees)


def from_devices(tree, layout: Layout) -> list[Any]:
  """pmap output -> per-tower trees (read from replica 0's devices)."""
  return [jax.tree.map(lambda x, t=t: np.asarray(x[t]), tree)
          for t in range(layout.towers)]


def state_to_devices(state, layout: Layout, devices: Sequence[Any]):
  """A canonical (e.g. restored) train state in the model-parallel layout."""
  return to_devices(split_state(state, layout.towers), layout, devices)


def state_from_devices(device_state, layout: Layout):
  """The canonical train state (the checkpoint layout) of a pmapped state."""
  return merge_state(from_devices(device_state, layout))


def shard_batch(batch: dict[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
  """(B, ...) -> (devices, B / replicas, ...): a replica's towers share data.

  Both towers need the whole images, as conv1 sees all input channels.
  """
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.shape[0] % layout.replicas:
      raise ValueError(f'batch of {v.shape[0]} does not split into '
                       f'{layout.replicas} data replicas')
    per_replica = v.reshape((layout.replicas, -1) + v.shape[1:])
    out[k] = np.repeat(per_replica, layout.towers, axis=0)
  return out


# ---------------------------------------------------------------- forward


def _gather_towers(x: jax.Array, layout: Layout) -> jax.Array:
  """Concatenates the towers' channels along the last axis, in tower order.

  Tower order is the canonical channel order, so the result is what the
  single-device network holds at this point. Its transpose (a reduce-scatter)
  returns each tower the summed gradient of its own channels.
  """
  return jax.lax.all_gather(x, train_lib.AXIS, axis_index_groups=layout.tower_groups,
                            axis=-1, tiled=True)


def tower_apply(tower_params, images_BHWC: jax.Array, *, model: models.AlexNet,
                layout: Layout, train: bool, rng: jax.Array | None = None) -> jax.Array:
  """This device's tower of `model`; returns the full (gathered) logits.

  Must run inside a pmap over axis `train.AXIS` laid out as `layout`.
  `model` supplies the hyper-parameters (as built by `models.create_model`);
  the computation matches `model.apply` on the canonical parameters.

  Args:
    tower_params: this device's slice of the canonical parameters.
    images_BHWC: this replica's images (the same on every tower).
    model: the single-device module whose settings are reproduced.
    layout: the device layout; `layout.towers` must equal `model.towers`.
    train: apply dropout.
    rng: dropout key, needed when `train` and the dropout rate is positive.
  """
  if model.towers != layout.towers:
    raise ValueError(f'model has {model.towers} towers, layout {layout.towers}')
  p, dt = tower_params, model.dtype

  def conv(name, x, i, stride=1, padding=None, then_pool=None):
    k = model.kernel_sizes[i]
    pad = k // 2 if padding is None else padding
    if isinstance(pad, int):
      pad = [(pad, pad), (pad, pad)]
    return models.conv_nhwc(x.astype(dt), p[name]['kernel'].astype(dt), stride, pad,
                            model.conv_impl, bias=p[name]['bias'], then_pool=then_pool)

  def conv_block(name, x, i, lrn, **conv_args):
    # As `AlexNet.conv_block`. A tower's maps are exactly one normalisation
    # block of the canonical network, whose windows never cross towers.
    if models.uses_onednn(model.conv_impl, dt):
      return conv(name, x, i, then_pool=model.pool_args(lrn, towers=1), **conv_args)
    return model.relu_lrn_pool(conv(name, x, i, **conv_args), lrn, towers=1)

  def dense(name, x):
    return x.astype(dt) @ p[name]['kernel'].astype(dt) + p[name]['bias'].astype(dt)

  def dropout(x, i):
    rate = model.dropout_rate
    if not train or rate == 0.0:
      return x
    # Each tower drops its own units before they are gathered, so every
    # unit is dropped by exactly one device and all devices agree.
    keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))

  x = conv_block('conv1', images_BHWC, 0, lrn=True, stride=model.conv1_stride,
                 padding=model.conv1_padding)
  x = conv_block('conv2', x, 1, lrn=True)
  x = nn.relu(conv('conv3', _gather_towers(x, layout), 2))  # exchange 1
  x = nn.relu(conv('conv4', x, 3))
  x = conv_block('conv5', x, 4, lrn=False)
  # Gathered before flattening, so the features are in the canonical
  # (h, w, c) order that fc6's kernel rows follow.
  x = _gather_towers(x, layout)  # exchange 2
  x = x.reshape((x.shape[0], -1))
  num_hidden = len(model.fc_features)
  for i in range(num_hidden):
    if i:
      x = _gather_towers(x, layout)  # exchange 3 (fc7 input)
    x = dropout(nn.relu(dense(f'fc{i + 6}', x)), i)
  x = _gather_towers(x, layout)  # exchange 4 (fc8 input)
  logits = dense(f'fc{num_hidden + 6}', x)
  return _gather_towers(logits, layout).astype(jnp.float32)


# ---------------------------------------------------------------- steps


def tower_grads(tower_params, batch, *, model: models.AlexNet, layout: Layout,
                rng: jax.Array | None = None, train: bool = True):
  """(loss, logits, grads) of this device's tower, grads averaged over replicas.

  Differentiating through the all-gathers sums the cotangents of every device
  of a replica, i.e. gives the gradient of the sum of their losses. All
  towers of a replica compute the same loss, so each contributes
  loss / towers and the sum is the replica's loss.
  """
  def loss_fn(params):
    logits = tower_apply(params, batch['image'], model=model, layout=layout,
                         train=train, rng=rng)
    loss = train_lib.cross_entropy(logits, batch['label']).mean()
    return loss / layout.towers, (loss, logits)

  (_, (loss, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(tower_params)
  grads = train_lib.mean_over_devices(
      grads, layout.replica_groups, cpu_kernels=models.uses_onednn(model.conv_impl, model.dtype))
  return loss, logits, grads


def model_parallel_train_step(state, batch, *, model: models.AlexNet, layout: Layout,
                              tx: optax.GradientTransformationExtraArgs,
                              schedule: Callable[[jax.Array], jax.Array], seed: int):
  """`train.train_step` for a state in the model-parallel layout.

  The dropout key depends on (seed, step, device index); as in
  `train.train_step`, runs are reproducible for a given device count.
  """
  axis = train_lib.AXIS
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), state.step),
                           jax.lax.axis_index(axis))
  loss, logits, grads = tower_grads(state.params, batch, model=model, layout=layout,
                                    rng=rng)
  lr = schedule(state.step) * state.lr_scale
  params, opt_state = train_lib.apply_optimizer(
      tx, grads, state.opt_state, state.params, lr,
      cpu_kernels=models.uses_onednn(model.conv_impl, model.dtype))
  # Every tower of a replica holds the replica's loss and logits, so the mean
  # over all devices is the mean over replicas.
  metrics = train_lib.mean_over_devices({
      'train_loss': loss,
      'train_top1_error': jnp.mean(jnp.argmax(logits, -1) != batch['label']),
  })
  metrics['lr'] = lr
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def model_parallel_eval_step(tower_params, batch, *, model: models.AlexNet,
                             layout: Layout):
  """`train.eval_step` for params in the model-parallel layout.

  Counts are summed over one tower's devices only, so each replica's examples
  count once (every tower of a replica sees the same examples).
  """
  images = batch['image']
  apply = functools.partial(tower_apply, tower_params, model=model, layout=layout,
                            train=False)
  if images.ndim == 5:
    b, crops = images.shape[:2]
    logits = apply(images.reshape((b * crops,) + images.shape[2:]))
    probs = jax.nn.softmax(logits).reshape(b, crops, -1).mean(axis=1)
    logits = jnp.log(probs)
  else:
    logits = apply(images)
  counts = train_lib.masked_counts(logits, batch['label'], batch['mask'])
  return jax.lax.psum(counts, train_lib.AXIS, axis_index_groups=layout.replica_groups)


def make_model_parallel_train_step(*, model: models.AlexNet, layout: Layout,
                                   tx: optax.GradientTransformationExtraArgs,
                                   schedule: Callable[[jax.Array], jax.Array],
                                   seed: int, devices: Sequence[Any]):
  """The pmapped train step; its state argument is donated."""
  return jax.pmap(
      functools.partial(model_parallel_train_step, model=model, layout=layout,
                        tx=tx, schedule=schedule, seed=seed),
      axis_name=train_lib.AXIS, devices=devices, donate_argnums=(0,))


def make_model_parallel_eval_step(*, model: models.AlexNet, layout: Layout,
                                  devices: Sequence[Any]):
  """The pmapped eval step, called as `(device_params, sharded_batch)`."""
  return jax.pmap(
      functools.partial(model_parallel_eval_step, model=model, layout=layout),
      axis_name=train_lib.AXIS, devices=devices)
