"""Running a sweep's runs: here, several at once, or as one SLURM job array.

Every run is `python -m alexnet_jax.main --config=BASE --config.k=v ...
--workdir=ROOT/<name>` in its own process, so a run in a sweep is exactly the
run a user would start by hand, and the trainer's own resume, workdir lock
and checkpoints do the rest: re-running a sweep skips finished runs, resumes
started ones, and a workdir is never trained by two processes at once.

Each run's output goes to ROOT/logs/<name>.log and its state to
<workdir>/sweep_status.json ('running', 'done', 'stopped' by a signal, or
'failed'; the exit status, the log's path), which `sweep report` reads.

Local runs get devices of their own: on a GPU machine `devices_per_run`
GPUs each through CUDA_VISIBLE_DEVICES (runs share a card only with
`share_gpus`, then with a matching XLA memory fraction); on the CPU an
equal share of the cores (CPU affinity and OpenMP threads) and
`devices_per_run` simulated devices.

On SLURM (`submitit`), one array task per run holds its GPUs; on preemption
or timeout submitit calls `TrainTask.checkpoint`, which stops the trainer
with SIGTERM (it saves a checkpoint) and requeues the task, which resumes.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import signal
import subprocess
import sys
import time

import submitit

from alexnet_jax import checkpointing
from alexnet_jax import workdir as workdir_lib
from alexnet_jax.sweep import hyper

STATUS_FILE = 'sweep_status.json'
# A run started by a sweep writes no progress bar into its log.
RUN_FLAGS = ('--config.progress_bar=False',)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def write_status(workdir: str, **fields) -> None:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, STATUS_FILE)
  status = checkpointing.read_json(path) or {}
  status.update(fields)
  checkpointing.write_json(path, status)


def log_path(sweep: hyper.Sweep, run: hyper.Run) -> str:
  return os.path.join(sweep.root, 'logs', f'{run.name}.log')


def command(sweep: hyper.Sweep, run: hyper.Run, extra_flags=()) -> list[str]:
  return [sys.executable, '-m', 'alexnet_jax.main', f'--config={sweep.base_config}',
          *run.flags(), f'--workdir={run.workdir}', *RUN_FLAGS, *extra_flags]


def is_busy(workdir: str) -> bool:
  """Whether another process trains `workdir` now (it holds the trainer's lock)."""
  if not os.path.isdir(workdir):
    return False
  lock = workdir_lib.WorkdirLock(workdir)
  try:
    lock.acquire()
  except workdir_lib.WorkdirBusyError:
    return True
  lock.release()
  return False


def start(cmd: list[str], workdir: str, log: str, executor: str,
          env=None) -> subprocess.Popen:
  """Starts one run's trainer with its output appended to `log`."""
  os.makedirs(os.path.dirname(log), exist_ok=True)
  write_status(workdir, state='running', returncode=None, log=log, executor=executor,
               started=_now(), command=cmd)
  with open(log, 'a', encoding='utf-8') as out:
    out.write(f'\n=== {_now()} {" ".join(cmd)}\n')
    out.flush()
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=hyper.REPO, env=env)


def finish(workdir: str, returncode: int) -> str:
  """Records how a run's process ended: 'done', 'stopped' (by a signal, resumable) or 'failed'."""
  results = checkpointing.read_json(os.path.join(workdir, 'results.json')) or {}
  if returncode != 0:
    state = 'failed'
  else:
    state = 'stopped' if 'stopped_by' in results else 'done'
  write_status(workdir, state=state, returncode=returncode, ended=_now())
  return state


def results_line(run: hyper.Run) -> str:
  results = checkpointing.read_json(os.path.join(run.workdir, 'results.json')) or {}
  if 'eval_top1_error' not in results:
    return ''
  return (f': top-1 error {100 * results["eval_top1_error"]:.2f}%, top-5 '
          f'{100 * results["eval_top5_error"]:.2f}%')


# ---------------------------------------------------------------- local


