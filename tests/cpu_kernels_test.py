"""The CPU kernels (alexnet_jax/cpu) against the reference ops: values and gradients
of every kernel, the network on both implementations, selection, build errors.

Skipped, with the reason, where the kernels cannot be built.
"""

import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import backend
from alexnet_jax import config_lib
from alexnet_jax import model as model_lib
from alexnet_jax import ops as ops_lib
from alexnet_jax.cpu import onednn
from alexnet_jax.cpu import ops as cpu_ops
from conftest import load_config
from conftest import needs_cpu_kernels
from conftest import tiny_fashion_config

pytestmark = needs_cpu_kernels


def _xla_conv(x, w, stride, padding, groups=1):
  return ops_lib.conv_nhwc(x, w, stride, padding, groups)


def _values_and_grads(conv, x, w, stride, padding, dy, groups=1):
  y, vjp = jax.vjp(lambda x, w: conv(x, w, stride, padding, groups=groups), x, w)
  return (y,) + vjp(dy)


def _values_and_grads_with_bias(x, w, b, stride, padding, dy, groups, impl):
  if impl == 'onednn':
    f = lambda x, w, b: onednn.conv_nhwc(x, w, stride, padding, groups, bias=b)  # noqa: E731
  else:
    f = lambda x, w, b: _xla_conv(x, w, stride, padding, groups) + b  # noqa: E731
  y, vjp = jax.vjp(f, x, w, b)
  return (y,) + vjp(dy)


# (input NHWC, kernel HWIO, stride, padding, groups): the layers of the three
# networks, shrunk in batch and channels, and the cases with rows the stride
# leaves over. The kernel's I axis holds C / groups channels.
GEOMETRIES = [
    ((2, 227, 227, 3), (11, 11, 3, 8), 4, 'VALID', 1),          # paper conv1
    ((2, 224, 224, 3), (11, 11, 3, 8), 4, [(2, 2), (2, 2)], 1),  # single tower conv1
    ((3, 27, 27, 12), (5, 5, 12, 16), 1, 'SAME', 1),            # conv2
    ((3, 27, 27, 24), (5, 5, 12, 32), 1, 'SAME', 2),            # paper conv2, both towers
    ((2, 13, 13, 24), (3, 3, 24, 20), 1, 'SAME', 1),            # conv3-5
    ((2, 13, 13, 48), (3, 3, 24, 32), 1, 'SAME', 2),            # paper conv4-5
    ((4, 28, 28, 1), (5, 5, 1, 8), 1, [(2, 2), (2, 2)], 1),     # Fashion conv1
    ((2, 14, 15, 6), (3, 2, 6, 5), 2, [(0, 1), (1, 0)], 1),     # uneven everything
    ((2, 14, 15, 6), (3, 2, 2, 9), 2, [(0, 1), (1, 0)], 3),     # ... in 3 groups
    ((2, 6, 6, 3), (1, 1, 3, 4), 1, [(1, 1), (0, 2)], 1),       # pads wider than the kernel
    ((2, 6, 6, 4), (1, 1, 2, 6), 1, [(1, 1), (0, 2)], 2),       # ... in 2 groups
]


@pytest.mark.parametrize('x_shape,w_shape,stride,padding,groups', GEOMETRIES)
def test_float32_values_and_both_gradients_match_xla(x_shape, w_shape, stride, padding,
                                                     groups):
  kx, kw, kd = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw, w_shape) / np.sqrt(np.prod(w_shape[:3]))
  y_shape = jax.eval_shape(lambda: _xla_conv(x, w, stride, padding, groups)).shape
  dy = jax.random.normal(kd, y_shape)
  got = jax.jit(lambda *a: _values_and_grads(onednn.conv_nhwc, *a, stride, padding, dy,
                                             groups))(x, w)
  want = jax.jit(lambda *a: _values_and_grads(_xla_conv, *a, stride, padding, dy,
                                              groups))(x, w)
  for name, g, r in zip(('y', 'dx', 'dw'), got, want):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    scale = float(jnp.max(jnp.abs(r)))
    np.testing.assert_allclose(g, r, rtol=0, atol=2e-5 * scale, err_msg=name)


@pytest.mark.parametrize('x_shape,w_shape,stride,padding,groups', GEOMETRIES)
def test_bias_added_by_the_forward_call_matches_xla_with_all_gradients(
    x_shape, w_shape, stride, padding, groups):
  kx, kw, kb, kd = jax.random.split(jax.random.key(10), 4)
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw, w_shape) / np.sqrt(np.prod(w_shape[:3]))
  b = jax.random.normal(kb, w_shape[3:]) + 1.0  # the paper's biases of 1, and more
  y_shape = jax.eval_shape(lambda: _xla_conv(x, w, stride, padding, groups)).shape
  dy = jax.random.normal(kd, y_shape)
  got, want = [jax.jit(lambda x, w, b, impl=impl: _values_and_grads_with_bias(
      x, w, b, stride, padding, dy, groups, impl))(x, w, b) for impl in ('onednn', 'xla')]
  for name, g, r in zip(('y', 'dx', 'dw', 'db'), got, want):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    scale = float(jnp.max(jnp.abs(r)))
    np.testing.assert_allclose(g, r, rtol=0, atol=2e-5 * scale, err_msg=name)
  # The bias is added by the forward call, not by XLA after it.
  hlo = jax.jit(lambda x, w, b: onednn.conv_nhwc(x, w, stride, padding, groups, bias=b)
                ).lower(x, w, b).as_text()
  assert hlo.count('alexnet_onednn_conv_fwd_bias') == 1 and 'stablehlo.add' not in hlo


