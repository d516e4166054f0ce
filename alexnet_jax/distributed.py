"""Joining a multi-process run through JAX's distributed runtime.

Where the settings come from, first match wins:

1. flags `--coordinator_address`, `--num_processes`, `--process_id`, each
   falling back to the environment variable `ALEXNET_COORDINATOR`,
   `ALEXNET_NUM_PROCESSES` or `ALEXNET_PROCESS_ID` (`launch/local.py` sets
   these);
2. a SLURM job step with more than one task (`srun`): JAX reads the
   allocation itself (`jax.distributed.initialize()` without arguments picks
   the first node as coordinator and gives each task one local GPU);
3. otherwise a single process, and nothing is done.

`initialize` must run before the first JAX computation: the device list of
every process is fixed when the backend starts.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from absl import logging

ENV_COORDINATOR = 'ALEXNET_COORDINATOR'
ENV_NUM_PROCESSES = 'ALEXNET_NUM_PROCESSES'
ENV_PROCESS_ID = 'ALEXNET_PROCESS_ID'

# What JAX's SLURM detection reads; srun sets all of them for every task.
_SLURM_STEP_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS',
                    'SLURM_PROCID', 'SLURM_LOCALID')


@dataclasses.dataclass(frozen=True)
class Setup:
  """How this process joins the run.

  mode is 'single' (nothing to do), 'explicit' (coordinator, count and id
  given) or 'slurm' (JAX reads them from the SLURM job step).
  """
  mode: str
  num_processes: int = 1
  process_id: int = 0
  coordinator_address: str | None = None


def _int_setting(value, env: Mapping[str, str], name: str, flag: str) -> int | None:
  if value is None and env.get(name, '') != '':
    value = env[name]
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'--{flag} (or {name}) must be an integer, got {value!r}') from None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None,
            environ: Mapping[str, str] | None = None) -> Setup:
  """The `Setup` that flags (None = not given) and environment describe.

  Raises:
    ValueError: the settings are incomplete or inconsistent; the message says
      which flag or variable to set.
  """
  env = os.environ if environ is None else environ
  address = coordinator_address or env.get(ENV_COORDINATOR) or None
  count = _int_setting(num_processes, env, ENV_NUM_PROCESSES, 'num_processes')
  index = _int_setting(process_id, env, ENV_PROCESS_ID, 'process_id')

  if count is not None or index is not None or address is not None:
    return _explicit(address, count, index)
  if 'SLURM_JOB_ID' in env and int(env.get('SLURM_NTASKS', '1') or 1) > 1:
    missing = [v for v in _SLURM_STEP_VARS if v not in env]
    if missing:
      raise ValueError(
          f'SLURM job {env["SLURM_JOB_ID"]} has SLURM_NTASKS={env["SLURM_NTASKS"]} '
          f'but {", ".join(missing)} is not set, so this is not a task started by '
          'srun (perhaps the batch script itself). Start one task per process with '
          '`srun python -m alexnet_jax.main ...` (see launch/slurm.sbatch), or pass '
          '--num_processes=1 to run a single process.')
    return Setup('slurm', num_processes=int(env['SLURM_NTASKS']),
                 process_id=int(env['SLURM_PROCID']))
  return Setup('single')


def _explicit(address: str | None, count: int | None, index: int | None) -> Setup:
  hint = ('Give all three of --coordinator_address=HOST:PORT (process 0\'s '
          'address, reachable from every process), --num_processes=N and '
          '--process_id=I (0 to N-1, different for every process), or the '
          f'variables {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}; '
          'python -m launch.local sets them for processes on one machine.')
  if count is None:
    raise ValueError(f'--num_processes (or {ENV_NUM_PROCESSES}) is not set. {hint}')
  if count < 1:
    raise ValueError(f'--num_processes={count} must be at least 1')
  if count == 1:
    if index not in (None, 0):
      raise ValueError(f'--process_id={index} but --num_processes=1: the only '
                       'process has id 0')
    return Setup('single')
  if index is None:
    raise ValueError(f'--process_id (or {ENV_PROCESS_ID}) is not set for a run of '
                     f'{count} processes. {hint}')
  if not 0 <= index < count:
    raise ValueError(f'--process_id={index} is outside 0..{count - 1} for '
                     f'--num_processes={count}: number the processes 0 to {count - 1}')
  if not address:
    raise ValueError(f'--coordinator_address (or {ENV_COORDINATOR}) is not set for a '
                     f'run of {count} processes. {hint}')
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise ValueError(f'--coordinator_address={address!r} must be HOST:PORT, e.g. '
                     f'10.0.0.1:12345 (process 0 listens on that port)')
  return Setup('explicit', num_processes=count, process_id=index,
               coordinator_address=address)


def initialize(setup: Setup) -> None:
  """Connects this process to the others (no-op for a single process).

  CPU devices of different processes talk through gloo, so the same code runs
  on simulated CPU devices as on GPUs.
  """
  if setup.mode == 'single':
    return
  import jax  # pylint: disable=g-import-not-at-top
  if 'JAX_CPU_COLLECTIVES_IMPLEMENTATION' not in os.environ:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if setup.mode == 'slurm':
    jax.distributed.initialize()
  else:
    # No cluster detection: inside a SLURM allocation it would pick this
    # task's GPU by SLURM_LOCALID, not the devices the launcher gave it.
    jax.distributed.initialize(setup.coordinator_address,
                               num_processes=setup.num_processes,
                               process_id=setup.process_id,
                               cluster_detection_method='deactivate')
  logging.info('process %d of %d joined (%s); local devices %s',
               jax.process_index(), jax.process_count(), setup.mode,
               jax.local_devices())
