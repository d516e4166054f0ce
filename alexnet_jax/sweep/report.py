"""The report of a study: each configuration over its seeds, and against a baseline.

`write_report(ROOT)` reads ROOT/sweep.json (written by the sweep runner) and
every run folder it lists, groups the runs by their overrides other than the
seed, and writes
  ROOT/report.md   final top-1 / top-5 error per group: mean +- sample std,
                   min-max, a 95% bootstrap CI of the mean, the last training
                   error and the mean train time; each group minus the
                   baseline, paired by seed, with a bootstrap and a t interval;
                   the runs that did not finish, with their logs;
  ROOT/report.csv  the same table, errors as raw fractions;
  ROOT/curves.png  validation top-1 error per epoch, mean and min-max per group.

A run counts when it finished (results.json without 'stopped_by'); every
other run of sweep.json is listed under "Missing or failed", never dropped
in silence. Pairing by seed removes the variation the seed causes in both
runs of a pair (initialisation, data order, dropout), so a difference
between configurations shows with fewer seeds than two independent means
would need.
"""

from __future__ import annotations

import ast
import json
import math
import os
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats

from alexnet_jax import checkpointing
from alexnet_jax.sweep import compare
from alexnet_jax.sweep import hyper

CONFIDENCE = 0.95
# The percentile bootstrap: BCa needs a jackknife estimate of acceleration that
# three seeds cannot support (it fails or returns NaN when values tie). With n
# seeds the percentile interval lies within their range, so it is narrow for
# small n; the t interval of the paired differences is shown beside it.
BOOTSTRAP_METHOD = 'percentile'
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # the same report from the same runs, every time
METRICS = (('top1', 'eval_top1_error', 'top-1'), ('top5', 'eval_top5_error', 'top-5'))


# Reading the study.

def _seed_of(run: dict, config: dict | None) -> int:
  if hyper.SEED_KEY in run['overrides']:
    return run['overrides'][hyper.SEED_KEY]
  return (config or {}).get('seed', 0)


def _last_step(rows: list[dict]) -> int | None:
  return max((r['step'] for r in rows), default=None)


def _read_run(root: str, run: dict) -> dict:
  """What a run's folder holds, and its state (finished, failed, stopped, running, partial, ...)."""
  workdir = os.path.join(root, run['workdir'])
  read = lambda name: checkpointing.read_json(os.path.join(workdir, name))
  status = read('sweep_status.json') or {}
  results = read('results.json')
  rows = compare.read_metrics(workdir)
  info = {'name': run['name'], 'workdir': workdir,
          'overrides': run['overrides'], 'seed': _seed_of(run, read('config.json')),
          'log': status.get('log') or os.path.join(root, 'logs', f'{run["name"]}.log'),
          'results': results, 'rows': rows}
  step = _last_step(rows)
  if results is not None and 'stopped_by' not in results:
    if 'eval_top1_error' in results:
      info['state'] = 'finished'
    else:
      info['state'] = 'finished without an evaluation in results.json'
  elif status.get('state') == 'failed':
    info['state'] = f'failed (exit status {status.get("returncode")})'
  elif results is not None:
    info['state'] = f'stopped by {results["stopped_by"]} at step {results.get("step")}'
  elif not os.path.isdir(workdir):
    info['state'] = 'not started'
  elif status.get('state') == 'running':
    info['state'] = 'running or interrupted'
  elif status.get('state') == 'done':
    info['state'] = 'ended without results.json'
  else:
    info['state'] = 'partial'
  if info['state'] != 'finished' and step is not None:
    info['state'] += f', last logged step {step}'
  return info


def _canonical(value: Any) -> str:
  return json.dumps(value, sort_keys=True)


def _short_key(key: str) -> str:
  return key[len(hyper.PREFIX):] if key.startswith(hyper.PREFIX) else key


