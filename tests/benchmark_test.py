"""Train-step benchmark: the PyTorch twin, the FLOP count, the JSON, XLA defaults, bf16."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import torch

from alexnet_jax import summary
from alexnet_jax.cpu import xla_flags
from benchmarks import conv_layers
from benchmarks import input_pipeline as input_benchmark
from benchmarks import torch_alexnet
from benchmarks import train_step
from conftest import REPO
from conftest import needs_cpu_kernels
from conftest import load_config
from conftest import make_model
from conftest import tiny_fashion_config


def tiny_single_tower_config():
  """A single-tower network shaped like configs/single_tower.py, 67x67 input."""
  config = tiny_fashion_config()
  config.dataset.image_size = 67
  config.dataset.mean = (120.0, 115.0, 100.0)
  config.dataset.std = (60.0, 60.0, 60.0)
  config.model.towers = 1
  config.model.features = (4, 8, 8, 8, 4)
  config.model.kernel_sizes = (11, 5, 3, 3, 3)
  config.model.conv1_stride = 4
  config.model.conv1_padding = 2
  config.model.pool_padding = 'VALID'
  config.model.fc_features = (16, 16)
  config.model.lrn.alpha_over_size = True
  config.model.lrn.alpha = 0.05  # large enough that the LRN changes the result
  return config


def _flax_and_torch_logits(config, tower_mode, lrn_impl):
  model = make_model(config)
  size, channels = config.dataset.image_size, len(config.dataset.mean)
  x = np.random.RandomState(0).randn(3, size, size, channels).astype(np.float32) * 3
  shapes = jax.eval_shape(lambda: model.init({'params': jax.random.key(1)}, jnp.asarray(x),
                                             train=False))['params']
  # Random weights large enough that every layer (and the LRN) matters.
  rs = np.random.RandomState(1)
  params = jax.tree.map(
      lambda s: jnp.asarray(rs.randn(*s.shape).astype(np.float32)
                            / np.sqrt(np.prod(s.shape[:-1]))), shapes)
  ours = np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
      params, jnp.asarray(x)))
  net = torch_alexnet.TorchAlexNet(config.model, config.dataset.num_classes, channels,
                                   size, tower_mode=tower_mode, lrn_impl=lrn_impl)
  net.load_flax_params(params)
  net.eval()
  with torch.no_grad():
    theirs = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  return ours, theirs


@pytest.mark.parametrize('tower_mode,lrn_impl', [('groups', 'fast'), ('split', 'module')])
def test_torch_twin_matches_two_tower_flax_logits(tower_mode, lrn_impl):
  # The demo network shrunk: two towers, LRN (paper's convention), SAME pooling.
  config = tiny_fashion_config()
  config.model.lrn.alpha = 0.01  # large enough that the LRN changes the result
  ours, theirs = _flax_and_torch_logits(config, tower_mode, lrn_impl)
  assert np.abs(ours).max() > 1e-2
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())


def test_torch_twin_matches_single_tower_flax_logits():
  ours, theirs = _flax_and_torch_logits(tiny_single_tower_config(), 'groups', 'fast')
  assert np.abs(ours).max() > 1e-2
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())


def test_torch_paper_momentum_is_the_paper_rule():
  w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
  b = torch.nn.Parameter(torch.tensor([0.5]))
  opt = torch_alexnet.PaperMomentum([w], [b], lr=0.1, momentum=0.9, weight_decay=0.01)
  v_w, v_b, w_ref, b_ref = np.zeros(2), np.zeros(1), np.array([1.0, -2.0]), np.array([0.5])
  for g_w, g_b in (([0.3, 0.1], [1.0]), ([-0.2, 0.4], [0.5])):
    w.grad, b.grad = torch.tensor(g_w), torch.tensor(g_b)
    opt.step()
    v_w = 0.9 * v_w - 0.01 * 0.1 * w_ref - 0.1 * np.array(g_w)
    v_b = 0.9 * v_b - 0.1 * np.array(g_b)  # biases: no weight decay
    w_ref, b_ref = w_ref + v_w, b_ref + v_b
  np.testing.assert_allclose(w.detach().numpy(), w_ref, rtol=1e-6)
  np.testing.assert_allclose(b.detach().numpy(), b_ref, rtol=1e-6)


def test_train_flops_are_six_times_the_hand_counted_macs():
  # conv1 16x16x4 outputs x 11*11*3, pool -> 7; conv2 7x7x8 x 5*5*4, pool -> 3;
  # conv3 3x3x8 x 3*3*8; conv4 the same; conv5 3x3x4 x 3*3*8, pool -> 1;
  # fc6 4 -> 16, fc7 16 -> 16, fc8 16 -> 10.
  macs = (16 * 16 * 4 * 363 + 49 * 8 * 100 + 9 * 8 * 72 + 9 * 8 * 72 + 9 * 4 * 72
          + 4 * 16 + 16 * 16 + 16 * 10)
  assert train_step.train_flops_per_image(tiny_single_tower_config()) == 6 * macs


@needs_cpu_kernels
def test_benchmark_writes_every_figure(tmp_path, capsys):
  out = tmp_path / 'result.json'
  config = _fashion_small()
  train_step.benchmark_and_write(config, 'fashion_mnist', str(out), reps=3, steps=1,
                                 warmup=1, gemm_size=128)
  assert 'PyTorch' in capsys.readouterr().out
  r = json.loads(out.read_text())
  for key in ('jax', 'torch'):
    assert r['images_per_sec'][key] > 0
    assert r['achieved_flops_per_sec'][key] > 0
    assert r['mfu'][key] > 0
    assert r['epoch_sec'][key] > 0
  assert r['jax_vs_torch'] > 0 and r['compile_sec'] > 0
  samples = r['samples_images_per_sec']
  pairs = [j / t for j, t in zip(samples['jax'], samples['torch'])]
  assert len(pairs) == 3 and r['jax_vs_torch_pairs']['each'] == pytest.approx(pairs)
  assert r['jax_vs_torch_pairs']['median'] == pytest.approx(sorted(pairs)[1])
  assert r['jax_vs_torch_pairs']['min'] == pytest.approx(min(pairs))
  assert r['jax_vs_torch_pairs']['max'] == pytest.approx(max(pairs))
  row = train_step.format_row({**r, 'name': 'fashion_mnist'})
  assert row.count('|') == train_step.TABLE_HEADER.splitlines()[0].count('|')
  assert row.startswith('| fashion_mnist | ')
  wino = train_step.format_row({**r, 'name': 'paper', 'setup': {**r['setup'], 'conv_impl': 'winograd'}})
  assert wino.startswith('| paper (winograd) | ')
  assert r['gemm_peak']['float32']['peak_flops_per_sec'] > 0
  assert r['memory_mib']['process_max_rss_mib'] > 0
  assert r['memory_mib']['xla_temp_mib'] > 0
  assert r['train_flops_per_image'] == train_step.train_flops_per_image(config)
  assert r['steps_per_epoch'] == 60_000 // 16
  assert set(r['targets']) == {'jax >= 1.0x torch images/s'}
  setup = r['setup']
  assert setup['conv_impl'] == 'auto' and setup['convolutions'] == 'onednn'
  assert re.fullmatch(r'\d+\.\d+\.\d+', setup['onednn_version'])
  # The step's forward and kernel-gradient primitives (kinds 0 and 2; its
  # stride-1 input gradients run as forward convolutions) were recorded.
  assert {'0', '2'} <= {line.split()[0] for line in setup['onednn_primitives']}


def _fashion_small():
  config = tiny_fashion_config()
  config.model.features = (8, 16, 16, 16, 8)
  config.model.fc_features = (32, 32)
  config.global_batch_size = 16
  return config


def test_xla_defaults_never_override_the_users_flags():
  assert xla_flags.with_cpu_defaults('') == (
      '--xla_cpu_experimental_ynn_fusion_type=individual_dot')
  mine = '--xla_force_host_platform_device_count=4 --xla_cpu_experimental_ynn_fusion_type='
  assert xla_flags.with_cpu_defaults(mine) == mine


@pytest.mark.parametrize('user_flags, expected', [
    ('', '--xla_cpu_experimental_ynn_fusion_type=individual_dot'),
    ('--xla_cpu_experimental_ynn_fusion_type=', '--xla_cpu_experimental_ynn_fusion_type='),
])
def test_trainer_entry_point_sets_the_cpu_defaults_before_jax_loads(user_flags, expected):
  # XLA reads XLA_FLAGS when JAX opens its first backend (importing JAX opens none).
  probe = ('import os, sys; import alexnet_jax.main; '
           'print(os.environ["XLA_FLAGS"]); bridge = sys.modules.get("jax._src.xla_bridge"); '
           'print(bool(bridge and bridge.backends_are_initialized()))')
  env = dict(os.environ, XLA_FLAGS=user_flags)
  env.pop('ALEXNET_XLA_DEFAULTS', None)
  out = subprocess.run([sys.executable, '-c', probe], cwd=REPO, env=env, check=True,
                       capture_output=True, text=True).stdout.split('\n')
  assert out[0] == expected
  assert out[1] == 'False'  # XLA reads the flags when a backend starts: none may have


def test_malloc_tunables_are_added_once_and_never_override_the_user():
  every = ':'.join(f'{n}={v}' for n, v in xla_flags.MALLOC_TUNABLES)
  assert every.startswith('glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:')
  assert xla_flags.with_malloc_defaults('') == every
  # A user's value stays, in its place; only the missing ones are added.
  assert xla_flags.with_malloc_defaults('glibc.malloc.arena_max=2:glibc.rtld.x=1') == (
      'glibc.malloc.arena_max=2:glibc.rtld.x=1:' + every.replace('glibc.malloc.arena_max=1:', ''))
  assert xla_flags.with_malloc_defaults(every.replace('hugetlb=1', 'hugetlb=0')) is None
  assert xla_flags.with_malloc_defaults(xla_flags.with_malloc_defaults('')) is None


_PROBE = ('import os, sys; from alexnet_jax.cpu import xla_flags; '
          'print(os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True); '
          'xla_flags.restart_with_malloc_defaults("tests.restart_probe")')


def _run_probe(**env_vars):
  env = dict(os.environ)
  for name in ('GLIBC_TUNABLES', 'ALEXNET_XLA_DEFAULTS', 'JAX_PLATFORMS'):
    env.pop(name, None)
  env.update(env_vars)
  return subprocess.run([sys.executable, '-c', _PROBE, 'a', '--b=1'], cwd=REPO, env=env,
                        check=True, capture_output=True, text=True).stdout.split('\n')


def test_trainer_restarts_itself_with_malloc_tunables_keeping_its_arguments():
  # The probe prints its tunables and arguments, then restarts as
  # tests/restart_probe.py, which prints them again and tries to restart again.
  out = _run_probe()
  assert out[0] == "None ['a', '--b=1']"  # before the restart
  every = xla_flags.with_malloc_defaults('')
  assert out[1] == f"{every} ['a', '--b=1']"  # the restarted module
  assert out[2] == ''  # and no second restart


@pytest.mark.parametrize('env', [{'JAX_PLATFORMS': 'cuda,cpu'}, {'ALEXNET_XLA_DEFAULTS': '0'}])
def test_no_restart_off_the_cpu_or_with_defaults_off(env):
  assert _run_probe(**env) == ["None ['a', '--b=1']", '']


def test_cpu_is_judged_from_jax_platforms_first(monkeypatch):
  for platforms, expected in (('cpu', True), ('cpu,cuda', True), ('cuda', False),
                              ('tpu,cpu', False)):
    monkeypatch.setenv('JAX_PLATFORMS', platforms)
    assert xla_flags.runs_on_cpu() is expected, platforms


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else [value]):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          yield from _all_eqns(inner)


@pytest.mark.parametrize('conv_impl', ['xla', pytest.param('onednn', marks=needs_cpu_kernels)])
def test_bfloat16_computes_in_bfloat16_with_float32_params_and_lrn(conv_impl):
  config = tiny_fashion_config()
  config.dtype = 'bfloat16'
  config.conv_impl = conv_impl
  model = make_model(config)
  x = jnp.ones((2, 28, 28, 1), jnp.float32)
  params = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, x,
                                             train=False))['params']
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}

  def loss(params):
    return model.apply({'params': params}, x, train=True,
                       rngs={'dropout': jax.random.key(1)}).sum()

  eqns = list(_all_eqns(jax.make_jaxpr(jax.grad(loss))(params).jaxpr))
  # The LRN sums its windows with a reduce-window; the FC layers' dots are 2-D.
  lrn = lambda e: (e.primitive.name.startswith('reduce_window') or (
      e.primitive.name == 'dot_general' and e.invars[0].aval.ndim == 5))
  dots = [e for e in eqns if e.primitive.name == 'dot_general' and not lrn(e)]
  sums = [e for e in eqns if lrn(e)]
  if conv_impl == 'xla':
    convs = [e for e in eqns if e.primitive.name == 'conv_general_dilated']
    # Forward, input and kernel gradients of 8 convolutions (a grouped layer
    # is one per tower), less conv1's input gradient.
    assert len(convs) == 8 * 3 - 1 and sums
  else:
    calls = [e for e in eqns if e.primitive.name == 'ffi_call']
    convs = [e for e in calls if 'conv' in e.params['target_name']]
    fused = [e for e in calls if 'relu_lrn_pool' in e.params['target_name']]
    # 5 convolutions (both towers in one grouped call) and, as the custom VJP
    # traces it, conv1's input gradient too; ReLU-LRN-pool after conv1 and 2
    # and ReLU-pool after conv5, each forward and backward. The LRN is
    # computed in float32 inside (test_fused_relu_lrn_pool_in_bfloat16_...).
    assert len(convs) == 5 * 3 and len(fused) == 3 * 2 and not sums
    for e in fused:  # x (or x, arg, dy): all activations in bfloat16
      assert {v.aval.dtype for v in e.invars} - {jnp.dtype(jnp.uint8)} == {
          jnp.dtype(jnp.bfloat16)}, e
  assert convs and dots
  for e in convs + dots:  # forward and both gradients
    assert {v.aval.dtype for v in e.invars} == {jnp.dtype(jnp.bfloat16)}, e
  for e in sums:  # the LRN's windowed sums of squares (and of its backward)
    assert {v.aval.dtype for v in e.invars} == {jnp.dtype(jnp.float32)}, e
  grads = jax.eval_shape(jax.grad(loss), params)
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_input_benchmark_measures_every_variant_on_the_same_images():
  jpegs = input_benchmark.make_jpegs(3)
  squares = input_benchmark._squares(jpegs)  # pylint: disable=protected-access
  for data, square in zip(jpegs, squares):
    assert tf.io.extract_jpeg_shape(data).numpy().tolist() in ([375, 500, 3], [500, 375, 3])
    assert tf.io.extract_jpeg_shape(square).numpy().tolist() == [256, 256, 3]
  r = input_benchmark.run_benchmark(num_jpegs=3, images=64, rounds=1, epochs=90)
  rates = r['images_per_cpu_sec']
  assert set(rates) == {'tf_pipeline', 'tf_decode', 'pil_numpy', 'tf_pipeline_original',
                        'tf_decode_squares', 'pil_numpy_original', 'tf_make_squares'}
  assert all(rate > 0 for rate in rates.values())
  assert r['tf_pipeline_vs_tf_decode'] == pytest.approx(rates['tf_pipeline'] / rates['tf_decode'])
  assert r['tf_pipeline_vs_pil_numpy'] == pytest.approx(rates['tf_pipeline'] / rates['pil_numpy'])
  # Per image and epoch: the pipeline plus a ninetieth of the one-off copy.
  amortised = r['also']['tf_pipeline_with_copy_over_90_epochs']
  assert 1 / amortised == pytest.approx(1 / rates['tf_pipeline'] + 1 / (90 * rates['tf_make_squares']))
  assert r['targets']['tf_pipeline >= 0.8x tf_decode'] == (r['tf_pipeline_vs_tf_decode'] >= 0.8)


@pytest.mark.parametrize('name', ['paper', 'single_tower', 'fashion_mnist'])
def test_conv_layer_geometry_matches_the_models_own_shapes(name):
  config = load_config(name)
  traced = {r['layer']: r for r in summary.layer_table(config)}
  layers = conv_layers.conv_layers(config)
  assert [l['layer'] for l in layers] == [f'conv{i}' for i in range(1, 6)]
  for layer in layers:
    row = traced[layer['layer']]
    assert (layer['out_size'], layer['out_size'], layer['out_channels']) == row['output_shape']
    assert layer['in_channels'] // layer['groups'] == row['in_features']
    assert layer['macs_per_image'] == row['macs']


@needs_cpu_kernels
@pytest.mark.parametrize('config_fn', [tiny_single_tower_config, _fashion_small])
def test_conv_layer_benchmark_times_the_same_function_in_both_frameworks(config_fn):
  config = config_fn()
  config.global_batch_size = 2
  for layer in conv_layers.conv_layers(config):
    inputs = conv_layers.make_inputs(layer, 2)
    theirs = conv_layers.torch_parts(layer, inputs)
    for impl in conv_layers.IMPLS:
      ours = conv_layers.jax_parts(layer, inputs, impl)
      for part in conv_layers.PARTS:
        a = np.asarray(ours[part]())
        b = theirs[part]().numpy()
        assert a.shape == b.shape, (layer['layer'], part)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(),
                                   err_msg=f'{layer["layer"]} {part} {impl}')
  r = conv_layers.run_benchmark(config, reps=2)
  conv1 = r['layers'][0]
  assert conv1['counted_parts'] == ['forward', 'kernel_grad']  # never the images' gradient
  assert r['onednn_missing'] is None
  # Each 3x3 stride-1 layer asked oneDNN for its Winograd kernels, all three parts.
  for layer in conv_layers.conv_layers(config):
    if layer['kernel'] == 3 and layer['stride'] == 1:
      g = layer['groups']
      name = (f' {layer["in_channels"]}->{layer["out_channels"]} 3x3'
              + (f' groups={g}' if g > 1 else '') + ' winograd:')
      kinds = {line.split()[0] for line in r['onednn_kernels'].splitlines() if name in line}
      assert kinds >= {'0', '2'}, (name, r['onednn_kernels'])  # forward, kernel gradient
  for fw in ('xla', 'onednn', 'winograd', 'torch'):
    for row in r['layers']:
      s = row['seconds'][fw]
      assert all(s[p] > 0 for p in conv_layers.PARTS)
      assert s['total'] == pytest.approx(sum(s[p] for p in row['counted_parts']))
    assert r['total_seconds'][fw] == pytest.approx(
        sum(row['seconds'][fw]['total'] for row in r['layers']))
    if fw != 'torch':
      assert r['vs_torch_time'][fw] == pytest.approx(
          r['total_seconds'][fw] / r['total_seconds']['torch'])
  assert conv_layers.format_row(conv1).count('|') == conv_layers.TABLE_HEADER.splitlines()[0].count('|')


def _two_tower_small():
  config = tiny_single_tower_config()
  config.model.towers = 2
  config.model.conv1_padding = 0
  config.model.pool_padding = 'VALID'
  config.dataset.image_size = 71
  return config


def test_tower_comparison_interleaves_both_networks_and_reports_per_flop(monkeypatch):
  configs = {'two': _two_tower_small(), 'one': tiny_single_tower_config()}
  for c in configs.values():
    c.global_batch_size = 4
  flops = {k: train_step.train_flops_per_image(c) for k, c in configs.items()}
  assert flops['two'] != flops['one']
  calls = []

  def fake_runner(config, batch_size):
    name = 'two' if config.model.towers == 2 else 'one'
    return (lambda n: calls.append((name, n))), {'compile_sec': 0.5}

  # Each timing returns images/s from a fixed list of seconds per step.
  seconds = {'two': [2.0, 1.0, 4.0], 'one': [1.0, 2.0, 2.0]}
  def fake_rate(fn, n, reps=3):
    fn()
    name = calls[-1][0]
    return n / seconds[name].pop(0)

  monkeypatch.setattr(train_step, '_jax_runner', fake_runner)
  monkeypatch.setattr(train_step, '_median_rate', fake_rate)
  monkeypatch.setattr(train_step.time, 'sleep', lambda s: None)
  r = train_step.compare_towers(configs, reps=3, steps=2, warmup=1)
  # Warm-up, then both networks once per repetition, in alternating order.
  assert calls == [('two', 1), ('one', 1), ('two', 2), ('one', 2), ('one', 2), ('two', 2),
                   ('two', 2), ('one', 2)]
  per_sec = {'two': [8 / 2.0 * flops['two'], 8 / 1.0 * flops['two'], 8 / 4.0 * flops['two']],
             'one': [8 / 1.0 * flops['one'], 8 / 2.0 * flops['one'], 8 / 2.0 * flops['one']]}
  for name in configs:
    assert r['samples_flops_per_sec'][name] == pytest.approx(per_sec[name])
  assert r['flops_per_sec']['two'] == pytest.approx(4 * flops['two'])   # median of 8, 4, 2
  assert r['flops_per_sec']['one'] == pytest.approx(4 * flops['one'])
  assert r['images_per_sec'] == pytest.approx({'two': 4.0, 'one': 4.0})
  assert r['ratio'] == pytest.approx(flops['two'] / flops['one'])
  pairs = [a / b for a, b in zip(per_sec['two'], per_sec['one'])]
  assert r['ratio_pairs']['each'] == pytest.approx(pairs)
  assert r['ratio_pairs']['median'] == pytest.approx(sorted(pairs)[1])
  assert r['ratio_pairs']['median_interval'] == train_step.median_interval(pairs)
  assert list(r['target'].values()) == [flops['two'] >= flops['one']]
  assert list(r['comparisons']) == ['two / one']
  with pytest.raises(ValueError, match='at least two configs'):
    train_step.compare_towers({'two': configs['two']}, reps=1, steps=1, warmup=1)


def test_tower_comparison_reports_every_named_pair_in_interleaved_order(monkeypatch):
  configs = {}
  for name, towers, lrn in (('a', 2, False), ('b', 2, True), ('c', 1, True), ('d', 1, False)):
    c = _two_tower_small() if towers == 2 else tiny_single_tower_config()
    c.model.lrn.enabled = lrn
    c.global_batch_size = 4
    configs[name] = c
  flops = {k: train_step.train_flops_per_image(c) for k, c in configs.items()}
  # The LRN adds no counted FLOPs; the towers change them.
  assert flops['a'] == flops['b'] and flops['c'] == flops['d'] and flops['a'] != flops['c']
  order = []
  timed = {'a': [1.0, 3.0, 2.0], 'b': [2.0, 2.0, 5.0], 'c': [4.0, 1.0, 2.0], 'd': [1.0, 1.0, 4.0]}
  seconds = {k: list(v) for k, v in timed.items()}  # seconds per step, popped in turn

  def fake_runner(config, batch_size):
    name = next(k for k, c in configs.items() if c is config)
    return (lambda n: order.append((name, n))), {'compile_sec': 1.0}

  def fake_rate(fn, n, reps=3):
    fn()
    return n / seconds[order[-1][0]].pop(0)

  monkeypatch.setattr(train_step, '_jax_runner', fake_runner)
  monkeypatch.setattr(train_step, '_median_rate', fake_rate)
  monkeypatch.setattr(train_step.time, 'sleep', lambda s: None)
  pairs = [('b', 'c'), ('a', 'd'), ('b', 'a')]
  r = train_step.compare_towers(configs, reps=3, steps=1, warmup=1, pairs=pairs)
  assert [n for n, _ in order[4:]] == list('abcd') + list('dcba') + list('abcd')
  for x, y in pairs:
    each = [flops[x] / sx / (flops[y] / sy) for sx, sy in zip(timed[x], timed[y])]
    c = r['comparisons'][f'{x} / {y}']
    assert c['ratio_pairs']['each'] == pytest.approx(each)
    assert c['ratio_pairs']['median'] == pytest.approx(sorted(each)[1])
  # Medians of the seconds: a 2, b 2, c 2, d 1.
  assert r['comparisons']['b / c']['ratio'] == pytest.approx(flops['b'] / flops['c'])
  assert r['comparisons']['a / d']['ratio'] == pytest.approx(flops['a'] / flops['d'] / 2)
  assert r['comparisons']['b / a']['ratio'] == pytest.approx(1.0)
  # The first pair is the target, at the top level too.
  assert r['ratio'] == r['comparisons']['b / c']['ratio']
  assert list(r['target']) == ['b no slower per FLOP than c']
  for bad in ([('a', 'e')], [], [('a',)]):
    with pytest.raises(ValueError, match='must name two of'):
      train_step.compare_towers(configs, reps=1, steps=1, warmup=1, pairs=bad)
  with pytest.raises(ValueError, match='needs `pairs`'):
    train_step.compare_towers(configs, reps=1, steps=1, warmup=1)


def test_tower_configs_change_only_the_lrn_for_the_controls():
  plain, target = train_step.tower_configs(32)
  assert list(plain) == ['paper', 'single_tower'] and target == [('paper', 'single_tower')]
  configs, pairs = train_step.tower_configs(32, lrn_controls=True)
  assert pairs[0] == ('paper', 'single_tower')
  assert {n for p in pairs for n in p} == set(configs)
  order = list(configs)
  assert all(abs(order.index(a) - order.index(b)) <= 2 for a, b in pairs)
  for name, config in configs.items():
    net = 'paper' if name.startswith('paper') else 'single_tower'
    assert config.global_batch_size == 32
    assert config.model.lrn.enabled == (name in ('paper', 'single_tower_with_lrn'))
    # Apart from the LRN switch, each control is its network's config.
    other = plain[net].to_dict()
    mine = config.to_dict()
    other['model']['lrn'].pop('enabled'), mine['model']['lrn'].pop('enabled')
    assert mine == other


def test_median_interval_is_the_binomial_order_statistics_interval():
  # n = 9: P(B(9, 1/2) <= 1) = 10 / 512 <= 2.5%, P(B <= 2) = 46 / 512 > 2.5%,
  # so the 2nd and 8th smallest, covering 1 - 20 / 512.
  i = train_step.median_interval([9, 1, 8, 2, 7, 3, 6, 4, 5])
  assert (i['low'], i['high']) == (2, 8) and i['coverage'] == pytest.approx(1 - 20 / 512)
  # n = 20: P(B(20, 1/2) <= 5) = 21700 / 2**20 = 2.07%, P(B <= 6) = 5.77%.
  i = train_step.median_interval(range(20))
  assert (i['low'], i['high']) == (5, 14)
  assert i['coverage'] == pytest.approx(1 - 2 * 21700 / 2 ** 20)
  # Too few values for 95%: the whole range, and what it covers.
  i = train_step.median_interval([3.0, 1.0, 2.0, 5.0, 4.0])
  assert (i['low'], i['high'], i['coverage']) == (1.0, 5.0, pytest.approx(1 - 2 / 32))
  assert train_step.median_interval([0.97])['low'] == 0.97
  with pytest.raises(ValueError, match='at least one'):
    train_step.median_interval([])


@needs_cpu_kernels
def test_tower_comparison_runs_the_real_steps(tmp_path):
  configs = {'two': _two_tower_small(), 'one': tiny_single_tower_config()}
  for c in configs.values():
    c.global_batch_size = 4
  r = train_step.compare_towers(configs, reps=2, steps=1, warmup=1)
  for name in configs:
    assert len(r['samples_flops_per_sec'][name]) == 2
    assert r['flops_per_sec'][name] > 0 and r['compile_sec'][name] > 0
    assert r['setup']['convolutions'][name] == 'onednn'
  assert r['ratio'] == pytest.approx(r['flops_per_sec']['two'] / r['flops_per_sec']['one'])


def test_every_suite_case_writes_its_own_file():
  files = [train_step._case_file(name, batch, dtype, impl)
           for name, batch, dtype, _, impl in train_step.SUITE]
  assert len(set(files)) == len(files)
  assert train_step._case_file('paper', 64, 'float32', 'winograd') == (
      'train_step_paper_b64_float32_winograd.json')
  assert train_step._case_file('paper', 64, 'float32', 'auto') == 'train_step_paper_b64_float32.json'
  config = tiny_single_tower_config()
  config.global_batch_size, config.conv_impl = 8, 'winograd'
  assert train_step._default_out(config, 'x').endswith('train_step_x_b8_float32_winograd.json')


@pytest.mark.parametrize('name, flag', [('train_step', '--towers_at'),
                                        ('conv_layers', '--reps'),
                                        ('input_pipeline', '--num_jpegs')])
def test_benchmarks_run_as_modules_from_the_repository_root(name, flag):
  # absl's --help prints the module's flags and exits with status 1.
  run = subprocess.run([sys.executable, '-m', f'benchmarks.{name}', '--help'], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert 'Traceback' not in run.stderr, run.stderr[-2000:]
  assert f'benchmarks/{name}.py:' in run.stdout and flag in run.stdout, run.stdout[-2000:]


@pytest.mark.parametrize('module', ['alexnet_jax.main', 'alexnet_jax.summary'])
def test_the_package_imports_neither_the_benchmarks_nor_pytorch(module):
  probe = (f'import sys; import {module}, alexnet_jax.train; '
           'print(sorted(m for m in sys.modules if m.split(".")[0] in ("benchmarks", "torch")))')
  out = subprocess.run([sys.executable, '-c', probe], cwd=REPO, check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == '[]'
