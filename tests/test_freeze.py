"""model.freeze: fixed parameters and BatchNorm statistics stay bitwise unchanged through stage-1 steps,
the rest trains, and the fixed part is outside the gradient and the optimizer state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jsim import configs, models, validate
from jsim.models import efficientnet_lite
from jsim.models import freeze as freezing
from jsim.train import classifier, metric
from jsim.train.loop import zero_sums
from jsim.train.step import train_step
from jsim.train.state import TrainState

SIZE = 32
NUM_CLASSES = 4


def _config(freeze: str, loss: str = "cross_entropy", **model):
  c = configs.base_config()
  c.model.name, c.model.init, c.model.dtype, c.model.freeze = "efficientnet_lite_tiny", "random", "float32", freeze
  c.model.update(model)
  c.classifier.input_size = SIZE
  c.classifier.augment.crop_size = SIZE - 4
  c.classifier.learning_rate = 0.05
  c.classifier.weight_decay = 1e-3  # would move a frozen parameter if the optimizer saw it
  configs.use_metric_loss(c, loss, embedding_dim=8)
  return c


def _steps(c, n: int = 2):
  model = classifier.build_classifier(c, NUM_CLASSES)
  variables = classifier.initial_variables(c, model, NUM_CLASSES, SIZE)
  tx = classifier.make_optimizer(c.classifier, model)
  state = TrainState.create(jax.tree.map(jnp.asarray, variables), tx)
  args = dict(
    model=model,
    tx=tx,
    mean=(0.5,) * 3,
    std=(0.25,) * 3,
    input_size=SIZE,
    augment_config=c.classifier.augment,
    seed_key=jax.random.PRNGKey(0),
  )
  loss = metric.build_loss(c.classifier)
  step = jax.jit(lambda s, x, y, sums: train_step(s, {"images": x, "labels": y}, sums, loss=loss, **args))
  rng = np.random.default_rng(0)
  labels = jnp.asarray(np.repeat(np.arange(NUM_CLASSES), 2), jnp.int32)
  new = state
  for _ in range(n):
    images = jnp.asarray(rng.integers(0, 256, (len(labels), SIZE, SIZE, 3), np.uint8))
    new, _ = step(new, images, labels, zero_sums())
  return model, state, new


def _paths(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _split(model, tree):
  """(frozen, trained) leaves of a params or batch_stats tree, by path."""
  mask = _paths(freezing.frozen_fn(model)(tree))
  leaves = _paths(tree)
  return {k: v for k, v in leaves.items() if mask[k]}, {k: v for k, v in leaves.items() if not mask[k]}


@pytest.mark.parametrize(
  "freeze,loss",
  [
    ("stages:2", "cross_entropy"),
    ("backbone", "cross_entropy"),
    ("stages:0", "cross_entropy"),
    ("backbone", "triplet"),
  ],
)
@pytest.mark.slow
def test_frozen_parameters_and_statistics_are_bitwise_unchanged(freeze, loss):
  model, before, after = _steps(_config(freeze, loss))
  for collection in ("params", "batch_stats"):
    frozen_before, trained_before = _split(model, getattr(before, collection))
    frozen_after, trained_after = _split(model, getattr(after, collection))
    assert frozen_before, f"nothing frozen in {collection}"
    for k, v in frozen_before.items():
      assert np.array_equal(v, frozen_after[k]), f"{collection}{k} moved"
    moved = [k for k, v in trained_before.items() if not np.array_equal(v, trained_after[k])]
    if collection == "params":
      assert len(moved) == len(trained_before), f"not trained: {set(trained_before) - set(moved)}"
    elif freeze != "backbone":  # a trained part's BatchNorm statistics follow the batches
      assert moved
  names = {k.split("]")[0] for k in _split(model, before.params)[0]}
  if freeze == "stages:0":
    assert names == {"['stem_conv'", "['stem_bn'"}
  # No optimizer state for a frozen parameter: momentum cannot carry it.
  n_state = sum(x.size for x in jax.tree.leaves(before.opt_state) if x.ndim)
  n_trained = sum(v.size for v in _split(model, before.params)[1].values())
  assert n_state == n_trained


@pytest.mark.slow
def test_frozen_part_is_outside_the_gradient():
  c = _config("stages:3")
  model = classifier.build_classifier(c, NUM_CLASSES)
  variables = classifier.initial_variables(c, model, NUM_CLASSES, SIZE)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, SIZE, SIZE, 3)), jnp.float32)

  def loss(params):
    (logits, _), _ = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": jax.random.PRNGKey(0)},
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(4) % NUM_CLASSES).mean()

  grads = jax.jit(jax.grad(loss))(variables["params"])
  frozen, trained = _split(model, grads)
  assert frozen and all(not np.any(g) for g in frozen.values())
  assert sum(bool(np.any(g)) for g in trained.values()) > len(trained) // 2
  assert {k.split("]")[0].strip("['") for k in frozen} == {
    "stem_conv",
    "stem_bn",
    "stage1_0",
    "stage2_0",
    "stage3_0",
  }


def test_freeze_values_are_checked():
  assert freezing.parse("none") is None and freezing.parse("stages:3") == 3
  for bad, match in (
    ("stages:8", "has 7 stages"),
    ("stages", "expected none, backbone or stages:N"),
    ("all", "expected"),
  ):
    c = _config(bad)
    with pytest.raises(ValueError, match=match):
      validate.check_config(c)
  c = _config("backbone", name="resnet_tiny")
  with pytest.raises(
    ValueError, match="model.name='resnet_tiny' cannot be frozen.*efficientnet_lite0, efficientnet_lite1"
  ):
    validate.check_config(c)


def test_unfrozen_model_is_unchanged():
  # freeze=none builds the same model and the same optimizer state as before freezing existed.
  c = _config("none")
  model = classifier.build_classifier(c, NUM_CLASSES)
  assert model.freeze == "none" and freezing.frozen_fn(model) is None
  params = {"w": jnp.ones(3)}
  assert jax.tree.structure(classifier.make_optimizer(c.classifier, model).init(params)) == jax.tree.structure(
    classifier.make_optimizer(c.classifier).init(params)
  )
  assert models.build("efficientnet_lite0").frozen_modules() == ()
  assert [s[0] for s in efficientnet_lite.stage_specs(1.0, 1.0)] == [1, 2, 2, 3, 3, 4, 1]  # lite0: 16 blocks
  assert [s[0] for s in efficientnet_lite.stage_specs(0.25, 0.25)] == [1] * 7