def test_a_bias_of_another_shape_or_dtype_is_refused():
  x, w = jnp.zeros((1, 5, 5, 4)), jnp.zeros((3, 3, 4, 6))
  with pytest.raises(ValueError, match='6 output channels'):
    onednn.conv_nhwc(x, w, 1, 'SAME', bias=jnp.zeros((4,)))
  with pytest.raises(TypeError, match='bfloat16'):
    onednn.conv_nhwc(x, w, 1, 'SAME', bias=jnp.zeros((6,), jnp.bfloat16))


@pytest.mark.parametrize('groups', [1, 2])
def test_bfloat16_matches_float32_on_the_same_rounded_inputs(groups):
  kx, kw, kd = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (4, 13, 13, 32)).astype(jnp.bfloat16)
  w = (jax.random.normal(kw, (3, 3, 32 // groups, 16)) / 17).astype(jnp.bfloat16)
  dy = jax.random.normal(kd, (4, 13, 13, 16)).astype(jnp.bfloat16)
  b = (jax.random.normal(kd, (16,)) + 1).astype(jnp.bfloat16)
  got = _values_and_grads_with_bias(x, w, b, 1, 'SAME', dy, groups, 'onednn')
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  want = _values_and_grads_with_bias(f32(x), f32(w), f32(b), 1, 'SAME', f32(dy), groups, 'xla')
  for name, g, r in zip(('y', 'dx', 'dw', 'db'), got, want):
    assert g.dtype == jnp.bfloat16, name
    scale = float(jnp.max(jnp.abs(r)))
    # bfloat16 keeps 8 bits: its outputs are the float32 sums rounded once
    # (plus, for the kernel gradient, partial sums rounded on the way).
    np.testing.assert_allclose(f32(g), r, rtol=0, atol=2e-2 * scale, err_msg=name)


def test_repeated_runs_are_bit_identical():
  x = jax.random.normal(jax.random.key(2), (8, 27, 27, 16))
  w = jax.random.normal(jax.random.key(3), (5, 5, 16, 32)) / 20
  dy = jax.random.normal(jax.random.key(4), (8, 27, 27, 32))
  f = jax.jit(lambda x, w: _values_and_grads(onednn.conv_nhwc, x, w, 1, 'SAME', dy))
  first = f(x, w)
  for _ in range(3):
    for a, b in zip(first, f(x, w)):
      np.testing.assert_array_equal(a, b)


def test_after_all_returns_the_tree_and_makes_every_reader_wait_for_every_leaf():
  tree = {'a': jnp.array([1.5, -2.0, np.inf, np.nan, -0.0], jnp.float32),
          'b': (jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3) - 2,
                jnp.full((4,), 3.0, jnp.float32))}
  got = jax.jit(onednn.after_all)(jax.tree.map(jnp.copy, tree))
  for g, want in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
    assert g.dtype == want.dtype and g.shape == want.shape
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(want, np.float32))
  assert np.signbit(got['a'][4])  # the same bits: -0.0 stays
  # One call takes every leaf and returns each in place (aliased: no copy), and
  # each reader of a leaf reads the call's result.
  hlo = jax.jit(lambda t: jax.tree.map(lambda a: a * 2, onednn.after_all(
      jax.tree.map(lambda a: a + 1, t)))).lower(tree).compile().as_text()
  lines = hlo.splitlines()
  call = [l for l in lines if 'custom_call_target="alexnet_after_all"' in l]
  assert len(call) == 1, call
  assert call[0].split('custom-call(')[1].split(')')[0].count(', ') == 2  # 3 operands
  assert 'output_to_operand_aliasing={{0}: (0, {}), {1}: (1, {}), {2}: (2, {})}' in call[0]
  name = call[0].split('=')[0].strip().lstrip('%')
  results = [l.split('=')[0].strip().lstrip('%') for l in lines
             if f'get-tuple-element(%{name})' in l]
  assert len(results) == 3, results
  readers = [l for l in lines if any(f'%{r})' in l or f'%{r},' in l for r in results)]
  assert len(readers) == 3, readers
  assert ' copy(' not in hlo.split('ENTRY')[1]


def test_channels_that_do_not_make_the_groups_are_refused():
  x = jnp.zeros((1, 5, 5, 6))
  with pytest.raises(ValueError, match='do not make 2 groups'):
    onednn.conv_nhwc(x, jnp.zeros((3, 3, 6, 4)), 1, 'SAME', groups=2)
  with pytest.raises(ValueError, match='do not make 2 groups'):
    onednn.conv_nhwc(x, jnp.zeros((3, 3, 3, 5)), 1, 'SAME', groups=2)


def test_vmap_runs_each_element_alone():
  x = jax.random.normal(jax.random.key(5), (3, 2, 9, 9, 4))
  w = jax.random.normal(jax.random.key(6), (3, 3, 4, 6))
  got = jax.vmap(lambda x: onednn.conv_nhwc(x, w, 1, 'SAME'))(x)
  want = jnp.stack([_xla_conv(xi, w, 1, 'SAME') for xi in x])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _model(config, impl):
  return model_lib.create_model(config, backend.select_ops(impl, config.dtype))


def _tiny_model_sum(config, images, impl):
  """(the tiny network's output sum as a function of its params, its params)."""
  model = _model(config, impl)
  params = model.init(jax.random.key(0), images, train=False)['params']
  return (lambda p: model.apply({'params': p}, images, train=False).sum()), params


def test_model_gradients_match_between_oneDNN_and_xla():
  config = tiny_fashion_config()
  images = jax.random.normal(jax.random.key(7), (4, 28, 28, 1))

  def grads(impl):
    f, params = _tiny_model_sum(config, images, impl)
    return jax.grad(f)(params)

  got, want = grads('onednn'), grads('xla')
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5), got, want)
  # The two settings really run different kernels.
  model = _model(config, 'onednn')
  params = model.init(jax.random.key(0), images, train=False)['params']
  hlo = jax.jit(lambda p: model.apply({'params': p}, images, train=False)).lower(params).as_text()
  # One call per layer, with its bias, both towers of conv2, 4 and 5 in one
  # grouped call; ReLU, LRN and pool fused after conv1 and conv2, ReLU and
  # pool after conv5.
  assert hlo.count('alexnet_onednn_conv_fwd_bias') == 5 and hlo.count('groups = 2 : i64') == 3
  assert hlo.count('alexnet_relu_lrn_pool_fwd') == 3 and hlo.count('size = 5 : i64') == 2
  # Backward, the fused kernel sums the bias gradients of conv1, conv2 and conv5.
  hlo = jax.jit(jax.grad(lambda p: model.apply({'params': p}, images, train=False).sum())
                ).lower(params).as_text()
  assert hlo.count('alexnet_relu_lrn_pool_bwd_bias') == 3
  assert 'alexnet_relu_lrn_pool_bwd"' not in hlo
  model = _model(config, 'xla')
  hlo = jax.jit(lambda p: model.apply({'params': p}, images, train=False)).lower(params).as_text()
  assert 'alexnet_onednn' not in hlo and hlo.count('stablehlo.convolution') == 8


