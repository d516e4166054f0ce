"""Where two runs part: their provenance, the first logged step that differs, their parameters.

`compare_runs(dir_a, dir_b)` reads two trainer workdirs and `format_comparison`
prints what it found, for the sweep command line's `compare`. It answers the
question a surprising result raises first: did these runs compute the same
thing, and if not, where did they start to differ?
  - provenance.json: every differing field, flattened (`config.seed`,
    `packages.jax`, `git_commit`), as `a -> b`; the fields that only say when
    and how a run was started (time, command, host, process) apart;
  - metrics.jsonl: the first step logged by both whose metrics differ, exact
    equality over the keys both logged, wall-clock keys (images/s, times) left
    out since they differ run to run by nature;
  - the newest intact checkpoint of each: the largest absolute difference of
    every parameter tensor, 0.0 for bit-identical runs.
Each part says so when its files are missing, in one run or both.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import flax.traverse_util
import numpy as np

from alexnet_jax import checkpointing
from alexnet_jax import config_lib

# provenance.json fields that say when and how a run was started, not what it
# computes; `previous` holds the records of earlier starts of a resumed run.
START_FIELDS = ('created', 'command', 'host', 'pid')
SKIPPED_FIELDS = ('previous',)
_ABSENT = '(absent)'


def is_wall_clock(key: str) -> bool:
  """Whether a metrics key measures time or speed (differs between identical runs)."""
  return key.endswith('_sec') or key.endswith('_per_sec') or 'time' in key


def read_metrics(workdir: str) -> list[dict]:
  """The rows of workdir/metrics.jsonl; a line cut short (a run killed while writing) is skipped."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict) and isinstance(row.get('step'), int):
        rows.append(row)
  return rows


def _same(a: Any, b: Any) -> bool:
  """Exact equality; True is not 1, and NaN equals NaN (NaN in both runs is no difference)."""
  if isinstance(a, bool) or isinstance(b, bool):
    return type(a) is type(b) and a == b
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  return a == b


def _compare_provenance(dir_a: str, dir_b: str) -> dict:
  records = [checkpointing.read_json(os.path.join(d, 'provenance.json')) for d in (dir_a, dir_b)]
  missing = [side for side, r in zip('ab', records) if r is None]
  out = {'missing': missing, 'differences': [], 'start_differences': []}
  if missing:
    return out
  flat_a, flat_b = (config_lib.flatten({k: v for k, v in r.items() if k not in SKIPPED_FIELDS})
                    for r in records)
  for key in sorted(flat_a.keys() | flat_b.keys()):
    a, b = flat_a.get(key, _ABSENT), flat_b.get(key, _ABSENT)
    if _same(a, b):
      continue
    kind = 'start_differences' if key.split('.')[0] in START_FIELDS else 'differences'
    out[kind].append((key, a, b))
  return out


def _rows_by_step(rows: list[dict]) -> dict[int, dict]:
  """One dict per step: a step's training and evaluation lines merged."""
  merged = {}
  for row in rows:
    merged.setdefault(row['step'], {}).update(row)
  return merged


def _compare_metrics(dir_a: str, dir_b: str) -> dict:
  paths = [os.path.join(d, 'metrics.jsonl') for d in (dir_a, dir_b)]
  missing = [side for side, p in zip('ab', paths) if not os.path.exists(p)]
  out = {'missing': missing, 'shared_steps': 0, 'first_step': None, 'differences': {},
         'compared_keys': [], 'ignored_keys': [], 'steps_only_in_a': 0, 'steps_only_in_b': 0}
  if missing:
    return out
  by_a, by_b = _rows_by_step(read_metrics(dir_a)), _rows_by_step(read_metrics(dir_b))
  shared = sorted(by_a.keys() & by_b.keys())
  out['shared_steps'] = len(shared)
  out['steps_only_in_a'] = len(by_a.keys() - by_b.keys())
  out['steps_only_in_b'] = len(by_b.keys() - by_a.keys())
  compared, ignored = set(), set()
  for step in shared:
    row_a, row_b = by_a[step], by_b[step]
    keys = (row_a.keys() & row_b.keys()) - {'step'}
    ignored.update(k for k in keys if is_wall_clock(k))
    keys = sorted(k for k in keys if not is_wall_clock(k))
    compared.update(keys)
    differing = {k: (row_a[k], row_b[k]) for k in keys if not _same(row_a[k], row_b[k])}
    if differing:
      out['first_step'] = step
      out['differences'] = differing
      break
  out['compared_keys'] = sorted(compared)
  out['ignored_keys'] = sorted(ignored)
  return out


