"""The distance similarity model: distances, logistic calibration (against sklearn), the prob_fn."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jsim.models import distance


def test_distances():
  a = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
  b = np.array([[0.0, 0.0], [0.0, 2.0]], np.float32)
  np.testing.assert_allclose(
    distance.pair_distance(jnp.asarray(a), jnp.asarray(b), "l2"), [5.0, np.sqrt(5.0)], rtol=1e-6
  )
  np.testing.assert_allclose(
    distance.pair_distance(jnp.asarray(a), jnp.asarray(a[::-1]), "cosine"), [1 - 0.6, 1 - 0.6], rtol=1e-6
  )
  with pytest.raises(ValueError, match="similarity.distance='l3'"):
    distance.make_prob_fn("l3")


def test_logistic_fit_equals_sklearn_and_recovers_the_model():
  linear_model = pytest.importorskip("sklearn.linear_model")
  rng = np.random.default_rng(0)
  d = rng.uniform(0.0, 2.0, 20000)
  same = rng.uniform(size=d.shape) < 1 / (1 + np.exp(-(-6.0 * d + 4.5)))
  scale, bias = distance.fit_logistic(d, same)
  ref = linear_model.LogisticRegression(C=1e8, tol=1e-10, max_iter=1000).fit(d[:, None], same)
  assert scale == pytest.approx(ref.coef_[0, 0], rel=1e-4)
  assert bias == pytest.approx(ref.intercept_[0], rel=1e-4)
  assert scale == pytest.approx(-6.0, rel=0.05) and bias == pytest.approx(4.5, rel=0.05)


def test_separable_pairs_give_finite_parameters_and_a_refusal_for_one_kind():
  d = np.array([0.1, 0.2, 0.3, 1.0, 1.1, 1.2])
  scale, bias = distance.fit_logistic(d, d < 0.5)
  assert np.isfinite(scale) and scale < 0 and 0.3 < -bias / scale < 1.0
  with pytest.raises(ValueError, match="only one kind"):
    distance.fit_logistic(d, np.ones(6, bool))


@pytest.mark.parametrize("kind", ["l2", "cosine"])
def test_calibration_makes_a_prob_fn_for_the_evaluators(kind):
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(5), 8)
  emb = (np.eye(5, 6)[labels] * 3 + rng.normal(size=(40, 6))).astype(np.float32)
  i, j = np.triu_indices(40, 1)
  pairs = np.stack([i, j], 1)
  same = labels[i] == labels[j]
  cal = distance.calibrate(emb, pairs, same, kind)
  prob_fn = distance.make_prob_fn(kind)
  p = np.asarray(prob_fn(distance.params_of(cal), jnp.asarray(emb[i]), jnp.asarray(emb[j])))
  assert cal["scale"] < 0  # farther = less likely the same class
  assert ((p > 0.5) == same).mean() > 0.85
  d = np.asarray(distance.pair_distance(jnp.asarray(emb[i]), jnp.asarray(emb[j]), kind))
  np.testing.assert_array_equal(p > 0.5, d < cal["distance_at_0.5"])
