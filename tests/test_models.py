"""Model zoo: registry, parameter counts, the module contract, initialisation, pooling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsim.models as models
from jsim.models import vgg


def _shapes(model, size=64):
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init({"params": jax.random.PRNGKey(0)}, x, train=False), x)


def _init(model, rngs, x):
  return jax.jit(lambda r, x: model.init(r, x, train=False))(rngs, x)


def _apply(model, variables, x, train=False, rng=None):
  """Jitted apply (one compile instead of one per op); train mode as the training code calls it."""
  if train:
    return jax.jit(lambda v, x, k: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": k}))(
      variables, x, rng
    )
  return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def test_registry_lists_models_and_rejects_unknown_names():
  assert {"resnet50", "vgg16", "resnet_tiny", "vgg_tiny"} <= set(models.available())
  with pytest.raises(ValueError, match=r"unknown model 'resnet51'.*resnet50.*vgg16"):
    models.build("resnet51")
  with pytest.raises(ValueError, match="already registered"):
    models.register("resnet50", models.resnet.resnet50)


@pytest.mark.parametrize("name,count,emb", [("resnet50", 23_876_852, 2048), ("vgg16", 134_998_004, 4096)])
def test_trainable_parameter_counts_with_180_way_head(name, count, emb):
  # Counts from the source (torchvision's models with a 180-way last layer).
  model = models.build(name, num_classes=180)
  shapes = _shapes(model)
  assert _count(shapes["params"]) == count
  assert model.embedding_dim == emb == models.embedding_dim(name)
  assert shapes["params"]["head"]["kernel"].shape == (emb, 180)
  assert ("batch_stats" in shapes) == (name == "resnet50")
  logits, embedding = jax.eval_shape(
    lambda v, x: model.apply(v, x, train=False), shapes, jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  )
  assert logits.shape == (2, 180) and embedding.shape == (2, emb)


X32 = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))


# The tests on `tiny` run in one pytest-xdist worker (make test: --dist loadgroup), which compiles it once.
TINY_GROUP = pytest.mark.xdist_group("models_tiny")


@pytest.fixture(scope="module")
def tiny():
  """name -> (model, variables) for the tiny models with a 50-way head: one init compile each."""
  out = {}
  for name in ("resnet_tiny", "vgg_tiny"):
    model = models.build(name, num_classes=50)
    out[name] = model, _init(model, {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(2)}, X32)
  return out


@TINY_GROUP
@pytest.mark.slow
def test_resnet_tiny_train_step_updates_batch_stats_with_momentum_0_9(tiny):
  model, variables = tiny["resnet_tiny"]
  x = X32
  assert set(variables) == {"params", "batch_stats"}
  (logits, emb), updates = _apply(model, variables, x, True, jax.random.PRNGKey(3))
  assert logits.shape == (4, 50) and emb.shape == (4, model.embedding_dim) == (4, 256)
  assert jax.tree_util.tree_structure(updates["batch_stats"]) == jax.tree_util.tree_structure(variables["batch_stats"])
  # Stem BN: new = 0.9 * old + 0.1 * batch statistic (biased variance), old = (0, 1).
  kernel = variables["params"]["conv1"]["kernel"]
  y = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  stats = updates["batch_stats"]["bn1"]
  np.testing.assert_allclose(stats["mean"], 0.1 * y.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * y.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  # Every BN layer moved; eval uses the running statistics: deterministic, unlike train mode.
  for old, new in zip(
    jax.tree_util.tree_leaves(variables["batch_stats"]), jax.tree_util.tree_leaves(updates["batch_stats"])
  ):
    assert not np.allclose(old, new)
  eval1, _ = _apply(model, variables, x)
  eval2, _ = _apply(model, variables, x)
  np.testing.assert_array_equal(eval1, eval2)
  assert not np.allclose(eval1, logits)


@TINY_GROUP
@pytest.mark.slow
def test_vgg_tiny_has_only_params_and_embedding_is_the_heads_input(tiny):
  model, variables = tiny["vgg_tiny"]
  x = X32
  assert set(variables) == {"params"}
  head = variables["params"]["head"]
  (logits, emb), updates = _apply(model, variables, x, True, jax.random.PRNGKey(3))
  assert not updates  # nothing to update, but the training code's call works
  assert emb.shape == (4, model.embedding_dim) == (4, 32)
  # In train mode the head sees fc7 after ReLU *and* dropout: that is the embedding.
  np.testing.assert_allclose(logits, emb @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-6)
  (_, emb2), _ = _apply(model, variables, x, True, jax.random.PRNGKey(4))
  assert not np.allclose(emb, emb2)  # dropout is live and keyed
  eval_logits, eval_emb = _apply(model, variables, x)
  assert (eval_emb >= 0).all() and (eval_emb > 0).any()  # after ReLU
  np.testing.assert_allclose(eval_logits, eval_emb @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-6)


@TINY_GROUP
@pytest.mark.parametrize("name", ["resnet_tiny", "vgg_tiny"])
@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny, name):
  model, variables = tiny[name]
  model16 = models.build(name, num_classes=50, dtype=jnp.bfloat16)
  # Same tree whatever the compute dtype, and parameters stay float32.
  shapes16 = _shapes(model16, 32)
  assert jax.tree_util.tree_structure(shapes16) == jax.tree_util.tree_structure(variables)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes16)} == {jnp.dtype(jnp.float32)}
  logits, emb = _apply(model16, variables, X32)
  assert logits.dtype == emb.dtype == jnp.float32
  ref_logits, _ = _apply(model, variables, X32)
  np.testing.assert_allclose(logits, ref_logits, rtol=0.1, atol=0.1 * float(jnp.abs(ref_logits).max()))


@TINY_GROUP
@pytest.mark.slow
def test_initialisation_follows_torchvision(tiny):
  r = tiny["resnet_tiny"][1]["params"]
  # Conv: kaiming normal, fan_out = out_channels * kh * kw, gain sqrt(2).
  k = r["layer4_0"]["conv2"]["kernel"]  # 3x3, 64 -> 64
  np.testing.assert_allclose(k.std(), math.sqrt(2 / (3 * 3 * 64)), rtol=0.05)
  assert abs(float(k.mean())) < 0.05 * float(k.std())
  bn = r["layer4_0"]["bn3"]
  np.testing.assert_array_equal(bn["scale"], 1.0)
  np.testing.assert_array_equal(bn["bias"], 0.0)
  # ResNet head: torch nn.Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
  bound = 1 / math.sqrt(256)
  for leaf in (r["head"]["kernel"], r["head"]["bias"]):
    assert float(jnp.abs(leaf).max()) <= bound
  np.testing.assert_allclose(r["head"]["kernel"].std(), bound / math.sqrt(3), rtol=0.05)
  assert float(jnp.abs(r["head"]["bias"]).max()) > 0.5 * bound

  v = tiny["vgg_tiny"][1]["params"]
  np.testing.assert_allclose(v["conv2_2"]["kernel"].std(), math.sqrt(2 / (3 * 3 * 16)), rtol=0.05)
  np.testing.assert_array_equal(v["conv2_2"]["bias"], 0.0)
  assert v["fc6"]["kernel"].shape == (16 * 7 * 7, 32)  # adaptive pool to 7x7 even from 8x8
  for name in ("fc6", "fc7", "head"):
    np.testing.assert_array_equal(v[name]["bias"], 0.0)
  # VGG linears (head included, when built from scratch): N(0, 0.01).
  np.testing.assert_allclose(v["fc6"]["kernel"].std(), 0.01, rtol=0.05)
  np.testing.assert_allclose(v["head"]["kernel"].std(), 0.01, rtol=0.1)


def test_adaptive_pool_bins_follow_torch_formula():
  # in 3 -> out 2: bins [0, 2) and [1, 3) overlap; in 2 -> out 3: [0,1), [0,2), [1,2).
  np.testing.assert_allclose(vgg.adaptive_pool_matrix(3, 2), [[0.5, 0.5, 0], [0, 0.5, 0.5]])
  np.testing.assert_allclose(vgg.adaptive_pool_matrix(2, 3), [[1, 0], [0.5, 0.5], [0, 1]])
  np.testing.assert_allclose(vgg.adaptive_pool_matrix(14, 7), np.kron(np.eye(7), [[0.5, 0.5]]))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 7, 4))
  np.testing.assert_array_equal(vgg.adaptive_avg_pool(x, (7, 7)), x)


@pytest.mark.parametrize("h,w", [(1, 1), (3, 5), (9, 9), (10, 13), (14, 14), (15, 6)])
def test_adaptive_pool_matches_torch(h, w):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(h * 100 + w).normal(size=(2, 3, h, w)).astype(np.float32)
  ref = torch.nn.AdaptiveAvgPool2d((7, 7))(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  got = vgg.adaptive_avg_pool(jnp.asarray(x.transpose(0, 2, 3, 1)), (7, 7))
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
