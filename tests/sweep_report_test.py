"""The study report: statistics against hand-computed values, baselines, unfinished runs, files."""

import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from alexnet_jax.sweep import report

LRN_OFF = {'config.model.lrn.enabled': False}
NO_DROPOUT = {'config.model.dropout_rate': 0.0}
# (name, overrides without the seed, seed, final top-1, final top-5, state)
RUNS = [
    ('base-0', {}, 0, 0.10, 0.010, 'finished'),
    ('base-1', {}, 1, 0.12, 0.020, 'finished'),
    ('base-2', {}, 2, 0.14, 0.030, 'finished'),
    ('lrn-0', LRN_OFF, 0, 0.13, 0.015, 'finished'),
    ('lrn-1', LRN_OFF, 1, 0.14, 0.020, 'finished'),
    ('lrn-2', LRN_OFF, 2, 0.18, 0.040, 'finished'),
    ('drop-0', NO_DROPOUT, 0, 0.20, 0.050, 'finished'),
    ('drop-1', NO_DROPOUT, 1, None, None, 'failed'),
    ('drop-2', NO_DROPOUT, 2, None, None, 'not started'),
    ('drop-3', NO_DROPOUT, 3, None, None, 'stopped'),
]
T_975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (tables)


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    if isinstance(obj, list):
      f.writelines(json.dumps(row) + '\n' for row in obj)
    else:
      json.dump(obj, f)


def _make_study(root):
  manifest = {'sweep_file': '/sweeps/lrn.py', 'base_config': '/configs/fashion_mnist.py',
              'runs': []}
  for name, overrides, seed, top1, top5, state in RUNS:
    all_overrides = {**overrides, 'config.seed': seed}
    manifest['runs'].append({'name': name, 'overrides': all_overrides, 'workdir': name})
    workdir = os.path.join(root, name)
    log = os.path.join(root, 'logs', f'{name}.log')
    if state == 'not started':
      continue
    rows = [{'step': 10, 'train_loss': 1.0, 'train_top1_error': 0.5, 'lr': 0.1},
            {'step': 10, 'eval_top1_error': 0.3 + seed / 100, 'eval_top5_error': 0.1,
             'epoch': 1.0, 'eval_crops': 1},
            {'step': 20, 'train_loss': 0.5, 'train_top1_error': 0.25 + seed / 100, 'lr': 0.1}]
    if state == 'finished':
      rows.append({'step': 20, 'eval_top1_error': top1, 'eval_top5_error': top5,
                   'epoch': 2.0, 'eval_crops': 1})
      _write(os.path.join(workdir, 'results.json'),
             {'step': 20, 'eval_top1_error': top1, 'eval_top5_error': top5,
              'eval_examples': 100, 'wall_time_sec': 100.0 + 10 * seed})
    if state == 'stopped':  # as a SIGTERM leaves it
      _write(os.path.join(workdir, 'results.json'), {'step': 12, 'stopped_by': 'SIGTERM'})
    _write(os.path.join(workdir, 'metrics.jsonl'), rows)
    _write(os.path.join(workdir, 'config.json'), {'seed': seed})
    _write(os.path.join(workdir, 'sweep_status.json'),
           {'state': 'failed' if state == 'failed' else 'done',
            'returncode': 1 if state == 'failed' else 0, 'log': log})
  _write(os.path.join(root, 'sweep.json'), manifest)
  os.makedirs(os.path.join(root, 'stray-run'))


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('study'))
  _make_study(root)
  return root, report.write_report(root)


def _row(table, group):
  return table[table['group'] == group].iloc[0]


def test_group_statistics_match_hand_computed_values(study):
  _, written = study
  table = written['table']
  assert list(table['group']) == ['(base config)', 'model.lrn.enabled=False',
                                  'model.dropout_rate=0.0']
  base, lrn, drop = (_row(table, g) for g in table['group'])
  assert base['is_baseline'] and not lrn['is_baseline']
  assert (base['finished'], lrn['finished'], drop['finished']) == (3, 3, 1)
  assert drop['runs'] == 4 and drop['seeds'] == '0'
  np.testing.assert_allclose([base['top1_error_mean'], base['top1_error_std']], [0.12, 0.02])
  np.testing.assert_allclose([base['top1_error_min'], base['top1_error_max']], [0.10, 0.14])
  # lrn off: deviations from 0.15 are -0.02, -0.01, 0.03; (4 + 1 + 9)e-4 / 2 = 7e-4.
  np.testing.assert_allclose(lrn['top1_error_mean'], 0.15)
  np.testing.assert_allclose(lrn['top1_error_std'], math.sqrt(7e-4))
  np.testing.assert_allclose(base['top5_error_mean'], 0.02)
  assert math.isnan(drop['top1_error_std']) and math.isnan(drop['top1_error_ci_low'])
  # Last logged training error 0.25 + seed / 100 over seeds 0-2; wall time 100 + 10 * seed.
  np.testing.assert_allclose(base['train_top1_error_last_mean'], 0.26)
  np.testing.assert_allclose(base['wall_time_sec_mean'], 110.0)