def test_auto_uses_the_cpu_kernels_on_cpu_and_xla_never():
  assert backend.select_ops('auto') == backend.select_ops('onednn') == cpu_ops.OneDNNOps()
  assert backend.select_ops('winograd') == cpu_ops.OneDNNOps(winograd=True)
  assert backend.select_ops('xla') is ops_lib.REFERENCE
  assert backend.select_ops('auto', 'float16') is ops_lib.REFERENCE
  with pytest.raises(ValueError, match="conv_impl='eigen'"):
    backend.select_ops('eigen')
  assert backend.describe(backend.select_ops('auto'))['convolutions'] == 'onednn'


def test_auto_falls_back_to_xla_with_a_warning_when_oneDNN_is_missing(monkeypatch, caplog):
  monkeypatch.setattr(onednn, 'unavailable_reason', lambda: 'no libdnnl here')
  backend._warn_no_cpu_kernels.cache_clear()
  with caplog.at_level(logging.WARNING):
    assert backend.select_ops('auto') is ops_lib.REFERENCE
  assert 'no libdnnl here' in caplog.text and 'using the reference (XLA) operations' in caplog.text


def test_build_failure_says_what_to_install(monkeypatch, tmp_path):
  monkeypatch.setenv('ALEXNET_BUILD_DIR', str(tmp_path))
  monkeypatch.setenv('CXX', 'no-such-compiler-x')
  with pytest.raises(onednn.OneDNNUnavailable, match='apt-get install g\\+\\+ libdnnl-dev'):
    onednn.build()
  monkeypatch.setenv('CXX', 'g++')
  monkeypatch.setattr(onednn, 'SOURCES', (tmp_path / 'broken.cc',))
  (tmp_path / 'broken.cc').write_text('this is not C++\n')
  with pytest.raises(onednn.OneDNNUnavailable, match='building broken.cc failed'):
    onednn.build()
  assert not list(tmp_path.glob('*.so'))  # no half-written library is left
  (tmp_path / 'file').write_text('')
  monkeypatch.setenv('ALEXNET_BUILD_DIR', str(tmp_path / 'file' / 'sub'))
  with pytest.raises(onednn.OneDNNUnavailable, match='set ALEXNET_BUILD_DIR to a writable'):
    onednn.build()


def test_build_writes_a_library_that_loads(monkeypatch, tmp_path):
  monkeypatch.setenv('ALEXNET_BUILD_DIR', str(tmp_path))
  path = onednn.build()
  assert path.parent == tmp_path and path.exists()
  assert onednn.build() == path  # built once, then reused
  assert [p.name for p in tmp_path.iterdir()] == [path.name]


OPS_CASES = {  # the layers of the demo network and of the paper's, scaled down
    'conv1': dict(x=(2, 27, 27, 3), k=(11, 11, 3, 16), stride=4, padding=0, groups=1,
                  lrn=ops_lib.LRN(), pool=ops_lib.Pool(3, 2), towers=2),
    'conv2': dict(x=(2, 14, 14, 8), k=(5, 5, 4, 16), stride=1, padding=2, groups=2,
                  lrn=ops_lib.LRN(alpha_over_size=True), pool=ops_lib.Pool(3, 2, 'SAME'),
                  towers=2),
    'conv5': dict(x=(2, 13, 13, 12), k=(3, 3, 6, 8), stride=1, padding=1, groups=2,
                  lrn=None, pool=ops_lib.Pool(3, 2), towers=2),
}


