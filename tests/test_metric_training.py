"""Stage 1 by a metric-learning loss: the step itself, the per-group rates, exact resume, and the CLI."""

from __future__ import annotations

import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (
  REPO,
  Jsim,
  assert_bitwise_equal,
  checkpoint_state,
  checkpoint_steps,
  predict_agrees_with_the_stored_embeddings,
  run_jsim,
  worker_env,
  xla_flags,
)
from jsim import configs, losses, models
from jsim.data.samplers import MPerClassSampler
from jsim.models.metric_model import MetricModel
from jsim.train import classifier, metric, schedule
from jsim.train.loop import zero_sums
from jsim.train.step import train_step
from jsim.train.state import TrainState

SIZE = 16


def _tiny_config(loss="cross_entropy", **cl):
  c = configs.base_config()
  c.model.name, c.model.init, c.model.dtype = "resnet_tiny", "random", "float32"
  c.classifier.input_size = SIZE
  c.classifier.augment.crop_size = SIZE - 2
  c.classifier.loss = loss
  c.classifier.update(cl)
  return c


def test_cross_entropy_stays_the_protocol():
  c = _tiny_config()
  model = classifier.build_classifier(c, 5)
  assert not isinstance(model, MetricModel)
  plain = schedule.make_optimizer(learning_rate=0.01, momentum=0.8, nesterov=True)
  params = {"w": jnp.ones(3)}
  assert jax.tree.structure(classifier.make_optimizer(c.classifier).init(params)) == jax.tree.structure(
    plain.init(params)
  )
  identity = classifier.stage_identity(c)["classifier"]
  assert not set(metric.METRIC_FIELDS) & set(identity)  # old workdirs keep their identity
  c.classifier.loss = "triplet"
  assert classifier.stage_identity(c)["classifier"]["loss"] == "triplet"


def test_the_loss_label_names_the_miner():
  c = _tiny_config()
  assert metric.loss_label(c.classifier) == "cross_entropy"
  configs.use_metric_loss(c, "multi_similarity")
  assert metric.loss_label(c.classifier) == "multi_similarity"
  c.classifier.loss_hparams.multi_similarity.miner = "multi_similarity"
  assert metric.loss_label(c.classifier) == "multi_similarity + multi_similarity miner"


def test_group_rates_and_halving():
  c = _tiny_config("proxy_anchor", learning_rate=0.01, head_learning_rate=0.1, loss_learning_rate=1.0, momentum=0.0)
  tx = classifier.make_optimizer(c.classifier)
  params = {"backbone": {"w": jnp.ones(2)}, "embedding_head": {"kernel": jnp.ones(2)}, "loss": {"proxies": jnp.ones(2)}}
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  assert {k: float(v[next(iter(v))][0]) for k, v in updates.items()} == pytest.approx(
    {"backbone": -0.01, "embedding_head": -0.1, "loss": -1.0}
  )
  state = schedule.set_learning_rate(state, schedule.get_learning_rate(state) / 2)  # the halving rule
  updates, _ = tx.update(grads, state, params)
  assert float(updates["loss"]["proxies"][0]) == pytest.approx(-0.5)
  with pytest.raises(ValueError, match="classifier.head_learning_rate=-1.0 must be > 0"):
    classifier.make_optimizer(_tiny_config("triplet", head_learning_rate=-1.0).classifier)