def test_paired_differences_and_t_interval(study):
  table = study[1]['table']
  lrn, drop = _row(table, 'model.lrn.enabled=False'), _row(table, 'model.dropout_rate=0.0')
  # lrn off minus base by seed: 0.03, 0.02, 0.04: mean 0.03, sample std 0.01.
  assert lrn['top1_diff_seeds'] == 3
  np.testing.assert_allclose(lrn['top1_diff_mean'], 0.03)
  half = T_975_2 * 0.01 / math.sqrt(3)
  np.testing.assert_allclose([lrn['top1_diff_t_ci_low'], lrn['top1_diff_t_ci_high']],
                             [0.03 - half, 0.03 + half])
  assert lrn['top1_diff_t_excludes_0'] and lrn['top1_diff_boot_excludes_0']
  # top-5: 0.005, 0.0, 0.01: the t interval (half-width 0.0124) includes 0.
  np.testing.assert_allclose(lrn['top5_diff_mean'], 0.005)
  assert not lrn['top5_diff_t_excludes_0']
  # One seed in common: no interval, no verdict.
  assert drop['top1_diff_seeds'] == 1
  np.testing.assert_allclose(drop['top1_diff_mean'], 0.10)
  assert math.isnan(drop['top1_diff_t_ci_low']) and not drop['top1_diff_t_excludes_0']


def test_bootstrap_interval_holds_the_mean_and_is_reproducible(study):
  root, written = study
  lrn = _row(written['table'], 'model.lrn.enabled=False')
  for prefix, mean in (('top1_error_ci', 0.15), ('top1_diff_boot_ci', 0.03)):
    low, high = lrn[f'{prefix}_low'], lrn[f'{prefix}_high']
    assert low < mean < high
  # A percentile interval of 3 values lies within their range.
  assert 0.13 - 1e-12 <= lrn['top1_error_ci_low'] and lrn['top1_error_ci_high'] <= 0.18 + 1e-12
  again = report.write_report(root)['table']
  pd.testing.assert_frame_equal(written['table'], again)


def test_files_markdown_and_csv(study):
  root, written = study
  for name in ('report.md', 'report.csv', 'curves.png'):
    assert written[name] == os.path.join(root, name) and os.path.getsize(written[name]) > 0
  with open(written['curves.png'], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  csv = pd.read_csv(written['report.csv'])
  np.testing.assert_allclose(csv['top1_error_mean'], written['table']['top1_error_mean'])
  assert csv['top1_error_mean'].max() < 1  # fractions, not percent
  text = open(written['report.md']).read()
  assert '(base config) (baseline)' in text
  assert '| 12.00 +- 2.00 | 10.00 to 14.00 |' in text  # percent, 2 decimals
  assert '| model.lrn.enabled=False | 3 | 3.00 |' in text  # paired difference, pp
  assert 'differs: both CIs exclude 0' in text
  assert 'n/a (fewer than 2 paired seeds)' in text
  assert 'percentile bootstrap' in text and 'dropout active' in text
  assert 'Ignored (in the study folder, not in sweep.json): `stray-run`' in text


def test_unfinished_runs_are_listed_with_state_and_log(study):
  root, written = study
  missing = {m['name']: m for m in written['missing']}
  assert sorted(missing) == ['drop-1', 'drop-2', 'drop-3']
  assert missing['drop-1']['state'].startswith('failed (exit status 1)')
  assert missing['drop-2']['state'] == 'not started'
  assert missing['drop-3']['state'].startswith('stopped by SIGTERM at step 12')
  assert missing['drop-1']['log'] == os.path.join(root, 'logs', 'drop-1.log')
  section = open(written['report.md']).read().split('## Missing or failed (3)')[1]
  for name, m in missing.items():
    assert f'| {name} | {m["state"]} | `{m["log"]}` |' in section


def test_parse_baseline():
  assert report.parse_baseline(
      'config.model.lrn.enabled=false, model.dropout_rate=0.5,dataset.mean=[1, 2],'
      'dataset.channel_order=bgr,model.lrn.across_towers=True') == {
          'config.model.lrn.enabled': False, 'config.model.dropout_rate': 0.5,
          'config.dataset.mean': [1, 2], 'config.dataset.channel_order': 'bgr',
          'config.model.lrn.across_towers': True}
  with pytest.raises(ValueError, match="item 'lrn' is not KEY=VALUE"):
    report.parse_baseline('lrn')


def test_a_given_baseline_and_errors_naming_the_choices(study):
  root, _ = study
  written = report.write_report(root, report.parse_baseline('model.lrn.enabled=False'))
  assert written['baseline'] == 'model.lrn.enabled=False'
  base = _row(written['table'], '(base config)')
  np.testing.assert_allclose(base['top1_diff_mean'], -0.03)
  cases = [('seed=1', "key 'seed' is not swept in this study: choose from "
                      'model.dropout_rate, model.lrn.enabled'),
           ('model.lrn.enabled=True', 'no group has model.lrn.enabled=True: choose from False'),
           ('model.dropout_rate=1', 'no group has model.dropout_rate=1: choose from 0.0')]
  for text, message in cases:
    with pytest.raises(ValueError) as error:
      report.write_report(root, report.parse_baseline(text))
    assert message in str(error.value) and '\n' not in str(error.value)
  report.write_report(root)  # leave the default report for the other tests


def test_no_sweep_json_is_a_one_line_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='no sweep.json in .*: pass the folder of a study'):
    report.write_report(str(tmp_path))