@pytest.mark.parametrize('case', sorted(OPS_CASES))
def test_every_op_equals_the_reference(case):
  """OneDNNOps computes the reference's functions: values and all gradients.

  (float32; the bfloat16 kernels are held to float32 on the same rounded
  inputs by the tests of each kernel below.)
  """
  dtype = 'float32'
  c = OPS_CASES[case]
  keys = jax.random.split(jax.random.key(11), 4)
  x = (jax.random.normal(keys[0], c['x']) * 2).astype(dtype)
  w = (jax.random.normal(keys[1], c['k']) / np.sqrt(np.prod(c['k'][:3]))).astype(dtype)
  b = jax.random.normal(keys[2], c['k'][-1:])
  conv = dict(stride=c['stride'], padding=c['padding'], groups=c['groups'])
  block = dict(lrn=c['lrn'], pool=c['pool'], towers=c['towers'])
  calls = {
      'conv': lambda o, x, w, b: o.conv(x, w, b, **conv),
      'conv_relu_lrn_pool': lambda o, x, w, b: o.conv_relu_lrn_pool(x, w, b, **conv, **block),
      'relu_lrn_pool': lambda o, x, w, b: o.relu_lrn_pool(o.conv(x, w, b, **conv), **block),
      'dense': lambda o, x, w, b: o.dense(x.reshape(x.shape[0], -1)[:, :w.shape[-1]],
                                          w.reshape(-1, w.shape[-1])[:w.shape[-1]],
                                          b.astype(x.dtype)),
  }
  tol = 1e-4
  for name, call in calls.items():
    def values_and_grads(o, x, w):
      y, vjp = jax.vjp(lambda x, w, b: call(o, x, w, b), x, w, b)
      return (y,) + vjp(jnp.cos(y))
    got = values_and_grads(cpu_ops.OneDNNOps(), x, w)
    want = values_and_grads(ops_lib.REFERENCE, x, w)
    for part, g, r in zip(('y', 'dx', 'dw', 'db'), got, want):
      assert g.dtype == r.dtype and g.shape == r.shape, (name, part)
      r = np.asarray(r, np.float32)
      np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=0,
                                 atol=tol * max(1.0, float(np.max(np.abs(r)))),
                                 err_msg=f'{name}: {part}')


def test_sum_to_last_axis_is_the_sum_over_leading_axes():
  g = jax.random.normal(jax.random.key(3), (3, 5, 6, 4))
  np.testing.assert_allclose(onednn.sum_to_last_axis(g), g.sum(axis=(0, 1, 2)),
                             rtol=1e-5, atol=1e-5)
  assert onednn.sum_to_last_axis(g.astype(jnp.bfloat16)).dtype == jnp.float32


def test_config_rejects_an_unknown_conv_impl():
  config = load_config('fashion_mnist')
  config.conv_impl = 'cudnn'
  with pytest.raises(ValueError, match="conv_impl='cudnn'"):
    config_lib.validate(config, 1)


def test_selection_says_why_oneDNN_cannot_be_forced(monkeypatch):
  monkeypatch.setattr(onednn, 'unavailable_reason', lambda: 'no C++ compiler here')
  with pytest.raises(ValueError, match="conv_impl='onednn', but no C\\+\\+ compiler here"):
    backend.select_ops('onednn')
  assert backend.select_ops('auto') is ops_lib.REFERENCE


def _xla_relu_lrn_pool(x, lrn, towers, window, stride, padding):
  y = jax.nn.relu(x)
  if lrn:
    y = ops_lib.local_response_norm(y, size=lrn['size'], k=lrn['k'], alpha=lrn['scale'],
                                    beta=lrn['beta'], towers=towers)
  return ops_lib.max_pool(y, window, stride, padding)


PAPER_LRN = dict(size=5, k=2.0, scale=1e-4, beta=0.75)


# (x NHWC, lrn, towers, window, stride, padding)
FUSED_CASES = [
    ((2, 27, 27, 16), PAPER_LRN, 2, 3, 2, 'VALID'),   # paper conv1-2, both towers
    ((2, 13, 13, 12), PAPER_LRN, 1, 3, 2, 'VALID'),   # one tower
    ((2, 13, 13, 8), None, 2, 3, 2, 'VALID'),         # conv5: ReLU and pool only
    ((3, 12, 11, 6), None, 1, 3, 2, 'SAME'),          # -inf padding, odd sizes
    ((2, 14, 14, 8), PAPER_LRN, 2, 3, 2, 'SAME'),     # the demo's
    ((2, 9, 9, 12), dict(size=4, k=1.0, scale=0.1, beta=0.6), 3, 2, 2, 'VALID'),  # even window,
                                                      # another beta, three towers
    ((2, 13, 13, 96), PAPER_LRN, 2, 3, 2, 'VALID'),   # paper conv1's 48-channel towers
    ((1, 7, 7, 80), dict(size=7, k=1.0, scale=0.01, beta=0.75), 2, 3, 2, 'SAME'),  # 40-channel
]                                                     # towers, window of 7 (not unrolled)


@pytest.mark.parametrize('shape,lrn,towers,window,stride,padding', FUSED_CASES)
def test_fused_relu_lrn_pool_matches_the_xla_composition(shape, lrn, towers, window, stride,
                                                         padding):
  kx, kg = jax.random.split(jax.random.key(8))
  x = jax.random.normal(kx, shape) * 3
  # Ties: a block of zeros (and, after the ReLU, all negatives) must send the
  # gradient to the first maximum of each window in row-major order.
  x = x.at[0, :5, :5, :].set(0.0).at[1, 2:4, :, 0].set(1.5)

  def values_and_grad(f):
    y, vjp = jax.vjp(lambda x: f(x, lrn, towers, window, stride, padding), x)
    return y, vjp(jax.random.normal(kg, y.shape))[0]

  fused = lambda x, lrn, towers, window, stride, padding: onednn.relu_lrn_pool(  # noqa: E731
      x, window=window, stride=stride, padding=padding, lrn=lrn, towers=towers)
  got = jax.jit(lambda x: values_and_grad(fused))(x)
  want = jax.jit(lambda x: values_and_grad(_xla_relu_lrn_pool))(x)
  for name, g, r in zip(('y', 'dx'), got, want):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    np.testing.assert_allclose(g, r, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(r))),
                               err_msg=name)
  # Exactly where the reference puts the gradient (and exactly zero elsewhere).
  np.testing.assert_array_equal(got[1] == 0, want[1] == 0)


