"""Many devices and many processes, on CPU.

* 4 virtual CPU devices (--xla_force_host_platform_device_count=4, in a subprocess
  since the flag must be set before JAX starts): a sharded stage-1 step, stage-2 step,
  embedding and pair evaluation give what one device gives. BatchNorm statistics are
  global under jit, so with 4 images per device the sharded step would differ by far
  more than the tolerance if they were per-device.
* A batch that does not divide by the device count: a one-line error.
* bf16 compute: float32 parameters, bf16 convolutions, close to the float32 step.
* 2 processes on localhost (JAX's distributed runtime, gloo CPU collectives) run the
  tiny config through the real command line: one checkpoint set, one report.

The worker half of this file runs as `python tests/test_parallel.py four_devices`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, fake_stage1_data, tiny_config, worker_env, xla_flags

REPO = Path(__file__).resolve().parents[1]
# Sharded and single-device float32 steps differ only in the order of reductions (and
# in how XLA's CPU convolutions block a batch of 4 versus 16): |a - b| <= ATOL + RTOL |b|
# (measured: within 0.1 of it). Per-device BatchNorm statistics (4 images a device) would
# miss it by orders of magnitude.
RTOL, ATOL = 1e-3, 1e-6


def initial_variables(config, num_classes: int = 6) -> dict:
  """The seed's initial variables of the config's backbone, as host (numpy) arrays."""
  import jax
  from jsim.train import classifier

  model = classifier.build_classifier(config, num_classes)
  return jax.tree.map(
    np.asarray, classifier.initial_variables(config, model, num_classes, config.classifier.input_size)
  )


def stage1_steps(
  config, data, mesh, num_steps: int, variables: dict, *, evaluate: bool = False, num_classes: int = 6
) -> dict:
  """num_steps real Stage1Plan steps from `variables`; host copies of the results."""
  import jax
  from jsim import parallel
  from jsim.train import classifier, loop
  from jsim.train.state import TrainState

  model = classifier.build_classifier(config, num_classes)
  tx = classifier.make_optimizer(config.classifier)
  # From host copies: the step donates its state, which must not alias `variables`.
  state = parallel.put_replicated(TrainState.create(variables, tx), mesh)
  plan = classifier.Stage1Plan(config, data, model, tx, mesh)
  plan.begin_epoch(1)
  sums = loop.zero_sums()
  for b in range(num_steps):
    state, sums = plan.train_step(state, 1, b, sums)
  return {
    "params": jax.device_get(state.params),
    "batch_stats": jax.device_get(state.batch_stats),
    "sums": jax.device_get(sums),
    "val": plan.evaluate(state) if evaluate else None,
  }


# ---------------------------------------------------------------------------
# The 4-device worker (a subprocess: XLA_FLAGS must be set before JAX starts).


def closeness(a, b) -> float:
  """max |a - b| / (ATOL + RTOL |b|) over two pytrees: <= 1 means allclose."""
  import jax

  f = lambda x, y: float(
    np.max(
      np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)) / (ATOL + RTOL * np.abs(np.asarray(y, np.float64)))
    )
  )
  return max(jax.tree.leaves(jax.tree.map(f, a, b)))


def _four_devices() -> dict:
  """Sharded (4 devices) versus one device; returns the measured differences as JSON."""
  import jax
  from jax.sharding import Mesh

  jax.config.update("jax_default_matmul_precision", "highest")
  from jsim import parallel, validate
  from jsim.data import pairs as pairs_lib
  from jsim.evaluate import pairwise
  from jsim.train import batching as embed
  from jsim.models.similarity import make_prob_fn
  from jsim.train import classifier, loop, schedule, similarity

  assert jax.device_count() == 4, jax.devices()
  mesh4 = parallel.make_mesh()
  mesh1 = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))
  out = {"devices": jax.device_count()}
  config = tiny_config()

  # Stage 1: 3 steps of batch 16 (4 images per device), then the validation pass. (With
  # 1-2 images per device, train-mode BatchNorm over a handful of values -- layer 4 is
  # 1x1 -- amplifies rounding differences past any fixed tolerance; VGG, without
  # BatchNorm, matches to 1e-7 even then.)
  data = fake_stage1_data()
  variables = initial_variables(config)
  # 'rotate_first', not the default 'paper': paper's first batch (bitwise equal on 4 and 1 devices, checked below)
  # puts one pre-ReLU value within rounding of 0 (layer3_0.bn1: +6.3e-7 on 1 device, -2.7e-7 on 4), so the ReLU
  # gates its gradient differently and train-mode BatchNorm spreads that to ~1 % of every earlier gradient -- a
  # kink of the model, not a sharding error (no max-pool ties). rotate_first's smallest |pre-ReLU| is 1.7e-5.
  cfg16 = tiny_config(**{"classifier.batch_size": 16, "classifier.augment.order": "rotate_first"})
  s4, s1 = (stage1_steps(cfg16, data, m, 3, variables, evaluate=True) for m in (mesh4, mesh1))
  moved = max(
    jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), s1["params"], variables["params"]))
  )
  out["stage1"] = {
    "params": closeness(s4["params"], s1["params"]),
    "batch_stats": closeness(s4["batch_stats"], s1["batch_stats"]),
    "loss_sum": [float(s4["sums"]["loss_sum"]), float(s1["sums"]["loss_sum"])],
    "count": [float(s4["sums"]["count"]), float(s1["sums"]["count"])],
    "val": [s4["val"], s1["val"]],
    "params_moved": moved,
  }

  # The augmentation itself (default order, key traced as in the step): bitwise equal when sharded.
  from jax.sharding import NamedSharding, PartitionSpec
  from jsim.data import augment

  aug_cfg = config.classifier.augment
  images = data.train_set.images[:16]

  def augmented(step_no, imgs):
    key = jax.random.fold_in(jax.random.PRNGKey(0), step_no)
    return augment.augment(key, imgs, data.mean, data.std, 32, aug_cfg)

  batch = NamedSharding(mesh4, PartitionSpec(parallel.DATA_AXIS))
  diffs = []
  for step_no in range(3):
    a = jax.jit(augmented)(np.int32(step_no), images)
    b = jax.jit(augmented, out_shardings=batch)(np.int32(step_no), jax.device_put(images, batch))
    diffs.append(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))))
  out["augment"] = {"order": aug_cfg.order, "max_diff": max(diffs)}

  # Embeddings of the same images.
  model = classifier.build_classifier(config, 6)
  embs = [
    embed.embed_images(
      model,
      variables,
      parallel.put_replicated(data.train_set.images, m),
      np.arange(50),
      mean=data.mean,
      std=data.std,
      input_size=32,
      batch_size=16,
      mesh=m,
    )
    for m in (mesh4, mesh1)
  ]
  out["embed"] = {"shape": list(embs[0].shape), "diff": closeness(embs[0], embs[1])}

  # Stage 2: 3 steps of batch 16 with dropout, then the validation pairs.
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(6), 10).astype(np.int32)
  emb = rng.normal(size=(60, 32)).astype(np.float32)
  smodel = similarity.build_similarity(config, 32)
  stx = schedule.optimizer_from(config.similarity)
  res = []
  for m in (mesh4, mesh1):
    state = parallel.put_replicated(jax.tree.map(np.asarray, similarity.init_state(config, smodel, 32, stx)), m)
    plan = similarity.SimilarityPlan(config, emb, labels, smodel, stx, m)
    plan.begin_epoch(1)
    sums = loop.zero_sums()
    for b in range(3):
      state, sums = plan.train_step(state, 1, b, sums)
    res.append({"params": jax.device_get(state.params), "sums": jax.device_get(sums), "val": plan.evaluate(state)})
  out["stage2"] = {
    "params": closeness(res[0]["params"], res[1]["params"]),
    "loss_sum": [float(r["sums"]["loss_sum"]) for r in res],
    "val": [r["val"] for r in res],
  }

  # The streaming evaluator: sampled and exhaustive pairs, chunks split over 4 devices.
  params = res[1]["params"]
  prob_fn = make_prob_fn(smodel)
  test_emb = rng.normal(size=(40, 32)).astype(np.float32)
  test_labels = np.repeat(np.arange(8), 5).astype(np.int32)
  seen = np.arange(8) < 6
  test_pairs = pairs_lib.sample_test_pairs(jax.random.key(3), pairs_lib.build_class_index(test_labels, 8), seen, 2, 10)
  ev = {}
  for mode in ("sampled", "exhaustive"):
    r4, r1 = (
      pairwise.evaluate_pairs(
        prob_fn,
        params,
        parallel.put_replicated(test_emb, m) if m else test_emb,
        test_labels,
        seen,
        pairs=test_pairs,
        mode=mode,
        chunk_size=64,
        num_bins=50,
        mesh=m,
      )
      for m in (mesh4, None)
    )
    ev[mode] = {f: [getattr(r, f).tolist() for r in (r4, r1)] for f in ("count", "correct_05", "hist_pos", "hist_neg")}
  out["evaluator"] = ev

  # Batches that do not divide by 4 devices: refused before anything compiles.
  errors = {}
  bad = tiny_config(**{"classifier.batch_size": 6})
  for name, fn in (
    ("validate", lambda: validate.check_config(bad)),
    ("plan", lambda: classifier.Stage1Plan(bad, data, model, classifier.make_optimizer(bad.classifier), mesh4)),
    (
      "embed",
      lambda: embed.embed_images(
        model, variables, None, np.arange(5), mean=data.mean, std=data.std, input_size=32, batch_size=6, mesh=mesh4
      ),
    ),
  ):
    try:
      fn()
      errors[name] = None
    except ValueError as e:
      errors[name] = str(e)
  out["errors"] = errors
  return out


# ---------------------------------------------------------------------------
# Tests.


@pytest.mark.slow
def test_four_devices_match_one_device():
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
  assert r["devices"] == 4

  s1 = r["stage1"]
  assert s1["params_moved"] > 1e-4  # the steps did something
  assert s1["params"] <= 1 and s1["batch_stats"] <= 1, s1
  assert s1["count"] == [48.0, 48.0]
  np.testing.assert_allclose(*s1["loss_sum"], rtol=1e-5)
  a, b = s1["val"]
  assert a["count"] == b["count"] == 16 and a["accuracy"] == b["accuracy"]
  assert abs(a["loss"] - b["loss"]) < 1e-5

  assert r["embed"]["shape"] == [50, 256] and r["embed"]["diff"] <= 1, r["embed"]
  assert r["augment"] == {"order": "paper", "max_diff": 0.0}

  s2 = r["stage2"]
  assert s2["params"] <= 1, s2
  np.testing.assert_allclose(*s2["loss_sum"], rtol=1e-5)
  a, b = s2["val"]
  assert a["count"] == b["count"] and abs(a["accuracy"] - b["accuracy"]) < 1e-9

  for mode, ev in r["evaluator"].items():
    assert ev["count"][0] == ev["count"][1], mode
    assert sum(ev["count"][0]) == (40 * 39 // 2 if mode == "exhaustive" else 8 * 7 * 2 + 8 * 10)
    assert ev["correct_05"][0] == ev["correct_05"][1], mode
    # A score a rounding error away from a bin edge may change bins: allow a handful.
    for h in ("hist_pos", "hist_neg"):
      assert np.abs(np.subtract(*ev[h])).sum() <= 4, (mode, h)

  for name, message in r["errors"].items():
    assert message and "batch_size=6 is not divisible by the 4 devices" in message, (name, message)


def test_bad_batch_is_one_line_from_the_cli(tmp_path):
  # The real command line with 4 devices and classifier.batch_size=6: refused, no traceback.
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "jsim.main",
      f"--config={TINY}",
      f"--workdir={tmp_path / 'w'}",
      "--config.classifier.batch_size=6",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=worker_env(XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"), JSIM_CACHE=str(tmp_path / "cache")),
  )
  assert proc.returncode == 1
  assert "jsim: classifier.batch_size=6 is not divisible by the 4 devices" in proc.stderr
  assert "Traceback" not in proc.stderr


def _one_step_updates(model_name: str) -> dict:
  """{dtype: (flat parameter update of one stage-1 step, mean loss, state)} for bf16 and float32 compute."""
  import jax
  from jsim import parallel

  data = fake_stage1_data()
  variables = initial_variables(tiny_config(**{"model.name": model_name}))  # float32 whatever the compute dtype
  out = {}
  for dtype in ("bfloat16", "float32"):
    r = stage1_steps(
      tiny_config(**{"model.name": model_name, "model.dtype": dtype}), data, parallel.make_mesh(), 1, variables
    )
    delta = jax.tree.map(lambda p, p0: (p - p0).astype(np.float64), r["params"], variables["params"])
    out[dtype] = (
      np.concatenate([x.ravel() for x in jax.tree.leaves(delta)]),
      float(r["sums"]["loss_sum"] / r["sums"]["count"]),
      r,
    )
  return out


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params():
  import jax
  import jax.numpy as jnp
  from jsim import models, parallel
  from jsim.train import classifier

  assert models.compute_dtype("auto") == parallel.default_compute_dtype() == jnp.float32  # CPU default

  # The tiny config's ResNet: a real stage-1 step (augmentation included) with bf16 compute.
  runs = _one_step_updates("resnet_tiny")
  for leaf in jax.tree.leaves((runs["bfloat16"][2]["params"], runs["bfloat16"][2]["batch_stats"])):
    assert leaf.dtype == np.float32

  # Its convolutions and dense layers compute in bf16 (the jaxpr of a train-mode forward) ...
  config = tiny_config(**{"model.dtype": "bfloat16"})
  model = classifier.build_classifier(config, 6)
  variables = initial_variables(config)
  fwd = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
  x = jnp.zeros((2, 32, 32, 3), jnp.float32)
  eqns = [
    e
    for e in jax.make_jaxpr(fwd)(variables, x).jaxpr.eqns
    if e.primitive.name in ("conv_general_dilated", "dot_general")
  ]
  assert len(eqns) >= 5
  assert {str(v.aval.dtype) for e in eqns for v in e.invars} == {"bfloat16"}
  (logits, emb), _ = jax.eval_shape(fwd, variables, x)
  assert logits.dtype == emb.dtype == jnp.float32  # ... and the outputs are cast back

  # Close to float32: the loss to bf16 rounding. The update direction is only roughly the
  # same (measured cosine ~0.92): train-mode BatchNorm over 8 values (layer 4 is 1x1 at this
  # size) turns bf16's ~0.4 % rounding into tens of percent on the gradient of a tiny net.
  u16, u32 = runs["bfloat16"][0], runs["float32"][0]
  assert abs(runs["bfloat16"][1] - runs["float32"][1]) < 0.02, (runs["bfloat16"][1], runs["float32"][1])
  assert u16 @ u32 / (np.linalg.norm(u16) * np.linalg.norm(u32)) > 0.8

  # Without BatchNorm (the tiny VGG), one bf16 step is the float32 step to ~1 %.
  runs = _one_step_updates("vgg_tiny")
  u16, u32 = runs["bfloat16"][0], runs["float32"][0]
  assert np.linalg.norm(u32) > 0
  assert np.linalg.norm(u16 - u32) / np.linalg.norm(u32) < 0.03
  assert abs(runs["bfloat16"][1] - runs["float32"][1]) < 0.01


# ---------------------------------------------------------------------------
# The local launcher on its own (plain Python children: fast).

LAUNCHER = REPO / "launch" / "local_multiprocess.py"


def _launch(child: str, *options: str) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, str(LAUNCHER), *options, "--", sys.executable, "-c", child],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=worker_env(),
  )


def test_launcher_sets_the_environment_and_propagates_exit_codes():
  child = (
    "import os, sys; e = os.environ; print('id', e['JSIM_PROCESS_ID'], 'of', e['JSIM_NUM_PROCESSES'], "
    "e['JSIM_COORDINATOR'].split(':')[0], e.get('CUDA_VISIBLE_DEVICES')); "
    "sys.exit(3 if e['JSIM_PROCESS_ID'] == '2' else 0)"
  )
  proc = _launch(child, "--num_processes=3", "--gpus_per_process=2")
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 3, out
  for i in range(3):
    assert f"[{i}] id {i} of 3 127.0.0.1 {2 * i},{2 * i + 1}" in out, out


def test_launcher_stops_the_others_when_one_fails():
  # Process 1 fails at once; process 0 would wait forever (as in a collective).
  child = "import os, sys, time; sys.exit(5) if os.environ['JSIM_PROCESS_ID'] == '1' else time.sleep(120)"
  proc = _launch(child, "--num_processes=2", "--grace_s=1")
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 5, out


def test_launcher_forwards_sigterm():
  import signal
  import time

  child = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (print('checkpoint', flush=True), "
    "sys.exit(0))); print('ready', flush=True); time.sleep(120); sys.exit(1)"
  )
  proc = _launch(child, "--num_processes=2")
  seen = []
  deadline = time.monotonic() + 60
  while len(seen) < 2 and time.monotonic() < deadline:  # both children up and their handlers set
    line = proc.stdout.readline()
    if "ready" in line:
      seen.append(line)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, out
  assert "[0] checkpoint" in out and "[1] checkpoint" in out, out


@pytest.mark.slow
def test_two_processes_train_and_write_one_checkpoint_set(tmp_path):
  """2 JAX processes on localhost (gloo) run every stage of the tiny config via the real CLI."""
  workdir = tmp_path / "w"
  proc = subprocess.run(
    [
      sys.executable,
      str(LAUNCHER),
      "--num_processes=2",
      "--grace_s=20",
      "--",
      sys.executable,
      "-m",
      "jsim.main",
      f"--config={TINY}",
      f"--workdir={workdir}",
      "--config.classifier.num_epochs=1",
      "--config.similarity.num_epochs=1",
      "--config.evaluation.retrieval=False",
      # 42 train images / 6 = 7 equal batches: one compiled step (6 divides by 2 devices).
      "--config.classifier.batch_size=6",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=worker_env(JSIM_CACHE=str(tmp_path / "cache")),
  )
  log = proc.stdout + proc.stderr
  assert proc.returncode == 0, log[-4000:]
  # Both processes joined one runtime of 2 devices.
  assert "[0] " in log and "[1] " in log
  assert "process 0 of 2, 1 local / 2 global devices" in log, log[-3000:]
  assert "process 1 of 2, 1 local / 2 global devices" in log, log[-3000:]
  # The later stages ran too (each process waits for the files process 0 writes), and
  # the report was printed and written once.
  assert log.count("Five-case test accuracy") == 1, log[-3000:]
  assert (workdir / "report.json").exists() and (workdir / "embeddings" / "meta.json").exists()
  stage2 = sorted(p.name for p in (workdir / "stage2" / "checkpoints").iterdir())
  assert len(stage2) == 1 and stage2[0].isdigit(), stage2
  assert len((workdir / "stage2" / "metrics.jsonl").read_text().splitlines()) == 1

  stage = workdir / "stage1"
  # metrics and the result written once (by process 0), not once per process.
  rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in rows] == [1]
  assert rows[0]["step"] == 7
  assert len(list((stage / "tb").glob("events.out.tfevents.*"))) == 1
  result = json.loads((stage / "result.json").read_text())
  assert result["epochs"] == 1 and result["best_step"] == 7

  # One checkpoint set: step 7 only, complete, no temporary or per-process folders.
  entries = sorted(p.name for p in (stage / "checkpoints").iterdir())
  assert entries == ["7"], entries
  items = {p.name for p in (stage / "checkpoints" / "7").iterdir()}
  assert {"_CHECKPOINT_METADATA", "state"} <= items and not any("tmp" in name for name in items), items

  # It restores in a single process, and holds trained float32 parameters of the tiny ResNet.
  import jax
  from jsim import parallel
  from jsim.checkpoint import StageCheckpoints
  from jsim.train import classifier

  config = tiny_config()
  model = classifier.build_classifier(config, 6)
  abstract = classifier.abstract_state(config, model, parallel.make_mesh())
  ckpts = StageCheckpoints(stage / "checkpoints")
  try:
    state, meta = ckpts.restore(7, abstract)
  finally:
    ckpts.close()
  assert int(state.step) == 7 and meta["epoch"] == 1 and meta["best"]["step"] == 7
  init = classifier.initial_variables(config, model, 6, 32)["params"]
  moved = max(
    jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), state.params, init))
  )
  assert moved > 1e-5


if __name__ == "__main__":
  if sys.argv[1:] != ["four_devices"]:
    sys.exit(f"usage: {sys.argv[0]} four_devices")
  sys.path.insert(0, str(REPO))
  print(json.dumps(_four_devices()), flush=True)