def _final_params(workdir: str) -> dict:
  """{'step', 'params' (name -> array), 'skipped'} of the newest intact checkpoint, or 'problem'."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return {'problem': 'no checkpoints folder'}
  ckpt = checkpointing.Checkpointer(directory)
  try:
    step, restored, skipped = ckpt.read_newest_intact()
  finally:
    ckpt.close()
  if restored is None:
    what = f' ({len(skipped)} damaged)' if skipped else ''
    return {'problem': f'no intact checkpoint{what}', 'skipped': skipped}
  params = restored['state'].get('params') or {}
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  return {'step': step, 'skipped': skipped,
          'params': {k: np.asarray(v) for k, v in flat.items()}}


def _max_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
  if a.size == 0:
    return 0.0
  a, b = a.astype(np.float64), b.astype(np.float64)
  diff = np.abs(a - b)
  diff[np.isnan(a) & np.isnan(b)] = 0.0
  diff[np.isnan(diff)] = np.inf  # NaN in one run only
  return float(diff.max())


def _compare_params(dir_a: str, dir_b: str) -> dict:
  finals = [_final_params(d) for d in (dir_a, dir_b)]
  out = {'problems': {side: f['problem'] for side, f in zip('ab', finals) if 'problem' in f},
         'steps': tuple(f.get('step') for f in finals),
         'skipped': {side: f.get('skipped', []) for side, f in zip('ab', finals)},
         'tensors': [], 'max': None, 'only_in_a': [], 'only_in_b': [], 'shape_differs': []}
  if out['problems']:
    return out
  params_a, params_b = finals[0]['params'], finals[1]['params']
  out['only_in_a'] = sorted(params_a.keys() - params_b.keys())
  out['only_in_b'] = sorted(params_b.keys() - params_a.keys())
  tensors = []
  for name in sorted(params_a.keys() & params_b.keys()):
    a, b = params_a[name], params_b[name]
    if a.shape != b.shape:
      out['shape_differs'].append((name, a.shape, b.shape))
    else:
      tensors.append((name, _max_abs_difference(a, b)))
  out['tensors'] = sorted(tensors, key=lambda t: (-t[1], t[0]))
  out['max'] = max((d for _, d in tensors), default=None)
  return out


def compare_runs(dir_a: str, dir_b: str) -> dict:
  """Provenance, metrics and parameter differences between the runs in two workdirs.

  Returns {'dirs': (a, b), 'provenance': ..., 'metrics': ..., 'params': ...}:
    provenance: 'missing' (the sides, 'a'/'b', without provenance.json),
      'differences' and 'start_differences' as (flattened key, a, b);
    metrics: 'first_step' (None when no shared step differs) with its
      'differences' {key: (a, b)}, 'shared_steps', 'compared_keys',
      'ignored_keys' (wall clock), 'steps_only_in_a' / '_b', 'missing';
    params: 'steps' (the checkpoints compared), 'tensors' [(name, max |a - b|)]
      largest first, 'max', 'only_in_a', 'only_in_b', 'shape_differs'
      [(name, shape a, shape b)], 'skipped' (damaged checkpoints passed over),
      'problems' {side: why there is nothing to compare}.
  Raises FileNotFoundError if either folder does not exist.
  """
  for label, d in (('first', dir_a), ('second', dir_b)):
    if not os.path.isdir(d):
      raise FileNotFoundError(f'the {label} run folder {d} does not exist: pass two run '
                              'workdirs (each holding config.json, metrics.jsonl, checkpoints/)')
  return {'dirs': (os.path.abspath(dir_a), os.path.abspath(dir_b)),
          'provenance': _compare_provenance(dir_a, dir_b),
          'metrics': _compare_metrics(dir_a, dir_b),
          'params': _compare_params(dir_a, dir_b)}


def _value(v: Any) -> str:
  """A value as logged: floats in full (they are compared exactly), lists and dicts as JSON."""
  if isinstance(v, float):
    return repr(v)
  return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _missing_line(missing: list[str], dirs: tuple[str, str], filename: str) -> str:
  if len(missing) == 2:
    return f'  no {filename} in either run'
  return f'  no {filename} in {missing[0].upper()} ({dirs["ab".index(missing[0])]})'


def _format_provenance(p: dict, dirs) -> list[str]:
  lines = ['Provenance (provenance.json):']
  if p['missing']:
    return lines + [_missing_line(p['missing'], dirs, 'provenance.json')]
  if not p['differences']:
    lines.append('  same code, config, packages, platform and devices')
  for key, a, b in p['differences']:
    lines.append(f'  {key}: {_value(a)} -> {_value(b)}')
  if p['start_differences']:
    keys = sorted({k.split('.')[0] for k, _, _ in p['start_differences']})
    lines.append(f'  started differently (expected): {", ".join(keys)}')
  return lines


def _format_metrics(m: dict, dirs) -> list[str]:
  lines = ['Metrics (metrics.jsonl):']
  if m['missing']:
    return lines + [_missing_line(m['missing'], dirs, 'metrics.jsonl')]
  if not m['shared_steps']:
    lines.append('  no step logged by both runs')
  elif m['first_step'] is None:
    lines.append(f'  identical over {m["shared_steps"]} shared steps')
  else:
    lines.append(f'  first differing step: {m["first_step"]}')
    lines += [f'    {k}: {_value(a)} -> {_value(b)}' for k, (a, b) in m['differences'].items()]
  if m['compared_keys']:
    lines.append(f'  keys compared: {", ".join(m["compared_keys"])}'
                 + (f' (wall clock, ignored: {", ".join(m["ignored_keys"])})'
                    if m['ignored_keys'] else ''))
  for side in 'ab':
    n = m[f'steps_only_in_{side}']
    if n:
      lines.append(f'  {n} logged step(s) only in {side.upper()}')
  return lines


def _format_params(p: dict, dirs) -> list[str]:
  lines = ['Parameters (newest intact checkpoint of each):']
  for side in 'ab':
    for step, problem in p['skipped'].get(side, []):
      lines.append(f'  {side.upper()}: passed over the damaged checkpoint of step {step}: '
                   f'{problem}')
  if p['problems']:
    return lines + [f'  {side.upper()} ({dirs["ab".index(side)]}): {why}'
                    for side, why in sorted(p['problems'].items())]
  step_a, step_b = p['steps']
  lines.append(f'  steps: A {step_a}, B {step_b}')
  if p['max'] is not None:
    lines.append(f'  max |A - B| over all parameters: {p["max"]:.6g}')
  width = max((len(n) for n, _ in p['tensors']), default=0)
  lines += [f'    {name:<{width}}  {d:.6g}' for name, d in p['tensors']]
  lines += [f'  only in A: {n}' for n in p['only_in_a']]
  lines += [f'  only in B: {n}' for n in p['only_in_b']]
  lines += [f'  shape differs: {n} {tuple(a)} -> {tuple(b)}' for n, a, b in p['shape_differs']]
  return lines


def format_comparison(result: dict) -> str:
  """The text report of `compare_runs`: A is the first folder, B the second, shown as A -> B."""
  dirs = result['dirs']
  lines = [f'A: {dirs[0]}', f'B: {dirs[1]}', '']
  lines += _format_provenance(result['provenance'], dirs) + ['']
  lines += _format_metrics(result['metrics'], dirs) + ['']
  lines += _format_params(result['params'], dirs)
  return '\n'.join(lines) + '\n'