@pytest.mark.parametrize('lrn', [PAPER_LRN, None])
def test_fused_relu_lrn_pool_in_bfloat16_matches_the_xla_composition(lrn):
  kx, kg = jax.random.split(jax.random.key(9))
  x = (jax.random.normal(kx, (2, 27, 27, 16)) * 3).astype(jnp.bfloat16)
  x = x.at[0, :5, :5, :].set(0)

  def values_and_grad(f):
    y, vjp = jax.vjp(f, x)
    return y, vjp(jax.random.normal(kg, y.shape).astype(jnp.bfloat16))[0]

  got = values_and_grad(lambda x: onednn.relu_lrn_pool(x, window=3, stride=2, lrn=lrn,
                                                        towers=2))
  want = values_and_grad(lambda x: _xla_relu_lrn_pool(x, lrn, 2, 3, 2, 'VALID'))
  f32 = lambda a: np.asarray(a.astype(jnp.float32))  # noqa: E731
  assert got[0].dtype == got[1].dtype == jnp.bfloat16
  # The same float32 LRN rounded once: outputs agree to one bfloat16 step
  # (at most 2**-7 relative); the gradient differs by the roundings of XLA's
  # bfloat16 sums of overlapping windows, which the kernel sums in float32.
  np.testing.assert_allclose(f32(got[0]), f32(want[0]), rtol=2 ** -7, atol=0)
  np.testing.assert_allclose(f32(got[1]), f32(want[1]), rtol=0,
                             atol=2e-2 * float(np.max(np.abs(f32(want[1])))))


def test_fused_relu_pool_bfloat16_gradient_is_the_float32_sum_rounded_once():
  """Rounding to nearest even, ties included, bit for bit.

  Sums of two to four bfloat16 gradients are exact in float32 and often need
  a ninth significant bit, so many land halfway between two bfloat16 values.
  """
  kx, kg = jax.random.split(jax.random.key(11))
  x = (jax.random.normal(kx, (3, 27, 27, 40)) * 3).astype(jnp.bfloat16)
  dy = jax.random.normal(kg, (3, 13, 13, 40)).astype(jnp.bfloat16)
  dy = dy.at[0, 0, 0, :3].set(jnp.array([jnp.inf, -jnp.inf, 2.0 ** -130], jnp.bfloat16))
  fused = lambda x: onednn.relu_lrn_pool(x, window=3, stride=2, towers=2)  # noqa: E731
  got = jax.vjp(fused, x)[1](dy)[0]
  # The same windows in float32 (the bfloat16 maxima are the float32 ones).
  xla = lambda x: _xla_relu_lrn_pool(x, None, 2, 3, 2, 'VALID')  # noqa: E731
  want = jax.vjp(xla, x.astype(jnp.float32))[1](dy.astype(jnp.float32))[0]
  sums = np.asarray(want)
  halfway = (sums.view(np.uint32) & 0xffff) == 0x8000
  assert halfway.sum() > 100  # ties to even are exercised
  np.testing.assert_array_equal(np.asarray(got).view(np.uint16),
                                np.asarray(want.astype(jnp.bfloat16)).view(np.uint16))


# (x NHWC, kernel HWIO, conv stride, conv padding, groups, lrn, towers): conv1
# of the paper (48-channel towers), conv2 and conv5 (grouped), 20-channel
# towers (vectors that start mid-tower), and SAME pooling; batches of 5, so
# that each thread sums several images.
CONV_POOL_CASES = [
    ((5, 39, 39, 3), (11, 11, 3, 96), 4, 'VALID', 1, PAPER_LRN, 2, 'VALID'),
    ((5, 13, 13, 32), (5, 5, 16, 64), 1, 'SAME', 2, PAPER_LRN, 2, 'VALID'),
    ((5, 13, 13, 48), (3, 3, 24, 32), 1, 'SAME', 2, None, 2, 'VALID'),
    ((5, 11, 11, 40), (3, 3, 20, 40), 1, 'SAME', 2, dict(PAPER_LRN, scale=1e-2), 2, 'SAME'),
]


def _conv_pool_operands(case, dtype):
  x_shape, w_shape, *_ = case
  kx, kw, kb = jax.random.split(jax.random.key(12), 3)
  x = jax.random.normal(kx, x_shape).astype(dtype)
  w = (jax.random.normal(kw, w_shape) / np.sqrt(np.prod(w_shape[:3]))).astype(dtype)
  b = (jax.random.normal(kb, w_shape[3:]) * 0.5 + 0.2).astype(dtype)
  return x, w, b


def _conv_pool(case, fused):
  _, _, stride, padding, groups, lrn, towers, pool_padding = case
  pool = dict(window=3, stride=2, padding=pool_padding, lrn=lrn, towers=towers)
  conv = lambda x, w, b: onednn.conv_nhwc(x, w, stride, padding, groups, bias=b)  # noqa: E731
  if fused:
    return lambda x, w, b: onednn.conv_relu_lrn_pool(x, w, b, stride, padding, groups, pool)
  return conv, lambda a: onednn.relu_lrn_pool(a, **pool)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('case', CONV_POOL_CASES)
