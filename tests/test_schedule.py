"""The halving rule, written from the protocol's formula, and the optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jsim.train import schedule


def _formula(v, k):
  # E_k as the protocol states it: the mean of v_1..v_k.
  E = lambda n: sum(v[:n]) / n
  return E(k) - (E(k - 1) + E(k - 2) + E(k - 3)) / 3


def test_running_means():
  assert schedule.running_means([1, 2, 3, 6]) == [1, 1.5, 2, 3]


def test_never_before_epoch_four():
  # Flat accuracies would halve immediately, but k <= 3 never halves.
  for k in range(4):
    assert not schedule.should_halve([0.5] * k, [], alpha=0.02)
  assert schedule.should_halve([0.5] * 4, [], alpha=0.02)


@pytest.mark.parametrize("seed", range(5))
def test_matches_formula_on_random_curves(seed):
  rng = np.random.default_rng(seed)
  v = list(np.cumsum(rng.uniform(0, 0.08, size=12)))
  for k in range(4, 13):
    expect = _formula(v, k) < 0.02
    assert schedule.should_halve(v[:k], [], alpha=0.02) == expect


def test_improving_curve_does_not_halve():
  v = [0.1, 0.2, 0.3, 0.4]  # E = .1 .15 .2 .25 -> .25 - .15 = .1 >= alpha
  assert not schedule.should_halve(v, [], alpha=0.02)
  assert schedule.should_halve(v, [], alpha=0.11)


def test_wait_after_halving():
  flat = [0.5] * 20
  # Halved after epoch 4: epochs 5 and 6 wait, epoch 7 may halve again.
  assert not schedule.should_halve(flat[:5], [4], alpha=0.02)
  assert not schedule.should_halve(flat[:6], [4], alpha=0.02)
  assert schedule.should_halve(flat[:7], [4], alpha=0.02)
  assert not schedule.should_halve(flat[:7], [4], alpha=0.02, wait=4)


def test_nesterov_matches_protocol_nag():
  """optax's Nesterov SGD tracks the protocol's NAG at the look-ahead point."""
  a = jnp.array([3.0, -1.0, 0.5])
  loss = lambda th: 0.5 * jnp.sum(a * th**2)
  lr, g = 0.1, 0.8
  tx = schedule.make_optimizer(learning_rate=lr, momentum=g)
  phi = jnp.array([1.0, 2.0, -1.0])
  st = tx.init(phi)
  # Protocol NAG: theta, u; look-ahead phi_t = theta_t - g u_{t-1}.
  theta, u = phi, jnp.zeros(3)
  for _ in range(10):
    u = g * u + lr * jax.grad(loss)(theta - g * u)
    theta = theta - u
    upd, st = tx.update(jax.grad(loss)(phi), st, phi)
    phi = optax.apply_updates(phi, upd)
    np.testing.assert_allclose(phi, theta - g * u, rtol=1e-5, atol=1e-6)


def _nag_runs(nag_form, steps=12, halve_at=(4, 8)):
  """(look-ahead params from make_optimizer, the formula's theta - g u) over steps with halvings."""
  a = jnp.array([3.0, -1.0, 0.5, 2.0])
  loss = lambda th: 0.5 * jnp.sum(a * th**2) + jnp.sum(jnp.sin(th))
  lr, g = 0.1, 0.8
  tx = schedule.make_optimizer(learning_rate=lr, momentum=g, nag_form=nag_form)
  phi = jnp.array([1.0, 2.0, -1.0, 0.3])
  st = tx.init(phi)
  theta, u = phi, jnp.zeros(4)
  got, want = [], []
  for t in range(steps):
    if t in halve_at:
      lr /= 2
      st = schedule.set_learning_rate(st, lr)
    u = g * u + lr * jax.grad(loss)(theta - g * u)  # the protocol's NAG, written out
    theta = theta - u
    upd, st = tx.update(jax.grad(loss)(phi), st, phi)
    phi = optax.apply_updates(phi, upd)
    got.append(np.asarray(phi))
    want.append(np.asarray(theta - g * u))
  return np.array(got), np.array(want)


def test_paper_nag_matches_the_formula_through_halvings():
  # Step by step, with the rate halved twice: nag_form='paper' is the formula at the look-ahead point.
  got, want = _nag_runs("paper")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # optax's form agrees until the first halving and then departs (its buffer excludes the rate).
  got, want = _nag_runs("optax")
  np.testing.assert_allclose(got[:4], want[:4], rtol=1e-5, atol=1e-6)
  assert np.abs(got[4:] - want[4:]).max() > 1e-3
  with pytest.raises(ValueError, match="nag_form"):
    schedule.make_optimizer(learning_rate=0.1, momentum=0.8, nag_form="pytorch")


def test_paper_nag_state_with_weight_decay_and_no_retrace():
  tx = schedule.make_optimizer(learning_rate=0.01, momentum=0.8, weight_decay=1e-4, nag_form="paper")
  params = {"w": jnp.ones(3)}
  st = tx.init(params)
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(1)
    upd, s = tx.update({"w": jnp.ones(3)}, s, p)
    return optax.apply_updates(p, upd), s

  params, st = step(params, st)
  # First step from u = 0: phi - (1 + g) lr (grad + wd phi).
  np.testing.assert_allclose(params["w"], 1 - 1.8 * 0.01 * (1 + 1e-4), rtol=1e-6)
  st = schedule.set_learning_rate(st, 0.005)
  params, st = step(params, st)
  assert len(traces) == 1 and schedule.get_learning_rate(st) == pytest.approx(0.005)


def test_set_learning_rate_keeps_dtype_and_no_retrace():
  tx = schedule.make_optimizer(learning_rate=0.01, momentum=0.8)
  params = {"w": jnp.ones(3)}
  st = tx.init(params)
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(1)
    upd, s = tx.update({"w": jnp.ones(3)}, s, p)
    return optax.apply_updates(p, upd), s

  params, st = step(params, st)
  st = schedule.set_learning_rate(st, 0.005)
  assert schedule.get_learning_rate(st) == pytest.approx(0.005)
  p2, _ = step(params, st)
  assert len(traces) == 1
  np.testing.assert_allclose(p2["w"], params["w"] - 0.005 * (1 + 0.8 * 1.8), rtol=1e-6)
