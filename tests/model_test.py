"""The network and its reference ops: parameter counts, shapes, LRN and
convolutions against torch, pooling against flax, initialisation, dropout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from alexnet_jax import backend
from alexnet_jax import model as model_lib
from alexnet_jax import ops as ops_lib
from alexnet_jax import optim
from alexnet_jax import parallel
from alexnet_jax import summary
from alexnet_jax import train
from conftest import load_config
from conftest import needs_cpu_kernels
from conftest import tiny_fashion_config


def test_paper_parameter_count_and_macs():
  rows = summary.layer_table(load_config('paper'))
  assert sum(r['params'] for r in rows) == 60_965_224
  # Hand count: conv1 55*55*96*(11*11*3) + conv2 27*27*256*(5*5*48)
  # + conv3 13*13*384*(3*3*256) + conv4 13*13*384*(3*3*192)
  # + conv5 13*13*256*(3*3*192) + 9216*4096 + 4096*4096 + 4096*1000
  expected = (55 * 55 * 96 * 363 + 27 * 27 * 256 * 1200 + 169 * 384 * 2304
              + 169 * 384 * 1728 + 169 * 256 * 1728 + 9216 * 4096 + 4096 * 4096
              + 4096 * 1000)
  assert sum(r['macs'] for r in rows) == expected


def test_paper_layer_output_shapes():
  rows = {r['layer']: r['output_shape'] for r in summary.layer_table(load_config('paper'))}
  assert rows == {
      'conv1': (55, 55, 96), 'conv2': (27, 27, 256), 'conv3': (13, 13, 384),
      'conv4': (13, 13, 384), 'conv5': (13, 13, 256), 'fc6': (4096,),
      'fc7': (4096,), 'fc8': (1000,)}


def test_single_tower_parameter_count_matches_torchvision_shape():
  rows = summary.layer_table(load_config('single_tower'))
  assert sum(r['params'] for r in rows) == 61_100_840
  assert rows[0]['output_shape'] == (55, 55, 64)


def test_summary_cli_prints_totals(capsys):
  print(summary.format_table(summary.layer_table(load_config('paper'))))
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last == 'total params: 60965224  MACs: 724406816'


def _torch_lrn(x_BHWC, size, alpha, beta, k):
  t = torch.from_numpy(np.asarray(x_BHWC)).permute(0, 3, 1, 2)
  out = torch.nn.LocalResponseNorm(size, alpha=alpha, beta=beta, k=k)(t)
  return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize('size', [5, 3, 4])
def test_lrn_matches_torch_caffe_convention(size):
  x = np.random.RandomState(0).randn(2, 5, 6, 16).astype(np.float32) * 20
  ours = ops_lib.local_response_norm(jnp.asarray(x), size=size, k=2.0, alpha=1e-3,
                                    beta=0.75, alpha_over_size=True)
  np.testing.assert_allclose(ours, _torch_lrn(x, size, 1e-3, 0.75, 2.0), rtol=1e-5, atol=1e-6)


def test_lrn_paper_convention_is_torch_with_alpha_times_size():
  # The paper's alpha multiplies the plain sum; torch divides alpha by n.
  x = np.random.RandomState(1).randn(2, 4, 4, 12).astype(np.float32) * 30
  ours = ops_lib.local_response_norm(jnp.asarray(x), size=5, k=2.0, alpha=1e-4, beta=0.75)
  np.testing.assert_allclose(ours, _torch_lrn(x, 5, 5 * 1e-4, 0.75, 2.0), rtol=1e-5, atol=1e-6)


def test_lrn_two_towers_normalise_each_half_alone():
  x = np.random.RandomState(2).randn(2, 3, 3, 16).astype(np.float32) * 30
  ours = ops_lib.local_response_norm(jnp.asarray(x), size=5, alpha=1e-3, beta=0.75,
                                    alpha_over_size=True, towers=2)
  halves = [_torch_lrn(h, 5, 1e-3, 0.75, 2.0) for h in np.split(x, 2, axis=-1)]
  np.testing.assert_allclose(ours, np.concatenate(halves, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('beta', [0.75, 0.6])
def test_lrn_gradient_matches_torch_autograd(beta):
  rs = np.random.RandomState(3)
  x = rs.randn(2, 3, 4, 10).astype(np.float32) * 10
  w = rs.randn(*x.shape).astype(np.float32)
  grad = jax.grad(lambda v: jnp.sum(ops_lib.local_response_norm(
      v, size=5, alpha=1e-2, beta=beta, alpha_over_size=True) * w))(jnp.asarray(x))
  t = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
  out = torch.nn.LocalResponseNorm(5, alpha=1e-2, beta=beta, k=2.0)(t)
  (out * torch.from_numpy(w.transpose(0, 3, 1, 2))).sum().backward()
  np.testing.assert_allclose(grad, t.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('channels, towers', [(160, 2), (192, 1), (16, 2)])
def test_lrn_per_tower_matches_torch_values_and_gradients(channels, towers):
  rs = np.random.RandomState(5)
  x = rs.randn(2, 3, 3, channels).astype(np.float32) * 10
  w = rs.randn(*x.shape).astype(np.float32)
  fn = lambda v: ops_lib.local_response_norm(v, size=5, alpha=1e-2, beta=0.75,
                                            alpha_over_size=True, towers=towers)
  grad = jax.grad(lambda v: jnp.sum(fn(v) * w))(jnp.asarray(x))
  ref_out, ref_grad = [], []
  for xs, ws in zip(np.split(x, towers, -1), np.split(w, towers, -1)):
    t = torch.from_numpy(xs.transpose(0, 3, 1, 2)).requires_grad_()
    out = torch.nn.LocalResponseNorm(5, alpha=1e-2, beta=0.75, k=2.0)(t)
    (out * torch.from_numpy(ws.transpose(0, 3, 1, 2))).sum().backward()
    ref_out.append(out.detach().numpy().transpose(0, 2, 3, 1))
    ref_grad.append(t.grad.numpy().transpose(0, 2, 3, 1))
  np.testing.assert_allclose(fn(jnp.asarray(x)), np.concatenate(ref_out, -1),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, np.concatenate(ref_grad, -1), rtol=1e-4, atol=1e-5)


def test_grouped_conv_layer_equals_torch_grouped_conv():
  rs = np.random.RandomState(4)
  x = rs.randn(2, 9, 9, 8).astype(np.float32)
  conv = model_lib.Conv(features=6, kernel_size=3, padding=1, groups=2)
  params = conv.init(jax.random.key(0), jnp.asarray(x))
  ours = conv.apply(params, jnp.asarray(x))
  kernel = np.asarray(params['params']['kernel'])  # HWIO, I = in / groups
  assert kernel.shape == (3, 3, 4, 6)
  ref = torch.relu(torch.nn.functional.conv2d(
      torch.from_numpy(x.transpose(0, 3, 1, 2)),
      torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()),
      torch.from_numpy(np.array(params['params']['bias'])), padding=1, groups=2))
  np.testing.assert_allclose(ours, ref.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def test_conv_layer_with_pooling_is_conv_relu_lrn_pool():
  rs = np.random.RandomState(6)
  x = jnp.asarray(rs.randn(2, 11, 11, 4).astype(np.float32))
  lrn, pool = ops_lib.LRN(size=3, alpha=1e-2), ops_lib.Pool(3, 2, 'SAME')
  conv = model_lib.Conv(features=8, kernel_size=3, padding=1, groups=2, lrn=lrn, pool=pool,
                        towers=2)
  params = conv.init(jax.random.key(0), x)['params']
  y = jax.lax.conv_general_dilated(x, params['kernel'], (1, 1), [(1, 1), (1, 1)],
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                   feature_group_count=2) + params['bias']
  y = ops_lib.local_response_norm(jax.nn.relu(y), size=3, alpha=1e-2, towers=2)
  np.testing.assert_allclose(conv.apply({'params': params}, x), ops_lib.max_pool(y, 3, 2, 'SAME'),
                             rtol=1e-6, atol=1e-6)


def test_paper_initialisation():
  model = model_lib.create_model(load_config('paper'))
  params = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), jnp.zeros((1, 227, 227, 3)))['params']
  for name in ('conv2', 'conv4', 'conv5', 'fc6', 'fc7'):
    assert np.all(np.asarray(params[name]['bias']) == 1.0), name
  for name in ('conv1', 'conv3', 'fc8'):
    assert np.all(np.asarray(params[name]['bias']) == 0.0), name
  w = np.asarray(params['fc6']['kernel'])
  assert abs(w.mean()) < 1e-4 and abs(w.std() - 0.01) < 1e-4


def test_dropout_only_in_training():
  config = load_config('fashion_mnist')
  model = model_lib.create_model(config)
  x = jnp.ones((4, 28, 28, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  a = model.apply(variables, x, train=False)
  b = model.apply(variables, x, train=False)
  c = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(1)})
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def _collectives(fn, num_devices, *args):
  """(primitive name, input bytes, output bytes, groups) of every collective in fn."""
  from jax._src import core  # pylint: disable=g-import-not-at-top
  jaxpr = jax.make_jaxpr(fn, axis_env=[('batch', num_devices)])(*args)

  def walk(j):
    for eqn in j.eqns:
      yield eqn
      for sub in core.jaxprs_in_params(eqn.params):
        yield from walk(sub)

  nbytes = lambda v: int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize
  return [(e.primitive.name, sum(map(nbytes, e.invars)), sum(map(nbytes, e.outvars)),
           e.params.get('axis_index_groups'))
          for e in walk(jaxpr.jaxpr)
          if e.primitive.name in ('all_gather', 'reduce_scatter', 'psum')]


@needs_cpu_kernels
@pytest.mark.parametrize('num_devices', [2, 4])
def test_summary_traffic_matches_the_model_parallel_step(num_devices):
  """The summary's byte counts equal the collectives the real step runs."""
  config = tiny_fashion_config()
  config.model_parallel = 2
  config.global_batch_size = 16
  model = model_lib.create_model(config, backend.select_ops(config.conv_impl, config.dtype))
  tx = optim.create_optimizer(config.optimizer)
  layout = parallel.Layout(num_devices, towers=2)
  tower_state = parallel.split_state(train.create_train_state(config, model, tx), 2)[0]
  per_replica = config.global_batch_size // layout.replicas
  batch = {'image': np.zeros((per_replica, 28, 28, 1), np.float32),
           'label': np.zeros((per_replica,), np.int32)}
  step = functools.partial(train.train_step, model=parallel.split_model(model, layout),
                           layout=layout, tx=tx, schedule=lambda s: 0.1, seed=0)
  ops = _collectives(step, num_devices, tower_state, batch)
  # Two towers: an all-gather sends this device's input to the partner, the
  # backward reduce-scatter sends the partner's half (the size of its output).
  sent = (sum(i for name, i, _, _ in ops if name == 'all_gather')
          + sum(o for name, _, o, _ in ops if name == 'reduce_scatter'))
  replica_groups = tuple(map(tuple, layout.replica_groups))
  grads = sum(i for name, i, _, g in ops
              if name == 'psum' and g is not None and tuple(map(tuple, g)) == replica_groups)
  expected = summary.traffic(config, summary.layer_table(config), num_devices)
  assert sent == expected['tower_exchange_bytes'] > 0
  r = layout.replicas
  # One replica: each tower's gradients are its own (on the CPU kernels the step
  # runs no all-reduce of one device, `cpu.ops.OneDNNOps.mean_over_devices`).
  assert grads == (expected['param_bytes'] if r > 1 else 0)
  assert expected['gradient_allreduce_bytes'] == 2 * (r - 1) * expected['param_bytes'] // r