def test_conv_relu_lrn_pool_gives_the_two_calls_values_and_gradients(case, dtype):
  x, w, b = _conv_pool_operands(case, dtype)

  def values_and_grads(f):
    y, vjp = jax.vjp(f, x, w, b)
    return (y,) + vjp(jax.random.normal(jax.random.key(13), y.shape).astype(dtype))

  conv, pool = _conv_pool(case, fused=False)
  got = jax.jit(lambda: values_and_grads(_conv_pool(case, fused=True)))()
  want = jax.jit(lambda: values_and_grads(lambda *a: pool(conv(*a))))()
  # The same kernels: y, dx and dw bit for bit.
  for name, g, r in zip(('y', 'dx', 'dw'), got, want):
    assert g.dtype == r.dtype == dtype, name
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                  err_msg=name)
  # db: float32 sums of the same values in another order (then rounded to
  # the bias's dtype, one bfloat16 step at most).
  assert got[3].dtype == dtype
  tol = 2 ** -8 if dtype == jnp.bfloat16 else 1e-6
  np.testing.assert_allclose(np.asarray(got[3], np.float32), np.asarray(want[3], np.float32),
                             rtol=tol, atol=tol * float(jnp.max(jnp.abs(want[3]))))


@pytest.mark.parametrize('case', CONV_POOL_CASES)
def test_fused_bias_gradient_is_the_sum_of_the_map_gradient_and_repeats(case):
  x, w, b = _conv_pool_operands(case, jnp.float32)
  y, vjp = jax.vjp(_conv_pool(case, fused=True), x, w, b)
  dy = jax.random.normal(jax.random.key(14), y.shape)
  db = np.asarray(vjp(dy)[2])
  # The gradient reaching the convolution's output, from the unfused kernel.
  conv, pool = _conv_pool(case, fused=False)
  da = np.asarray(jax.vjp(pool, conv(x, w, b))[1](dy)[0], np.float64)
  want = da.sum(axis=(0, 1, 2))
  assert np.count_nonzero(want) == want.size  # every channel gets a gradient
  np.testing.assert_allclose(db, want, rtol=1e-5, atol=1e-6 * np.abs(da).sum(axis=(0, 1, 2)).max())
  again = np.asarray(jax.vjp(_conv_pool(case, fused=True), x, w, b)[1](dy)[2])
  np.testing.assert_array_equal(db.view(np.uint32), again.view(np.uint32))


def test_conv_relu_lrn_pool_needs_a_bias():
  x, w = jnp.zeros((1, 9, 9, 4)), jnp.zeros((3, 3, 4, 8))
  pool = dict(window=3, stride=2)
  with pytest.raises(ValueError, match="needs the convolution's bias"):
    onednn.conv_relu_lrn_pool(x, w, None, 1, 'SAME', 1, pool)
  with pytest.raises(TypeError, match="unknown relu_lrn_pool arguments \\['size'\\]"):
    onednn.conv_relu_lrn_pool(x, w, jnp.zeros(8), 1, 'SAME', 1, dict(pool, size=5))
  # The custom call itself refuses a bias gradient of another length.
  a, y = jnp.zeros((1, 9, 9, 8)), jnp.zeros((1, 4, 4, 8))
  attrs = dict(size=np.int64(0), towers=np.int64(1), window=np.int64(3), stride=np.int64(2),
               pad_top=np.int64(0), pad_left=np.int64(0), k=np.float32(0),
               scale=np.float32(0), beta=np.float32(0))
  call = jax.ffi.ffi_call('alexnet_relu_lrn_pool_bwd_bias',
                          (jax.ShapeDtypeStruct(a.shape, a.dtype),
                           jax.ShapeDtypeStruct((9,), jnp.float32)))
  with pytest.raises(Exception, match='db needs one value per channel'):
    jax.block_until_ready(call(a, jnp.zeros(y.shape, jnp.uint8), y, **attrs))


def test_fused_relu_lrn_pool_refuses_what_it_cannot_run():
  with pytest.raises(TypeError, match='NHWC float32 or bfloat16'):
    onednn.relu_lrn_pool(jnp.zeros((1, 5, 5, 4), jnp.float16), window=3, stride=2)
  with pytest.raises(ValueError, match='split evenly'):
    onednn.relu_lrn_pool(jnp.zeros((1, 5, 5, 6)), window=3, stride=2, towers=4)
  with pytest.raises(ValueError, match="padding='FULL'"):
    onednn.relu_lrn_pool(jnp.zeros((1, 5, 5, 4)), window=3, stride=2, padding='FULL')


def test_fused_relu_lrn_pool_passes_a_nan_on_as_xla_does():
  x = jax.random.normal(jax.random.key(10), (1, 9, 9, 16)) * 3
  x = x.at[0, 4, 4, 3].set(jnp.nan)
  fused = lambda x, lrn: onednn.relu_lrn_pool(x, window=3, stride=2, lrn=lrn,  # noqa: E731
                                              towers=2)
  # ReLU and pool: NaN exactly in the outputs whose windows hold (4, 4):
  # rows and columns 1 and 2 of the 4x4 output, channel 3.
  y = np.asarray(fused(x, None))
  np.testing.assert_array_equal(np.isnan(y), np.isnan(_xla_relu_lrn_pool(x, None, 2, 3, 2,
                                                                          'VALID')))
  want = np.zeros(y.shape, bool)
  want[0, 1:3, 1:3, 3] = True
  np.testing.assert_array_equal(np.isnan(y), want)
  # With the LRN the NaN reaches channels 1-5 of its tower (0-7), no further.
  y = np.asarray(fused(x, PAPER_LRN))
  want[0, 1:3, 1:3, 1:6] = True
  np.testing.assert_array_equal(np.isnan(y), want)


