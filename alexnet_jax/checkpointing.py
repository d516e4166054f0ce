"""Orbax checkpoints of the train state, with compatibility and integrity checks.

The state is saved in flax's state-dict form (plain nested dicts of arrays),
whatever device layout trained it, so a checkpoint restores into any layout.
Before anything in a workdir is touched, a checkpoint there is compared leaf
by leaf with the state the current config builds; a mismatch stops the run
with a message instead of overwriting or mis-loading the old run.

Integrity: every checkpoint records a sha256 checksum of its arrays and of the
host state (in the host JSON item, key `_checksum`). On resume the newest
checkpoint that reads back and matches its checksum is used; a checkpoint that
fails to read or to verify is moved aside, never deleted, to
`<checkpoints>_corrupt/<step>-<UTC time>` (outside the folder Orbax manages),
with a warning, and the next newest is tried. Checkpoints written before
checksums existed are loaded unverified. If none is intact the run stops with
NoIntactCheckpointError.

Disk space: before each save the free space of the checkpoint folder is
compared with the checkpoint's size (from the arrays' shapes and dtypes); if
it cannot fit, or the asynchronous write fails for lack of space, the run
stops with DiskFullError naming the last good checkpoint, and Orbax's
temporary folders of the failed save are removed.

In a multi-process run every process calls `save` and `restore_latest` at the
same steps (Orbax synchronises them); the host copies of the state are the
same everywhere, and Orbax writes them from process 0 only. Every process
reads them back on resume, so the workdir must be on storage all hosts see;
all of them reach the same verdict on a checkpoint, and process 0 alone moves
a bad one aside.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import errno
import hashlib
import json
import os
import shutil
import threading
import time
from typing import Any

from absl import logging
import flax.serialization
import flax.traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKSUM_KEY = '_checksum'  # in the host JSON item of a checkpoint
_CHECKSUM_SCHEME = 'sha256/v1'
# Orbax writes a step into `<step>.orbax-checkpoint-tmp` (its items into
# `<item>.orbax-checkpoint-tmp` inside) and renames it when complete.
_ORBAX_TMP_MARK = '.orbax-checkpoint-tmp'
_MIB = 1 << 20


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint of a different model or optimiser."""


class CheckpointIntegrityError(ValueError):
  """A checkpoint failed to read or to verify and could not be dealt with."""


class NoIntactCheckpointError(CheckpointIntegrityError):
  """Every checkpoint of the workdir failed to read or to verify."""


class DiskFullError(ValueError):
  """A checkpoint does not fit on the disk of the checkpoint folder."""


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


def _fmt_bytes(n: float) -> str:
  for unit, size in (('GiB', 1 << 30), ('MiB', _MIB), ('KiB', 1 << 10)):
    if n >= size:
      return f'{n / size:.1f} {unit}'
  return f'{int(n)} bytes'


def _array_leaves(state_dict) -> dict[str, np.ndarray]:
  """The arrays of a state dict by '/'-joined name (empty nodes left out)."""
  return {k: np.asarray(v) for k, v in _flat(state_dict).items()
          if v is not None and v is not flax.traverse_util.empty_node
          and not isinstance(v, dict)}


def _leaf_digest(name: str, array: np.ndarray) -> str:
  h = hashlib.sha256(f'{name}\0{array.dtype.name}\0{array.shape}\0'.encode())
  h.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
  return h.hexdigest()


def _canonical_json(host_state) -> bytes:
  # Through JSON and back first: what is checked on restore is what was read.
  return json.dumps(json.loads(json.dumps(host_state)), sort_keys=True,
                    separators=(',', ':')).encode()


def checksum(state_dict, host_state: dict) -> dict:
  """The integrity record of a checkpoint: sha256 of every array and of the host state.

  Each array's digest covers its name, dtype, shape and bytes; `sha256` covers
  all of them (sorted by name) and the canonical JSON of `host_state`. Large
  states are hashed on several threads (hashlib releases the GIL).
  """
  leaves = _array_leaves(state_dict)
  names = sorted(leaves)
  total_bytes = sum(a.nbytes for a in leaves.values())
  if total_bytes > 64 * _MIB and len(names) > 1:
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
      digests = list(pool.map(lambda n: _leaf_digest(n, leaves[n]), names))
  else:
    digests = [_leaf_digest(n, leaves[n]) for n in names]
  arrays = dict(zip(names, digests))
  host = hashlib.sha256(_canonical_json(host_state)).hexdigest()
  total = hashlib.sha256()
  for name in names:
    total.update(f'{name}\0{arrays[name]}\n'.encode())
  total.update(f'host\0{host}\n'.encode())
  return {'scheme': _CHECKSUM_SCHEME, 'sha256': total.hexdigest(), 'arrays': arrays,
          'host': host}