def _show(value: Any) -> str:
  return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _group_runs(runs: list[dict]) -> tuple[list[dict], dict]:
  """Groups by overrides other than the seed, in sweep order; and the overrides all runs share."""
  groups = {}
  for run in runs:
    overrides = {k: v for k, v in run['overrides'].items() if k != hyper.SEED_KEY}
    key = _canonical(overrides)
    groups.setdefault(key, {'overrides': overrides, 'runs': []})['runs'].append(run)
  groups = list(groups.values())
  common = dict(groups[0]['overrides']) if groups else {}
  for g in groups[1:]:
    common = {k: v for k, v in common.items()
              if k in g['overrides'] and _canonical(g['overrides'][k]) == _canonical(v)}
  for g in groups:
    g['varying'] = {k: v for k, v in g['overrides'].items() if k not in common}
    g['label'] = ', '.join(f'{_short_key(k)}={_show(v)}' for k, v in g['varying'].items())
  return groups, common


# The baseline.

def _split_items(text: str) -> list[str]:
  """`a=1,b=[1,2]` -> ['a=1', 'b=[1,2]']: commas inside brackets or quotes do not split."""
  items, depth, quote, current = [], 0, None, ''
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == ',' and depth == 0:
      items.append(current)
      current = ''
      continue
    current += ch
  items.append(current)
  return [i.strip() for i in items if i.strip()]


def _literal(text: str) -> Any:
  for parse in (json.loads, ast.literal_eval):
    try:
      value = parse(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      continue
    return list(value) if isinstance(value, tuple) else value
  return text


def parse_baseline(text: str) -> dict:
  """`KEY=VALUE,...` as {'config.KEY': value}, the `config.` prefix optional.

  Values are JSON or Python literals (`false`, `False`, `0.5`, `[1, 2]`),
  anything else a string. Whether a group of the study has these values is
  checked by `write_report`. Raises ValueError for an item without `=`.
  """
  baseline = {}
  for item in _split_items(text):
    key, sep, value = item.partition('=')
    key = key.strip()
    if not sep or not key:
      raise ValueError(f'--baseline item {item!r} is not KEY=VALUE: pass e.g. '
                       '--baseline=model.lrn.enabled=True,model.dropout_rate=0.5')
    if not key.startswith(hyper.PREFIX):
      key = hyper.PREFIX + key
    baseline[key] = _literal(value.strip())
  return baseline


def _same_value(a: Any, b: Any) -> bool:
  """Equal as override values: True is not 1, but 1 is 1.0."""
  if isinstance(a, bool) or isinstance(b, bool):
    return type(a) is type(b) and a == b
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
  return a == b


def _find_baseline(groups: list[dict], baseline: dict | None) -> dict:
  """The baseline group: given, else the one without overrides besides the seed, else the first."""
  if not baseline:
    plain = [g for g in groups if not g['varying']]
    return plain[0] if plain else groups[0]
  keys = sorted({k for g in groups for k in g['overrides']})
  for key, value in baseline.items():
    if key not in keys:
      raise ValueError(f'--baseline key {_short_key(key)!r} is not swept in this study: '
                       f'choose from {", ".join(_short_key(k) for k in keys) or "(none)"}')
    values = [g['overrides'][key] for g in groups if key in g['overrides']]
    if not any(_same_value(value, v) for v in values):
      shown = sorted({_show(v) for v in values})
      raise ValueError(f'no group has {_short_key(key)}={_show(value)}: choose from '
                       f'{", ".join(shown)}')
  matches = [g for g in groups
             if all(k in g['overrides'] and _same_value(v, g['overrides'][k])
                    for k, v in baseline.items())]
  if not matches:
    raise ValueError('no group has all of ' + ', '.join(
        f'{_short_key(k)}={_show(v)}' for k, v in baseline.items()) + ': choose one of '
        + '; '.join(g['label'] or '(base config)' for g in groups))
  exact = [g for g in matches if g['varying'].keys() <= baseline.keys()]
  if len(matches) > 1 and len(exact) != 1:
    raise ValueError('--baseline matches several groups (' + '; '.join(
        g['label'] for g in matches) + '): add keys to choose one of them')
  return exact[0] if len(matches) > 1 else matches[0]


# Statistics.

def _bootstrap_ci(values: np.ndarray) -> tuple[float, float]:
  """95% percentile-bootstrap CI of the mean; NaN for fewer than 2 values."""
  if len(values) < 2:
    return math.nan, math.nan
  if np.all(values == values[0]):  # every resample has the same mean
    return float(values[0]), float(values[0])
  ci = scipy.stats.bootstrap(
      (values,), np.mean, confidence_level=CONFIDENCE, n_resamples=BOOTSTRAP_RESAMPLES,
      method=BOOTSTRAP_METHOD, rng=np.random.default_rng(BOOTSTRAP_SEED)).confidence_interval
  return float(ci.low), float(ci.high)


def _t_ci(values: np.ndarray) -> tuple[float, float]:
  """95% Student-t CI of the mean: mean +- t(0.975, n-1) * s / sqrt(n)."""
  n = len(values)
  if n < 2:
    return math.nan, math.nan
  half = scipy.stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n)
  mean = float(np.mean(values))
  return mean - half, mean + half


