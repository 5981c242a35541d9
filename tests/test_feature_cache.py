"""The feature cache of a frozen backbone (jsim.train.feature_cache): the head trained on cached features
equals the head trained through the frozen backbone (augmentation off), bitwise on CPU; the cache is
computed once and the embeddings stage reuses it; other weights, normalisation, input size or images
invalidate it; a resumed stage 1 equals an uninterrupted one; a run stopped while caching leaves no
cache that reads as complete. Real stages in-process on the tiny synthetic data, efficientnet_lite_tiny."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from jsim import configs, parallel, workdir as wd
from jsim.data import augment
from jsim.data.prepare import prepare
from jsim.train import batching, classifier, embeddings, feature_cache, loop, metric
from jsim.train.state import TrainState
from jsim.train.step import eval_step, train_step

SIZE = 32


def _config(loss: str = "cross_entropy", **overrides):
  c = tiny_config(
    **{
      "model.name": "efficientnet_lite_tiny",
      "model.freeze": "backbone",
      "classifier.augment.prob": 0.0,
      "classifier.num_epochs": 2,
      "stage": "classifier",
    }
  )
  # A metric loss: an 8-d embedding head (and proxy_anchor's proxies) on the frozen features, m=2 per class.
  configs.use_metric_loss(c, loss, embedding_dim=8, m=2)
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for name in path:
      node = node[name]
    node[last] = value
  return c


def _stage1_parts(c, num_classes):
  """(model, variables, optimizer, loss) of stage 1 as the run builds them from config `c`."""
  model = classifier.build_classifier(c, num_classes)
  variables = classifier.initial_variables(c, model, num_classes, SIZE)
  return model, variables, classifier.make_optimizer(c.classifier, model), metric.build_loss(c.classifier)


def _leaves(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_trees_equal(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def test_the_switch():
  assert feature_cache.applies(_config())
  assert not feature_cache.applies(_config(**{"classifier.augment.prob": 0.5}))  # augmentation reaches it
  assert feature_cache.applies(_config(**{"classifier.augment.prob": 0.5, "classifier.augment.enabled": ()}))
  assert not feature_cache.applies(_config(**{"model.freeze": "stages:3"}))
  assert not feature_cache.applies(_config(**{"model.freeze": "none"}))
  assert feature_cache.applies(_config("proxy_anchor"))  # any stage-1 loss: only the heads train
  assert not feature_cache.applies(_config("multi_similarity", **{"classifier.augment.prob": 0.5}))


def test_a_frozen_backbone_with_augmentation_gets_a_hint():
  from jsim import run

  assert run.cpu_hints(_config()) == []
  (hint,) = run.cpu_hints(_config(**{"classifier.augment.prob": 0.5}))
  assert "--config.classifier.augment.prob=0" in hint and "\n" not in hint


@pytest.mark.default_codegen
@pytest.mark.parametrize("cache_batch", [6, 16])
@pytest.mark.slow
def test_head_on_cached_features_equals_head_through_the_frozen_backbone(cache_batch):
  # The same steps, once on images through the frozen backbone (augmentation off: augment() is
  # preprocess() bit for bit), once on the features the cache computes (embed_images, in batches of
  # cache_batch): the dropout draws are the same (the head's modules keep their names). With the
  # training batch size (6) the features are bitwise those inside the step, and so are the trained
  # head, the optimizer state, the running sums and the evaluation. XLA:CPU rounds one image's
  # features differently in the last bits in a batch of another size (16): equal to a few ULPs.
  c = _config()
  num_classes = 6
  model, variables, tx, loss = _stage1_parts(c, num_classes)
  mean, std = (0.5, 0.45, 0.4), (0.25, 0.24, 0.26)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (30, SIZE, SIZE, 3), dtype=np.uint8)
  labels = rng.integers(0, num_classes, 30).astype(np.int32)
  mesh = parallel.make_mesh()
  features = batching.embed_images(
    model,
    variables,
    parallel.put_replicated(images, mesh),
    np.arange(30),
    mean=mean,
    std=std,
    input_size=SIZE,
    batch_size=cache_batch,
    mesh=mesh,
  )
  assert features.shape == (30, 1280)
  args = dict(
    model=model,
    loss=loss,
    tx=tx,
    mean=mean,
    std=std,
    input_size=SIZE,
    augment_config=c.classifier.augment,
    seed_key=jax.random.PRNGKey(3),
  )
  step = jax.jit(functools.partial(train_step, **args))
  states, all_sums = {}, {}
  for inputs, data in (("images", images), ("features", features)):
    state, sums = TrainState.create(jax.tree.map(jnp.asarray, variables), tx), loop.zero_sums()
    for b in range(5):
      idx = np.arange(b * 6, b * 6 + 6)
      state, sums = step(state, {inputs: jnp.asarray(data[idx]), "labels": jnp.asarray(labels[idx])}, sums)
    states[inputs], all_sums[inputs] = state, sums
  head = states["features"].params["head"]["kernel"]
  assert not np.array_equal(head, variables["params"]["head"]["kernel"])  # it trained
  evaluate = jax.jit(functools.partial(eval_step, model=model, loss=loss, mean=mean, std=std, input_size=SIZE))
  mask = jnp.ones(30, bool)
  on_images = evaluate(states["images"], {"images": jnp.asarray(images), "labels": jnp.asarray(labels)}, mask)
  on_features = evaluate(states["images"], {"features": jnp.asarray(features), "labels": jnp.asarray(labels)}, mask)
  if cache_batch == 6:
    _assert_trees_equal(states["images"], states["features"])
    _assert_trees_equal(all_sums["images"], all_sums["features"])
    _assert_trees_equal(on_images, on_features)
    return
  scale = np.abs(features).max()
  embed6 = jax.jit(lambda x: model.apply(variables, augment.preprocess(x, mean, std, SIZE), train=False)[1])
  in_step = np.concatenate([np.asarray(embed6(jnp.asarray(images[i : i + 6]))) for i in range(0, 30, 6)])
  assert 0 < np.abs(features - in_step).max() <= 1e-5 * scale  # not bitwise: rounding, not the math
  for k, a in _leaves(states["images"]).items():
    b = _leaves(states["features"])[k]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max() + 1e-30, err_msg=k)
  assert on_images["correct"] == on_features["correct"] and on_images["count"] == on_features["count"]
  np.testing.assert_allclose(on_images["loss_sum"], on_features["loss_sum"], rtol=1e-6)


@pytest.mark.default_codegen
@pytest.mark.parametrize("loss", ["proxy_anchor", "multi_similarity+miner"])
@pytest.mark.slow
def test_metric_heads_on_cached_features_equal_them_through_the_frozen_backbone(loss):
  # A metric loss behind the frozen backbone trains its embedding head (and proxy_anchor its proxies;
  # multi_similarity here with its miner) on the cached features exactly as through the backbone:
  # batches of 6 throughout (as for cross_entropy above), so bitwise, and so are the embeddings.
  name, _, miner = loss.partition("+")
  c = _config(name)
  if miner:
    c.classifier.loss_hparams[name].miner = name
  num_classes = 3
  model, variables, tx, loss_fn = _stage1_parts(c, num_classes)
  mean, std = (0.5, 0.45, 0.4), (0.25, 0.24, 0.26)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (30, SIZE, SIZE, 3), dtype=np.uint8)
  labels = np.repeat(np.arange(num_classes), 10).astype(np.int32)[rng.permutation(30)]
  mesh = parallel.make_mesh()
  kw = dict(mean=mean, std=std, input_size=SIZE, batch_size=6, mesh=mesh)
  features = batching.embed_images(
    *feature_cache.backbone_of(model, variables), parallel.put_replicated(images, mesh), np.arange(30), **kw
  )
  assert features.shape == (30, 1280)  # the backbone's output, not the 8-d embedding
  step = jax.jit(
    functools.partial(
      train_step,
      model=model,
      loss=loss_fn,
      tx=tx,
      mean=mean,
      std=std,
      input_size=SIZE,
      augment_config=c.classifier.augment,
      seed_key=jax.random.PRNGKey(3),
    )
  )
  order = np.argsort(labels, kind="stable").reshape(3, 10)[:, :10].T.reshape(-1)  # 2 per class in a batch of 6
  states = {}
  for inputs, data in (("images", images), ("features", features)):
    state, sums = TrainState.create(jax.tree.map(jnp.asarray, variables), tx), loop.zero_sums()
    for b in range(5):
      idx = order[b * 6 : b * 6 + 6]
      state, sums = step(state, {inputs: jnp.asarray(data[idx]), "labels": jnp.asarray(labels[idx])}, sums)
    states[inputs] = state
  trained = states["features"].params["embedding_head"]["kernel"]
  assert not np.array_equal(trained, variables["params"]["embedding_head"]["kernel"])  # it trained
  _assert_trees_equal(states["images"], states["features"])
  state = states["features"]
  on_images = batching.embed_images(model, state.variables, parallel.put_replicated(images, mesh), np.arange(30), **kw)
  on_features = batching.embed_images(
    model,
    state.variables,
    parallel.put_replicated(features, mesh),
    np.arange(30),
    embed_fn=batching.make_embed_fn(model, mean, std, SIZE, mesh, inputs="features"),
    **kw,
  )
  assert on_features.shape == (30, 8)
  np.testing.assert_allclose(np.linalg.norm(on_features, axis=1), 1.0, rtol=1e-6)  # the L2-normalised head
  np.testing.assert_array_equal(on_images, on_features)


def _stage1_and_embeddings(config, workdir):
  result = classifier.train_classifier(config, workdir)
  meta = embeddings.compute_embeddings(config, workdir)
  return result, meta, embeddings.load_embeddings(workdir)


def _count_computes(monkeypatch, tmp_path) -> list:
  # This test's own shared copy: another test's (the same key) would spare its computation.
  monkeypatch.setattr(feature_cache, "shared_dir", lambda config, key: tmp_path / "shared")
  calls = []
  compute = feature_cache.compute

  def counted(*args, **kw):
    calls.append(1)
    return compute(*args, **kw)

  monkeypatch.setattr(feature_cache, "compute", counted)
  return calls


@pytest.mark.default_codegen
@pytest.mark.slow  # (trains stage 1 two or three times)
@pytest.mark.parametrize("loss", ["cross_entropy", "proxy_anchor"])
def test_stage1_and_embeddings_with_the_cache_equal_them_without(tmp_path, monkeypatch, loss):
  # Every batch of 6 images (training, evaluation, embedding): XLA:CPU then rounds each image's features
  # alike in all of them, and the two runs agree to the bit (see the test above for other batch sizes).
  # proxy_anchor: its embedding head and proxies train on the features; its embeddings are the head's.
  c = _config(loss, **{"classifier.eval_batch_size": 6, "embed.batch_size": 6})
  calls = _count_computes(monkeypatch, tmp_path)
  cached_result, cached_meta, cached = _stage1_and_embeddings(c, tmp_path / "cached")
  assert len(calls) == 1  # computed once, for stage 1; the embeddings stage read it
  assert cached_meta["from_feature_cache"] is True
  key = wd.read_json(tmp_path / "cached" / feature_cache.CACHE_DIR / feature_cache.META_FILE)["key"]
  assert key["train_count"] == 60 and key["test_count"] == 32 and key["input_size"] == SIZE

  with monkeypatch.context() as m:
    m.setattr(feature_cache, "applies", lambda config: False)  # through the backbone, as before the cache
    m.setattr(feature_cache, "lookup", lambda *a: None)
    plain_result, plain_meta, plain = _stage1_and_embeddings(c, tmp_path / "plain")
  assert len(calls) == 1 and plain_meta["from_feature_cache"] is False
  assert not (tmp_path / "plain" / feature_cache.CACHE_DIR).exists()

  figures = ("test_accuracy", "test_loss") if loss == "cross_entropy" else ("test_map@r", "test_precision@1")
  for k in ("best_step", "best_val_accuracy", "test_images", "epochs", *figures):
    assert cached_result[k] == plain_result[k], k
  assert cached["train"].shape[1] == (1280 if loss == "cross_entropy" else 8)
  mesh = parallel.make_mesh()
  _, cached_state = classifier.restore_classifier(c, tmp_path / "cached", mesh)
  _, plain_state = classifier.restore_classifier(c, tmp_path / "plain", mesh)
  _assert_trees_equal(cached_state, plain_state)
  for name in ("train", "test", "train_index", "test_index", "train_labels", "test_labels"):
    np.testing.assert_array_equal(cached[name], plain[name], err_msg=name)

  def rows(workdir):
    lines = (workdir / wd.STAGE1 / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "items_per_s"} for line in lines]

  assert rows(tmp_path / "cached") == rows(tmp_path / "plain")


@pytest.mark.slow  # (trains stage 1 twice)
def test_another_workdir_on_the_same_backbone_takes_the_shared_copy(tmp_path, monkeypatch):
  calls = _count_computes(monkeypatch, tmp_path)
  classifier.train_classifier(_config(**{"classifier.num_epochs": 1}), tmp_path / "ce")
  assert len(calls) == 1 and (tmp_path / "shared" / feature_cache.META_FILE).exists()
  # Another learning rate (with model.init=random a metric loss's backbone is another random draw: another key;
  # the test below shows every loss on the same weights has the same key).
  other = _config(**{"classifier.num_epochs": 1, "classifier.learning_rate": 0.05})
  classifier.train_classifier(other, tmp_path / "lr")
  assert len(calls) == 1  # the second run read the copy the first one left
  for name in feature_cache.ARRAYS:
    a, b = (np.load(tmp_path / w / feature_cache.CACHE_DIR / f"{name}.npy") for w in ("ce", "lr"))
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_every_loss_on_one_backbone_shares_its_cache_key(tmp_path):
  # The features depend on the backbone alone: a metric loss's heads (and their random init) do not enter the key.
  c, c_metric = _config(), _config("proxy_anchor")
  data = prepare(c, tmp_path)
  model = classifier.build_classifier(c, 6)
  variables = classifier.initial_variables(c, model, 6, SIZE)
  metric_model = classifier.build_classifier(c_metric, 6)
  metric_variables = metric.initial_variables(metric_model, variables, SIZE, seed=1)
  assert set(metric_variables["params"]) == {"backbone", "embedding_head", "loss"}
  key = feature_cache.cache_key(c, data, model, variables)
  assert feature_cache.cache_key(c_metric, data, metric_model, metric_variables) == key
  other = jax.tree.map(lambda a: a, metric_variables)
  other["params"]["backbone"]["top_conv"]["kernel"] = other["params"]["backbone"]["top_conv"]["kernel"] * 1.5
  assert feature_cache.cache_key(c_metric, data, metric_model, other)["frozen_sha256"] != key["frozen_sha256"]


@pytest.mark.slow
def test_changed_weights_normalisation_input_size_or_images_invalidate_the_cache(tmp_path):
  c = _config()
  data = prepare(c, tmp_path)
  model = classifier.build_classifier(c, 6)
  variables = classifier.initial_variables(c, model, 6, SIZE)
  key = feature_cache.cache_key(c, data, model, variables)
  arrays = {"train": np.zeros((60, 1280), np.float32), "test": np.ones((32, 1280), np.float32)}
  feature_cache.write(tmp_path, key, arrays)
  assert feature_cache.load(tmp_path, key)["test"].sum() == 32 * 1280

  def changed(**kw):
    return feature_cache.load(tmp_path, dict(key, **kw))

  params = jax.tree.map(np.array, variables["params"])
  params["stage7_0"]["project_conv"]["kernel"][0, 0, 0, 0] += 1e-6  # a frozen weight
  other = feature_cache.cache_key(c, data, model, {**variables, "params": params})
  assert other["frozen_sha256"] != key["frozen_sha256"] and feature_cache.load(tmp_path, other) is None
  stats = jax.tree.map(np.array, variables["batch_stats"])
  stats["top_bn"]["var"][0] *= 1.0001  # a frozen BatchNorm statistic
  assert (
    feature_cache.cache_key(c, data, model, {**variables, "batch_stats": stats})["frozen_sha256"]
    != (key["frozen_sha256"])
  )
  params = jax.tree.map(np.array, variables["params"])
  params["head"]["kernel"] += 1.0  # the head is trained, not frozen: it does not enter the features
  assert feature_cache.cache_key(c, data, model, {**variables, "params": params}) == key

  c2 = _config(**{"classifier.input_size": 48})
  assert feature_cache.load(tmp_path, feature_cache.cache_key(c2, data, model, variables)) is None
  moved = dataclasses.replace(data, mean=(0.5, 0.5, 0.5))
  assert feature_cache.load(tmp_path, feature_cache.cache_key(c, moved, model, variables)) is None
  assert changed(normalization="imagenet") is None
  images = data.test_set.images.copy()
  images[data.test_idx[-1], 0, 0, 0] ^= 1  # one bit of one test image
  edited = dataclasses.replace(data, test_set=dataclasses.replace(data.test_set, images=images))
  assert feature_cache.images_digest(edited) != key["images_sha256"]
  assert changed(dtype="bfloat16") is None and changed(conv_impl="xla") is None and changed(model="x") is None
  assert changed(batch_size=8) is None and changed(devices=2) is None and changed(platform="gpu") is None


@pytest.mark.slow  # (trains stage 1 two or three times)
def test_a_changed_input_size_recomputes_and_replaces_the_cache(tmp_path, monkeypatch):
  calls = _count_computes(monkeypatch, tmp_path)
  c = _config(**{"classifier.num_epochs": 1})
  classifier.train_classifier(c, tmp_path)
  classifier.train_classifier(c, tmp_path)  # finished: skipped, nothing computed
  assert len(calls) == 1
  c48 = _config(**{"classifier.num_epochs": 1, "classifier.input_size": 48, "overwrite": True})
  wd.start_run()
  classifier.train_classifier(c48, tmp_path)
  assert len(calls) == 2
  key = wd.read_json(tmp_path / feature_cache.CACHE_DIR / feature_cache.META_FILE)["key"]
  assert key["input_size"] == 48
  # The embeddings stage of the 48-px stage 1 reads the 48-px cache.
  assert embeddings.compute_embeddings(c48, tmp_path)["from_feature_cache"] is True
  assert len(calls) == 2


@pytest.mark.slow  # (trains stage 1 two or three times)
def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path, monkeypatch):
  c = _config(**{"classifier.num_epochs": 3})
  calls = _count_computes(monkeypatch, tmp_path)
  whole = classifier.train_classifier(c, tmp_path / "whole")
  step = classifier.Stage1Plan.train_step
  sent = []

  def signalled(self, state, epoch, batch, sums):
    if (epoch, batch) == (2, 3) and not sent:
      sent.append(1)
      os.kill(os.getpid(), signal.SIGTERM)  # handled by fit's guard: stops before the next step
    return step(self, state, epoch, batch, sums)

  with monkeypatch.context() as m:
    m.setattr(classifier.Stage1Plan, "train_step", signalled)
    with pytest.raises(loop.Preempted, match="SIGTERM at epoch 2, batch 4/7"):
      classifier.train_classifier(c, tmp_path / "cut")
  resumed = classifier.train_classifier(c, tmp_path / "cut")
  assert len(calls) == 1  # the whole run computed it; the cut run took its shared copy, the rerun its own
  for k in ("best_step", "best_val_accuracy", "test_accuracy", "test_loss", "epochs"):
    assert resumed[k] == whole[k], k
  mesh = parallel.make_mesh()
  _assert_trees_equal(
    classifier.restore_classifier(c, tmp_path / "cut", mesh)[1],
    classifier.restore_classifier(c, tmp_path / "whole", mesh)[1],
  )


@pytest.mark.slow  # (trains stage 1 two or three times)
def test_a_signal_while_caching_leaves_no_cache_and_the_rerun_computes_it(tmp_path, monkeypatch):
  from jsim import run as run_lib

  c = _config(**{"classifier.num_epochs": 1})
  embed = batching.make_embed_fn
  batches = []

  def make_embed_fn(*args, **kw):
    fn = embed(*args, **kw)

    def signalled(*a):
      batches.append(1)
      if len(batches) == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # the stage's guard: the cache stops at the next batch
      return fn(*a)

    return signalled

  with monkeypatch.context() as m:
    m.setattr(batching, "make_embed_fn", make_embed_fn)
    with pytest.raises(loop.Preempted, match="SIGTERM while caching the frozen backbone's features"):
      run_lib.run(c, tmp_path)
  assert len(batches) == 2
  assert not (tmp_path / feature_cache.CACHE_DIR / feature_cache.META_FILE).exists()
  assert not (tmp_path / feature_cache.CACHE_DIR).exists()
  # A write killed between the arrays and meta.json leaves arrays that nothing reads as a cache.
  data = prepare(c, tmp_path)
  model = classifier.build_classifier(c, 6)
  variables = classifier.initial_variables(c, model, 6, SIZE)
  key = feature_cache.cache_key(c, data, model, variables)
  with monkeypatch.context() as m:

    def killed(path, obj):
      raise KeyboardInterrupt

    m.setattr(wd, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
      feature_cache.write(
        tmp_path, key, {"train": np.zeros((60, 1280), np.float32), "test": np.zeros((32, 1280), np.float32)}
      )
  assert (tmp_path / feature_cache.CACHE_DIR / "train.npy").exists()
  assert feature_cache.load(tmp_path, key) is None
  calls = _count_computes(monkeypatch, tmp_path)
  result = run_lib.run(c, tmp_path)
  assert len(calls) == 1 and result["epochs"] == 1
  assert feature_cache.load(tmp_path, key) is not None
