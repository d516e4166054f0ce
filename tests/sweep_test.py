"""Sweeps: expansion, stable names, states, the local runner and the SLURM path (fake sbatch)."""

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from alexnet_jax import checkpointing
from alexnet_jax import provenance
from alexnet_jax import workdir as workdir_lib
from alexnet_jax.sweep import hyper
from alexnet_jax.sweep import runner
from conftest import REPO

h = hyper.Hyper()

# The tiny network of conftest.tiny_fashion_config, as sweep overrides.
TINY = {'config.model.features': (8, 16, 16, 16, 8), 'config.model.conv1_stride': 2,
        'config.model.fc_features': (32, 32), 'config.global_batch_size': 32,
        'config.eval_batch_size': 500, 'config.dataset.eval_crops': 'center',
        'config.num_epochs': 1, 'config.log_every_steps': 1, 'config.max_train_steps': 2,
        'config.max_eval_batches': 1, 'config.checkpoint_every_steps': 2}


def write_sweep(tmp_path, body: str, base: str = 'configs/fashion_mnist.py') -> str:
  path = tmp_path / 'sweep.py'
  path.write_text(f'BASE_CONFIG = {base!r}\n\n' + textwrap.dedent(body))
  return str(path)


def test_builders_expand_as_documented():
  a, b = h.sweep('config.seed', [0, 1]), h.sweep('config.model.towers', [1, 2])
  assert h.product([a, b]) == [
      {'config.seed': 0, 'config.model.towers': 1}, {'config.seed': 0, 'config.model.towers': 2},
      {'config.seed': 1, 'config.model.towers': 1}, {'config.seed': 1, 'config.model.towers': 2}]
  assert h.zipit([a, b]) == [{'config.seed': 0, 'config.model.towers': 1},
                             {'config.seed': 1, 'config.model.towers': 2}]
  assert h.chainit([a, b]) == [{'config.seed': 0}, {'config.seed': 1},
                               {'config.model.towers': 1}, {'config.model.towers': 2}]
  assert h.product([[{}], a]) == a  # an empty override set is the base config
  with pytest.raises(ValueError, match='equal length'):
    h.zipit([a, h.sweep('config.num_epochs', [1, 2, 3])])
  with pytest.raises(ValueError, match='twice'):
    h.product([a, a])
  with pytest.raises(ValueError, match="start with 'config.'"):
    h.sweep('seed', [0])


def test_names_and_hashes_are_stable():
  overrides = {'config.model.lrn.enabled': False, 'config.seed': 1}
  # sha256 of the canonical JSON {"config.model.lrn.enabled":false,"config.seed":1}.
  assert hyper.overrides_hash(overrides) == '137c8130'
  assert hyper.run_name(overrides) == 'enabled-False_seed-1-137c8130'
  # The hash ignores the order of the keys; tuples and lists are the same value.
  assert hyper.overrides_hash(dict(reversed(overrides.items()))) == '137c8130'
  assert (hyper.overrides_hash({'config.model.features': (8, 16)}) ==
          hyper.overrides_hash({'config.model.features': [8, 16]}))
  # Keys that share their last part keep their full path; values stay readable.
  assert hyper.run_name({'config.model.lrn.enabled': True, 'config.x.enabled': 0.5,
                         'config.model.features': (8, 16)}).startswith(
                             'model.lrn.enabled-True_x.enabled-0.5_features-8x16-')
  assert hyper.run_name({}).startswith('base-')
  assert hyper.flag_value((8, 16)) == '(8,16)' and hyper.flag_value((8,)) == '(8,)'


