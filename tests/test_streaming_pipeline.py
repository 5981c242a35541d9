"""data.pipeline='stream' trains and evaluates exactly like the device-resident path.

Both paths feed one jitted step core with the same per-step key (fold_in(seed key,
step)) and visit the same order (streaming.epoch_permutation); they differ only in
where a batch is gathered: inside jit from images held on the device, or on the host
by grain and sent sharded. The gather is exact, so on CPU (one device, float32) the
results must be bitwise equal: parameters, BatchNorm statistics, running sums and
evaluation. A resumed epoch (begin_epoch, then train_step from batch k in a fresh
plan) must continue the uninterrupted stream.
"""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest

from jsim import parallel, validate
from jsim.data.dataset import ImageSet
from jsim.train import classifier, loop
from jsim.train.state import TrainState

from conftest import tiny_config

# One worker runs the module: its `runs` fixture (both pipelines, two epochs; ~2 min on 2 cores) is built once.
# Bitwise equal results of two differently fused programs: XLA's default emitters (tests/conftest.py).
pytestmark = [pytest.mark.xdist_group("streaming_pipeline"), pytest.mark.default_codegen]

NUM_CLASSES, PER_CLASS, SEEN = 10, 12, 6


def pipeline_config(pipeline: str):
  return tiny_config(**{"data.pipeline": pipeline, "classifier.eval_batch_size": 8})


def tiny_data():
  """A Prepared-like object over a real ImageSet: 10 classes x 12 images of 32x32, 6 seen classes.

  15 stage-1 train images (batch 6: batches of 6, 6 and a remainder of 3), scattered
  through the set so that a wrong index or order would show; 11 validation images
  (eval batch 8: one padded batch).
  """
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(NUM_CLASSES), PER_CLASS).astype(np.int32)
  # A class-dependent tint, so that the model's predictions are not all one class.
  images = (rng.integers(0, 160, (len(labels), 32, 32, 3)) + labels[:, None, None, None] * 9).astype(np.uint8)
  train_set = ImageSet(
    images, labels, tuple(f"c{i}" for i in range(NUM_CLASSES)), tuple(f"img{i}" for i in range(len(labels)))
  )
  head = np.where(labels < SEEN, labels, -1).astype(np.int32)
  seen = np.flatnonzero(head >= 0)
  chosen = rng.permutation(seen)
  return types.SimpleNamespace(
    train_set=train_set,
    train_idx=np.sort(chosen[:15]),
    val_idx=np.sort(chosen[15:26]),
    train_head_labels=head,
    mean=(0.4, 0.4, 0.4),
    std=(0.25, 0.25, 0.25),
  )


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_equal_trees(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def setup():
  config = pipeline_config("device")
  model = classifier.build_classifier(config, SEEN)
  tx = classifier.make_optimizer(config.classifier)
  variables = host(classifier.initial_variables(config, model, SEEN, config.classifier.input_size))
  return model, tx, variables, tiny_data(), parallel.make_mesh()


def make_plan(pipeline, setup):
  model, tx, _, data, mesh = setup
  return classifier.Stage1Plan(pipeline_config(pipeline), data, model, tx, mesh)


def run(plan, state, sums, epoch, batches, mesh):
  """train_step over `batches` of `epoch` (after begin_epoch, as the loop does); host copies after each step."""
  plan.begin_epoch(epoch)
  state = parallel.put_replicated(state, mesh)  # the step donates its inputs: never the host copies
  snapshots = []
  for b in batches:
    state, sums = plan.train_step(state, epoch, b, sums)
    snapshots.append((host(state), host(sums)))
  return snapshots


@pytest.fixture(scope="module")
def runs(setup):
  """Epoch 0 (6 + 6 + 3 images) and epoch 1 in each pipeline, from the same initial state."""
  _, tx, variables, _, mesh = setup
  out = {}
  for pipeline in ("device", "stream"):
    plan = make_plan(pipeline, setup)
    state0 = TrainState.create(variables, tx)
    snaps = run(plan, state0, loop.zero_sums(), 0, range(3), mesh)
    snaps += run(plan, snaps[-1][0], loop.zero_sums(), 1, range(3), mesh)
    out[pipeline] = {"plan": plan, "snaps": snaps, "val": plan.evaluate(parallel.put_replicated(snaps[-1][0], mesh))}
  return out


@pytest.mark.slow
def test_stream_keeps_images_on_host(runs):
  plan = runs["stream"]["plan"]
  assert not isinstance(plan.images, jax.Array) and not isinstance(plan.labels, jax.Array)
  assert isinstance(runs["device"]["plan"].images, jax.Array)


@pytest.mark.slow
def test_stream_trains_like_device(runs):
  dev, st = runs["device"]["snaps"], runs["stream"]["snaps"]
  assert len(dev) == len(st) == 6
  # Epoch 0's sums count 6 + 6 + 3 images: the remainder batch is kept by both paths.
  assert float(dev[2][1]["count"]) == float(st[2][1]["count"]) == 15
  assert int(st[-1][0].step) == 6
  for (s_dev, sums_dev), (s_st, sums_st) in zip(dev, st):
    assert_equal_trees(s_dev.params, s_st.params)
    assert_equal_trees(s_dev.batch_stats, s_st.batch_stats)
    assert_equal_trees(s_dev.opt_state, s_st.opt_state)
    assert_equal_trees(sums_dev, sums_st)
  # Training moved the parameters (the comparison above is not of two untouched states).
  first = jax.tree.leaves(dev[0][0].params)[0]
  assert not np.array_equal(first, jax.tree.leaves(dev[-1][0].params)[0])


@pytest.mark.slow
def test_stream_evaluates_like_device(runs):
  dev, st = runs["device"]["val"], runs["stream"]["val"]
  assert dev["count"] == st["count"] == 11
  assert dev == st


@pytest.mark.slow
def test_stream_resumes_inside_an_epoch(setup, runs):
  """Epoch 1 resumed at batch 1 from the state after batch 0 continues the uninterrupted run.

  The plan that ran the whole epoch is reused (its compiled steps: a fresh plan would
  compile again); begin_epoch drops its stream, so train_step must open a new one at
  batch 1, as a restarted process would.
  """
  mesh = setup[-1]
  snaps = runs["stream"]["snaps"]
  state_after_b0, sums_after_b0 = snaps[3]
  resumed = run(runs["stream"]["plan"], state_after_b0, sums_after_b0, 1, range(1, 3), mesh)
  for (s_a, sums_a), (s_b, sums_b) in zip(resumed, snaps[4:]):
    assert_equal_trees(s_a.params, s_b.params)
    assert_equal_trees(s_a.batch_stats, s_b.batch_stats)
    assert_equal_trees(sums_a, sums_b)


def test_pipeline_key_is_checked():
  config = pipeline_config("gpu")
  with pytest.raises(ValueError, match="data.pipeline='gpu'"):
    validate.check_config(config)
