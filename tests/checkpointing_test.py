"""Checkpoint integrity (checksums, moving damaged checkpoints aside) and disk space.

Real Orbax checkpoints in tmp folders, written and read by `Checkpointer`.
"""

import collections
import errno
import hashlib
import json
import logging
import math
import os

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.handlers import json_checkpoint_handler
import pytest

from alexnet_jax import checkpointing
from alexnet_jax import optim
from alexnet_jax import train
from conftest import make_model, tiny_fashion_config

# Orbax's readers, failing on a damaged checkpoint, leave callbacks that find
# their event loop closed ("Event loop is closed"): noise, not a test failure.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')

HOST1 = {'plateau': {'best': 0.25, 'bad_evals': 1, 'reductions': 0}, 'elapsed_sec': 12.5}
HOST2 = {'plateau': {'best': 0.125, 'bad_evals': 0, 'reductions': 1}, 'elapsed_sec': 30.0}


def _with_random_fc7(state, seed):
  """`state` with fc7's kernel made of random bytes, which zstd stores as they are."""
  state_dict = flax.serialization.to_state_dict(state)
  kernel = state_dict['params']['fc7']['kernel']
  bits = np.random.default_rng(seed).integers(0, 256, kernel.size * 4, dtype=np.uint8)
  state_dict['params']['fc7']['kernel'] = bits.view(np.float32).reshape(kernel.shape)
  return flax.serialization.from_state_dict(state, state_dict)


@pytest.fixture(scope='module')
def states():
  """(template of zeros, state at step 1, state at step 2) with distinct values.

  fc6/fc7 are widened: fc7's kernel (1 MiB of random bytes) is stored raw in
  the largest data file, so bytes overwritten in it still decode, and only
  the checksum can tell.
  """
  config = tiny_fashion_config()
  config.model.fc_features = (512, 512)
  state = train.create_train_state(config, make_model(config),
                                   optim.create_optimizer(config.optimizer))
  state = jax.device_get(state)
  two = jax.tree.map(lambda x: np.asarray(x) + np.asarray(1, x.dtype), state)
  one = _with_random_fc7(state.replace(step=np.int32(1)), seed=1)
  two = _with_random_fc7(two.replace(step=np.int32(2)), seed=2)
  zeros = jax.tree.map(np.zeros_like, state)
  return zeros, one, two


def _save_two(directory, states):
  _, one, two = states
  ckpt = checkpointing.Checkpointer(str(directory))
  ckpt.save(one, HOST1)
  ckpt.save(two, HOST2)
  ckpt.close()


def _assert_same_state(a, b):
  a, b = flax.serialization.to_state_dict(a), flax.serialization.to_state_dict(b)
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(x, y)


def _largest_file(folder):
  files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