def _summary(values: list[float], prefix: str) -> dict:
  v = np.asarray(values, np.float64)
  low, high = _bootstrap_ci(v)
  return {
      f'{prefix}_mean': float(v.mean()) if len(v) else math.nan,
      f'{prefix}_std': float(v.std(ddof=1)) if len(v) > 1 else math.nan,
      f'{prefix}_min': float(v.min()) if len(v) else math.nan,
      f'{prefix}_max': float(v.max()) if len(v) else math.nan,
      f'{prefix}_ci_low': low, f'{prefix}_ci_high': high,
  }


def _excludes_zero(low: float, high: float) -> bool:
  return bool(low > 0 or high < 0)


def _paired(group: dict, base: dict, short: str, key: str) -> dict:
  """Group minus baseline over the seeds both finished, for the metric `key`."""
  mine = {r['seed']: r['results'].get(key, math.nan) for r in group['finished']}
  theirs = {r['seed']: r['results'].get(key, math.nan) for r in base['finished']}
  seeds = sorted(mine.keys() & theirs.keys())
  d = np.array([mine[s] - theirs[s] for s in seeds], np.float64)
  t_low, t_high = _t_ci(d)
  b_low, b_high = _bootstrap_ci(d)
  return {
      f'{short}_diff_seeds': len(seeds),
      f'{short}_diff_mean': float(d.mean()) if len(d) else math.nan,
      f'{short}_diff_t_ci_low': t_low, f'{short}_diff_t_ci_high': t_high,
      f'{short}_diff_boot_ci_low': b_low, f'{short}_diff_boot_ci_high': b_high,
      f'{short}_diff_t_excludes_0': _excludes_zero(t_low, t_high),
      f'{short}_diff_boot_excludes_0': _excludes_zero(b_low, b_high),
  }


def _group_row(group: dict, base: dict) -> dict:
  finished = group['finished']
  row = {'group': group['label'] or '(base config)', 'is_baseline': group is base,
         'overrides': _canonical(group['overrides']), 'runs': len(group['runs']),
         'finished': len(finished), 'seeds': ' '.join(str(r['seed']) for r in finished)}
  for short, key, _ in METRICS:
    row.update(_summary([r['results'].get(key, math.nan) for r in finished], f'{short}_error'))
  train_errors = [next((x['train_top1_error'] for x in reversed(r['rows'])
                        if 'train_top1_error' in x), math.nan) for r in finished]
  row['train_top1_error_last_mean'] = float(np.mean(train_errors)) if finished else math.nan
  times = [r['results'].get('wall_time_sec', math.nan) for r in finished]
  row['wall_time_sec_mean'] = float(np.mean(times)) if finished else math.nan
  if group is not base:
    for short, key, _ in METRICS:
      row.update(_paired(group, base, short, key))
  return row


# Writing.

def _pct(x: float) -> str:
  return 'n/a' if x is None or math.isnan(x) else f'{100 * x:.2f}'


def _range(low: float, high: float) -> str:
  return 'n/a' if math.isnan(low) else f'{_pct(low)} to {_pct(high)}'


def _verdict(t_excl: bool, boot_excl: bool, n: int) -> str:
  if n < 2:
    return 'n/a (fewer than 2 paired seeds)'
  if t_excl and boot_excl:
    return 'differs: both CIs exclude 0'
  if boot_excl:
    return 'unclear: only the bootstrap CI excludes 0'
  if t_excl:
    return 'unclear: only the t CI excludes 0'
  return 'no difference shown: both CIs include 0'


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return lines + ['| ' + ' | '.join(r) + ' |' for r in rows]