def verify(record, state_dict, host_state: dict) -> str | None:
  """None if the checkpoint matches its checksum record, else what is wrong."""
  if not isinstance(record, dict) or not isinstance(record.get('sha256'), str):
    return f'its checksum record is damaged ({str(record)[:100]!r})'
  actual = checksum(state_dict, host_state)
  if actual['sha256'] == record['sha256']:
    return None
  stored = record.get('arrays') if isinstance(record.get('arrays'), dict) else {}
  differ = [n for n in sorted(set(actual['arrays']) | set(stored))
            if actual['arrays'].get(n) != stored.get(n)]
  if actual['host'] != record.get('host'):
    differ.append('host state')
  listed = ', '.join(differ[:5]) + (f' and {len(differ) - 5} more' if len(differ) > 5 else '')
  return ('its contents do not match the checksum recorded when it was saved'
          + (f' (differ: {listed})' if listed else ''))


def state_nbytes(state) -> int:
  """Bytes of the arrays of `state`, from their shapes and dtypes (no copies)."""
  total = 0
  for leaf in jax.tree.leaves(state):
    nbytes = getattr(leaf, 'nbytes', None)
    total += int(nbytes) if nbytes is not None else np.asarray(leaf).nbytes
  return total


def needed_bytes(nbytes: int) -> int:
  """Free space a checkpoint of `nbytes` of arrays asks for: 10% + 1 MiB margin."""
  return int(nbytes * 1.1) + _MIB


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` (or what caused it) says the disk or quota is full."""
  seen = 0
  while error is not None and seen < 10:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(error)
    if ('No space left on device' in text or 'Disk quota exceeded' in text
        or f"os_error_code='{errno.ENOSPC}'" in text):
      return True
    error = error.__cause__ or error.__context__
    seen += 1
  return False


def _short_error(error: BaseException) -> str:
  text = str(error).split('\n')[0].split(' [tensorstore_spec=')[0]
  if 'No space left on device' in text and not isinstance(error, OSError):
    text = 'No space left on device'
  if len(text) > 300:
    text = text[:300] + '...'
  return f'{type(error).__name__}: {text}'


def _wait_for_orbax_writers(timeout_sec: float = 60.0) -> None:
  """Waits for Orbax's write threads of a failed save to end.

  When one write of a save fails, Orbax reports the failure while the other
  items may still be writing into the temporary folder; removing it before
  they end would let them recreate parts of it.
  """
  try:
    from orbax.checkpoint._src.futures import future as orbax_future  # pylint: disable=g-import-not-at-top
    writer_class = orbax_future._SignalingThread  # pylint: disable=protected-access
  except (ImportError, AttributeError):  # another Orbax: nothing to wait for by name
    return
  deadline = time.monotonic() + timeout_sec
  for thread in threading.enumerate():
    if isinstance(thread, writer_class) and thread is not threading.current_thread():
      thread.join(max(0.0, deadline - time.monotonic()))


def _kind(problem: str) -> str:
  """A few words for what `Checkpointer._read` found wrong."""
  if problem.startswith('it could not be read'):
    return 'unreadable'
  if problem.startswith('its contents do not match'):
    return 'checksum mismatch'
  return 'damaged checksum record' if 'checksum record' in problem else 'unverifiable'


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


class Checkpointer:
  """Periodic saves to `directory`, keeping the last `keep`.

  Checkpoints that fail to read or verify on restore are moved to
  `corrupt_directory` (default: `<directory>_corrupt`, beside it).
  """

  def __init__(self, directory: str, keep: int = 3, corrupt_directory: str | None = None):
    self.directory = os.path.abspath(directory)
    self.corrupt_directory = os.path.abspath(
        corrupt_directory or self.directory.rstrip(os.sep) + '_corrupt')
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )
    # (step, where it went, why) of each checkpoint `restore_latest` moved aside.
    self.moved_aside: list[tuple[int, str, str]] = []
    self._pending: tuple[int, int] | None = None  # (step, bytes needed) of the save in flight
    self._failed = False  # a save failed; its error was raised already

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_directory(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # Saving.

  def save(self, state, host_state: dict) -> None:
    """Saves asynchronously; `state` is one (unreplicated) copy of the state.

    Raises DiskFullError if the checkpoint will not fit on the disk, or if the
    previous asynchronous save failed for lack of space.
    """
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return
    needed = needed_bytes(state_nbytes(state))
    state_dict = jax.device_get(flax.serialization.to_state_dict(state))
    host = {k: v for k, v in host_state.items() if k != CHECKSUM_KEY}
    host[CHECKSUM_KEY] = checksum(state_dict, host)
    self._finish_pending()  # Orbax would wait for it anyway; its errors surface here
    self._check_space(step, needed)
    self._pending = (step, needed)
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state_dict),
          host=ocp.args.JsonSave(host)))
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._pending = None
      self._after_failed_save(step, needed, e)

  def wait(self) -> None:
    """Blocks until the save in flight is written; raises DiskFullError if it failed for lack of space."""
    self._finish_pending()

  def close(self) -> None:
    try:
      self._finish_pending()
    except BaseException:
      self._close_quietly()
      raise
    if self._failed:
      self._close_quietly()
    else:
      self.manager.close()

  def _close_quietly(self) -> None:
    """Closes the manager after a failed save, whose error was already raised."""
    try:
      self.manager.close()
    except Exception as e:  # pylint: disable=broad-exception-caught
      logging.info('Closing the checkpoint manager after a failed save: %s', _short_error(e))

  def _finish_pending(self) -> None:
    if self._pending is None:
      self.manager.wait_until_finished()
      return
    step, needed = self._pending
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._after_failed_save(step, needed, e)
    finally:
      self._pending = None

  def _after_failed_save(self, step: int, needed: int, error: Exception):
    """Removes what the failed save of `step` left, then raises."""
    self._failed = True
    try:  # Orbax keeps the error to raise it again on close: it has been dealt with
      self.manager.check_for_errors()
    except Exception:  # pylint: disable=broad-exception-caught
      pass
    removed = self._remove_partial(step)
    self.manager.reload()
    if removed:
      logging.warning('Removed the partial checkpoint of step %d: %s', step,
                      ', '.join(removed))
    if is_disk_full(error):
      raise DiskFullError(
          f'Saving the checkpoint of step {step} in {self.directory} failed for lack '
          f'of disk space ({_short_error(error)}); its partial files were removed. It '
          f'needs about {_fmt_bytes(needed)} and {_fmt_bytes(self._free_bytes())} is '
          f'free now. {self._last_good(exclude=step)} Free space on that disk, or move '
          'the workdir to a larger one, then re-run the same command to resume.'
      ) from error
    raise error

  def _remove_partial(self, step: int) -> list[str]:
    """Deletes Orbax's temporary folders (process 0, which writes them).

    No save is in flight when this runs, so every temporary folder is a
    leftover. A finished step folder is left: its checksum decides on resume.
    """
    del step
    if jax.process_index() != 0:
      return []
    _wait_for_orbax_writers()
    removed = []
    try:
      names = os.listdir(self.directory)
    except OSError:
      names = []
    for name in names:
      if _ORBAX_TMP_MARK in name:
        path = os.path.join(self.directory, name)
        shutil.rmtree(path, ignore_errors=True)
        if os.path.exists(path):  # a straggling writer recreated a file in it
          shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed

  def _free_bytes(self) -> int:
    path = self.directory
    while not os.path.exists(path) and os.path.dirname(path) != path:
      path = os.path.dirname(path)
    return shutil.disk_usage(path).free

  def _check_space(self, step: int, needed: int) -> None:
    free = self._free_bytes()
    fits = free >= needed
    if jax.process_count() > 1:  # process 0 writes: its verdict is everyone's
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      verdict = multihost_utils.broadcast_one_to_all(
          np.array([fits, free / _MIB], np.float32))
      fits, free = bool(verdict[0]), int(float(verdict[1]) * _MIB)
    if not fits:
      raise DiskFullError(
          f'Not enough disk space to save the checkpoint of step {step} in '
          f'{self.directory}: it needs about {_fmt_bytes(needed)} and '
          f'{_fmt_bytes(free)} is free. {self._last_good(exclude=step)} Free space on '
          'that disk, or move the workdir to a larger one, then re-run the same '
          'command to resume.')

  def _last_good(self, exclude: int) -> str:
    steps = [s for s in self.manager.all_steps() if s != exclude]
    if not steps:
      return ('This run has no checkpoint yet, so re-running starts it from the '
              'beginning.')
    last = max(steps)
    return (f'The last good checkpoint of this run is step {last}, in '
            f'{self.step_directory(last)}.')

  # Restoring.

  def restore_latest(self, template):
    """(state, host_state) of the newest intact checkpoint, or None if there is none.

    A checkpoint that fails to read or to match its checksum is moved aside
    (see `moved_aside`) with a warning, and the next newest is tried.
    Raises NoIntactCheckpointError if every checkpoint failed, and
    IncompatibleCheckpointError if the checkpoint does not fit `template`.
    """
    while True:
      step = self.latest_step()
      if step is None:
        self._raise_if_all_failed()
        return None
      restored, problem = self._read(step)
      if problem is not None:
        self._move_aside(step, problem)
        continue
      problems = compare(template, restored['state'])
      if problems:
        listing = '\n  '.join(problems[:10])
        raise IncompatibleCheckpointError(
            f'{self.directory} holds a checkpoint (step {step}) of a different model or '
            f'optimiser than this config builds:\n  {listing}\nNothing was changed. Use a '
            'new --workdir for this config, or re-run with the config that wrote it '
            '(saved as config.json beside it).')
      state = flax.serialization.from_state_dict(template, restored['state'])
      state = jax.tree.map(lambda t, r: np.asarray(r, dtype=np.asarray(t).dtype),
                           template, state)
      return state, restored['host']

  def read_newest_intact(self) -> tuple[int | None, dict | None, list[tuple[int, str]]]:
    """(step, {'state': state dict, 'host': host state}, skipped) of the newest intact checkpoint.

    For tools that inspect a finished run: needs no template and changes
    nothing, so a checkpoint that fails to read or verify is only listed in
    `skipped` as (step, what is wrong), never moved aside. (None, None,
    skipped) when no checkpoint is intact.
    """
    skipped = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      restored, problem = self._read(step)
      if problem is None:
        return step, restored, skipped
      skipped.append((step, problem))
    return None, None, skipped

  def _read(self, step: int) -> tuple[dict | None, str | None]:
    """The checkpoint of `step` read and verified, or (None, what is wrong with it)."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), host=ocp.args.JsonRestore()))
      host = dict(restored['host'] or {})
      state_dict = restored['state']
    except Exception as e:  # pylint: disable=broad-exception-caught
      return None, f'it could not be read ({_short_error(e)})'
    record = host.pop(CHECKSUM_KEY, None)
    if record is None:
      logging.warning('The checkpoint at step %d in %s has no checksum (it was written '
                      'before checksums were recorded); loading it unverified.',
                      step, self.directory)
    else:
      try:
        problem = verify(record, state_dict, host)
      except Exception as e:  # pylint: disable=broad-exception-caught
        problem = f'it could not be verified ({_short_error(e)})'
      if problem is not None:
        return None, problem
    return {'state': state_dict, 'host': host}, None

  def _move_aside(self, step: int, problem: str) -> None:
    """Renames the checkpoint of `step` into the corrupt folder (process 0), then reloads."""
    source = self.step_directory(step)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
    target = os.path.join(self.corrupt_directory, f'{step}-{stamp}')
    failure = None
    if jax.process_index() == 0:
      try:
        os.makedirs(self.corrupt_directory, exist_ok=True)
        n = 1
        while os.path.exists(target):
          target = os.path.join(self.corrupt_directory, f'{step}-{stamp}.{n}')
          n += 1
        try:
          os.rename(source, target)
        except OSError as e:
          if e.errno != errno.EXDEV:
            raise
          shutil.move(source, target)  # another filesystem: copied, then removed
        with open(target + '.reason.txt', 'w') as f:
          f.write(f'Checkpoint of step {step}, moved from {source}: {problem}\n')
      except OSError as e:
        failure = e
    else:
      target = self.corrupt_directory  # process 0 names the folder
    _barrier(f'checkpointing_moved_aside_{step}')
    if os.path.exists(source):
      raise CheckpointIntegrityError(
          f'The checkpoint at step {step} in {self.directory} is damaged: {problem}. It '
          f'could not be moved aside to {self.corrupt_directory} '
          f'({_short_error(failure) if failure else "it is still there"}). Move '
          f'{source} out of {self.directory} by hand, then re-run the same command to '
          'resume from the checkpoint before it.')
    self.manager.reload()
    self.moved_aside.append((step, target, problem))
    logging.warning('The checkpoint at step %d is damaged: %s. It was moved, unchanged, '
                    'to %s; trying the checkpoint before it.', step, problem, target)

  def _raise_if_all_failed(self) -> None:
    """Raises NoIntactCheckpointError when checkpoints exist only as moved-aside ones."""
    if self.moved_aside:
      details = '; '.join(f'step {s}: {_kind(p)}' for s, _, p in self.moved_aside)
      raise NoIntactCheckpointError(
          f'Every checkpoint in {self.directory} failed to read or to verify ({details}), '
          'so there is nothing to resume from. They were moved, unchanged, to '
          f'{self.corrupt_directory} (the reasons are in the .reason.txt files there). '
          'Start afresh with another --workdir, or remove '
          f'{self.corrupt_directory} to start this workdir over from step 0.')
    try:
      earlier = sorted(n for n in os.listdir(self.corrupt_directory)
                       if os.path.isdir(os.path.join(self.corrupt_directory, n)))
    except OSError:
      earlier = []
    if earlier:
      raise NoIntactCheckpointError(
          f'{self.directory} holds no checkpoint: the checkpoints of this workdir '
          f'failed to read or to verify earlier and were moved to '
          f'{self.corrupt_directory} ({", ".join(earlier)}; the reasons are in the '
          '.reason.txt files there). '
          'Start afresh with another --workdir, or remove '
          f'{self.corrupt_directory} to start this workdir over from step 0.')