def _overwrite_ff(folder, state):
  """4 KB of 0xFF into the largest file of `folder`, over the middle of fc7's kernel.

  The bytes are found by content: Orbax writes arrays concurrently, so their
  order in the file varies from run to run.
  """
  path = _largest_file(folder)
  with open(path, 'rb') as f:
    data = f.read()
  kernel = np.ascontiguousarray(state.params['fc7']['kernel']).tobytes()
  offset = data.find(kernel[len(kernel) // 2:len(kernel) // 2 + 4096])
  assert offset >= 0, 'fc7/kernel is not stored raw in the largest file'
  with open(path, 'r+b') as f:
    f.seek(offset)
    f.write(b'\xff' * 4096)


def _truncate(folder):
  path = _largest_file(folder)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _digest_tree(folder):
  """{relative path: sha256} of every file under `folder`."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _restore(directory, template):
  """(restored state, host state, what was moved aside) of a fresh Checkpointer on `directory`."""
  ckpt = checkpointing.Checkpointer(str(directory))
  try:
    restored, host = ckpt.restore_latest(template)
  finally:
    ckpt.close()
  return restored, host, ckpt.moved_aside


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_round_trip_returns_identical_arrays_and_host_state(tmp_path, states):
  zeros, one, two = states
  _save_two(tmp_path / 'checkpoints', states)
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  restored, host = ckpt.restore_latest(zeros)
  assert ckpt.moved_aside == []
  ckpt.close()
  _assert_same_state(restored, two)
  assert int(restored.step) == 2
  assert host == HOST2  # the checksum is stripped
  # The checksum is in the host JSON item, and covers arrays and host state.
  with open(tmp_path / 'checkpoints' / '2' / 'host' / 'metadata') as f:
    stored = json.load(f)
  record = stored.pop(checkpointing.CHECKSUM_KEY)
  assert stored == HOST2
  expected = checkpointing.checksum(flax.serialization.to_state_dict(two), HOST2)
  assert record == expected
  assert record['sha256'] != checkpointing.checksum(
      flax.serialization.to_state_dict(one), HOST2)['sha256']
  assert record['sha256'] != checkpointing.checksum(
      flax.serialization.to_state_dict(two), HOST1)['sha256']
  assert not (tmp_path / 'checkpoints_corrupt').exists()


def test_damaged_bytes_are_moved_aside_and_the_previous_checkpoint_restores(
    tmp_path, states, caplog):
  zeros, one, two = states
  _save_two(tmp_path / 'checkpoints', states)
  _overwrite_ff(tmp_path / 'checkpoints' / '2', two)
  damaged = _digest_tree(tmp_path / 'checkpoints' / '2')
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  with caplog.at_level(logging.WARNING):
    restored, host = ckpt.restore_latest(zeros)
  _assert_same_state(restored, one)
  assert host == HOST1
  # Moved, not deleted, byte for byte, outside the folder Orbax manages.
  [(step, target, problem)] = ckpt.moved_aside
  assert step == 2
  assert os.path.dirname(target) == str(tmp_path / 'checkpoints_corrupt')
  assert os.path.basename(target).startswith('2-')
  assert _digest_tree(target) == damaged
  assert 'do not match the checksum' in problem and 'params/fc7/kernel' in problem
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']
  assert ckpt.manager.all_steps() == [1] and ckpt.latest_step() == 1
  assert any('step 2 is damaged' in w and target in w for w in _warnings(caplog))
  with open(target + '.reason.txt') as f:
    assert 'do not match the checksum' in f.read()
  # The run goes on: step 2 is saved again and restores.
  ckpt.save(two, HOST2)
  ckpt.close()
  restored, host, _ = _restore(tmp_path / 'checkpoints', zeros)
  _assert_same_state(restored, two)
  assert host == HOST2


def test_unreadable_newest_checkpoint_falls_back(tmp_path, states, caplog):
  zeros, one, _ = states
  _save_two(tmp_path / 'checkpoints', states)
  _truncate(tmp_path / 'checkpoints' / '2')
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  with caplog.at_level(logging.WARNING):
    restored, host = ckpt.restore_latest(zeros)
  ckpt.close()
  _assert_same_state(restored, one)
  assert host == HOST1
  [(step, target, problem)] = ckpt.moved_aside
  assert step == 2 and os.path.isdir(target)
  assert problem.startswith('it could not be read')
  assert any('step 2 is damaged: it could not be read' in w for w in _warnings(caplog))


def test_missing_item_metadata_falls_back(tmp_path, states):
  zeros, one, _ = states
  _save_two(tmp_path / 'checkpoints', states)
  os.remove(tmp_path / 'checkpoints' / '2' / 'state' / '_METADATA')
  restored, _, moved = _restore(tmp_path / 'checkpoints', zeros)
  _assert_same_state(restored, one)
  assert [s for s, _, _ in moved] == [2]


def test_damaged_host_state_is_caught_by_the_checksum(tmp_path, states):
  zeros, one, _ = states
  _save_two(tmp_path / 'checkpoints', states)
  path = tmp_path / 'checkpoints' / '2' / 'host' / 'metadata'
  host = json.loads(path.read_text())
  host['elapsed_sec'] = 31.0  # still valid JSON
  path.write_text(json.dumps(host))
  restored, _, moved = _restore(tmp_path / 'checkpoints', zeros)
  _assert_same_state(restored, one)
  [(_, _, problem)] = moved
  assert 'differ: host state' in problem


def test_no_intact_checkpoint_is_a_clear_error(tmp_path, states):
  zeros = states[0]
  _save_two(tmp_path / 'checkpoints', states)
  _overwrite_ff(tmp_path / 'checkpoints' / '2', states[2])
  _truncate(tmp_path / 'checkpoints' / '1')
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  with pytest.raises(checkpointing.NoIntactCheckpointError) as e:
    ckpt.restore_latest(zeros)
  ckpt.close()
  assert isinstance(e.value, ValueError)
  message = str(e.value)
  corrupt = str(tmp_path / 'checkpoints_corrupt')
  assert message == (
      f'Every checkpoint in {tmp_path / "checkpoints"} failed to read or to verify '
      '(step 2: checksum mismatch; step 1: unreadable), so there is nothing to resume '
      f'from. They were moved, unchanged, to {corrupt} (the reasons are in the '
      '.reason.txt files there). Start afresh with another --workdir, or remove '
      f'{corrupt} to start this workdir over from step 0.')
  assert sorted(n.split('-')[0] for n in os.listdir(corrupt)
                if os.path.isdir(os.path.join(corrupt, n))) == ['1', '2']
  assert os.listdir(tmp_path / 'checkpoints') == []
  # Re-running does not silently start over from step 0.
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  with pytest.raises(checkpointing.NoIntactCheckpointError, match='holds no checkpoint'):
    ckpt.restore_latest(zeros)
  ckpt.close()


def test_checkpoint_without_checksum_still_restores(tmp_path, states, caplog):
  zeros, one, _ = states
  # The format before checksums: a plain manager, no `_checksum` in the host item.
  manager = ocp.CheckpointManager(
      str(tmp_path / 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True))
  manager.save(1, args=ocp.args.Composite(
      state=ocp.args.StandardSave(flax.serialization.to_state_dict(one)),
      host=ocp.args.JsonSave(HOST1)))
  manager.wait_until_finished()
  manager.close()
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  with caplog.at_level(logging.WARNING):
    restored, host = ckpt.restore_latest(zeros)
  ckpt.close()
  _assert_same_state(restored, one)
  assert host == HOST1
  assert ckpt.moved_aside == []
  assert any('has no checksum' in w and 'unverified' in w for w in _warnings(caplog))


def test_different_model_is_refused_not_moved(tmp_path, states):
  _save_two(tmp_path / 'checkpoints', states)
  config = tiny_fashion_config()  # fc layers of 32, not 512
  other = train.create_train_state(config, make_model(config),
                                   optim.create_optimizer(config.optimizer))
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match=r'params/fc7/kernel: checkpoint \(512, 512\) vs model \(32, 32\)'):
    ckpt.restore_latest(other)
  ckpt.close()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']
  assert not (tmp_path / 'checkpoints_corrupt').exists()


def _fake_disk_usage(free):
  usage = collections.namedtuple('usage', 'total used free')
  return lambda path: usage(free * 10, free * 9, free)


def test_disk_full_before_saving(tmp_path, states, monkeypatch):
  _, one, two = states
  directory = tmp_path / 'checkpoints'
  ckpt = checkpointing.Checkpointer(str(directory))
  ckpt.save(one, HOST1)
  ckpt.wait()
  nbytes = checkpointing.state_nbytes(two)
  assert nbytes == sum(np.asarray(x).nbytes for x in jax.tree.leaves(two))
  needed = checkpointing.needed_bytes(nbytes)
  assert needed == int(nbytes * 1.1) + 2**20
  monkeypatch.setattr(checkpointing.shutil, 'disk_usage', _fake_disk_usage(needed - 1))
  with pytest.raises(checkpointing.DiskFullError) as e:
    ckpt.save(two, HOST2)
  assert isinstance(e.value, ValueError)
  assert str(e.value) == (
      f'Not enough disk space to save the checkpoint of step 2 in {directory}: it needs '
      f'about {needed / 2**20:.1f} MiB and {(needed - 1) / 2**20:.1f} MiB is free. The '
      f'last good checkpoint of this run is step 1, in {directory / "1"}. Free space on '
      'that disk, or move the workdir to a larger one, then re-run the same command to '
      'resume.')
  assert sorted(os.listdir(directory)) == ['1']  # no step folder, no temporary folder
  assert ckpt.manager.all_steps() == [1]
  # With room again the same checkpointer saves.
  monkeypatch.setattr(checkpointing.shutil, 'disk_usage', _fake_disk_usage(needed))
  ckpt.save(two, HOST2)
  ckpt.close()
  assert sorted(os.listdir(directory)) == ['1', '2']


def test_disk_full_with_no_checkpoint_yet(tmp_path, states, monkeypatch):
  monkeypatch.setattr(checkpointing.shutil, 'disk_usage', _fake_disk_usage(1000))
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  with pytest.raises(checkpointing.DiskFullError,
                     match='1000 bytes is free. This run has no checkpoint yet'):
    ckpt.save(states[1], HOST1)
  ckpt.close()
  assert os.listdir(tmp_path / 'checkpoints') == []


def test_disk_full_during_the_asynchronous_write(tmp_path, states, monkeypatch):
  _, one, two = states
  directory = tmp_path / 'checkpoints'
  ckpt = checkpointing.Checkpointer(str(directory))
  ckpt.save(one, HOST1)
  ckpt.wait()
  seen = []

  async def no_space(self, x, path):
    del self, x, path
    seen.extend(os.listdir(directory))
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, '_save_fn', no_space)
  ckpt.save(two, HOST2)  # returns: the write goes on in the background
  with pytest.raises(checkpointing.DiskFullError) as e:
    ckpt.wait()
  message = str(e.value)
  assert message.startswith(
      f'Saving the checkpoint of step 2 in {directory} failed for lack of disk space '
      '(OSError: [Errno 28] No space left on device); its partial files were removed.')
  assert f'The last good checkpoint of this run is step 1, in {directory / "1"}.' in message
  assert 're-run the same command to resume' in message
  assert isinstance(e.value.__cause__, OSError)
  assert any('orbax-checkpoint-tmp' in n for n in seen)  # there was something to remove
  assert sorted(os.listdir(directory)) == ['1']
  ckpt.close()  # Orbax's copy of the error is not raised again
  monkeypatch.undo()
  ckpt = checkpointing.Checkpointer(str(directory))
  restored, host = ckpt.restore_latest(states[0])
  ckpt.close()
  _assert_same_state(restored, one)
  assert host == HOST1


def test_disk_full_is_recognised_in_tensorstore_errors():
  assert checkpointing.is_disk_full(OSError(errno.ENOSPC, 'No space left on device'))
  assert checkpointing.is_disk_full(OSError(errno.EDQUOT, 'Disk quota exceeded'))
  assert checkpointing.is_disk_full(ValueError(
      'RESOURCE_EXHAUSTED: Error writing "lr_scale/.zarray": Failed to write 174 bytes to '
      "file 11: No space left on device [os_error_code='28']"))
  try:
    try:
      raise OSError(errno.ENOSPC, 'No space left on device')
    except OSError as inner:
      raise RuntimeError('background save failed') from inner
  except RuntimeError as outer:
    assert checkpointing.is_disk_full(outer)
  assert not checkpointing.is_disk_full(OSError(errno.EACCES, 'Permission denied'))
  assert not checkpointing.is_disk_full(ValueError('RESOURCE_EXHAUSTED: out of memory'))


def _overwrite_ff_anywhere(folder):
  """4 KB of 0xFF into the largest file (smaller than 64 KB in the tiny model)."""
  path = _largest_file(folder)
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.seek(max(0, size // 2 - 2048))
    f.write(b'\xff' * 4096)


def test_training_resumes_from_the_newest_intact_checkpoint(tmp_path, caplog, capsys):
  config = tiny_fashion_config()
  config.max_train_steps = 20
  config.checkpoint_every_steps = 10
  config.max_eval_batches = 1
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['10', '20']
  _overwrite_ff_anywhere(tmp_path / 'checkpoints' / '20')
  capsys.readouterr()
  config.max_train_steps = 30
  with caplog.at_level(logging.WARNING):
    results = train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert any('step 20 is damaged' in w for w in _warnings(caplog)), _warnings(caplog)
  assert f'Resuming from the checkpoint at step 10 in {workdir}' in out
  corrupt = tmp_path / 'checkpoints_corrupt'
  moved = [n for n in os.listdir(corrupt) if (corrupt / n).is_dir()]
  assert len(moved) == 1 and moved[0].startswith('20-'), moved
  assert results['step'] == 30
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  losses = {r['step']: r['train_loss'] for r in records if 'train_loss' in r}
  assert sorted(losses) == [10, 20, 30]
  assert all(math.isfinite(v) for v in losses.values()), losses
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['10', '20', '30']
