"""The paper's update rule: three steps computed by hand, and its one-pass CPU kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet_jax import optim
from alexnet_jax.cpu import onednn
from conftest import needs_cpu_kernels


def test_paper_rule_three_hand_computed_steps():
  tx = optim.paper_momentum(momentum=0.9, weight_decay=0.0005)
  w = {'kernel': jnp.array([1.0, -2.0])}
  state = tx.init(w)
  grads = [jnp.array([0.5, 0.1]), jnp.array([-0.2, 0.3]), jnp.array([0.0, -1.0])]
  lrs = [0.1, 0.1, 0.01]  # lr cut before step 3: old velocity keeps its size
  # By hand, element 0:
  # v1 = -0.0005*0.1*1 - 0.1*0.5 = -0.05005            w1 = 0.94995
  # v2 = 0.9*v1 - 0.0005*0.1*0.94995 - 0.1*(-0.2)
  #    = -0.045045 - 0.0000474975 + 0.02 = -0.0250924975  w2 = 0.9248575025
  # v3 = 0.9*v2 - 0.0005*0.01*0.9248575025 - 0 = -0.02258787...
  # Element 1:
  # v1 = 0.0001 - 0.01 = -0.0099                        w1 = -2.0099
  # v2 = -0.00891 + 0.000100495 - 0.03 = -0.038809505    w2 = -2.048709505
  # v3 = -0.0349285545 + 0.0000102435475 + 0.01 = -0.0249183109525
  expected_w = [
      [0.94995, -2.0099],
      [0.9248575025, -2.048709505],
      [0.9248575025 + (0.9 * -0.0250924975 - 0.0005 * 0.01 * 0.9248575025),
       -2.048709505 - 0.0249183109525],
  ]
  for g, lr, want in zip(grads, lrs, expected_w):
    updates, state = tx.update({'kernel': g}, state, w, learning_rate=lr)
    w = optax.apply_updates(w, updates)
    np.testing.assert_allclose(w['kernel'], want, rtol=1e-6)


def test_lr_inside_velocity_differs_from_optax_sgd():
  # optax.sgd scales the whole trace by the current lr; the paper does not.
  w = {'k': jnp.array([1.0])}
  g = {'k': jnp.array([1.0])}
  paper = optim.paper_momentum(0.9, 0.0)
  ps = paper.init(w)
  u1, ps = paper.update(g, ps, w, learning_rate=1.0)
  u2, _ = paper.update(g, ps, w, learning_rate=0.1)
  # With lr 0.1 in step 2 the paper gives 0.9*(-1) - 0.1 = -1.0; an optax.sgd
  # style trace scaled by the current lr would give -0.1*(0.9+1) = -0.19.
  np.testing.assert_allclose(u2['k'], [-1.0], rtol=1e-6)
  np.testing.assert_allclose(u1['k'], [-1.0], rtol=1e-6)


def test_zero_learning_rate_only_decays_the_velocity():
  # The step divides by a runtime 1 (1 + 0 * lr); at lr = 0 (warm-up start) the
  # step must be exactly zero.
  tx = optim.paper_momentum(0.9, 0.0005)
  w = {'k': jnp.array([1.0, -3.0])}
  state = optim.PaperMomentumState({'k': jnp.array([0.5, -0.25])})
  u, state = tx.update({'k': jnp.array([2.0, 7.0])}, state, w, learning_rate=0.0)
  np.testing.assert_allclose(state.velocity['k'], [0.45, -0.225], rtol=1e-6)
  np.testing.assert_allclose(u['k'], [0.45, -0.225], rtol=1e-6)


def test_jitted_update_is_bit_identical_to_the_plain_product():
  # The division by a runtime 1 is there for XLA's fusion only: jitted as in the
  # train step, every value must be exactly that of lr * (g + wd w) jitted.
  rs = np.random.RandomState(0)
  w, v, g = (jnp.asarray(rs.randn(64, 32).astype(np.float32)) for _ in range(3))

  @jax.jit
  def plain(v, g, w, lr):
    delta = lr * (g + 0.0005 * w)
    v_new = 0.9 * v - delta
    return v_new, 0.9 * v_new - delta

  for nesterov in (False, True):
    tx = optim.paper_momentum(0.9, 0.0005, nesterov=nesterov)
    update = jax.jit(lambda g, s, w, lr: tx.update(g, s, w, learning_rate=lr))
    u, s = update({'k': g}, optim.PaperMomentumState({'k': v}), {'k': w}, 0.0137)
    v_new, nesterov_update = plain(v, g, w, jnp.float32(0.0137))
    assert not np.array_equal(v_new, v)  # a real step was taken
    np.testing.assert_array_equal(s.velocity['k'], v_new)
    np.testing.assert_array_equal(u['k'], nesterov_update if nesterov else v_new)


def test_biases_are_not_decayed_by_default_mask():
  tx = optim.paper_momentum(0.0, 0.5, decay_mask=optim.kernels_only)
  w = {'conv': {'kernel': jnp.array([2.0]), 'bias': jnp.array([2.0])}}
  zero = {'conv': {'kernel': jnp.array([0.0]), 'bias': jnp.array([0.0])}}
  u, _ = tx.update(zero, tx.init(w), w, learning_rate=0.1)
  np.testing.assert_allclose(u['conv']['kernel'], [-0.1])
  np.testing.assert_allclose(u['conv']['bias'], [0.0])


def test_one_cycle_schedule_peaks_at_base_lr():
  from ml_collections import ConfigDict
  cfg = ConfigDict({'name': 'one_cycle', 'warmup_fraction': 0.2, 'div_factor': 10.0,
                    'final_div_factor': 100.0})
  fn = optim.create_schedule(cfg, 1.0, 10, 100)
  np.testing.assert_allclose(fn(0), 0.1, rtol=1e-6)
  np.testing.assert_allclose(fn(20), 1.0, rtol=1e-6)
  np.testing.assert_allclose(fn(100), 0.01, rtol=1e-5)


@needs_cpu_kernels
@pytest.mark.parametrize('nesterov', [False, True])
def test_one_pass_cpu_kernel_is_the_rule_bit_for_bit(nesterov):
  """`onednn.momentum_update` against the optax rule plus `apply_updates`, jitted."""
  rs = np.random.RandomState(1)
  shapes = {'conv': {'kernel': (5, 5, 3, 7), 'bias': (7,)}, 'fc': {'kernel': (33, 1000)},
            'one': {'kernel': (1,)}}
  make = lambda scale: jax.tree.map(lambda s: (rs.randn(*s) * scale).astype(np.float32),
                                    shapes, is_leaf=lambda s: isinstance(s, tuple))
  params, velocity, grads = make(0.05), make(0.01), make(1.0)
  grads['fc']['kernel'][0, :4] = [np.inf, -np.inf, np.nan, -0.0]
  tx = optim.paper_momentum(0.9, 5e-4, nesterov=nesterov, decay_mask=optim.kernels_only)
  lr = np.float32(0.0137)

  @jax.jit
  def rule(params, velocity, grads):
    updates, state = tx.update(grads, optim.PaperMomentumState(velocity), params,
                               learning_rate=lr)
    return optax.apply_updates(params, updates), state.velocity

  @jax.jit
  def kernel(params, velocity, grads):
    return onednn.momentum_update(params, velocity, grads, lr, momentum=0.9,
                                  decay=optim.decay_rates(tx.rule, params), nesterov=nesterov)

  want = rule(params, velocity, grads)
  got = kernel(params, velocity, grads)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert not np.array_equal(got[0]['fc']['kernel'], params['fc']['kernel'])
  # The biases are not decayed: with a zero gradient and velocity they stay.
  zeros = jax.tree.map(np.zeros_like, params)
  w, v = kernel(params, zeros, zeros)
  np.testing.assert_array_equal(w['conv']['bias'], params['conv']['bias'])
  assert np.all(np.abs(w['conv']['kernel']) < np.abs(params['conv']['kernel']))


def test_decay_rates_follow_the_mask():
  tx = optim.paper_momentum(0.9, 0.25, decay_mask=optim.kernels_only)
  params = {'conv': {'kernel': 1, 'bias': 1}, 'fc': {'kernel': 1}}
  assert optim.decay_rates(tx.rule, params) == {
      'conv': {'kernel': 0.25, 'bias': 0.0}, 'fc': {'kernel': 0.25}}
  assert optim.decay_rates(optim.paper_momentum(0.9, 0.25).rule, params)['conv']['bias'] == 0.25
