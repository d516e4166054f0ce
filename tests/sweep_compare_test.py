"""Comparing two runs: identical runs differ nowhere; another seed differs from the first step."""

import json
import os
import shutil

import numpy as np
import pytest

from alexnet_jax import train
from alexnet_jax.sweep import compare
from conftest import set_keys
from conftest import tiny_fashion_config

STEPS = 4
PARAM_TENSORS = 16  # kernel and bias of conv1-5 and fc6-8


def _tiny(seed):
  # Slices of the splits: tfds reads only these rows, the costliest part of a tiny run after
  # compiling.
  return set_keys(tiny_fashion_config(), {
      'seed': seed, 'max_train_steps': STEPS, 'max_eval_batches': 1, 'log_every_steps': 1,
      'checkpoint_every_steps': 2, 'num_devices': 1, 'dataset.train_split': 'train[:2048]',
      'dataset.eval_split': 'test[:512]'})


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Three tiny real runs: 'a' and 'b' of the same config, 'c' with another seed."""
  root = tmp_path_factory.mktemp('runs')
  for name, seed in (('a', 0), ('b', 0), ('c', 1)):
    train.train_and_evaluate(_tiny(seed), str(root / name))
  return {name: str(root / name) for name in 'abc'}


def test_runs_of_the_same_config_differ_nowhere(runs):
  result = compare.compare_runs(runs['a'], runs['b'])
  metrics, params = result['metrics'], result['params']
  assert metrics['first_step'] is None and metrics['shared_steps'] == STEPS
  assert {'train_loss', 'eval_top1_error'} <= set(metrics['compared_keys'])
  assert metrics['ignored_keys'] == ['train_images_per_sec']
  assert params['steps'] == (STEPS, STEPS) and params['problems'] == {}
  assert len(params['tensors']) == PARAM_TENSORS
  assert params['max'] == 0.0 and all(d == 0.0 for _, d in params['tensors'])
  assert not result['provenance']['differences']  # the trainer's, or none written
  text = compare.format_comparison(result)
  assert f'identical over {STEPS} shared steps' in text
  assert 'max |A - B| over all parameters: 0' in text


def test_another_seed_differs_at_the_first_logged_step_and_in_every_kernel(runs):
  result = compare.compare_runs(runs['a'], runs['c'])
  metrics, params = result['metrics'], result['params']
  assert metrics['first_step'] == 1
  loss_a, loss_c = metrics['differences']['train_loss']
  assert loss_a != loss_c
  diffs = [d for _, d in params['tensors']]
  assert diffs == sorted(diffs, reverse=True) and params['max'] == diffs[0] > 0
  kernels = {name: d for name, d in params['tensors'] if name.endswith('kernel')}
  assert len(kernels) == PARAM_TENSORS // 2 and min(kernels.values()) > 0
  text = compare.format_comparison(result)
  assert 'first differing step: 1' in text
  assert f'    train_loss: {loss_a!r} -> {loss_c!r}' in text
  if os.path.exists(os.path.join(runs['a'], 'provenance.json')):
    assert ('config.seed', 0, 1) in result['provenance']['differences']


def test_a_damaged_newest_checkpoint_is_passed_over_not_moved(runs, tmp_path):
  copy = str(tmp_path / 'b')
  shutil.copytree(runs['b'], copy)
  metadata = os.path.join(copy, 'checkpoints', str(STEPS), 'host', 'metadata')
  with open(metadata) as f:
    host = json.load(f)
  host['elapsed_sec'] += 1.0  # valid JSON, no longer what the checksum covers
  with open(metadata, 'w') as f:
    json.dump(host, f)
  params = compare.compare_runs(runs['a'], copy)['params']
  assert params['steps'] == (STEPS, STEPS - 2)
  assert [s for s, _ in params['skipped']['b']] == [STEPS]
  assert params['max'] > 0  # step 2 of B against step 4 of A
  assert os.path.isdir(os.path.join(copy, 'checkpoints', str(STEPS)))


def _provenance(commit, jax_version, seed, created):
  return {'git_commit': commit, 'git_dirty': False, 'seed': seed, 'created': created,
          'command': ['python', '-m', 'alexnet_jax.main'], 'config': {'seed': seed},
          'packages': {'jax': jax_version, 'numpy': '2.4.6'}, 'previous': [{'seed': 7}]}


def test_provenance_differences_and_missing_files(tmp_path):
  a, b, c = (str(tmp_path / n) for n in 'abc')
  for d in (a, b, c):
    os.makedirs(d)
  for d, record in ((a, _provenance('abc123', '0.10.2', 0, '2026-01-01T00:00:00+00:00')),
                    (b, _provenance('def456', '0.10.3', 1, '2026-01-02T00:00:00+00:00'))):
    with open(os.path.join(d, 'provenance.json'), 'w') as f:
      json.dump(record, f)
  result = compare.compare_runs(a, b)
  assert result['provenance']['differences'] == [
      ('config.seed', 0, 1), ('git_commit', 'abc123', 'def456'),
      ('packages.jax', '0.10.2', '0.10.3'), ('seed', 0, 1)]
  assert [k for k, _, _ in result['provenance']['start_differences']] == ['created']
  text = compare.format_comparison(result)
  assert 'config.seed: 0 -> 1' in text and 'packages.jax: 0.10.2 -> 0.10.3' in text
  assert 'started differently (expected): created' in text
  assert f'A ({a}): no checkpoints folder' in text
  assert 'no metrics.jsonl in either run' in text
  assert f'no provenance.json in B ({c})' in compare.format_comparison(compare.compare_runs(a, c))
  assert 'no provenance.json in either run' in compare.format_comparison(
      compare.compare_runs(c, c))
  with pytest.raises(FileNotFoundError, match='does not exist: pass two run workdirs'):
    compare.compare_runs(a, str(tmp_path / 'nowhere'))


def test_parameter_trees_that_differ_are_listed(monkeypatch):
  finals = {
      'a': {'step': 1, 'skipped': [], 'params': {
          'conv1/kernel': np.zeros((3, 3)), 'fc8/kernel': np.zeros((4, 10)),
          'lrn/only_a': np.zeros(2)}},
      'b': {'step': 1, 'skipped': [], 'params': {
          'conv1/kernel': np.full((3, 3), -0.5), 'fc8/kernel': np.zeros((4, 5)),
          'extra/bias': np.zeros(1)}},
  }
  monkeypatch.setattr(compare, '_final_params', lambda d: finals[d])
  params = compare._compare_params('a', 'b')  # pylint: disable=protected-access
  assert params['tensors'] == [('conv1/kernel', 0.5)] and params['max'] == 0.5
  assert params['only_in_a'] == ['lrn/only_a'] and params['only_in_b'] == ['extra/bias']
  assert params['shape_differs'] == [('fc8/kernel', (4, 10), (4, 5))]
  text = compare.format_comparison({'dirs': ('a', 'b'), 'params': params,
                                    'provenance': {'missing': ['a', 'b']},
                                    'metrics': {'missing': ['a', 'b']}})
  assert 'shape differs: fc8/kernel (4, 10) -> (4, 5)' in text
  assert 'only in A: lrn/only_a' in text and 'only in B: extra/bias' in text
