"""Ms: pair features, the MLP's shapes, parameter count, init, dropout and symmetry."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsim.models import similarity as sim


def _emb(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("kind", ["l1", "sq", "prod", "cos", "l2", "l1+prod", "sq+cos+l2"])
def test_features_symmetric_and_width(kind):
  e1, e2 = _emb(0, (5, 16)), _emb(1, (5, 16))
  f12 = sim.pair_features(e1, e2, kind)
  f21 = sim.pair_features(e2, e1, kind)
  assert f12.shape == (5, sim.feature_dim(kind, 16))
  np.testing.assert_allclose(np.asarray(f12), np.asarray(f21), rtol=1e-6, atol=1e-6)


def test_feature_values_from_formulas():
  a = np.array([[1.0, -2.0, 3.0]], np.float32)
  b = np.array([[4.0, 2.0, -1.0]], np.float32)
  f = lambda k: np.asarray(sim.pair_features(jnp.asarray(a), jnp.asarray(b), k))
  np.testing.assert_allclose(f("l1"), [[3.0, 4.0, 4.0]])
  np.testing.assert_allclose(f("sq"), [[9.0, 16.0, 16.0]])
  np.testing.assert_allclose(f("prod"), [[4.0, -4.0, -3.0]])
  np.testing.assert_allclose(f("l2"), [[np.sqrt(41.0)]], rtol=1e-6)
  cos = (4 - 4 - 3) / (np.sqrt(14.0) * np.sqrt(21.0))
  np.testing.assert_allclose(f("cos"), [[cos]], rtol=1e-6)
  np.testing.assert_allclose(f("l1+prod"), [[3.0, 4.0, 4.0, 4.0, -4.0, -3.0]])
  assert sim.feature_dim("l1+prod+cos", 2048) == 4097


def test_l2_of_identical_embeddings_has_finite_gradient():
  e = _emb(2, (3, 8))
  g = jax.jit(jax.grad(lambda x: jnp.sum(sim.pair_features(x, e, "l2+cos"))))(e)
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("bad", ["l3", "l1+", "L1", ""])
def test_unknown_kind_names_it_and_lists_valid(bad):
  with pytest.raises(ValueError) as err:
    sim.feature_dim(bad, 8)
  msg = str(err.value)
  assert repr(bad) in msg or repr(bad.split("+")[-1]) in msg
  for k in ("l1", "sq", "prod", "cos", "l2"):
    assert k in msg
  with pytest.raises(ValueError):
    sim.SimilarityMLP(feature=bad).init(jax.random.key(0), jnp.ones((1, 8)), jnp.ones((1, 8)))


def _count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_parameter_count_resnet_and_vgg_widths():
  assert sim.default_hidden(2048) == (1024, 512)
  assert sim.default_hidden(4096) == (2048, 1024)
  model = sim.SimilarityMLP()
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 2048)), jnp.ones((1, 2048))))
  assert _count(shapes["params"]) == 2048 * 1024 + 1024 + 1024 * 512 + 512 + 512 * 2 + 2
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 4096)), jnp.ones((1, 4096))))
  assert _count(shapes["params"]) == 4096 * 2048 + 2048 + 2048 * 1024 + 1024 + 1024 * 2 + 2
  # Concatenated features widen only the first layer; hidden widths still halve from D.
  model = sim.SimilarityMLP(feature="l1+prod")
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 2048)), jnp.ones((1, 2048))))
  assert _count(shapes["params"]) == 4096 * 1024 + 1024 + 1024 * 512 + 512 + 512 * 2 + 2


def test_he_init_bias_zero_float32_params():
  model = sim.SimilarityMLP(dtype=jnp.bfloat16)
  params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 512)), jnp.ones((1, 512)))["params"]
  assert set(params) == {"hidden0", "hidden1", "out"}
  for name, fan_in in (("hidden0", 512), ("hidden1", 256), ("out", 128)):
    k = np.asarray(params[name]["kernel"])
    assert k.dtype == np.float32 and params[name]["bias"].dtype == jnp.float32
    assert np.all(np.asarray(params[name]["bias"]) == 0)
    # He normal: std sqrt(2 / fan_in), untruncated (values beyond 2 sigma exist).
    std = np.sqrt(2.0 / fan_in)
    assert abs(k.std() / std - 1) < 0.1 if k.size > 1000 else abs(k.std() / std - 1) < 0.3
    if k.size > 1000:
      assert np.abs(k).max() > 2.5 * std


def test_forward_dtype_dropout_and_symmetry():
  model = sim.SimilarityMLP(dtype=jnp.bfloat16)
  e1, e2 = _emb(3, (64, 32)), _emb(4, (64, 32))
  params = jax.jit(model.init)(jax.random.key(0), e1, e2)["params"]
  apply = jax.jit(model.apply, static_argnames="train")
  logits = apply({"params": params}, e1, e2, train=False)
  assert logits.shape == (64, 2) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(apply({"params": params}, e2, e1)))
  # Dropout only in training, driven by the 'dropout' rng.
  t1 = apply({"params": params}, e1, e2, train=True, rngs={"dropout": jax.random.key(1)})
  t2 = apply({"params": params}, e1, e2, train=True, rngs={"dropout": jax.random.key(2)})
  t1b = apply({"params": params}, e1, e2, train=True, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(np.asarray(t1), np.asarray(t2))
  np.testing.assert_array_equal(np.asarray(t1), np.asarray(t1b))
  p = sim.same_probability(logits)
  assert p.shape == (64,)
  np.testing.assert_allclose(np.asarray(p), np.asarray(jax.nn.softmax(logits)[:, 1]), rtol=1e-6)
  prob_fn = sim.make_prob_fn(model)
  np.testing.assert_allclose(np.asarray(jax.jit(prob_fn)(params, e1, e2)), np.asarray(p), rtol=1e-6)


def test_float32_forward_matches_numpy_mlp():
  model = sim.SimilarityMLP(hidden=(6, 3), feature="sq")
  e1, e2 = _emb(5, (4, 5)), _emb(6, (4, 5))
  params = jax.jit(model.init)(jax.random.key(0), e1, e2)["params"]
  x = (np.asarray(e1) - np.asarray(e2)) ** 2
  for name in ("hidden0", "hidden1"):
    x = np.maximum(x @ np.asarray(params[name]["kernel"]) + np.asarray(params[name]["bias"]), 0)
  x = x @ np.asarray(params["out"]["kernel"]) + np.asarray(params["out"]["bias"])
  np.testing.assert_allclose(np.asarray(jax.jit(model.apply)({"params": params}, e1, e2)), x, rtol=1e-5, atol=1e-6)