# One loss per family (the losses themselves are checked against PML in test_losses.py).
@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["triplet", "arcface", "pair_ms"])
def test_train_step_updates_backbone_head_and_loss(loss_name):
  num_classes = 4
  c = _tiny_config(loss_name, embedding_dim=8, loss_learning_rate=0.1)
  if loss_name == "triplet":
    c.classifier.loss_hparams.triplet.miner = "batch_hard"
  model = classifier.build_classifier(c, num_classes)
  assert isinstance(model, MetricModel) and model.embedding_dim == 8
  variables = classifier.initial_variables(c, model, num_classes, SIZE)
  assert ("loss" in variables["params"]) == (losses.build(loss_name).param_name is not None)
  tx = classifier.make_optimizer(c.classifier)
  state = TrainState.create(variables, tx)
  labels = np.repeat(np.arange(num_classes), 3)
  images = np.random.default_rng(0).integers(0, 255, (len(labels), SIZE, SIZE, 3), np.uint8)
  step = jax.jit(
    lambda s, x, y, sums: train_step(
      s,
      {"images": x, "labels": y},
      sums,
      model=model,
      loss=model.loss,
      tx=tx,
      mean=(120.0,) * 3,
      std=(60.0,) * 3,
      input_size=SIZE,
      augment_config=c.classifier.augment,
      seed_key=jax.random.PRNGKey(0),
    )
  )
  new, sums = step(state, jnp.asarray(images), jnp.asarray(labels, jnp.int32), zero_sums())
  assert int(new.step) == 1 and np.isfinite(float(sums["loss_sum"])) and float(sums["count"]) == len(labels)
  assert 0 <= float(sums["correct"]) <= len(labels)
  for part in new.params:
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params[part], state.params[part]))
    assert any(changed), f"{part} did not move"
  # The embedding the later stages see is the head's, L2-normalised.
  _, e = jax.jit(lambda v, x: model.apply(v, x, train=False))(new.variables, jnp.zeros((2, SIZE, SIZE, 3)))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(e), axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_torchvision_backbone_goes_under_the_wrapper(monkeypatch):
  c = _tiny_config("proxy_anchor")
  c.model.init = "torchvision"
  backbone = models.build("resnet_tiny", num_classes=3)
  x = jnp.zeros((1, SIZE, SIZE, 3))
  ported = jax.jit(lambda k, x: backbone.init({"params": k, "dropout": k}, x, train=False))(jax.random.key(5), x)
  monkeypatch.setattr(models, "from_torchvision", lambda *a, **k: ported)
  model = classifier.build_classifier(c, 3)
  variables = classifier.initial_variables(c, model, 3, SIZE)
  assert_bitwise_equal(
    jax.tree.map(np.asarray, variables["params"]["backbone"]), jax.tree.map(np.asarray, ported["params"])
  )
  assert variables["params"]["loss"]["proxies"].shape == (3, model.backbone.embedding_dim)


def test_sampler_batches_feed_the_plan_from_seed_and_epoch():
  labels = np.repeat(np.arange(6), 7)
  s = MPerClassSampler(labels, m=2, batch_size=6)
  assert s.num_batches == 7
  a, b = np.asarray(s.epoch(0, 1)), np.asarray(s.epoch(0, 1))
  np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- through the command line

# Pair family, 2 epochs of 7 steps, mid-epoch checkpoints every 4 steps; the reference run goes
# on through every stage, with the distance model as stage 2.
METRIC1 = [
  "--config=configs/tiny.py",
  "--config.classifier.loss=contrastive",
  "--config.classifier.sampler_m=2",
  "--config.classifier.embedding_dim=8",
  "--config.classifier.num_epochs=2",
  "--config.classifier.checkpoint_every_steps=4",
  "--config.similarity.model=distance",
]
METRIC1_STEPS = 14