def test_load_checks_every_run(tmp_path):
  sweep = hyper.load(write_sweep(tmp_path, """
      def get_hyper(h):
        return h.product([h.sweep('config.model.towers', [1, 2]), h.sweep('config.seed', [0, 1])])
      """), str(tmp_path / 'root'))
  assert [r.overrides for r in sweep.runs][1] == {'config.model.towers': 1, 'config.seed': 1}
  assert len({r.workdir for r in sweep.runs}) == 4
  assert all(os.path.dirname(r.workdir) == str(tmp_path / 'root') for r in sweep.runs)
  assert sweep.base_config == os.path.join(REPO, 'configs', 'fashion_mnist.py')
  assert sweep.manifest()['runs'][0]['workdir'] == sweep.runs[0].name
  with pytest.raises(ValueError, match="'config.model.tower' is not a config key"):
    hyper.load(write_sweep(tmp_path, """
        def get_hyper(h):
          return h.sweep('config.model.tower', [1])
        """), str(tmp_path))
  with pytest.raises(ValueError, match=r'run towers-3-\w+: Bad config: model.towers=3'):
    hyper.load(write_sweep(tmp_path, """
        def get_hyper(h):
          return h.sweep('config.model.towers', [3])
        """), str(tmp_path))
  with pytest.raises(ValueError, match='needs BASE_CONFIG'):
    (tmp_path / 'bad.py').write_text('x = 1\n')
    hyper.load(str(tmp_path / 'bad.py'), str(tmp_path))


def test_states_and_busy_workdirs(tmp_path):
  run = hyper.Run('r', {}, str(tmp_path / 'r'))
  assert run.state() == 'new' and not runner.is_busy(run.workdir)
  os.makedirs(run.workdir)
  (tmp_path / 'r' / 'config.json').write_text('{}')
  assert run.state() == 'partial'
  (tmp_path / 'r' / 'results.json').write_text('{"step": 5, "stopped_by": "SIGTERM"}')
  assert run.state() == 'partial'  # a run stopped by a signal resumes
  (tmp_path / 'r' / 'results.json').write_text('{"step": 5}')
  assert run.state() == 'done'
  with workdir_lib.WorkdirLock(run.workdir):  # another run holds it
    assert runner.is_busy(run.workdir)
  assert not runner.is_busy(run.workdir)


