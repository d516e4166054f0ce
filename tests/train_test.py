"""Training: device equivalence, evaluation counts, resume, failure messages."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import checkpointing
from alexnet_jax import config_lib
from alexnet_jax import ops as ops_lib
from alexnet_jax import optim
from alexnet_jax import parallel
from alexnet_jax import train
from alexnet_jax.cpu import ops as cpu_ops
from alexnet_jax.data import fashion_mnist
from conftest import REPO
from conftest import CPU_KERNELS_MISSING
from conftest import needs_cpu_kernels
from conftest import make_model


def _pmapped_step(config, num_devices):
  """(the trainer's pmapped step on the first num_devices devices, its replicated state)."""
  model = make_model(config)
  tx = optim.create_optimizer(config.optimizer)
  schedule = optim.create_schedule(config.schedule, config.schedule.base_lr, 100, 100)
  devices = jax.local_devices()[:num_devices]
  layout = parallel.Layout(num_devices, towers=1)
  step, _ = train.make_steps(model, layout, tx, schedule, 0, devices)
  state = train.create_train_state(config, model, tx)
  return step, parallel.state_to_devices(state, layout, devices)


def _run_steps(config, batches, num_devices):
  step, state = _pmapped_step(config, num_devices)
  losses = []
  for b in batches:
    state, metrics = step(state, parallel.shard_batch(b, parallel.Layout(num_devices, 1)))
    losses.append(float(metrics['train_loss'][0]))
  return parallel.state_from_devices(state, parallel.Layout(num_devices, 1)), losses


def test_one_and_four_devices_give_the_same_parameters(tiny_config, fashion_arrays):
  assert jax.local_device_count() == 4
  tiny_config.model.dropout_rate = 0.0  # dropout keys depend on the device index
  images, labels = fashion_arrays['train']
  batches = list(fashion_mnist.train_dataset(tiny_config, images[:1000], labels[:1000],
                                             local_batch=32).take(4).as_numpy_iterator())
  s1, l1 = _run_steps(tiny_config, batches, 1)
  s4, l4 = _run_steps(tiny_config, batches, 4)
  np.testing.assert_allclose(l1, l4, rtol=1e-5)
  assert int(s1.step) == int(s4.step) == 4
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The parameters did move, so the comparison is not between two initial states.
  init = train.create_train_state(tiny_config, make_model(tiny_config),
                                  optim.create_optimizer(tiny_config.optimizer))
  assert not np.allclose(init.params['fc8']['kernel'], s1.params['fc8']['kernel'])


def _eval_step(model, state):
  """(the trainer's eval step on 4 devices, the params on them, the batch sharding)."""
  layout = parallel.Layout(4, towers=1)
  _, p_eval = train.make_steps(model, layout, None, None, 0, jax.local_devices())
  state = parallel.state_to_devices(state, layout, jax.local_devices())
  return p_eval, state.params, lambda b: parallel.shard_batch(b, layout)


def test_evaluation_counts_every_example_with_padding(tiny_config, fashion_arrays):
  images, labels = fashion_arrays['test']
  images, labels = images[:1003], labels[:1003]  # 1003 = 3 * 320 + 43: a ragged end
  model = make_model(tiny_config)
  state = train.create_train_state(tiny_config, model, optim.create_optimizer(tiny_config.optimizer))
  tiny_config.eval_batch_size = 320
  p_eval, params, shard = _eval_step(model, state)
  result = train.evaluate(p_eval, params, fashion_mnist.eval_batches(
      tiny_config, images, labels, local_batch=320), shard)
  assert result['eval_examples'] == 1003
  # Reference: the same network on all 1003 images at once, no padding.
  x = (images.astype(np.float32) - np.array(tiny_config.dataset.mean)) / np.array(tiny_config.dataset.std)
  logits = np.asarray(model.apply({'params': state.params}, jnp.asarray(x), train=False))
  top1 = np.mean(np.argmax(logits, -1) != labels)
  top5 = np.mean([l not in np.argsort(-row)[:5] for row, l in zip(logits, labels)])
  np.testing.assert_allclose(result['eval_top1_error'], top1, atol=1e-6)
  np.testing.assert_allclose(result['eval_top5_error'], top5, atol=1e-6)


def test_ten_crop_evaluation_averages_the_softmax_of_ten_patches(tiny_config, fashion_arrays):
  images, labels = (a[:203] for a in fashion_arrays['test'])
  model = make_model(tiny_config)
  state = train.create_train_state(tiny_config, model, optim.create_optimizer(tiny_config.optimizer))
  p_eval, params, shard = _eval_step(model, state)
  result = train.evaluate(p_eval, params,
                          fashion_mnist.eval_batches(tiny_config, images, labels,
                                                     local_batch=64, crops='ten'),
                          shard)
  assert result['eval_examples'] == 203
  # Reference: numpy patches of the zero-padded images, one forward pass each.
  p = tiny_config.dataset.crop_padding
  padded = np.pad(images, [(0, 0), (p, p), (p, p), (0, 0)]).astype(np.float32)
  x = (padded - np.array(tiny_config.dataset.mean)) / np.array(tiny_config.dataset.std)
  patches = [x[:, r:r + 28, c:c + 28] for r, c in ((0, 0), (0, 2 * p), (2 * p, 0),
                                                   (2 * p, 2 * p), (p, p))]
  patches += [q[:, :, ::-1] for q in patches]
  probs = np.mean([jax.nn.softmax(model.apply({'params': state.params}, jnp.asarray(q),
                                              train=False)) for q in patches], axis=0)
  np.testing.assert_allclose(result['eval_top1_error'],
                             np.mean(np.argmax(probs, -1) != labels), atol=1e-6)
  np.testing.assert_allclose(result['eval_loss'],
                             -np.mean(np.log(probs[np.arange(203), labels])), rtol=1e-4)


def test_short_real_data_run_learns(tiny_config, tmp_path):
  # A constant lr: the demo's one-cycle schedule spans the whole epoch, so
  # stopping at step 400 would evaluate at its peak lr.
  tiny_config.schedule.name = 'constant'
  tiny_config.schedule.base_lr = 0.01
  tiny_config.max_train_steps = 400
  tiny_config.log_every_steps = 25
  tiny_config.dataset.eval_crops = 'ten'  # the demo's final test
  tiny_config.model.features = (16, 32, 32, 32, 32)
  tiny_config.model.fc_features = (128, 128)
  results = train.train_and_evaluate(tiny_config, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  losses = [l['train_loss'] for l in lines if 'train_loss' in l]
  assert losses[-1] < 0.6 * losses[0]
  assert results['eval_examples'] == 10000 and results['eval_crops'] == 10
  assert results['eval_top1_error'] < 0.6  # chance is 0.9
  for name in ('results.json', 'curves.png', 'config.json'):
    assert (tmp_path / name).exists(), name
  assert any(f.startswith('events') for f in os.listdir(tmp_path / 'tensorboard'))


def _main_cmd(workdir, *overrides):
  return [sys.executable, '-m', 'alexnet_jax.main', f'--workdir={workdir}',
          '--config.model.features=(8,16,16,16,8)', '--config.model.fc_features=(32,32)',
          '--config.model.conv1_stride=2', '--config.dataset.eval_crops=center',
          '--config.global_batch_size=32', '--config.eval_batch_size=1000',
          '--config.progress_bar=False', '--config.checkpoint_every_steps=10',
          '--config.log_every_steps=5', '--config.max_eval_batches=1', *overrides]


def _env():
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  return env


def _final_params(workdir):
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  step = ckpt.latest_step()
  restored = ckpt.manager.restore(step)
  ckpt.close()
  return step, restored['state']['params']


def test_sigterm_saves_and_rerun_resumes_to_the_same_result(tmp_path):
  steps = '--config.max_train_steps=60'
  interrupted, straight = tmp_path / 'interrupted', tmp_path / 'straight'
  proc = subprocess.Popen(_main_cmd(interrupted, steps), cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = interrupted / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and any('"step": 15' in l for l in open(metrics)):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert 'SIGTERM received: checkpoint saved at step' in out, out
  stopped_at = int(out.split('checkpoint saved at step ')[1].split(';')[0])
  assert 15 <= stopped_at < 60
  assert checkpointing.Checkpointer(str(interrupted / 'checkpoints')).latest_step() == stopped_at
  assert not (interrupted / 'results.json').exists()
  # The training metrics since the last log were written before the stop.
  logged = [json.loads(l) for l in open(metrics)]
  assert [r['step'] for r in logged if 'train_loss' in r][-1] == stopped_at

  out2 = subprocess.run(_main_cmd(interrupted, steps), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert out2.returncode == 0, out2.stderr
  assert f'Resuming from the checkpoint at step {stopped_at}' in out2.stdout
  subprocess.run(_main_cmd(straight, steps), cwd=REPO, env=_env(), check=True,
                 capture_output=True, timeout=300)
  step_a, params_a = _final_params(str(interrupted))
  step_b, params_b = _final_params(str(straight))
  assert step_a == step_b == 60
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  results = json.load(open(interrupted / 'results.json'))
  assert results['step'] == 60
  steps = [json.loads(l)['step'] for l in open(metrics) if 'train_loss' in l]
  assert steps == sorted(set(steps)) and steps[-1] == 60  # each step once


def test_incompatible_checkpoint_is_refused_and_kept(tmp_path):
  run = subprocess.run(_main_cmd(tmp_path, '--config.max_train_steps=10'), cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  before = sorted(os.listdir(tmp_path / 'checkpoints'))
  config_before = open(tmp_path / 'config.json').read()
  changed = _main_cmd(tmp_path, '--config.max_train_steps=20',
                      '--config.model.kernel_sizes=(5,5,3,3,5)')
  run = subprocess.run(changed, cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 1
  assert '  model.kernel_sizes: [5, 5, 3, 3, 3] (saved) -> [5, 5, 3, 3, 5] (now)' in run.stderr
  # Forced, the checkpoint itself is found to be of another model.
  run = subprocess.run(changed + ['--allow_config_change'], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 1
  assert 'holds a checkpoint (step 10) of a different model' in run.stderr
  assert 'params/conv5/kernel: checkpoint (3, 3, 8, 8) vs model (5, 5, 8, 8)' in run.stderr, run.stderr[-3000:]
  assert 'new --workdir' in run.stderr
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == before
  assert open(tmp_path / 'config.json').read() == config_before


def test_mistyped_config_key_is_an_error(tmp_path):
  run = subprocess.run(_main_cmd(tmp_path, '--config.optimiser.momentum=0.5'), cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=300)
  assert run.returncode == 2
  assert ("the config has no key 'optimiser'. Did you mean \"optimizer\" instead of "
          '"optimiser"?') in run.stderr, run.stderr[-2000:]
  assert 'Traceback' not in run.stderr
  assert not (tmp_path / 'checkpoints').exists()
  # With --config given, the override is applied while the flags are parsed.
  run = subprocess.run([sys.executable, '-m', 'benchmarks.train_step',
                        '--config=configs/paper.py', '--config.model.lrnn.size=3',
                        f'--out={tmp_path}/b.json'],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert run.returncode == 2 and 'Traceback' not in run.stderr
  assert "no key 'lrnn'. Did you mean \"lrn\"" in run.stderr, run.stderr[-2000:]


def test_batch_not_divisible_by_devices_is_a_clear_error(tiny_config):
  tiny_config.global_batch_size = 30
  with pytest.raises(ValueError, match='global_batch_size=30 is not divisible by the 4 devices'):
    config_lib.validate(tiny_config, 4)
  tiny_config.global_batch_size = 32
  config_lib.validate(tiny_config, 4)
  tiny_config.model.features = (8, 15, 16, 16, 8)
  with pytest.raises(ValueError, match=r'features\[1\]=15'):
    config_lib.validate(tiny_config, 4)


def test_nan_loss_stops_without_saving_the_diverged_state(tiny_config, tmp_path):
  tiny_config.schedule.base_lr = 1e6
  tiny_config.max_train_steps = 30
  tiny_config.checkpoint_every_steps = 1000
  with pytest.raises(train.NonFiniteLossError, match='Lower --config.schedule.base_lr'):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  ckpt_dir = tmp_path / 'checkpoints'
  assert not ckpt_dir.exists() or not os.listdir(ckpt_dir)


def test_plateau_divides_lr_by_ten_at_most_max_reductions_times(tiny_config, tmp_path):
  tiny_config.schedule.name = 'plateau'
  tiny_config.schedule.base_lr = 0.01
  tiny_config.schedule.min_delta = 1.0  # no evaluation counts as an improvement
  tiny_config.schedule.patience = 1
  tiny_config.schedule.max_reductions = 2
  tiny_config.max_train_steps = 40
  tiny_config.eval_every_epochs = 10 * 32 / 60000  # every 10 steps
  tiny_config.log_every_steps = 1
  tiny_config.max_eval_batches = 1
  train.train_and_evaluate(tiny_config, str(tmp_path))
  lr = {r['step']: r['lr'] for r in map(json.loads, open(tmp_path / 'metrics.jsonl'))
        if 'lr' in r}
  # First eval (step 10) sets the best; evals at 20 and 30 each cut by 10; the
  # one at 40 would be a third cut, beyond max_reductions.
  np.testing.assert_allclose([lr[10], lr[11], lr[21], lr[31], lr[40]],
                             [0.01, 0.01, 0.001, 0.0001, 0.0001], rtol=1e-5)


def test_plateau_rule_unit():
  from ml_collections import ConfigDict
  cfg = ConfigDict({'name': 'plateau', 'min_delta': 0.01, 'patience': 2, 'max_reductions': 1})
  p = train.Plateau(cfg)
  assert [p.update(e) for e in (0.5, 0.45, 0.445, 0.44, 0.30, 0.299, 0.298, 0.2)] == [
      False, False, False, True, False, False, False, False]
  assert p.reductions == 1 and p.best == 0.2


def _pmapped_update(tx, ops):
  """`ops.apply_optimizer` alone, pmapped over one device as in the train step."""
  def step(grads, params, opt_state):  # donated in the order they are returned
    return ops.apply_optimizer(tx, grads, opt_state, params, jnp.float32(0.0137))
  return jax.pmap(step, axis_name=train.AXIS, devices=jax.local_devices()[:1],
                  donate_argnums=(1, 2))


# adamw has no Nesterov form: one case of it.
@needs_cpu_kernels
@pytest.mark.parametrize('name,nesterov', [('paper_momentum', False), ('paper_momentum', True),
                                           ('adamw', False)])
def test_optimizer_step_is_written_in_place_with_the_same_values(name, nesterov):
  rs = np.random.RandomState(0)
  shapes = {'conv': {'kernel': (3, 3, 4, 8), 'bias': (8,)}, 'fc': {'kernel': (256, 131)}}
  make = lambda: jax.tree.map(lambda s: rs.randn(1, *s).astype(np.float32), shapes,
                              is_leaf=lambda s: isinstance(s, tuple))
  params, grads = make(), make()
  config = config_lib.base_config().optimizer
  config.name = name
  config.nesterov = nesterov
  tx = optim.create_optimizer(config)
  opt_state = jax.pmap(tx.init, devices=jax.local_devices()[:1])(params)
  # A first step so that the velocity (or Adam's moments) is not zero.
  opt_state = _pmapped_update(tx, ops_lib.REFERENCE)(grads, params, opt_state)[1]
  results, hlos = {}, {}
  variants = {'optax': ops_lib.REFERENCE, 'cpu_kernels': cpu_ops.OneDNNOps()}
  for variant, ops in variants.items():
    step = _pmapped_update(tx, ops)
    hlos[variant] = step.lower(grads, params, opt_state).compile().as_text()
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # the step donates its inputs
    results[variant] = step(grads, copy(params), copy(opt_state))
  copies = {k: h.count(' copy(') for k, h in hlos.items()}
  # Without the leading-axis views XLA copies buffers (for the paper's rule,
  # every parameter and velocity); with them it copies none.
  assert copies['optax'] >= (2 * len(jax.tree.leaves(params)) if name == 'paper_momentum' else 1), copies
  assert copies['cpu_kernels'] == 0, copies
  # On the CPU kernels the paper's rule is one call that writes every
  # parameter and velocity over its operand; other optimisers stay XLA's.
  calls = [l for l in hlos['cpu_kernels'].splitlines() if 'alexnet_momentum_update' in l]
  leaves = len(jax.tree.leaves(params))
  if name == 'paper_momentum':
    assert len(calls) == 1, calls
    assert calls[0].split('custom-call(')[1].split(')')[0].count(', ') == 3 * leaves  # lr, (w, v, g)s
    assert calls[0].count('}: (') == 2 * leaves  # w', v' aliased
  else:
    assert not calls
  if name == 'paper_momentum':  # the same values bit for bit
    jax.tree.map(np.testing.assert_array_equal, results['optax'], results['cpu_kernels'])
  else:  # Adam's division and square root are fused differently: 1-ulp changes
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
                 results['optax'], results['cpu_kernels'])
  assert not np.array_equal(results['cpu_kernels'][0]['fc']['kernel'], params['fc']['kernel'])


@pytest.mark.parametrize('cpu_kernels', [False, True])
@pytest.mark.parametrize('groups', [None, [[0, 2], [1, 3]], [[0], [1], [2], [3]]])
def test_mean_over_devices_is_pmean_without_all_reduces_of_one(groups, cpu_kernels):
  x = np.arange(4 * 3, dtype=np.float32).reshape(4, 3) ** 2
  if cpu_kernels and CPU_KERNELS_MISSING:
    pytest.skip(f'the CPU kernels cannot be built here: {CPU_KERNELS_MISSING}')
  ops = cpu_ops.OneDNNOps() if cpu_kernels else ops_lib.REFERENCE
  f = jax.pmap(lambda v: ops.mean_over_devices({'v': v}, train.AXIS, groups)['v'],
               axis_name=train.AXIS)
  got = np.asarray(f(x))
  for members in groups or [[0, 1, 2, 3]]:  # each device: the mean over its group
    for d in members:
      np.testing.assert_allclose(got[d], x[members].mean(0), rtol=1e-6)
  hlo = f.lower(x).compile().as_text()
  ones = groups == [[0], [1], [2], [3]] and cpu_kernels  # all-reduces of one device
  assert ('all-reduce' in hlo) == (not ones)
  assert ('alexnet_after_all' in hlo) == ones


@needs_cpu_kernels
def test_one_device_train_step_has_no_all_reduce_and_updates_after_all_gradients(tiny_config):
  assert isinstance(make_model(tiny_config).ops, cpu_ops.OneDNNOps)
  size = tiny_config.dataset.image_size
  batch = {'image': np.zeros((8, size, size, 1), np.float32), 'label': np.zeros(8, np.int32)}
  for n in (1, 2):
    step, state = _pmapped_step(tiny_config, n)
    leaves = len(jax.tree.leaves(state.params))
    hlo = step.lower(state, parallel.shard_batch(batch, parallel.Layout(n, 1))).compile().as_text()
    # One device: XLA would copy every gradient through an all-reduce of one;
    # instead one call that takes every gradient orders the updates after them
    # (and one more takes the two metrics).
    calls = [line for line in hlo.splitlines() if 'custom_call_target="alexnet_after_all"' in line]
    assert ('all-reduce' in hlo) == (n > 1), n
    operands = sorted(len(c.split('custom-call(')[1].split(')')[0].split(', ')) for c in calls)
    assert operands == ([2, leaves] if n == 1 else []), (operands, leaves)
    # Either way, one call updates every parameter and velocity in one pass.
    updates = [line for line in hlo.splitlines()
               if 'custom_call_target="alexnet_momentum_update"' in line]
    assert len(updates) == 1, updates
    assert updates[0].split('custom-call(')[1].split(')')[0].count(', ') == 3 * leaves
