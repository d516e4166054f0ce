"""How devices share the work: data parallelism, and the paper's split of the towers.

The paper trained its network on two GPUs, one tower per GPU; the GPUs
exchanged activations only at the inputs of conv3, fc6, fc7 and fc8. This
module reproduces that split inside one `jax.pmap` over all devices, which
form (data replica, tower) pairs:

    device d holds tower d % towers of data replica d // towers

so with 4 devices and 2 towers, devices 0 and 1 are the two towers of replica
0 and see the same images, devices 2 and 3 those of replica 1. Each device
runs the one network (`model.AlexNet`) with `split=towers`, so it computes
only its own tower, and with an `exchange` that all-gathers the towers'
activations within a replica (`Layout.tower_groups`) at the four exchange
points above and on the logits; gradients are averaged over the replicas
holding the same tower (`Layout.replica_groups`). Plain data parallelism is
the layout with one tower per replica (`Layout(n, towers=1)`): every device a
replica, every exchange the identity. The train and eval steps
(`train.train_step`, `train.eval_step`) serve both. A single pmap with
`axis_index_groups` is used because nested pmaps (data x model) fail on the
jax version this project runs on.

Parameter layout. A tower's parameters are the canonical (single-device)
parameters of `model.AlexNet` sliced along their last axis: tower t owns
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
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import model as model_lib

AXIS = 'batch'  # the pmap axis: every device of the run


@dataclasses.dataclass(frozen=True)
class Layout:
  """How `num_devices` devices are divided into towers and data replicas.

  towers=1 is plain data parallelism: every device holds the whole network.
  """
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
  def replica_groups(self) -> list[list[int]] | None:
    """Devices that hold the same tower: their gradients are averaged.

    None (all devices, `lax.pmean`'s default) with one tower per replica.
    """
    if self.towers == 1:
      return None
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
  mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
  sharding = jax.NamedSharding(mesh, jax.P(AXIS))

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
    out[k] = (per_replica if layout.towers == 1
              else np.repeat(per_replica, layout.towers, axis=0))
  return out


# ---------------------------------------------------------------- the network


def gather_towers(x: jax.Array, layout: Layout) -> jax.Array:
  """Concatenates the towers' channels along the last axis, in tower order.

  Tower order is the canonical channel order, so the result is what the
  single-device network holds at this point. Its transpose (a reduce-scatter)
  returns each tower the summed gradient of its own channels.
  """
  return jax.lax.all_gather(x, AXIS, axis_index_groups=layout.tower_groups,
                            axis=-1, tiled=True)


def split_model(model: model_lib.AlexNet, layout: Layout) -> model_lib.AlexNet:
  """The network each device of `layout` runs: its own tower, exchanging with the others.

  Must run inside a pmap over axis `AXIS` laid out as `layout`, on the
  device's slice of the parameters (`split_params`). One tower per replica:
  `model` itself.
  """
  if layout.towers == 1:
    return model
  if model.towers != layout.towers:
    raise ValueError(f'model has {model.towers} towers, layout {layout.towers}')
  return model.clone(split=layout.towers,
                     exchange=functools.partial(gather_towers, layout=layout))