def test_local_slots_give_each_run_its_devices():
  gpu = runner.local_slots(2, 2, gpus=['0', '1', '2', '3'])
  assert [s.env['CUDA_VISIBLE_DEVICES'] for s in gpu] == ['0,1', '2,3']
  assert all('XLA_PYTHON_CLIENT_MEM_FRACTION' not in s.env for s in gpu)
  with pytest.raises(ValueError, match='need 4 GPUs, and 2 are visible'):
    runner.local_slots(2, 2, gpus=['0', '1'])
  shared = runner.local_slots(4, 1, share_gpus=True, gpus=['0', '1'])
  assert [s.env['CUDA_VISIBLE_DEVICES'] for s in shared] == ['0', '1', '0', '1']
  assert shared[0].env['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.450'
  cpu = runner.local_slots(2, 4, gpus=[], cpus=[0, 1, 2, 3])
  assert [s.cpus for s in cpu] == [(0, 1), (2, 3)]
  assert [s.env['OMP_NUM_THREADS'] for s in cpu] == ['2', '2']
  assert '--xla_force_host_platform_device_count=4' in cpu[0].env['XLA_FLAGS']
  if shutil.which('taskset'):
    assert cpu[1].wrap(['python']) == ['taskset', '-c', '2,3', 'python']
  assert runner.local_slots(1, 1, gpus=[], cpus=[0, 1])[0].wrap(['python']) == ['python']


def test_local_runner_runs_n_at_once_and_survives_failures(tmp_path, monkeypatch, capsys):
  sweep = hyper.load(write_sweep(tmp_path, """
      def get_hyper(h):
        return h.sweep('config.seed', [0, 1, 2, 3])
      """), str(tmp_path / 'root'))
  spans = tmp_path / 'spans'
  spans.mkdir()

  def fake_command(sweep_, run, extra_flags=()):
    # Records when it ran; the run of seed 2 fails.
    code = (f'import time, sys; t = time.time(); time.sleep(0.6); '
            f'open({str(spans / run.name)!r}, "w").write(f"{{t}} {{time.time()}}"); '
            f'print("output of {run.name}"); sys.exit(3 if {run.overrides["config.seed"]} == 2 else 0)')
    return [sys.executable, '-c', code]

  monkeypatch.setattr(runner, 'command', fake_command)
  slots = runner.local_slots(2, 1, gpus=[], cpus=[0, 0])
  outcome = runner.run_local(sweep, list(sweep.runs), slots, poll_sec=0.05)
  failed = sweep.runs[2]
  assert outcome == {r.name: 'failed' if r is failed else 'done' for r in sweep.runs}
  out = capsys.readouterr().out
  assert f'FAILED {failed.name} (exit status 3)' in out and runner.log_path(sweep, failed) in out
  status = json.load(open(os.path.join(failed.workdir, runner.STATUS_FILE)))
  assert status['state'] == 'failed' and status['returncode'] == 3
  assert 'output of' in open(status['log']).read()
  # Never more than two at once, and the pool was used: some ran together.
  times = sorted(tuple(map(float, p.read_text().split())) for p in spans.iterdir())
  overlaps = [sum(s < t_end and t_start < e for s, e in times) - 1 for t_start, t_end in times]
  assert max(overlaps) <= 1 and max(overlaps) == 1


def test_slurm_task_requeues_with_its_arguments(tmp_path):
  task = runner.TrainTask()
  proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  task._proc = proc  # a running trainer
  args = (['cmd'], str(tmp_path), str(tmp_path / 'log'))
  delayed = task.checkpoint(*args)
  assert proc.poll() == -15  # stopped with SIGTERM, so that it saves
  assert delayed.args == args and isinstance(delayed.function, runner.TrainTask)


FAKE_SBATCH = r"""#!/usr/bin/env bash
# Records its arguments and script, then runs the array's tasks here, in the background.
echo "$@" >> "$FAKE_SLURM_LOG"
script="${@: -1}"
cp "$script" "$FAKE_SLURM_LOG.script"
range=$(grep -o -- '--array=[0-9-]*' "$script" | cut -d= -f2)
last=${range#*-}
(
  sleep 1  # submitit files the tasks' pickles under the job id once sbatch has answered
  for i in $(seq 0 "$last"); do
    SLURM_JOB_ID=4242$i SLURM_ARRAY_JOB_ID=4242 SLURM_ARRAY_TASK_ID=$i SLURM_NTASKS=1 \
      SLURM_JOB_NUM_NODES=1 SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0 \
      SLURM_JOB_NODELIST=localhost bash "$script"
  done
) >/dev/null 2>&1 &
echo "Submitted batch job 4242"
"""
FAKE_SRUN = r"""#!/usr/bin/env bash
# srun --unbuffered --output F [--error F] CMD...: runs CMD with its output in F.
out=/dev/null; err=/dev/null
while [[ "$1" == --* ]]; do
  case "$1" in
    --output) out="$2"; shift 2 ;;
    --error) err="$2"; shift 2 ;;
    *) shift ;;
  esac
done
sub() { local p="$1"; p="${p//%A/$SLURM_ARRAY_JOB_ID}"; p="${p//%a/$SLURM_ARRAY_TASK_ID}"; echo "${p//%j/$SLURM_JOB_ID}"; }
exec "$@" >>"$(sub "$out")" 2>>"$(sub "$err")"
"""


def test_slurm_path_against_a_fake_sbatch(tmp_path, monkeypatch):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, text in (('sbatch', FAKE_SBATCH), ('srun', FAKE_SRUN),
                     ('squeue', '#!/bin/sh\nexit 0\n'), ('sacct', '#!/bin/sh\nexit 0\n')):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(stat.S_IRWXU)
  monkeypatch.setenv('PATH', f'{bin_dir}:{os.environ["PATH"]}')
  monkeypatch.setenv('FAKE_SLURM_LOG', str(tmp_path / 'sbatch.log'))
  sweep = hyper.load(write_sweep(tmp_path, """
      def get_hyper(h):
        return h.sweep('config.seed', [0, 1])
      """), str(tmp_path / 'root'))
  monkeypatch.setattr(runner, 'command', lambda s, run, extra_flags=(): [
      sys.executable, '-c', f'print("trained {run.name}")'])
  options = runner.SlurmOptions(partition='gpu', time_min=30, account='lab', cpus_per_task=4)
  jobs = runner.submit_slurm(sweep, list(sweep.runs), devices_per_run=2, parallel=1,
                             options=options)
  assert [j.job_id for j in jobs] == ['4242_0', '4242_1']
  deadline = time.time() + 120
  states = []
  while time.time() < deadline:
    states = [(checkpointing.read_json(os.path.join(r.workdir, runner.STATUS_FILE)) or {}).get('state')
              for r in sweep.runs]
    if states == ['done', 'done']:
      break
    time.sleep(0.5)
  assert states == ['done', 'done']
  script = (tmp_path / 'sbatch.log.script').read_text()
  for line in ('--array=0-1%1', '--partition=gpu', '--time=30', '--account=lab',
               '--gpus-per-node=2', '--cpus-per-task=4', '--ntasks-per-node=1'):
    assert f'#SBATCH {line}' in script, line
  for run in sweep.runs:
    assert f'trained {run.name}' in open(runner.log_path(sweep, run)).read()


def test_command_line_runs_skips_and_lists(tmp_path):
  """A real (two-step) training run through `sweep run`; the second call skips it."""
  sweep = write_sweep(tmp_path, f"""
      def get_hyper(h):
        tiny = [{{{', '.join(f'{k!r}: {v!r}' for k, v in TINY.items())}}}]
        return h.product([tiny, h.sweep('config.seed', [0])])
      """)
  root = str(tmp_path / 'root')
  cmd = [sys.executable, '-m', 'alexnet_jax.sweep', 'run', sweep, f'--root={root}']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  dry = subprocess.run(cmd + ['--dry_run'], capture_output=True, text=True, cwd=REPO, env=env)
  assert dry.returncode == 0, dry.stderr
  assert '1 runs of' in dry.stdout and ' new ' in dry.stdout
  first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
  assert first.returncode == 0, first.stdout + first.stderr
  assert '1 to run (0 resumed)' in first.stdout and 'finished ' in first.stdout
  (name,) = [r['workdir'] for r in json.load(open(os.path.join(root, 'sweep.json')))['runs']]
  results = json.load(open(os.path.join(root, name, 'results.json')))
  assert results['step'] == 2
  provenance = json.load(open(os.path.join(root, name, 'provenance.json')))
  assert provenance['seed'] == 0 and provenance['config']['model']['fc_features'] == [32, 32]
  assert provenance['devices']['count'] >= 1 and 'jax' in provenance['packages']
  again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
  assert again.returncode == 0 and '1 done' in again.stdout and '0 to run' in again.stdout
  dry = subprocess.run(cmd + ['--dry_run'], capture_output=True, text=True, cwd=REPO, env=env)
  assert ' done ' in dry.stdout


def test_deterministic_sets_the_xla_flag_before_the_backend_starts():
  code = ('import os; from alexnet_jax import backend; backend.set_deterministic(True); '
          'import jax; print(os.environ["XLA_FLAGS"]); print(float(jax.numpy.ones(3).sum())); '
          'backend.set_deterministic(True)')  # a second call, after the backend: no-op on CPU
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                       env={**env, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr
  flags_line, total = out.stdout.split('\n')[:2]
  assert flags_line.split() == ['--xla_gpu_deterministic_ops=true'] and total == '3.0'


def test_provenance_keeps_earlier_starts(tmp_path):
  provenance.write(str(tmp_path), {'created': 'a', 'git_commit': 'x'})
  provenance.write(str(tmp_path), {'created': 'b', 'git_commit': 'y'})
  provenance.write(str(tmp_path), {'created': 'c', 'git_commit': 'y'})
  record = json.load(open(tmp_path / 'provenance.json'))
  assert record['created'] == 'c'
  assert [p['created'] for p in record['previous']] == ['a', 'b']
  assert all('previous' not in p for p in record['previous'])
