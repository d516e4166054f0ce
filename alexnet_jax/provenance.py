"""provenance.json: what a run was, so that anyone can tell two runs apart or re-run one.

Written by process 0 at every start of a run (a resume included) beside
config.json: the git commit of the code and whether the tree had uncommitted
changes, the command line, the full config and its seed, the versions of the
packages that decide the numbers, the platform, the devices and the XLA flags.
The record of an earlier start of the same workdir is kept under `previous`.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys

import jax

from alexnet_jax import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'tensorflow-cpu',
            'tensorflow', 'tensorflow-datasets', 'ml-collections', 'jax-cuda12-plugin')
# Fields that say when and how a run was started, not what it computes.
START_FIELDS = ('created', 'command', 'host', 'pid')


def _git(*args: str) -> str | None:
  try:
    out = subprocess.run(['git', '-C', REPO, *args], capture_output=True, text=True, timeout=10,
                         check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def package_versions() -> dict[str, str]:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def collect(config, ops_description: dict | None = None) -> dict:
  """The provenance of a run of `config` started by this process."""
  status = _git('status', '--porcelain', '--untracked-files=no')
  devices = jax.devices()
  return {
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'command': [sys.executable, *sys.argv],
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'git_commit': _git('rev-parse', 'HEAD'),
      'git_dirty': None if status is None else bool(status),
      'seed': config.seed,
      'config': json.loads(config.to_json_best_effort()),
      'packages': package_versions(),
      'platform': {'python': platform.python_version(), 'system': platform.platform(),
                   'machine': platform.machine(), 'cpu_count': os.cpu_count()},
      'devices': {'backend': jax.default_backend(), 'kind': devices[0].device_kind,
                  'count': len(devices), 'process_count': jax.process_count()},
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'ops': ops_description or {},
  }


def write(workdir: str, record: dict) -> None:
  """Writes `record` to workdir/provenance.json, keeping earlier starts under `previous`."""
  path = os.path.join(workdir, 'provenance.json')
  old = checkpointing.read_json(path)
  if old:
    previous = old.pop('previous', [])
    record = {**record, 'previous': previous + [old]}
  checkpointing.write_json(path, record)