def _errors_table(table: pd.DataFrame) -> list[str]:
  rows = []
  for _, r in table.iterrows():
    cells = [r['group'] + (' (baseline)' if r['is_baseline'] else ''),
             f'{r["finished"]}/{r["runs"]}']
    for short, _, _ in METRICS:
      p = f'{short}_error'
      std = '' if math.isnan(r[f'{p}_std']) else f' +- {_pct(r[f"{p}_std"])}'
      cells += [f'{_pct(r[f"{p}_mean"])}{std}', _range(r[f'{p}_min'], r[f'{p}_max']),
                _range(r[f'{p}_ci_low'], r[f'{p}_ci_high'])]
    time_s = r['wall_time_sec_mean']
    cells += [_pct(r['train_top1_error_last_mean']),
              'n/a' if math.isnan(time_s) else f'{time_s:.0f}']
    rows.append(cells)
  header = ['group', 'finished']
  for _, _, name in METRICS:
    header += [f'{name} % mean +- std', f'{name} % min to max', f'{name} % 95% CI']
  return _md_table(header + ['last train top-1 %', 'train time s'], rows)


def _paired_table(table: pd.DataFrame, short: str, name: str) -> list[str]:
  rows = []
  for _, r in table[~table['is_baseline']].iterrows():
    n = int(r[f'{short}_diff_seeds'])
    rows.append([r['group'], str(n), _pct(r[f'{short}_diff_mean']),
                 _range(r[f'{short}_diff_t_ci_low'], r[f'{short}_diff_t_ci_high']),
                 _range(r[f'{short}_diff_boot_ci_low'], r[f'{short}_diff_boot_ci_high']),
                 _verdict(r[f'{short}_diff_t_excludes_0'], r[f'{short}_diff_boot_excludes_0'], n)])
  return _md_table(['group', 'paired seeds', f'{name} diff pp', '95% CI (t)',
                    '95% CI (bootstrap)', 'verdict'], rows)


def _markdown(root: str, manifest: dict, groups: list[dict], base: dict, common: dict,
              table: pd.DataFrame, missing: list[dict], ignored: list[str],
              crops_vary: bool) -> str:
  runs = sum(len(g['runs']) for g in groups)
  done = sum(len(g['finished']) for g in groups)
  lines = [f'# Study {os.path.basename(os.path.abspath(root))}', '',
           f'- sweep file: `{manifest.get("sweep_file")}`; base config: '
           f'`{manifest.get("base_config")}`',
           f'- {runs} runs in {len(groups)} groups (runs grouped by their overrides other than '
           f'the seed); {done} finished, {len(missing)} missing or failed',
           f'- baseline: {base["label"] or "(base config)"}']
  if common:
    lines.append('- set in every run: ' + ', '.join(
        f'{_short_key(k)}={_show(v)}' for k, v in common.items()))
  lines += ['', '## Final errors (validation, %)', '']
  lines += _errors_table(table)
  lines += ['', 'Mean +- sample standard deviation (ddof=1) over the finished seeds; the 95% CI '
            f'of the mean is a {BOOTSTRAP_METHOD} bootstrap (scipy.stats.bootstrap, '
            f'{BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}), n/a below 2 seeds. '
            'With few seeds it lies within their range and understates the uncertainty. '
            '"last train top-1" is the last logged training error, measured on augmented '
            'batches with dropout active: it is not comparable with the validation error. '
            '"train time" is the mean wall time of a run (results.json wall_time_sec).']
  if len(groups) > 1:
    lines += ['', f'## Against the baseline: {base["label"] or "(base config)"}, paired by seed',
              '', 'Group minus baseline over the seeds both finished, in percentage points '
              '(positive: the group has the higher error); 95% CIs of the mean paired '
              'difference, by the t distribution and by the bootstrap.']
    for short, _, name in METRICS:
      lines += ['', f'### {name} error', '']
      lines += _paired_table(table, short, name)
  lines += ['', '## Curves', '', '![validation top-1 error per epoch](curves.png)', '',
            'Validation top-1 error of the finished runs per epoch: the mean over seeds '
            'and the min-max band.']
  if crops_vary:
    lines[-1] += (' Interim evaluations use fewer crops than the final one, so the last '
                  'point of a curve may step down.')
  lines += ['', f'## Missing or failed ({len(missing)})', '']
  if missing:
    lines += _md_table(['run', 'state', 'log'],
                       [[m['name'], m['state'], f'`{m["log"]}`'] for m in missing])
  else:
    lines.append('Every run of sweep.json finished.')
  if ignored:
    lines += ['', 'Ignored (in the study folder, not in sweep.json): '
              + ', '.join(f'`{n}`' for n in ignored)]
  return '\n'.join(lines) + '\n'


