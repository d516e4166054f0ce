"""Sweep files: the runs of a study, each a set of `--config.*` overrides with its own workdir.

A sweep file names its base config and builds its runs from `h`, in the
style of flax's and scenic's `get_hyper`:

  BASE_CONFIG = 'configs/fashion_mnist.py'   # relative to the repository root

  def get_hyper(h):
    return h.product([
        h.sweep('config.model.lrn.enabled', [True, False]),
        h.sweep('config.seed', [0, 1, 2]),
    ])

Each run's workdir is ROOT/<readable name>-<hash of its overrides>: the
name is for people, the hash (of the overrides alone, in a canonical form)
keeps it stable across invocations and unique within a study.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from typing import Any, Sequence

import ml_collections

from alexnet_jax import checkpointing
from alexnet_jax import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIX = 'config.'
SEED_KEY = 'config.seed'
NAME_LIMIT = 72  # characters of the readable part of a workdir's name


class Hyper:
  """The builders `get_hyper(h)` receives; each returns a list of override dicts."""

  @staticmethod
  def sweep(key: str, values: Sequence[Any]) -> list[dict]:
    if not key.startswith(PREFIX):
      raise ValueError(f'sweep key {key!r} must start with {PREFIX!r} (e.g. config.seed)')
    if isinstance(values, (str, bytes)) or not len(values):
      raise ValueError(f'h.sweep({key!r}, ...) needs a non-empty list of values')
    return [{key: v} for v in values]

  @staticmethod
  def fixed(key: str, value: Any) -> list[dict]:
    return Hyper.sweep(key, [value])

  @staticmethod
  def product(sweeps: Sequence[list[dict]]) -> list[dict]:
    """Every combination, the last sweep varying fastest."""
    return [_merge(combo) for combo in itertools.product(*sweeps)]

  @staticmethod
  def zipit(sweeps: Sequence[list[dict]]) -> list[dict]:
    """The i-th entries together; the sweeps must have equal lengths."""
    lengths = sorted({len(s) for s in sweeps})
    if len(lengths) > 1:
      raise ValueError(f'h.zipit needs sweeps of equal length, got lengths {lengths}')
    return [_merge(combo) for combo in zip(*sweeps)]

  @staticmethod
  def chainit(sweeps: Sequence[list[dict]]) -> list[dict]:
    """One sweep after the other."""
    return [dict(d) for s in sweeps for d in s]


def _merge(dicts: Sequence[dict]) -> dict:
  out = {}
  for d in dicts:
    clash = out.keys() & d.keys()
    if clash:
      raise ValueError(f'a run sets {sorted(clash)} twice: combine sweeps of different keys')
    out.update(d)
  return out


def _plain(value: Any) -> Any:
  """The JSON form of an override value (tuples become lists)."""
  return json.loads(json.dumps(value))


def overrides_hash(overrides: dict) -> str:
  canonical = json.dumps(_plain(overrides), sort_keys=True, separators=(',', ':'))
  return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def _short(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    return 'x'.join(_short(v) for v in value)
  if isinstance(value, float):
    return f'{value:g}'
  return str(value)


def run_name(overrides: dict) -> str:
  """`enabled-False_seed-1-<hash>`: each key's last part (its full path where two
  keys share it) and value; readable, filesystem-safe, stable."""
  short = [k.rsplit('.', 1)[-1] for k in overrides]
  parts = [f'{k[len(PREFIX):] if short.count(s) > 1 else s}-{_short(v)}'
           for (k, v), s in zip(overrides.items(), short)]
  readable = re.sub(r'[^A-Za-z0-9._+=-]+', '_', '_'.join(parts)) or 'base'
  return f'{readable[:NAME_LIMIT]}-{overrides_hash(overrides)}'


def flag_value(value: Any) -> str:
  """An override as `--config.key=` takes it on the command line."""
  if isinstance(value, (list, tuple)):
    return '(' + ','.join(flag_value(v) for v in value) + (',)' if len(value) == 1 else ')')
  return str(value)


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  overrides: dict
  workdir: str  # absolute

  def flags(self) -> list[str]:
    return [f'--{k}={flag_value(v)}' for k, v in self.overrides.items()]

  def state(self) -> str:
    """'done' (results of a finished run), 'partial' (started) or 'new'."""
    results = checkpointing.read_json(os.path.join(self.workdir, 'results.json'))
    if results and 'stopped_by' not in results:
      return 'done'
    if os.path.isdir(os.path.join(self.workdir, 'checkpoints')) or os.path.exists(
        os.path.join(self.workdir, 'config.json')):
      return 'partial'
    return 'new'


@dataclasses.dataclass(frozen=True)
class Sweep:
  file: str         # the sweep file, absolute
  base_config: str  # absolute
  root: str         # absolute
  runs: tuple[Run, ...]

  def manifest(self) -> dict:
    """What sweep.json records: enough for `report` to find every run."""
    return {'sweep_file': self.file, 'base_config': self.base_config,
            'runs': [{'name': r.name, 'overrides': _plain(r.overrides),
                      'workdir': os.path.basename(r.workdir)} for r in self.runs]}


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
  """Sets each `config.a.b` override on `config` (a missing key is a ValueError)."""
  for key, value in overrides.items():
    *path, last = key[len(PREFIX):].split('.')
    node = config
    try:
      for part in path:
        node = node[part]
      old = node[last]
    except (KeyError, AttributeError, TypeError):
      raise ValueError(f'sweep key {key!r} is not a config key (the keys are listed in '
                       'alexnet_jax/config_lib.py)') from None
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    try:
      node[last] = value
    except TypeError as e:
      raise ValueError(f'sweep key {key!r}: {value!r} does not fit the config value '
                       f'{old!r} ({e})') from None


def load(sweep_file: str, root: str, num_devices: int = 1) -> Sweep:
  """The runs of `sweep_file` under `root`, each config checked by `config_lib.validate`."""
  base, get_hyper = _read_sweep_file(sweep_file)
  base_path = base if os.path.isabs(base) else os.path.join(REPO, base)
  base_config = config_lib.load_file(base_path)
  try:
    overrides = get_hyper(Hyper())
  except ValueError as e:
    raise ValueError(f'{sweep_file}: {e}') from None
  if not overrides:
    raise ValueError(f'{sweep_file}: get_hyper returned no runs')
  runs, seen = [], {}
  root = os.path.abspath(root)
  for o in overrides:
    name = run_name(o)
    if name in seen:
      raise ValueError(f'{sweep_file}: two runs have the same overrides {o}')
    seen[name] = o
    config = ml_collections.ConfigDict(base_config.to_dict())
    apply_overrides(config, o)
    try:
      config_lib.validate(config, num_devices)
    except ValueError as e:
      raise ValueError(f'{sweep_file}: run {name}: {e}') from None
    runs.append(Run(name, dict(o), os.path.join(root, name)))
  return Sweep(os.path.abspath(sweep_file), base_path, root, tuple(runs))


def _read_sweep_file(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no sweep file {path} (see configs/sweeps/*.py)')
  namespace = {'__file__': path}
  try:
    with open(path, encoding='utf-8') as f:
      exec(compile(f.read(), path, 'exec'), namespace)  # pylint: disable=exec-used
  except SyntaxError as e:
    raise ValueError(f'cannot load sweep file {path} line {e.lineno}: {e.msg}') from None
  base, get_hyper = namespace.get('BASE_CONFIG'), namespace.get('get_hyper')
  if not isinstance(base, str) or not callable(get_hyper):
    raise ValueError(f'sweep file {path} needs BASE_CONFIG = "configs/<name>.py" and '
                     'def get_hyper(h) (see configs/sweeps/*.py)')
  return base, get_hyper