def test_fused_relu_lrn_pool_portable_loops_match_xla(tmp_path):
  """The kernel built without AVX-512 (as on CPUs that lack it) agrees too."""
  script = textwrap.dedent('''
      import sys
      import jax, numpy as np
      from alexnet_jax import ops
      from alexnet_jax.cpu import onednn
      assert onednn.fused_lanes() == 1, onednn.fused_lanes()
      out = {}
      for c, towers, size in ((96, 2, 5), (20, 1, 4)):
        lrn = dict(size=size, k=2.0, scale=1e-4, beta=0.75)
        x = jax.random.normal(jax.random.key(0), (2, 13, 13, c)) * 3
        def xla(x):
          y = ops.local_response_norm(jax.nn.relu(x), size=size, towers=towers)
          return ops.max_pool(y, 3, 2)
        fused = lambda x: onednn.relu_lrn_pool(x, window=3, stride=2, lrn=lrn, towers=towers)
        for name, f in (('xla', xla), ('fused', fused)):
          y, vjp = jax.vjp(f, x)
          out[f'{name}_y_{c}'], out[f'{name}_dx_{c}'] = y, vjp(y)[0]
        # The bias gradient summed by the fused kernel, after a convolution.
        w = jax.random.normal(jax.random.key(1), (3, 3, c, c)) / (3 * c ** 0.5)
        b = jax.numpy.linspace(-1.0, 1.0, c)
        pool = dict(window=3, stride=2, lrn=lrn, towers=towers)
        convs = (('xla', lambda b: xla(ops.conv_nhwc(x, w, 1, 'SAME') + b)),
                 ('fused', lambda b: onednn.conv_relu_lrn_pool(x, w, b, 1, 'SAME', 1, pool)))
        for name, f in convs:
          y, vjp = jax.vjp(f, b)
          out[f'{name}_db_{c}'] = vjp(y)[0]
      np.savez(sys.argv[1], **out)
  ''')
  env = dict(os.environ, ALEXNET_BUILD_DIR=str(tmp_path), CXXFLAGS='-mno-avx512f',
             JAX_PLATFORMS='cpu')
  results = tmp_path / 'results.npz'
  proc = subprocess.run([sys.executable, '-c', script, str(results)], env=env,
                        capture_output=True, text=True, check=False, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(results)
  for c in (96, 20):
    for part, tol in (('y', 1e-6), ('dx', 1e-6), ('db', 1e-4)):  # db: after a convolution
      want = got[f'xla_{part}_{c}']
      np.testing.assert_allclose(got[f'fused_{part}_{c}'], want, rtol=0,
                                 atol=tol * np.max(np.abs(want)), err_msg=f'{part}, C={c}')
  if 'avx512f' in pathlib.Path('/proc/cpuinfo').read_text():
    assert onednn.fused_lanes() == 16  # and the default build uses AVX-512


def _has_avx512() -> bool:
  try:
    return 'avx512f' in pathlib.Path('/proc/cpuinfo').read_text()
  except OSError:
    return False


# (input NHWC, kernel HWIO, groups): 3x3 stride-1 layers, which the Winograd
# kernels take; channels not a multiple of 16 included.
WINOGRAD_GEOMETRIES = [
    ((2, 13, 13, 32), (3, 3, 32, 48), 1),   # conv3
    ((3, 13, 13, 64), (3, 3, 32, 32), 2),   # paper conv4, both towers
    ((2, 7, 7, 24), (3, 3, 12, 20), 2),     # odd sizes, channels not in 16s
]


@pytest.mark.parametrize('x_shape,w_shape,groups', WINOGRAD_GEOMETRIES)
def test_winograd_values_and_all_gradients_match_xla(x_shape, w_shape, groups):
  kx, kw, kb, kd = jax.random.split(jax.random.key(20), 4)
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw, w_shape) / np.sqrt(np.prod(w_shape[:3]))
  b = jax.random.normal(kb, w_shape[3:]) + 1.0
  dy = jax.random.normal(kd, x_shape[:3] + w_shape[3:])

  def run(f, *args):
    y, vjp = jax.vjp(f, *args)
    return (y,) + vjp(dy)

  xla = run(lambda x, w, b: _xla_conv(x, w, 1, 'SAME', groups) + b, x, w, b)
  wino = jax.jit(lambda x, w, b: run(
      lambda x, w, b: onednn.conv_nhwc(x, w, 1, 'SAME', groups, b, winograd=True), x, w, b))
  for name, g, r in zip(('y', 'dx', 'dw', 'db'), wino(x, w, b), xla):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    np.testing.assert_allclose(g, r, rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(r))),
                               err_msg=name)
  # Without a bias as well (the calls without one).
  got = jax.jit(lambda x, w: run(
      lambda x, w: onednn.conv_nhwc(x, w, 1, 'SAME', groups, winograd=True), x, w))(x, w)
  want = run(lambda x, w: _xla_conv(x, w, 1, 'SAME', groups), x, w)
  for name, g, r in zip(('y', 'dx', 'dw'), got, want):
    np.testing.assert_allclose(g, r, rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(r))),
                               err_msg=name)
  # The calls ask for the Winograd kernels, the input gradient included (not
  # as a direct forward convolution), and oneDNN runs them.
  hlo = wino.lower(x, w, b).as_text()
  assert hlo.count('algorithm = 1 : i64') == 3 and 'algorithm = 0' not in hlo
  assert 'alexnet_onednn_conv_bwd_data' in hlo
  if _has_avx512():
    cin, cout = x_shape[3], w_shape[3]
    shown = [line for line in onednn.describe().splitlines()
             if f' {cin}->{cout} 3x3' in line and 'winograd' in line]
    assert len(shown) >= 3 and all('wino' in line.split(': ')[1] for line in shown), shown
  # Winograd rounds differently: not the direct kernels' bits.
  direct = onednn.conv_nhwc(x, w, 1, 'SAME', groups, b)
  assert not np.array_equal(direct, wino(x, w, b)[0])