def _eval_curve(rows: list[dict]) -> dict[float, float]:
  """{epoch: validation top-1 error}; the epoch from the step when a row lacks it."""
  evals = [r for r in rows if 'eval_top1_error' in r]
  per_step = [r['epoch'] / r['step'] for r in evals if r.get('epoch') and r['step']]
  scale = per_step[-1] if per_step else None
  return {round(r['epoch'] if 'epoch' in r else r['step'] * (scale or 1.0), 6):
          r['eval_top1_error'] for r in evals}


def _plot(groups: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(8, 5))
  colours = plt.get_cmap('tab10' if len(groups) <= 10 else 'tab20')
  plotted = 0
  for i, g in enumerate(groups):
    curves = [_eval_curve(r['rows']) for r in g['finished']]
    epochs = sorted({e for c in curves for e in c})
    if not epochs:
      continue
    values = [[100 * c[e] for c in curves if e in c] for e in epochs]
    colour = colours(i % colours.N)
    label = f'{g["label"] or "(base config)"} (n={len(curves)})'
    ax.plot(epochs, [np.mean(v) for v in values], '-o', ms=3, color=colour, label=label)
    ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values],
                    color=colour, alpha=0.2, linewidth=0)
    plotted += 1
  if plotted:
    ax.legend(fontsize='small')
  else:
    ax.text(0.5, 0.5, 'no finished run has validation metrics', ha='center', va='center',
            transform=ax.transAxes)
  ax.set(xlabel='epoch', ylabel='validation top-1 error (%)',
         title='Validation top-1 error: mean over seeds, min-max band')
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(root: str, baseline: dict | None = None) -> dict:
  """Writes ROOT/report.md, report.csv and curves.png for the study in `root`.

  `baseline`: {override key: value} of the baseline group (`parse_baseline`);
  by default the group without overrides besides the seed, else the first.
  Returns {'report.md', 'report.csv', 'curves.png': paths, 'table': the
  DataFrame written to report.csv (one row per group, errors as fractions),
  'baseline': its group's label, 'missing': [{'name', 'state', 'log'}]}.
  Raises FileNotFoundError without ROOT/sweep.json, ValueError for a
  baseline no group matches.
  """
  manifest_path = os.path.join(root, 'sweep.json')
  manifest = checkpointing.read_json(manifest_path)
  if manifest is None:
    raise FileNotFoundError(f'no sweep.json in {root}: pass the folder of a study (the --root '
                            'its runs were started with)')
  if not manifest.get('runs'):
    raise ValueError(f'{manifest_path} lists no runs: run the sweep first')
  runs = [_read_run(root, r) for r in manifest['runs']]
  groups, common = _group_runs(runs)
  for g in groups:
    g['finished'] = [r for r in g['runs'] if r['state'] == 'finished']
  base = _find_baseline(groups, baseline)
  table = pd.DataFrame([_group_row(g, base) for g in groups])
  missing = [{'name': r['name'], 'state': r['state'], 'log': r['log']}
             for r in runs if r['state'] != 'finished']
  known = {r['workdir'] for r in manifest['runs']} | {'logs'}
  ignored = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n))
                   and n not in known and not n.startswith('.'))
  crops = {x.get('eval_crops') for r in runs if r['state'] == 'finished'
           for x in r['rows'] if 'eval_top1_error' in x}
  paths = {name: os.path.join(root, name) for name in ('report.md', 'report.csv', 'curves.png')}
  table.to_csv(paths['report.csv'], index=False)
  _plot(groups, paths['curves.png'])
  with open(paths['report.md'], 'w', encoding='utf-8') as f:
    f.write(_markdown(root, manifest, groups, base, common, table, missing, ignored,
                      len(crops) > 1))
  return {**paths, 'table': table, 'baseline': base['label'] or '(base config)',
          'missing': missing}
