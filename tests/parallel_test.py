"""Model parallelism of the towers: equality with the single-device network."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import checkpointing
from alexnet_jax import config_lib
from alexnet_jax import optim
from alexnet_jax import parallel
from alexnet_jax import train
from conftest import REPO
from conftest import make_model
from conftest import tiny_fashion_config

BATCH = 16


@functools.lru_cache(maxsize=1)
def _setup():
  """Tiny two-tower net without dropout, its initial state and two batches.

  Cached: building the state compiles, and every test only reads it.
  """
  config = tiny_fashion_config()
  config.model.dropout_rate = 0.0  # dropout keys depend on the device index
  model = make_model(config)
  tx = optim.create_optimizer(config.optimizer)
  state = train.create_train_state(config, model, tx)
  rng = np.random.default_rng(0)
  batches = [{'image': rng.normal(size=(BATCH, 28, 28, 1)).astype(np.float32),
              'label': rng.integers(0, 10, BATCH).astype(np.int32)}
             for _ in range(2)]
  return config, model, tx, state, batches


def _devices(n):
  return jax.local_devices()[:n]


def _assert_trees_close(a, b, rtol=1e-4, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _mp_logits(model, params, images, layout):
  """Model-parallel logits of `images`, back in batch order."""
  tower_model = parallel.split_model(model, layout)
  apply = jax.pmap(lambda p, x: tower_model.apply({'params': p}, x, train=False),
                   axis_name=parallel.AXIS, devices=_devices(layout.num_devices))
  device_params = parallel.to_devices(parallel.split_params(params, layout.towers),
                                      layout, _devices(layout.num_devices))
  out = np.asarray(apply(device_params, parallel.shard_batch({'x': images}, layout)['x']))
  # Every tower of a replica must hold the replica's full logits.
  for r in range(layout.replicas):
    for t in range(1, layout.towers):
      np.testing.assert_array_equal(out[r * layout.towers], out[r * layout.towers + t])
  return out[::layout.towers].reshape((-1,) + out.shape[2:])


def check_logits(num_devices):
  config, model, _, state, batches = _setup()
  del config
  layout = parallel.Layout(num_devices, towers=2)
  images = batches[0]['image']
  expected = model.apply({'params': state.params}, images, train=False)
  np.testing.assert_allclose(_mp_logits(model, state.params, images, layout),
                             expected, rtol=1e-5, atol=1e-5)


def check_gradients(num_devices):
  _, model, _, state, batches = _setup()
  layout = parallel.Layout(num_devices, towers=2)
  batch = batches[0]

  def loss_fn(params):
    logits = model.apply({'params': params}, batch['image'], train=False)
    return train.cross_entropy(logits, batch['label']).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grads_fn = jax.pmap(
      lambda p, b: train.loss_and_grads(p, b, None, model=parallel.split_model(model, layout),
                                        layout=layout, train=False),
      axis_name=parallel.AXIS, devices=_devices(num_devices))
  device_params = parallel.to_devices(parallel.split_params(state.params, 2), layout,
                                      _devices(num_devices))
  mp_loss, _, mp_grads = grads_fn(device_params, parallel.shard_batch(batch, layout))
  np.testing.assert_allclose(np.mean(mp_loss), loss, rtol=1e-5)
  _assert_trees_close(parallel.merge_params(parallel.from_devices(mp_grads, layout)),
                      grads, rtol=1e-4, atol=1e-6)
  # Devices holding the same tower must hold the same (averaged) gradient.
  for leaf in jax.tree.leaves(mp_grads):
    for d in range(2, num_devices):
      np.testing.assert_array_equal(leaf[d], leaf[d % 2])


def _steps(model, tx, schedule, layout):
  """(train step, eval step) of `layout` on its number of devices."""
  return train.make_steps(model, layout, tx, schedule, 0, _devices(layout.num_devices))


def check_train_steps(num_devices):
  config, model, tx, state, batches = _setup()
  schedule = optim.create_schedule(config.schedule, config.schedule.base_lr, 100, 100)
  one = parallel.Layout(1, towers=1)
  ref_step, _ = _steps(model, tx, schedule, one)
  ref = parallel.state_to_devices(state, one, _devices(1))
  ref_losses = []
  for b in batches:
    ref, metrics = ref_step(ref, parallel.shard_batch(b, one))
    ref_losses.append(float(metrics['train_loss'][0]))
  ref = parallel.state_from_devices(ref, one)

  layout = parallel.Layout(num_devices, towers=2)
  mp_step, _ = _steps(model, tx, schedule, layout)
  mp = parallel.state_to_devices(state, layout, _devices(num_devices))
  mp_losses = []
  for b in batches:
    mp, metrics = mp_step(mp, parallel.shard_batch(b, layout))
    mp_losses.append(float(metrics['train_loss'][0]))
  merged = parallel.state_from_devices(mp, layout)

  np.testing.assert_allclose(mp_losses, ref_losses, rtol=1e-5)
  assert int(merged.step) == int(ref.step) == 2
  _assert_trees_close(merged.params, ref.params)
  _assert_trees_close(merged.opt_state, ref.opt_state)
  # The comparison is between trained parameters, not two initial states.
  assert not np.allclose(ref.params['fc8']['kernel'], state.params['fc8']['kernel'])


@pytest.mark.parametrize('num_devices', [2, 4])
def test_logits_match_single_device(num_devices):
  check_logits(num_devices)


@pytest.mark.parametrize('num_devices', [2, 4])
def test_gradients_match_single_device(num_devices):
  check_gradients(num_devices)


@pytest.mark.parametrize('num_devices', [2, 4])
def test_two_train_steps_match_single_device(num_devices):
  check_train_steps(num_devices)


@pytest.mark.parametrize('num_devices,crops', [(4, 0), (2, 2), (4, 2)])
def test_eval_step_matches_single_device(num_devices, crops):
  check_eval(num_devices, crops)


def check_eval(num_devices, crops):
  _, model, tx, state, batches = _setup()
  batch = dict(batches[0])
  if crops:  # the multi-crop form (B, crops, H, W, C) of 10-patch testing
    batch['image'] = np.stack([batch['image'], batch['image'][:, ::-1]], axis=1)
  batch['mask'] = (np.arange(BATCH) < BATCH - 5).astype(np.float32)  # padded tail
  schedule = lambda step: jnp.float32(0.05)
  one = parallel.Layout(1, towers=1)
  _, ref_eval = _steps(model, tx, schedule, one)
  expected = ref_eval(jax.tree.map(lambda x: x[None], state.params),
                      parallel.shard_batch(batch, one))

  layout = parallel.Layout(num_devices, towers=2)
  _, mp_eval = _steps(model, tx, schedule, layout)
  params = parallel.to_devices(parallel.split_params(state.params, 2), layout,
                               _devices(num_devices))
  got = mp_eval(params, parallel.shard_batch(batch, layout))
  assert float(got['count'][0]) == BATCH - 5
  for k in expected:
    # Every device holds the totals, as after train.eval_step.
    np.testing.assert_allclose(got[k], np.full(num_devices, expected[k][0]),
                               rtol=1e-5, err_msg=k)


def test_split_merge_round_trip():
  _, _, _, state, _ = _setup()
  towers = parallel.split_state(state, 2)
  # Tower t owns output channels [8t, 8t + 8) of conv2 and sees 4 of conv1's 8 maps.
  np.testing.assert_array_equal(towers[1].params['conv2']['kernel'],
                                state.params['conv2']['kernel'][..., 8:])
  assert towers[0].params['conv2']['kernel'].shape == (5, 5, 4, 8)
  assert towers[0].params['fc8']['kernel'].shape == (32, 5)
  assert towers[1].opt_state.velocity['fc6']['bias'].shape == (16,)
  assert towers[1].step is state.step and towers[1].lr_scale is state.lr_scale
  layout = parallel.Layout(4, towers=2)
  on_devices = parallel.to_devices(towers, layout, _devices(4))
  assert on_devices.params['conv1']['kernel'].shape == (4, 5, 5, 1, 4)
  back = parallel.state_from_devices(on_devices, layout)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
    assert np.shape(a) == np.shape(b)


def test_shard_batch_gives_both_towers_the_same_data():
  layout = parallel.Layout(4, towers=2)
  x = np.arange(8)
  np.testing.assert_array_equal(parallel.shard_batch({'x': x}, layout)['x'],
                                [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7]])
  assert layout.tower_groups == [[0, 1], [2, 3]]
  assert layout.replica_groups == [[0, 2], [1, 3]]
  data_parallel = parallel.Layout(4, towers=1)
  np.testing.assert_array_equal(parallel.shard_batch({'x': x}, data_parallel)['x'],
                                [[0, 1], [2, 3], [4, 5], [6, 7]])
  assert data_parallel.tower_groups == [[0], [1], [2], [3]]
  assert data_parallel.replica_groups is None  # all devices


def test_canonical_checkpoint_restores_into_model_parallel_layout(tmp_path):
  config, model, tx, state, batches = _setup()
  del config
  layout = parallel.Layout(4, towers=2)
  schedule = lambda step: jnp.float32(0.05)
  mp_step, _ = _steps(model, tx, schedule, layout)
  mp, _ = mp_step(parallel.state_to_devices(state, layout, _devices(4)),
                  parallel.shard_batch(batches[0], layout))
  trained = parallel.state_from_devices(mp, layout)

  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  ckpt.save(trained, {})
  ckpt.wait()
  # The template is the canonical state a single-device run builds.
  restored, _ = ckpt.restore_latest(state)
  ckpt.close()
  _assert_trees_close(restored, trained, rtol=0, atol=0)

  images = batches[1]['image']
  expected = model.apply({'params': trained.params}, images, train=False)
  np.testing.assert_allclose(_mp_logits(model, restored.params, images, layout),
                             expected, rtol=1e-5, atol=1e-5)


def test_config_validation():
  config = tiny_fashion_config()
  config.model_parallel = 2
  config_lib.validate(config, 4)
  with pytest.raises(ValueError, match='even number of devices'):
    config_lib.validate(config, 3)
  config.model.towers = 1
  with pytest.raises(ValueError, match='needs model.towers=2'):
    config_lib.validate(config, 4)
  config.model_parallel = 4
  with pytest.raises(ValueError, match='use 1 or 2'):
    config_lib.validate(config, 4)


def test_eight_devices_in_a_subprocess():
  # The test session has 4 devices; 8 needs a fresh process: logits, loss
  # and gradients, parameters after two updates, and evaluation (centre and
  # multi-crop, padded tail) against the single-device network.
  script = (
      'import jax\n'
      'assert jax.device_count() == 8, jax.devices()\n'
      'import parallel_test\n'
      'parallel_test.check_logits(8)\n'
      'parallel_test.check_gradients(8)\n'
      'parallel_test.check_train_steps(8)\n'
      'parallel_test.check_eval(8, 0)\n'
      'parallel_test.check_eval(8, 2)\n'
      'print("ok")\n')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, 'tests')]))
  out = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                       text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith('ok')


def test_trainer_model_parallel_runs_match_and_resume_across_layouts(tmp_path):
  """train_and_evaluate with the towers split over device pairs equals the
  single-layout run, and each run's checkpoint resumes in the other layout."""
  def run(workdir, model_parallel, steps):
    config = tiny_fashion_config()
    config.model.dropout_rate = 0.0  # dropout keys depend on the device index
    config.model_parallel = model_parallel
    config.max_train_steps = steps
    config.max_eval_batches = 1
    config.checkpoint_every_steps = 1000
    train.train_and_evaluate(config, str(workdir))
    ckpt = checkpointing.Checkpointer(str(workdir / 'checkpoints'))
    state = ckpt.manager.restore(ckpt.latest_step())['state']
    ckpt.close()
    return state

  a = run(tmp_path / 'split', 2, 6)
  b = run(tmp_path / 'plain', 1, 6)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  a = run(tmp_path / 'split', 1, 10)  # model-parallel checkpoint, plain layout
  b = run(tmp_path / 'plain', 2, 10)  # plain checkpoint, model-parallel layout
  assert int(a['step']) == int(b['step']) == 10
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
