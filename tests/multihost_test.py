"""Several processes: settings, the local launcher, and a 2 x 2-device run.

The run test starts 2 processes of 2 simulated CPU devices each (gloo
collectives, as separate hosts) and checks them against 1 process of 4
devices: same parameters, same evaluation, one set of outputs, one checkpoint.
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import flax.serialization
import jax
import numpy as np
import pytest

from alexnet_jax import checkpointing
from alexnet_jax import distributed
from alexnet_jax import optim
from alexnet_jax import train
from alexnet_jax.data import common
from alexnet_jax.data import fashion_mnist
from conftest import REPO
from conftest import load_config
from conftest import set_keys
from launch import local

_SLURM_STEP = {'SLURM_JOB_ID': '77', 'SLURM_NTASKS': '4', 'SLURM_PROCID': '2',
               'SLURM_LOCALID': '0', 'SLURM_STEP_NODELIST': 'node[1-2]'}


# ---------------------------------------------------------------- settings


def test_without_settings_a_single_process():
  assert distributed.resolve(environ={}) == distributed.Setup('single')
  assert distributed.resolve(environ=dict(_SLURM_STEP, SLURM_NTASKS='1')).mode == 'single'
  assert distributed.resolve(num_processes=1, environ=_SLURM_STEP).mode == 'single'


def test_flags_then_environment_then_slurm():
  env = {distributed.ENV_COORDINATOR: 'head:99', distributed.ENV_NUM_PROCESSES: '4',
         distributed.ENV_PROCESS_ID: '3', **_SLURM_STEP}
  assert distributed.resolve('10.0.0.1:1234', 2, 1, environ=env) == distributed.Setup(
      'explicit', num_processes=2, process_id=1, coordinator_address='10.0.0.1:1234')
  assert distributed.resolve(environ=env) == distributed.Setup(
      'explicit', num_processes=4, process_id=3, coordinator_address='head:99')
  assert distributed.resolve(process_id=0, environ=env).process_id == 0
  assert distributed.resolve(environ=_SLURM_STEP) == distributed.Setup(
      'slurm', num_processes=4, process_id=2)


@pytest.mark.parametrize('flags,env,message', [
    ((None, 2, None), {}, r'--process_id \(or ALEXNET_PROCESS_ID\) is not set'),
    ((None, 2, 1), {}, r'--coordinator_address \(or ALEXNET_COORDINATOR\) is not set'),
    (('h:1', None, 1), {}, r'--num_processes \(or ALEXNET_NUM_PROCESSES\) is not set'),
    (('h:1', 2, 2), {}, r'--process_id=2 is outside 0..1'),
    (('h:1', 0, 0), {}, r'--num_processes=0 must be at least 1'),
    ((None, 1, 1), {}, r'the only process has id 0'),
    (('localhost', 2, 0), {}, r'must be HOST:PORT'),
    ((None, None, None), {'ALEXNET_NUM_PROCESSES': 'two'}, r'must be an integer'),
    ((None, None, None), {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '8', 'SLURM_PROCID': '0'},
     r'not a task started by srun.*srun python -m alexnet_jax.main'),
])
def test_inconsistent_settings_say_what_to_do(flags, env, message):
  with pytest.raises(ValueError, match=message):
    distributed.resolve(*flags, environ=env)


@pytest.fixture
def fake_jax_initialize(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda *args, **kwargs: calls.append((args, kwargs)))
  monkeypatch.setattr(jax.config, 'update', lambda *args: calls.append(('config', args)))
  monkeypatch.delenv('JAX_CPU_COLLECTIVES_IMPLEMENTATION', raising=False)
  return calls


def test_slurm_step_leaves_the_settings_to_jax(fake_jax_initialize):
  distributed.initialize(distributed.resolve(environ=_SLURM_STEP))
  assert fake_jax_initialize == [
      ('config', ('jax_cpu_collectives_implementation', 'gloo')), ((), {})]


def test_explicit_settings_reach_jax(fake_jax_initialize):
  distributed.initialize(distributed.resolve('127.0.0.1:5', 2, 1, environ={}))
  assert fake_jax_initialize[-1] == (('127.0.0.1:5',), {
      'num_processes': 2, 'process_id': 1, 'cluster_detection_method': 'deactivate'})
  fake_jax_initialize.clear()
  distributed.initialize(distributed.resolve(environ={}))
  assert not fake_jax_initialize


# ---------------------------------------------------------------- launcher


def test_process_env_hands_out_devices():
  base = {'XLA_FLAGS': '--xla_cpu_use_xnnpack=true --xla_force_host_platform_device_count=4',
          'PYTHONPATH': '/elsewhere'}
  env = local.process_env(base, process_id=1, num_processes=2, coordinator='127.0.0.1:5',
                          platform='cpu', devices_per_process=3)
  assert env['XLA_FLAGS'] == ('--xla_cpu_use_xnnpack=true '
                              '--xla_force_host_platform_device_count=3')
  assert (env['ALEXNET_COORDINATOR'], env['ALEXNET_NUM_PROCESSES'],
          env['ALEXNET_PROCESS_ID']) == ('127.0.0.1:5', '2', '1')
  assert env['PYTHONPATH'] == os.pathsep.join([REPO, '/elsewhere'])
  env = local.process_env({}, process_id=1, num_processes=2, coordinator='h:5',
                          platform='gpu', devices_per_process=2, gpus=['4', '5', '6', '7'])
  assert env['CUDA_VISIBLE_DEVICES'] == '6,7'
  assert 'XLA_FLAGS' not in env


def test_launcher_stops_the_others_when_one_fails():
  commands = [[sys.executable, '-c', 'import time; print("waiting", flush=True); time.sleep(120)'],
              [sys.executable, '-c', 'import sys, time; time.sleep(1); print("failing"); sys.exit(3)']]
  out = io.BytesIO()
  t0 = time.time()
  code = local.run(commands, [dict(os.environ)] * 2, kill_after=5, out=out)
  text = out.getvalue().decode()
  assert code == 3, text
  assert time.time() - t0 < 60
  assert '[0] waiting\n' in text and '[1] failing\n' in text
  assert 'process 1 exited with code 3; stopping the others' in text


_SIGNAL_CHILD = '''
import os, signal, sys, time
def handle(signum, frame):
  print('process', os.environ['ALEXNET_PROCESS_ID'], 'got', signal.Signals(signum).name,
        flush=True)
  sys.exit(0)
signal.signal(signal.SIGTERM, handle)
print('ready', flush=True)
time.sleep(120)
'''


def test_launcher_passes_signals_to_every_process(tmp_path):
  (tmp_path / 'signal_child.py').write_text(_SIGNAL_CHILD)
  env = dict(os.environ, PYTHONPATH=str(tmp_path))
  proc = subprocess.Popen([sys.executable, '-m', 'launch.local', '--num_processes=2',
                           '--module=signal_child'], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = _collect(proc.stdout)
  _wait_for(lambda: sum('ready' in l for l in lines) == 2, proc, lines)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=60) == 0, lines
  assert '[0] process 0 got SIGTERM\n' in lines and '[1] process 1 got SIGTERM\n' in lines


def _collect(stream) -> list[str]:
  """Lines of `stream` as they arrive (read in a thread)."""
  lines = []
  threading.Thread(target=lambda: lines.extend(iter(stream.readline, '')),
                   daemon=True).start()
  return lines


def _wait_for(condition, proc, lines, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, ''.join(lines[-50:])
    assert time.time() < deadline, ''.join(lines[-50:])
    time.sleep(0.05)


# ---------------------------------------------------------------- a real run

# The tiny network, an evaluation of all 10,000 test images every 5 steps.
_RUN = {'model.features': (8, 16, 16, 16, 8), 'model.fc_features': (32, 32),
        'model.conv1_stride': 2, 'dataset.eval_crops': 'center',
        'global_batch_size': 32, 'eval_batch_size': 1000, 'num_epochs': 1,
        'eval_every_epochs': 5 / (60000 // 32), 'log_every_steps': 5,
        'checkpoint_every_steps': 1000, 'max_train_steps': 200, 'progress_bar': False}
_REFERENCE_STEPS = 15


def _reference_config():
  """The launched run's config, with a checkpoint at every step."""
  config = load_config('fashion_mnist')
  overrides = dict(_RUN, max_train_steps=_REFERENCE_STEPS, checkpoint_every_steps=1,
                   keep_checkpoints=_REFERENCE_STEPS)
  return set_keys(config, overrides)