def test_summary_traffic_paper_model_by_hand():
  config = load_config('paper')
  config.model_parallel = 2
  rows = summary.layer_table(config)
  t = summary.traffic(config, rows, 2)
  # Per image the towers exchange conv3's input 13*13*256, fc6's 6*6*256,
  # fc7's and fc8's 4096 and the 1000 logits; each device sends half of each,
  # forward and backward, for 128 images of 4 bytes.
  assert t['tower_exchange_bytes'] == 2 * 128 * (
      13 * 13 * 128 + 6 * 6 * 128 + 2048 + 2048 + 500) * 4
  assert t['param_bytes'] == 60_965_224 * 4 // 2
  config.model_parallel = 1
  t = summary.traffic(config, rows, 8)
  assert t['tower_exchange_bytes'] == 0
  assert t['gradient_allreduce_bytes'] == 2 * 7 * 60_965_224 * 4 // 8


@pytest.mark.parametrize('shape,padding,window,stride', [
    ((2, 13, 13, 8), 'VALID', 3, 2), ((2, 14, 14, 8), 'SAME', 3, 2), ((2, 7, 7, 4), 'SAME', 3, 2),
    ((2, 12, 11, 4), 'VALID', 3, 2),  # uneven sides: trailing rows/cols no window covers
    ((2, 12, 12, 4), 'VALID', 2, 2), ((2, 13, 13, 4), 'VALID', 5, 3),
    ((2, 9, 9, 4), 'VALID', 3, 1)])
def test_max_pool_matches_flax_values_and_gradients_with_ties(shape, padding, window, stride):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(4)
  x = np.maximum(rs.randn(*shape), 0).astype(np.float32)  # ReLU zeros tie
  x[0, :4, :4] = 1.0  # and so do these
  ref = lambda x: nn.max_pool(x, (window, window), strides=(stride, stride), padding=padding)
  ours = lambda x: ops_lib.max_pool(x, window, stride, padding)
  y = ref(jnp.asarray(x))
  np.testing.assert_array_equal(ours(jnp.asarray(x)), y)
  g = jnp.asarray(rs.randn(*y.shape).astype(np.float32))
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * g))(jnp.asarray(x))
  np.testing.assert_allclose(grad(ours), grad(ref), rtol=1e-6, atol=1e-6)