def test_winograd_keeps_the_direct_kernels_where_it_has_none():
  x = jnp.ones((1, 27, 27, 16))
  cases = [(jnp.ones((5, 5, 16, 16)), 1, jnp.float32),   # 5x5
           (jnp.ones((3, 3, 16, 16)), 2, jnp.float32),   # stride 2
           (jnp.ones((3, 3, 16, 16)), 1, jnp.bfloat16)]  # bfloat16
  for w, stride, dtype in cases:
    hlo = jax.jit(lambda x, w, s=stride: onednn.conv_nhwc(x, w, s, 'SAME', winograd=True)
                  ).lower(x.astype(dtype), w.astype(dtype)).as_text()
    assert 'algorithm = 0 : i64' in hlo and 'algorithm = 1' not in hlo, (w.shape, stride, dtype)
  hlo = jax.jit(lambda x, w: onednn.conv_nhwc(x, w, 1, 'SAME')).lower(
      x, jnp.ones((3, 3, 16, 16))).as_text()
  assert 'algorithm = 0 : i64' in hlo  # off unless asked for


def test_winograd_conv_relu_lrn_pool_matches_the_direct_one():
  kx, kw, kb, kd = jax.random.split(jax.random.key(21), 4)
  x = jax.random.normal(kx, (2, 13, 13, 32))
  w = jax.random.normal(kw, (3, 3, 16, 32)) / 12
  b = jax.random.normal(kb, (32,))
  pool = dict(window=3, stride=2, lrn=PAPER_LRN, towers=2)
  dy = jax.random.normal(kd, (2, 6, 6, 32))

  def run(winograd):
    f = lambda x, w, b: onednn.conv_relu_lrn_pool(x, w, b, 1, 'SAME', 2, pool,  # noqa: E731
                                                  winograd=winograd)
    y, vjp = jax.vjp(jax.jit(f), x, w, b)
    return (y,) + vjp(dy)

  for name, g, r in zip(('y', 'dx', 'dw', 'db'), run(True), run(False)):
    np.testing.assert_allclose(g, r, rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(r))),
                               err_msg=name)


def test_model_with_winograd_matches_the_direct_kernels_and_config_checks():
  config = tiny_fashion_config()
  images = jax.random.normal(jax.random.key(7), (4, 28, 28, 1))

  def grads(impl):
    f, params = _tiny_model_sum(config, images, impl)
    f = jax.jit(jax.value_and_grad(f))  # the forward calls' outputs are kept
    return f(params), f.lower(params).as_text()

  (got, hlo), (want, _) = grads('winograd'), grads('onednn')
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5), got, want)
  # conv3, conv4 and conv5 (3x3) take the Winograd kernels in all three
  # directions; conv1 (5x5 here) and conv2 keep the direct ones.
  kernels = tuple(config.model.kernel_sizes)
  threes = sum(k == 3 for k in kernels)
  assert threes >= 3 and hlo.count('algorithm = 1 : i64') == 3 * threes - (kernels[0] == 3)
  config.conv_impl, config.dtype = 'winograd', 'bfloat16'
  with pytest.raises(ValueError, match="conv_impl='winograd' runs oneDNN's float32"):
    config_lib.validate(config, 1)


def test_a_primitive_built_on_one_thread_runs_on_another():
  # XLA runs a custom call on whichever of its threads is free. oneDNN's
  # GEMM-based kernel gradient (which it picks without AVX2, forced here with
  # ONEDNN_MAX_CPU_ISA) keeps its scratch memory per thread when the library
  # manages it, and crashed when run on another thread than the one that built
  # it; the calls give every primitive its own (csrc/onednn_conv.cc).
  script = textwrap.dedent('''
      import sys, threading
      import jax, numpy as np
      from alexnet_jax.cpu import onednn
      rs = np.random.RandomState(0)
      x = jax.numpy.asarray(rs.randn(2, 13, 13, 32).astype(np.float32))
      w = jax.numpy.asarray(rs.randn(3, 3, 32, 48).astype(np.float32) * 0.1)
      grads = lambda x, w: jax.grad(
          lambda x, w: onednn.conv_nhwc(x, w, 1, 'SAME').sum(), (0, 1))(x, w)
      want = grads(x, w)  # every primitive built on this thread
      got = []
      thread = threading.Thread(target=lambda: got.append(grads(x, w)))
      thread.start()
      thread.join()
      for g, r in zip(got[0], want):
        np.testing.assert_array_equal(g, r)
      print(onednn.describe())
  ''')
  env = dict(os.environ, ONEDNN_MAX_CPU_ISA='SSE41', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                        text=True, check=False, timeout=300)
  assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
  if _has_avx512():  # the kernel gradient really was the GEMM-based one
    assert '2 32->48 3x3: x64:gemm:jit' in proc.stdout, proc.stdout
