"""The paper's choices that jsim makes configurable (docs/PROTOCOL.md): stage-2 pair exclusion in the trainer."""

from __future__ import annotations


import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jsim import parallel
from jsim.data import pairs as pairs_lib
from jsim.train import loop, schedule, similarity

from conftest import parametrize_fast_first, tiny_config


def _keys(p):
  p = np.asarray(p).astype(np.int64)
  return np.minimum(p[:, 0], p[:, 1]) * 10**6 + np.maximum(p[:, 0], p[:, 1])


@parametrize_fast_first("exclusion", ["redraw", "remove"])
def test_similarity_plan_exclusion(exclusion):
  config = tiny_config()
  config.similarity.exclusion = exclusion
  # 6 classes of 6 images: 15 distinct pairs per class, 5 of them validation pairs, so
  # a third of the 10 similar training draws per class collide.
  labels = np.repeat(np.arange(6), 6).astype(np.int32)
  emb = np.random.default_rng(0).normal(size=(36, 32)).astype(np.float32)
  model = similarity.build_similarity(config, 32)
  tx = schedule.optimizer_from(config.similarity)
  mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))
  plan = similarity.SimilarityPlan(config, emb, labels, model, tx, mesh)
  drawn = pairs_lib.num_pairs(6, 2, 10)  # 120
  counts = []
  for epoch in (1, 2):
    plan.begin_epoch(epoch)
    used = sum(plan.batch_sizes)
    assert plan.num_batches(epoch) == -(-used // 16) == len(plan.batch_sizes)
    assert plan._pairs.shape == (drawn, 2)  # same shape every epoch: one compiled step
    batches = np.asarray(plan._pairs)[:used]
    assert not np.isin(_keys(batches), _keys(plan.val_pairs)).any()
    counts.append(used)
  if exclusion == "redraw":
    assert counts == [drawn, drawn]
  else:
    assert all(drawn - 60 < c < drawn - 5 for c in counts), counts
  state = similarity.init_state(config, model, 32, tx)
  state, sums = plan.train_step(state, 2, plan.num_batches(2) - 1, loop.zero_sums())  # the short last batch
  assert int(sums["count"]) == plan.batch_sizes[-1]


def test_exclusion_is_checked_with_the_config():
  from jsim import validate

  config = tiny_config()
  validate.check_config(config)
  assert config.similarity.exclusion == "redraw"  # the default: the protocol's exact 644,400 pairs
  config.similarity.exclusion = "drop"
  with pytest.raises(ValueError, match="similarity.exclusion='drop'"):
    validate.check_config(config)


def test_normalization_statistics_come_from_t180(tmp_path):
  # The source computes the statistics "across the training set": T180 = stage-1 train +
  # validation. 'train' (the stage-1 split only) and 'imagenet' stay available.
  from jsim.data import augment, prepare

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
  images[20:] //= 2  # the validation images differ, so the two choices do too
  train_idx, val_idx = np.arange(0, 20)[::-1], np.arange(20, 27)  # 27..29: an unseen class
  config = tiny_config()
  assert prepare.resolved_normalization(config) == "t180"  # 'auto' without pretrained weights
  mean, std = prepare._statistics(config, tmp_path, images, train_idx, val_idx)
  ref_mean, ref_std = augment.channel_stats(images[:27])
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
  np.testing.assert_allclose(std, ref_std, rtol=1e-12)
  stage1_mean, _ = augment.channel_stats(images[:20])
  assert np.abs(np.subtract(mean, stage1_mean)).max() > 0.01
  # Recorded once; a workdir recorded with another choice says how to continue it.
  import json

  assert json.loads((tmp_path / prepare.PREPROCESSING_FILE).read_text())["normalization"] == "t180"
  config.data.normalization = "train"
  with pytest.raises(ValueError, match="--config.data.normalization=t180"):
    prepare._statistics(config, tmp_path, images, train_idx, val_idx)
  old = tmp_path / "old"
  old.mkdir()
  np.testing.assert_allclose(prepare._statistics(config, old, images, train_idx, val_idx)[0], stage1_mean)


def test_compare_workdirs_must_be_evaluated(tmp_path):
  from jsim import validate

  config = tiny_config()
  config.evaluation.compare_workdirs = (str(tmp_path),)
  with pytest.raises(ValueError, match="evaluation.compare_workdirs: .* has no evaluation.npz"):
    validate.check_config(config)