def _records(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


def test_two_processes_of_two_devices_train_as_one_of_four(tmp_path):
  """Also: a SIGTERM to one process stops both at the same step, with one
  checkpoint written by both; only process 0 writes outputs."""
  workdir = tmp_path / 'two_processes'
  command = [sys.executable, '-m', 'launch.local', '--num_processes=2',
             '--devices_per_process=2', '--', f'--workdir={workdir}']
  command += [f'--config.{k}={v}' for k, v in _RUN.items()]
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = _collect(proc.stdout)

  def signal_process_1_only():
    # Process 0 is not signalled: it must learn of it and stop with process 1.
    while proc.poll() is None:
      if any(l.startswith('[0] step 5: top-1 error') for l in lines):
        pids = re.search(r'pids 0:(\d+) 1:(\d+)', ''.join(lines))
        os.kill(int(pids.group(2)), signal.SIGTERM)
        return
      time.sleep(0.05)

  threading.Thread(target=signal_process_1_only, daemon=True).start()
  # Meanwhile, 1 process x 4 devices (the launched processes, mostly
  # compiling one thing at a time, leave room for it).
  reference = tmp_path / 'one_process'
  config = _reference_config()
  assert jax.process_count() == 1 and jax.local_device_count() == 4
  train.train_and_evaluate(config, str(reference))

  assert proc.wait(timeout=600) == 0, ''.join(lines[-50:])
  output = ''.join(lines)
  stopped = re.search(r'\[0\] SIGTERM received: checkpoint saved at step (\d+)', output)
  assert stopped, output[-5000:]
  stopped_at = int(stopped.group(1))
  assert 5 < stopped_at <= _REFERENCE_STEPS, 'the signal came too late to compare'
  assert not [l for l in lines if l.startswith('[1] step ')]  # notes: process 0 only

  # One process wrote the outputs: every record once, one event file.
  records = _records(workdir)
  # Every 5 steps, and the steps since the last log when the signal came.
  assert [r['step'] for r in records if 'train_loss' in r] == sorted(
      set(range(5, stopped_at + 1, 5)) | {stopped_at})
  evals = [r for r in records if 'eval_top1_error' in r]
  assert [r['step'] for r in evals] == list(range(5, stopped_at + 1, 5))
  assert all(r['eval_examples'] == 10000 for r in evals)  # 5000 per process
  assert len(os.listdir(workdir / 'tensorboard')) == 1
  assert (workdir / 'config.json').exists()

  ref_evals = {r['step']: r for r in _records(reference) if 'eval_top1_error' in r}
  for r in evals:
    for k in ('eval_top1_error', 'eval_top5_error', 'eval_loss'):
      np.testing.assert_allclose(r[k], ref_evals[r['step']][k], atol=2e-4, err_msg=k)

  # The checkpoint both processes wrote restores, and equals the reference's
  # at that step.
  ckpt = checkpointing.Checkpointer(str(reference / 'checkpoints'))
  expected = ckpt.manager.restore(stopped_at)['state']
  first = ckpt.manager.restore(1)['state']
  ckpt.close()
  tx = optim.create_optimizer(config.optimizer)
  template = train.TrainState(step=np.int32(0), params=first['params'],
                              opt_state=tx.init(first['params']), lr_scale=np.float32(1))
  ckpt = checkpointing.Checkpointer(str(workdir / 'checkpoints'))
  restored, host = ckpt.restore_latest(template)
  ckpt.close()
  assert int(restored.step) == stopped_at and 'plateau' in host
  restored = flax.serialization.to_state_dict(restored)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert not np.allclose(restored['params']['fc8']['kernel'], first['params']['fc8']['kernel'])


def test_every_process_trains_on_its_rows_of_the_same_global_batch(fashion_arrays):
  config = load_config('fashion_mnist')
  images, labels = (a[:1000] for a in fashion_arrays['train'])
  whole = next(fashion_mnist.train_dataset(config, images, labels, local_batch=32,
                                           start_step=40).as_numpy_iterator())
  parts = [next(fashion_mnist.train_dataset(
      config, images, labels, local_batch=8, start_step=40, process_index=i,
      process_count=4).as_numpy_iterator()) for i in range(4)]
  for k in ('image', 'label'):
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


@pytest.mark.parametrize('n,count', [(10, 3), (10000, 2), (7, 4)])
def test_process_parts_cover_every_example_once(n, count):
  parts = [common.process_part(n, i, count) for i in range(count)]
  covered = np.concatenate([np.arange(n)[p] for p in parts])
  np.testing.assert_array_equal(covered, np.arange(n))
  sizes = [p.stop - p.start for p in parts]
  assert max(sizes) - min(sizes) <= 1


def test_eval_batches_pad_a_smaller_share_to_the_common_count(tiny_config):
  images = np.zeros((5, 28, 28, 1), np.uint8)
  labels = np.arange(5, dtype=np.int32)
  batches = list(fashion_mnist.eval_batches(tiny_config, images, labels, local_batch=4,
                                            num_batches=3))
  assert [len(b['label']) for b in batches] == [4, 4, 4]
  assert [b['mask'].sum() for b in batches] == [4, 1, 0]