def test_metric_run_resumes_bitwise_and_every_stage_follows(jsim_cache, tmp_path, monkeypatch):
  """SIGINT during the first step saves step 1; the resumed run ends bitwise where an uninterrupted
  one does. The uninterrupted one runs every stage (stage 2: the calibrated distance) and predict."""
  ref = tmp_path / "ref"
  proc = run_jsim([*METRIC1, f"--workdir={ref}"], jsim_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  w = tmp_path / "B"
  args = [*METRIC1, "--config.stage=classifier", f"--workdir={w}"]
  run = Jsim(args, jsim_cache)
  run.wait_for_text("stage 1 epoch 1/2")
  run.send(signal.SIGINT)
  assert run.finish() == 0, run.output[-3000:]
  assert checkpoint_steps(w / "stage1" / "checkpoints") == [1]
  run = Jsim(args, jsim_cache)
  assert run.finish() == 0, run.output[-3000:]
  assert "resumed from step 1 (epoch 1, batch 1/" in run.output  # numbered as the stop message
  assert_bitwise_equal(
    checkpoint_state(w / "stage1" / "checkpoints", METRIC1_STEPS),
    checkpoint_state(ref / "stage1" / "checkpoints", METRIC1_STEPS),
  )
  rows = lambda d: [
    {k: v for k, v in json.loads(line).items() if k != "items_per_s"}
    for line in (d / "stage1" / "metrics.jsonl").read_text().splitlines()
  ]
  assert rows(w) == rows(ref) and len(rows(ref)) == 2
  # The same command once more: stage 1 is finished and skipped, named by its MAP@R (it has no accuracy).
  proc = run_jsim(args, jsim_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "stage 1 already finished (2 epochs, test MAP@R " in proc.stderr, proc.stderr[-3000:]
  result = json.loads((ref / "stage1" / "result.json").read_text())
  assert result["loss"] == "contrastive" and 0 <= result["test_map@r"] <= 1
  assert result["best_val_map@r"] == max(r["val_accuracy"] for r in rows(ref))
  _check_every_stage(ref, "contrastive", METRIC1, jsim_cache, monkeypatch)


@pytest.mark.parametrize(
  "args",
  [
    [
      "--config.classifier.loss=proxy_anchor",
      "--config.classifier.embedding_dim=8",
      "--config.classifier.sampler=uniform",
      "--config.classifier.loss_learning_rate=0.1",
    ],
    ["--config.classifier.loss=pair_ms", "--config.classifier.sampler_m=3"],
  ],
  ids=["proxy", "pair_ms"],
)
def test_every_stage_runs_after_metric_learning(args, jsim_cache, tmp_path, monkeypatch):
  w = tmp_path / "run"
  proc = run_jsim(["--config=configs/tiny.py", *args, f"--workdir={w}"], jsim_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  _check_every_stage(w, args[0].split("=")[1], args, jsim_cache, monkeypatch)


def _check_every_stage(w, loss, args, jsim_cache, monkeypatch):
  """The report of a metric-learning workdir names the method and has the field's figures; predict works."""
  report = json.loads((w / "report.json").read_text())
  assert "all (1-5)" in (w / "report.md").read_text()
  assert report["extra"]["stage1"]["loss"] == loss
  assert 0 <= report["extra"]["stage1"]["test_map@r"] <= 1
  meta = json.loads((w / "embeddings" / "meta.json").read_text())
  assert meta["dim"] == (8 if "--config.classifier.embedding_dim=8" in args else models.embedding_dim("resnet_tiny"))
  assert 0 <= report["auc"]["overall"] <= 1
  assert report["method"]["stage1_loss"] == loss
  distance_model = "--config.similarity.model=distance" in args
  assert report["method"]["similarity"].startswith("distance (cosine)" if distance_model else "Ms on l1")
  stage2 = report["extra"]["stage2"]
  assert (stage2.get("model") == "distance") == distance_model
  if distance_model:  # the calibration: P(same) = sigmoid(scale d + bias), its 0.5 point
    assert stage2["distance_at_0.5"] == pytest.approx(-stage2["bias"] / stage2["scale"])
  er = report["embedding_retrieval"]
  assert er["distance"] == ("l2" if loss == "pair_ms" else "cosine")
  for part in ("seen", "unseen"):
    assert set(er[part]) == {"precision@1", "r_precision", "map@r", "nmi", "num_queries"}
  # The unseen test images against all test images: the same queries, ranked among more images.
  assert set(er["unseen_in_all"]) == {"precision@1", "r_precision", "map@r", "num_queries"}
  assert er["unseen_in_all"]["num_queries"] == er["unseen"]["num_queries"]
  # The seen test images' MAP@R is stage 1's test figure, computed the same way.
  assert er["seen"]["map@r"] == pytest.approx(report["extra"]["stage1"]["test_map@r"], abs=1e-6)
  b = report["balanced_unseen_accuracy"]["at_0.5"]
  cases = {c["case"]: c["accuracy_at_0.5"] for c in report["cases"]}
  assert b == pytest.approx((cases[4] + cases[5]) / 2)
  monkeypatch.setenv("JSIM_CACHE", str(jsim_cache))  # the runs' decoded data
  predict_agrees_with_the_stored_embeddings(w, stage2)


# ---------------------------------------------------------------------------- 4 devices == 1 device


def _four_devices() -> dict:
  """3 metric-learning steps sharded over 4 devices versus 1 device, and versus 1 device from initial
  parameters moved by 1e-6 of themselves (float32's noise floor for these steps); the validation MAP@R of
  the same state on both meshes (JSON)."""
  from jax.sharding import Mesh

  from jsim import parallel
  from jsim.train import loop
  from conftest import fake_stage1_data, tiny_config

  jax.config.update("jax_default_matmul_precision", "highest")
  assert jax.device_count() == 4
  config = tiny_config(
    **{
      "classifier.batch_size": 16,
      "classifier.loss": "proxy_anchor",
      "classifier.embedding_dim": 8,
      "classifier.sampler_m": 4,
    }
  )
  data = fake_stage1_data()
  model = classifier.build_classifier(config, 6)
  variables = jax.tree.map(np.asarray, classifier.initial_variables(config, model, 6, 32))
  rng = np.random.default_rng(0)
  moved = jax.tree.map(lambda a: (a * (1 + 1e-6 * rng.standard_normal(a.shape))).astype(a.dtype), variables)
  tx = classifier.make_optimizer(config.classifier)
  one = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))
  runs = {}
  for name, mesh, start in (("four", parallel.make_mesh(), variables), ("one", one, variables), ("moved", one, moved)):
    state = parallel.put_replicated(TrainState.create(start, tx), mesh)
    plan = classifier.Stage1Plan(config, data, model, tx, mesh)
    plan.begin_epoch(1)
    sums, params = loop.zero_sums(), []
    for b in range(3):
      state, sums = plan.train_step(state, 1, b, sums)
      params.append(jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))
    runs[name] = {"params": params, "loss_sum": float(sums["loss_sum"]), "plan": plan, "state": state}

  def rel(a, b):  # max |a - b| over a leaf, relative to the leaf's largest |b|, worst leaf
    f = lambda x, y: float(np.abs(np.asarray(x, np.float64) - y).max() / max(np.abs(np.asarray(y)).max(), 1e-12))
    return max(jax.tree.leaves(jax.tree.map(f, a, b)))

  one_params = runs["one"]["params"]  # params and batch_stats after each step
  four_state = jax.device_get(runs["four"]["state"])
  return {
    "four_vs_one": [rel(p, q) for p, q in zip(runs["four"]["params"], one_params)],
    "moved_vs_one": [rel(p, q) for p, q in zip(runs["moved"]["params"], one_params)],
    "loss_sum": [runs["four"]["loss_sum"], runs["one"]["loss_sum"]],
    "val": [
      runs["four"]["plan"].evaluate(runs["four"]["state"])["accuracy"],
      runs["one"]["plan"].evaluate(parallel.put_replicated(four_state, one))["accuracy"],
    ],
  }