def visible_gpus() -> list[str]:
  """The GPUs this machine offers runs (CUDA_VISIBLE_DEVICES, else nvidia-smi)."""
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    return [g for g in visible.split(',') if g.strip() and g.strip() != '-1']
  if shutil.which('nvidia-smi') is None:
    return []
  try:
    out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith('GPU ')]


@dataclasses.dataclass
class Slot:
  """What one of the `parallel` concurrent runs is given."""
  env: dict
  cpus: tuple[int, ...] = ()

  def wrap(self, cmd: list[str]) -> list[str]:
    """`cmd` pinned to this slot's cores (`taskset`), if it has its own."""
    if not self.cpus or shutil.which('taskset') is None:
      return cmd
    return ['taskset', '-c', ','.join(map(str, self.cpus)), *cmd]


def local_slots(parallel: int, devices_per_run: int, share_gpus: bool = False,
                gpus: list[str] | None = None, cpus: list[int] | None = None) -> list[Slot]:
  """The devices of each concurrent run: its own GPUs, or its share of the cores."""
  gpus = visible_gpus() if gpus is None else gpus
  base = dict(os.environ)
  if gpus:
    needed = parallel * devices_per_run
    if needed > len(gpus) and not share_gpus:
      raise ValueError(f'--parallel={parallel} runs of --devices_per_run={devices_per_run} '
                       f'GPUs need {needed} GPUs, and {len(gpus)} are visible: lower '
                       '--parallel, or pass --share_gpus to put several runs on a card')
    runs_per_gpu = -(-needed // len(gpus))
    slots = []
    for i in range(parallel):
      ids = [gpus[(i * devices_per_run + j) % len(gpus)] for j in range(devices_per_run)]
      env = {**base, 'CUDA_VISIBLE_DEVICES': ','.join(ids)}
      if runs_per_gpu > 1:
        env['XLA_PYTHON_CLIENT_MEM_FRACTION'] = f'{0.9 / runs_per_gpu:.3f}'
      slots.append(Slot(env))
    return slots
  cpus = sorted(os.sched_getaffinity(0)) if cpus is None else cpus
  share = max(1, len(cpus) // parallel)
  slots = []
  for i in range(parallel):
    mine = tuple(cpus[(i * share + j) % len(cpus)] for j in range(share))
    env = {**base, 'OMP_NUM_THREADS': str(len(mine)), 'JAX_PLATFORMS': 'cpu'}
    if devices_per_run > 1:
      flag = f'--xla_force_host_platform_device_count={devices_per_run}'
      env['XLA_FLAGS'] = f'{base.get("XLA_FLAGS", "")} {flag}'.strip()
    slots.append(Slot(env, mine if parallel > 1 else ()))
  return slots


def run_local(sweep: hyper.Sweep, runs: list[hyper.Run], slots: list[Slot],
              extra_flags=(), poll_sec: float = 0.5) -> dict[str, str]:
  """Runs `runs`, len(slots) at a time; returns {name: 'done' | 'stopped' | 'failed'}.

  A failed run is reported with its log and does not stop the others. On
  Ctrl-C or SIGTERM the running trainers get SIGTERM (they save a checkpoint)
  and the sweep stops; re-running the command resumes them.
  """
  pending, running, outcome = list(runs), {}, {}
  free = list(range(len(slots)))
  total, started = len(runs), 0

  def stop(signum, frame):
    raise KeyboardInterrupt

  previous = signal.signal(signal.SIGTERM, stop), signal.getsignal(signal.SIGINT)
  try:
    while pending or running:
      while pending and free:
        run, slot = pending.pop(0), free.pop(0)
        log = log_path(sweep, run)
        proc = start(slots[slot].wrap(command(sweep, run, extra_flags)), run.workdir, log,
                     'local', env=slots[slot].env)
        running[run.name] = (run, proc, slot, time.time())
        started += 1
        print(f'[{started}/{total}] started {run.name} (log: {log})', flush=True)
      time.sleep(poll_sec)
      for name, (run, proc, slot, t0) in list(running.items()):
        if proc.poll() is None:
          continue
        del running[name]
        free.append(slot)
        outcome[name] = finish(run.workdir, proc.returncode)
        minutes = (time.time() - t0) / 60
        if outcome[name] == 'done':
          print(f'finished {name} in {minutes:.1f} min{results_line(run)}', flush=True)
        elif outcome[name] == 'stopped':
          print(f'STOPPED {name} by a signal after {minutes:.1f} min (resumable): see '
                f'{log_path(sweep, run)}', flush=True)
        else:
          print(f'FAILED {name} (exit status {proc.returncode}) after {minutes:.1f} min: '
                f'see {log_path(sweep, run)}', flush=True)
  except KeyboardInterrupt:
    # The trainers save a checkpoint on SIGTERM; a second signal must not cut that short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f'Stopping {len(running)} running runs (they save a checkpoint first)...', flush=True)
    for run, proc, _, _ in running.values():
      proc.send_signal(signal.SIGTERM)
    for run, proc, _, _ in running.values():
      try:
        proc.wait(timeout=600)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      finish(run.workdir, proc.returncode)
    raise
  finally:
    signal.signal(signal.SIGTERM, previous[0])
    signal.signal(signal.SIGINT, previous[1])
  return outcome


# ---------------------------------------------------------------- SLURM


class TrainTask(submitit.helpers.Checkpointable):
  """One array task: a run's trainer in a subprocess, requeued on preemption."""

  def __init__(self):
    self._proc = None

  def __call__(self, cmd: list[str], workdir: str, log: str) -> str:
    self._proc = start(cmd, workdir, log, 'slurm')
    returncode = self._proc.wait()
    self._proc = None
    state = finish(workdir, returncode)
    if state != 'done':
      raise RuntimeError(f'the run in {workdir} failed with exit status {returncode}: see {log}')
    return workdir

  def checkpoint(self, *args, **kwargs):
    """Preemption or timeout: the trainer saves on SIGTERM, and the task is requeued."""
    proc, self._proc = self._proc, None
    if proc is not None and proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
      try:
        proc.wait(timeout=120)
      except subprocess.TimeoutExpired:
        proc.kill()
    return submitit.helpers.DelayedSubmission(TrainTask(), *args, **kwargs)

  def __getstate__(self):
    return {'_proc': None}


@dataclasses.dataclass
class SlurmOptions:
  partition: str = ''
  time_min: int = 24 * 60
  account: str = ''
  qos: str = ''
  constraint: str = ''
  cpus_per_task: int = 8
  mem_gb: int = 0
  array_parallelism: int = 0  # 0: --parallel
  setup: tuple[str, ...] = ()  # shell lines before the run (module load ..., source venv)


def submit_slurm(sweep: hyper.Sweep, runs: list[hyper.Run], devices_per_run: int,
                 parallel: int, options: SlurmOptions, extra_flags=()) -> list:
  """Submits `runs` as one SLURM job array; returns the submitit jobs."""
  if shutil.which('sbatch') is None:
    raise ValueError('--executor=slurm needs sbatch on PATH: run on a SLURM login node, '
                     'or use --executor=local')
  folder = os.path.join(sweep.root, 'slurm', '%j')
  executor = submitit.AutoExecutor(folder=folder, cluster='slurm')
  extra = {key: value for key, value in (('account', options.account), ('qos', options.qos),
                                         ('constraint', options.constraint)) if value}
  params = dict(name=f'alexnet-{os.path.basename(sweep.root)}', timeout_min=options.time_min,
                gpus_per_node=devices_per_run, tasks_per_node=1,
                cpus_per_task=options.cpus_per_task,
                slurm_array_parallelism=options.array_parallelism or parallel,
                slurm_additional_parameters=extra, slurm_setup=list(options.setup))
  if options.partition:
    params['slurm_partition'] = options.partition
  if options.mem_gb:
    params['mem_gb'] = options.mem_gb
  executor.update_parameters(**params)
  commands = [command(sweep, r, extra_flags) for r in runs]
  return executor.map_array(TrainTask(), commands, [r.workdir for r in runs],
                            [log_path(sweep, r) for r in runs])
