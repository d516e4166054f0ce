"""Orbax checkpoints of the train state, with a compatibility check.

The state is saved in flax's state-dict form (plain nested dicts of arrays),
whatever device layout trained it, so a checkpoint restores into any layout.
Before anything in a workdir is touched, a checkpoint there is compared leaf
by leaf with the state the current config builds; a mismatch stops the run
with a message instead of overwriting or mis-loading the old run.

In a multi-process run every process calls `save` and `restore_latest` at the
same steps (Orbax synchronises them); the host copies of the state are the
same everywhere, and Orbax writes them from process 0 only. Every process
reads them back on resume, so the workdir must be on storage all hosts see.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.serialization
import flax.traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint of a different model or optimiser."""


def write_json(path: str, obj: Any) -> None:
  """Writes atomically: a crash never leaves a half-written file."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_config(config, workdir: str) -> None:
  """Writes config.json; a different earlier config is kept as config.N.json."""
  path = os.path.join(workdir, 'config.json')
  new = json.loads(config.to_json_best_effort())
  old = read_json(path)
  if old is not None and old != new:
    n = 1
    while os.path.exists(os.path.join(workdir, f'config.{n}.json')):
      n += 1
    os.replace(path, os.path.join(workdir, f'config.{n}.json'))
  write_json(path, new)


def _flat(tree) -> dict[str, Any]:
  state_dict = flax.serialization.to_state_dict(tree)
  return {'/'.join(k): v for k, v in
          flax.traverse_util.flatten_dict(state_dict, keep_empty_nodes=True).items()}


def compare(expected, restored_state_dict) -> list[str]:
  """Differences in leaf names and shapes between two state trees."""
  want = {k: np.shape(v) for k, v in _flat(expected).items()}
  have = {k: np.shape(v) for k, v in _flat(restored_state_dict).items()}
  problems = [f'missing in checkpoint: {k} {want[k]}' for k in sorted(want.keys() - have.keys())]
  problems += [f'not in this model: {k} {have[k]}' for k in sorted(have.keys() - want.keys())]
  problems += [f'{k}: checkpoint {have[k]} vs model {want[k]}'
               for k in sorted(want.keys() & have.keys()) if want[k] != have[k]]
  return problems


class Checkpointer:
  """Periodic saves to `directory`, keeping the last `keep`."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state, host_state: dict) -> None:
    """Saves asynchronously; `state` is one (unreplicated) copy of the state."""
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(jax.device_get(flax.serialization.to_state_dict(state))),
        host=ocp.args.JsonSave(host_state)))

  def restore_latest(self, template):
    """(state, host_state) of the newest checkpoint, or None if there is none.

    Raises IncompatibleCheckpointError if the checkpoint does not fit `template`.
    """
    step = self.latest_step()
    if step is None:
      return None
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), host=ocp.args.JsonRestore()))
    except Exception as e:
      raise IncompatibleCheckpointError(
          f'Could not read checkpoint {step} in {self.directory} ({e}). Move that '
          'folder away to start afresh, or use another --workdir.') from e
    problems = compare(template, restored['state'])
    if problems:
      listing = '\n  '.join(problems[:10])
      raise IncompatibleCheckpointError(
          f'{self.directory} holds a checkpoint (step {step}) of a different model or '
          f'optimiser than this config builds:\n  {listing}\nNothing was changed. Use a '
          'new --workdir for this config, or re-run with the config that wrote it '
          '(saved as config.json beside it).')
    state = flax.serialization.from_state_dict(template, restored['state'])
    state = jax.tree.map(lambda t, r: np.asarray(r, dtype=np.asarray(t).dtype), template, state)
    return state, restored['host'] or {}

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
