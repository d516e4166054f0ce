"""Nothing lost, nothing mixed: the workdir lock, counts validated, resume that
refuses a changed computation, metrics that never hold a step twice."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from alexnet_jax import config_lib
from alexnet_jax import metric_writers
from alexnet_jax import train
from alexnet_jax import workdir as workdir_lib
from conftest import REPO
from conftest import set_keys
from conftest import tiny_fashion_config

# A child that holds a workdir's lock until killed.
_HOLDER = '''
import sys, time
from alexnet_jax import workdir
lock = workdir.WorkdirLock(sys.argv[1])
lock.acquire()
print('locked', flush=True)
time.sleep(600)
'''


def _hold(workdir):
  """A real process holding `workdir`'s lock (kill it to release)."""
  os.makedirs(workdir, exist_ok=True)
  proc = subprocess.Popen([sys.executable, '-c', _HOLDER, str(workdir)], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'locked'
  return proc


def _tiny(steps, **overrides):
  config = tiny_fashion_config()
  config.max_train_steps = steps
  config.max_eval_batches = 1
  config.checkpoint_every_steps = 5
  config.log_every_steps = 5
  return set_keys(config, overrides)


def test_lock_names_the_holder_and_dies_with_it(tmp_path):
  holder = _hold(tmp_path)
  try:
    with pytest.raises(workdir_lib.WorkdirBusyError,
                       match=f'in use by another run \\(process {holder.pid} on '):
      workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    # A run on the busy workdir stops before touching anything in it.
    with pytest.raises(workdir_lib.WorkdirBusyError, match='pass another --workdir'):
      train.train_and_evaluate(_tiny(5), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['.lock']
  finally:
    holder.send_signal(signal.SIGKILL)  # no chance to clean up
    holder.wait()
  with workdir_lib.WorkdirLock(str(tmp_path)):  # no stale lock
    with pytest.raises(workdir_lib.WorkdirBusyError, match=f'process {os.getpid()} '):
      workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  workdir_lib.WorkdirLock(str(tmp_path)).acquire()  # released on leaving the block


def test_second_main_on_a_busy_workdir_exits_with_one_line(tmp_path):
  holder = _hold(tmp_path)
  try:
    run = subprocess.run([sys.executable, '-m', 'alexnet_jax.main', f'--workdir={tmp_path}',
                          '--config.max_train_steps=5'], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
  finally:
    holder.kill()
    holder.wait()
  assert run.returncode == 1, run.stderr[-2000:]
  assert 'Traceback' not in run.stderr
  last = [l for l in run.stderr.splitlines() if l.strip()][-1]
  assert f'is in use by another run (process {holder.pid} on' in last, last


def test_two_processes_stop_when_the_workdir_is_busy(tmp_path):
  """Process 0 holds the lock for the run; process 1 waits for its verdict."""
  holder = _hold(tmp_path)
  try:
    run = subprocess.run([sys.executable, '-m', 'launch.local', '--num_processes=2',
                          '--devices_per_process=1', '--', f'--workdir={tmp_path}',
                          '--config.max_train_steps=5'], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
  finally:
    holder.kill()
    holder.wait()
  out = run.stdout + run.stderr
  assert run.returncode != 0, out[-3000:]
  assert f'[0] \nError: {tmp_path} is in use by another run (process {holder.pid}' in out or (
      f'is in use by another run (process {holder.pid}' in out), out[-3000:]
  assert 'process 0 could not lock it' in out, out[-3000:]
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.parametrize('key,value,message', [
    ('log_every_steps', 0, 'log_every_steps=0 must be a positive whole number: pass e.g. '
                           '--config.log_every_steps=100'),
    ('checkpoint_every_steps', 0, 'checkpoint_every_steps=0 must be a positive'),
    ('keep_checkpoints', 0, 'keep_checkpoints=0 must be a positive whole number: pass e.g. '
                            '--config.keep_checkpoints=3'),
    ('max_train_steps', -5, 'max_train_steps=-5 must be a whole number >= 0'),
    ('global_batch_size', -64, 'global_batch_size=-64 must be a positive whole number'),
    ('eval_every_epochs', 0.0, 'eval_every_epochs=0.0 must be > 0'),
    ('num_epochs', 0, 'num_epochs=0 must be a positive whole number'),
    ('schedule.patience', 0, 'schedule.patience=0 must be a positive whole number'),
])
def test_counts_and_intervals_are_validated(key, value, message):
  config = _tiny(5, **{key: value})
  with pytest.raises(ValueError, match=message.replace('(', '\\(').replace('+', '\\+')):
    config_lib.validate(config, 1)


def test_resume_refuses_a_changed_computation_and_allows_the_rest(tmp_path, capsys):
  train.train_and_evaluate(_tiny(5), str(tmp_path))
  before = sorted(os.listdir(tmp_path / 'checkpoints'))
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(_tiny(10, **{'schedule.base_lr': 0.01, 'global_batch_size': 16}),
                             str(tmp_path))
  message = str(e.value)
  assert '  global_batch_size: 32 (saved) -> 16 (now)' in message
  assert '  schedule.base_lr: 0.05 (saved) -> 0.01 (now)' in message
  assert 'max_train_steps' not in message  # allowed, not listed as a problem
  assert '--allow_config_change' in message
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == before
  assert json.load(open(tmp_path / 'config.json'))['schedule']['base_lr'] == 0.05
  # Cadence and length may change; the change is printed and the old config kept.
  results = train.train_and_evaluate(_tiny(10, log_every_steps=2), str(tmp_path))
  assert results['step'] == 10
  out = capsys.readouterr().out
  assert '  log_every_steps: 5 (saved) -> 2 (now)' in out
  assert '  max_train_steps: 5 (saved) -> 10 (now)' in out
  assert json.load(open(tmp_path / 'config.1.json'))['log_every_steps'] == 5
  # The explicit override resumes with the new values.
  results = train.train_and_evaluate(_tiny(15, **{'schedule.base_lr': 0.01}), str(tmp_path),
                                     allow_config_change=True)
  assert results['step'] == 15
  assert '  schedule.base_lr: 0.05 (saved) -> 0.01 (now)' in capsys.readouterr().out


def test_num_epochs_is_a_computation_change_only_when_it_shapes_the_schedule():
  saved = json.loads(tiny_fashion_config().to_json_best_effort())
  new = json.loads(tiny_fashion_config().to_json_best_effort())
  new['num_epochs'] = 3
  assert saved['schedule']['name'] == 'one_cycle'
  blocking, free = config_lib.resume_changes(saved, new)
  assert blocking == [('num_epochs', 1, 3)] and not free
  saved['schedule']['name'] = new['schedule']['name'] = 'plateau'
  assert config_lib.resume_changes(saved, new) == ([], [('num_epochs', 1, 3)])


def test_metrics_never_hold_a_step_twice_after_a_resume(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  lines = [{'step': s, 'train_loss': 1.0} for s in (5, 10, 15, 20)]
  path.write_text(''.join(json.dumps(l) + '\n' for l in lines) + '{"step": 2')  # cut short
  writer = metric_writers.MetricWriter(str(tmp_path), after_step=10)
  writer.write(15, {'train_loss': 0.5})
  writer.close()
  records = metric_writers.read_metrics(str(tmp_path))
  assert [(r['step'], r['train_loss']) for r in records] == [(5, 1.0), (10, 1.0), (15, 0.5)]


def test_a_run_killed_after_logging_resumes_without_duplicate_steps(tmp_path):
  """As after kill -9: metrics logged beyond the newest checkpoint are replayed once."""
  train.train_and_evaluate(_tiny(10, checkpoint_every_steps=4), str(tmp_path))
  # The run logged steps 5 and 10 but its last checkpoint is step 8 (the
  # final one, at 10, removed as if the process had died before saving it).
  shutil.rmtree(tmp_path / 'checkpoints' / '10')
  os.remove(tmp_path / 'results.json')
  train.train_and_evaluate(_tiny(10, checkpoint_every_steps=4), str(tmp_path))
  steps = [r['step'] for r in metric_writers.read_metrics(str(tmp_path)) if 'train_loss' in r]
  assert steps == [5, 10], steps
  evals = [r['step'] for r in metric_writers.read_metrics(str(tmp_path))
           if 'eval_top1_error' in r]
  assert len(evals) == len(set(evals))