@pytest.mark.default_codegen
@pytest.mark.slow
def test_four_devices_match_one_device_for_a_metric_loss():
  import subprocess
  import sys

  proc = subprocess.run(
    [sys.executable, __file__, "four_devices"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=worker_env(XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4")),
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  # The loss is one over the global batch: computed per device (4 images, one class each) the first step
  # would move the parameters differently at once, by far more than reduction order does (7e-6 of a leaf).
  np.testing.assert_allclose(*r["loss_sum"], rtol=1e-5, err_msg=str(r))
  assert r["four_vs_one"][0] <= 1e-4, r
  # Later steps amplify any float32 difference (exp(32 cos) and the L2 normalisation): 1e-6 of the initial
  # parameters on one device grew to 1.5e-2 of a leaf after 3 steps, as 4 devices' reduction order did (and
  # flipped the validation MAP@R the same way, 0.254 -> 0.203, on one machine). So 4 devices may differ from
  # 1 by no more than that noise floor does, and the same state has the same MAP@R on either mesh.
  for step, (four, moved) in enumerate(zip(r["four_vs_one"], r["moved_vs_one"]), 1):
    assert four <= 10 * max(moved, 1e-5), (step, r)
  assert r["val"][0] == pytest.approx(r["val"][1], abs=1e-6), r


if __name__ == "__main__" and len(__import__("sys").argv) > 1 and __import__("sys").argv[1] == "four_devices":
  print(json.dumps(_four_devices()))


def test_bad_loss_is_one_line_from_the_cli(jsim_main, tmp_path):
  w = tmp_path / "w"
  proc = jsim_main(["--config=configs/tiny.py", "--config.classifier.loss=tripplet", f"--workdir={w}"])
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  assert "classifier.loss='tripplet': expected 'cross_entropy' or one of arcface" in proc.stderr
  assert not w.exists() or not any(w.iterdir())  # a refused run leaves nothing behind


@pytest.mark.parametrize(
  "overrides,expect",
  [
    ({"loss": "nope"}, "classifier.loss='nope': expected 'cross_entropy' or one of arcface"),
    ({"loss": "triplet", "sampler_m": 5}, "classifier.sampler_m=5: must be >= 1 and divide classifier.batch_size=64"),
    ({"loss": "triplet", "sampler": "random"}, "classifier.sampler='random'"),
    ({"loss": "triplet", "embedding_dim": -1}, "classifier.embedding_dim=-1"),
    ({"loss": "proxy_anchor", "loss_learning_rate": 0.0}, "classifier.loss_learning_rate=0.0 must be > 0"),
    ({"sampler": "m_per_class"}, "needs a metric-learning classifier.loss"),
  ],
)
def test_config_errors_name_the_key(overrides, expect):
  c = _tiny_config()
  c.classifier.update(overrides)
  with pytest.raises(ValueError, match=expect.replace("(", r"\(").replace(")", r"\)")):
    metric.check_config(c.classifier)
  c = _tiny_config("triplet")
  c.classifier.loss_hparams.triplet.miner = "hardest"
  with pytest.raises(ValueError, match="classifier.loss_hparams.triplet: loss hyperparameter miner='hardest'"):
    metric.check_config(c.classifier)
  c.classifier.loss_hparams.triplet.miner = "triplet_margin"
  c.classifier.miner_hparams.triplet_margin.type_of_triplets = "semi_hard"
  with pytest.raises(
    ValueError, match="classifier.miner_hparams.triplet_margin: miner hyperparameter type_of_triplets="
  ):
    metric.check_config(c.classifier)


@pytest.mark.parametrize("name", ["metric", "cub200", "cars196", "sop"])
def test_experiment_configs_build(name):
  from conftest import config_module

  module = config_module(name)
  for loss in ["cross_entropy", *losses.available()]:
    c = module.get_config(f"loss={loss}")
    assert c.classifier.loss == loss
    metric.check_config(c.classifier)
  assert module.get_config().classifier.loss == "multi_similarity"
  with pytest.raises(ValueError, match=f"configs/{name}.py:los=x: expected loss=..."):
    module.get_config("los=x")


@pytest.mark.default_codegen
@pytest.mark.slow
def test_stream_pipeline_trains_as_the_device_pipeline():
  from jax.sharding import Mesh

  from jsim import parallel
  from jsim.train import loop
  from conftest import fake_stage1_data, tiny_config

  data = fake_stage1_data(num_images=48, size=16)
  mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))
  out = {}
  for pipeline in ("device", "stream"):
    config = tiny_config(
      **{
        "classifier.batch_size": 12,
        "classifier.loss": "multi_similarity",
        "classifier.sampler_m": 3,
        "classifier.input_size": SIZE,
        "classifier.augment.crop_size": SIZE - 2,
        "data.pipeline": pipeline,
      }
    )
    model = classifier.build_classifier(config, 6)
    tx = classifier.make_optimizer(config.classifier)
    variables = jax.tree.map(np.asarray, classifier.initial_variables(config, model, 6, SIZE))
    state = parallel.put_replicated(TrainState.create(variables, tx), mesh)
    plan = classifier.Stage1Plan(config, data, model, tx, mesh)
    plan.begin_epoch(2)
    sums = loop.zero_sums()
    for b in range(plan.num_batches(2)):
      state, sums = plan.train_step(state, 2, b, sums)
    out[pipeline] = (jax.device_get(state.params), plan.evaluate(state)["accuracy"])
  assert_bitwise_equal(out["device"][0], out["stream"][0])
  assert out["device"][1] == out["stream"][1]
