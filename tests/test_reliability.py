"""Reliability through the real command line: signals, SIGKILL mid-save, exact resume, NaN, workdir safety.

Every run is `python -m jsim.main --config=configs/tiny.py ...` in a subprocess, and
every interruption a real signal (os.kill) sent at a known moment: when a line of
the run's output appears (the progress bar of epoch 1 is printed just before the
first step compiles, which takes seconds), or while orbax writes a checkpoint (its
temporary folder exists; the run is stopped with SIGSTOP to make sure, then killed).

A reference run (uninterrupted) is trained once per test session and shared, also
across pytest-xdist workers; the interrupted runs must end with bitwise the same
parameters, optimizer state and metrics (CPU, fixed seed, same compiled step).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from conftest import (
  STAGE1,
  STAGE1_STEPS,
  STAGE2,
  STAGE2_STEPS,
  TINY1,
  Jsim,
  assert_bitwise_equal,
  run_ok,
  one_line_error,
  snapshot,
  checkpoint_state,
  checkpoint_steps,
  tmp_checkpoint_steps,
  run_jsim,
)


def _meta(ckpt_dir: Path, step: int) -> dict:
  return json.loads((ckpt_dir / str(step) / "meta" / "metadata").read_text())


def _rows(rows: list[dict]) -> list[dict]:
  """Metric rows without the throughput (a wall-clock measure)."""
  return [{k: v for k, v in r.items() if k != "items_per_s"} for r in rows]


def _metrics_file(stage_dir: Path) -> list[dict]:
  return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def _result(stage_dir: Path) -> dict:
  r = json.loads((stage_dir / "result.json").read_text())
  assert len(r.pop("run_id")) == 32 and r.pop("finished_at")
  return r


def test_stage1_signals_sigkill_mid_save_and_exact_resume(reference, jsim_cache, tmp_path):
  """SIGTERM before training stops cleanly; SIGINT mid-epoch saves and exits 0; SIGKILL during a
  save leaves a temporary folder that the next start removes; the resumed run ends bitwise where
  the uninterrupted one does."""
  w = tmp_path / "B"
  args = [*STAGE1, f"--workdir={w}"]
  ckpts = w / "stage1" / "checkpoints"

  # 0. SIGTERM while the data loads and the model's init compiles (before the epoch loop):
  #    honoured once the loop starts, before the first step; nothing to save.
  run = Jsim(args, jsim_cache)
  run.wait_for_text("Tiny ImageNet from folder")
  run.send(signal.SIGTERM)
  assert run.finish() == 0, run.output[-3000:]
  one_line_error(run.output, "SIGTERM at epoch 1, batch 0/7 (step 0): no step taken yet; rerun the same command")
  assert checkpoint_steps(ckpts) == [] and not tmp_checkpoint_steps(ckpts)

  # 1. Ctrl-C while the first step compiles: that step finishes, is saved, and the run stops.
  run = Jsim(args, jsim_cache)
  run.wait_for_text("stage 1 epoch 1/6")
  run.send(signal.SIGINT)
  assert run.finish() == 0, run.output[-3000:]
  one_line_error(run.output, "SIGINT at epoch 1, batch 1/7 (step 1): checkpoint saved; rerun the same command")
  assert checkpoint_steps(ckpts) == [1] and not tmp_checkpoint_steps(ckpts)
  meta = _meta(ckpts, 1)
  assert (meta["epoch"], meta["batch_in_epoch"], meta["rows"]) == (0, 1, [])
  assert meta["sums"]["count"] == 6.0  # the running sums of the partial epoch: one batch

  # 2. The same command resumes at batch 1; SIGKILL while orbax writes a checkpoint after the
  #    halving after epoch 4 (step 28) and the mid-epoch checkpoint of step 32 (so that the run
  #    resumes inside epoch 5). SIGSTOP first, so that the write is surely unfinished.
  run = Jsim(args, jsim_cache)
  while True:
    run.wait_until(lambda: tmp_checkpoint_steps(ckpts, 33), "a checkpoint being written after step 32")
    run.send(signal.SIGSTOP)
    if tmp_checkpoint_steps(ckpts, 33):
      break
    run.send(signal.SIGCONT)  # it finished between the look and the stop: catch the next one
  run.send(signal.SIGKILL)
  assert run.finish() == -signal.SIGKILL
  assert "stage 1: resumed from step 1 (epoch 1, batch 1/7)" in run.output  # numbered as the stop message
  killed_at = tmp_checkpoint_steps(ckpts, 33)
  last = max(checkpoint_steps(ckpts))
  assert killed_at and last < killed_at[0]
  # A kill mid-append leaves half a line in metrics.jsonl, one mid-write_json a temporary file.
  with open(w / "stage1" / "metrics.jsonl", "a") as f:
    f.write('{"epoch": 99, "st')
  (w / "stage1" / "result.json.12345.tmp").write_text('{"test_acc')

  # 3. The same command again: it starts from the last complete checkpoint and finishes.
  run = Jsim(args, jsim_cache)
  assert run.finish() == 0, run.output[-3000:]
  resumed = _meta_line(run.output)
  assert resumed["step"] == last, run.output[-3000:]
  assert not tmp_checkpoint_steps(ckpts), "the partial checkpoint was not cleaned up"
  assert STAGE1_STEPS in checkpoint_steps(ckpts)
  print(
    f"SIGKILL while writing step {killed_at[0]}; resumed from step {last} "
    f"(epoch {resumed['epoch']}, batch {resumed['batch']})"
  )

  # Bitwise the uninterrupted run: parameters, batch statistics, momentum, learning rate, step.
  ref = reference / "A" / "stage1"
  assert_bitwise_equal(checkpoint_state(ckpts, STAGE1_STEPS), checkpoint_state(ref / "checkpoints", STAGE1_STEPS))
  got, want = _meta(ckpts, STAGE1_STEPS), _meta(ref / "checkpoints", STAGE1_STEPS)
  assert want["halving_epochs"] == [4, 5, 6]
  assert [r["lr"] for r in want["rows"]] == pytest.approx([0.01] * 4 + [0.005, 0.0025], rel=1e-6)
  for key in ("halving_epochs", "val_accuracies", "best", "epoch", "batch_in_epoch"):
    assert got[key] == want[key], key
  assert _rows(got["rows"]) == _rows(want["rows"])
  # Every epoch's row once, the same numbers (the train loss sums the partial epochs exactly).
  assert _rows(_metrics_file(w / "stage1")) == _rows(_metrics_file(ref))
  assert _result(w / "stage1") == _result(ref)


def _meta_line(out: str) -> dict:
  """'resumed from step S (epoch E, batch B/N)', or '(end of epoch E)' (then batch is N)."""
  m = re.search(r"resumed from step (\d+) \((?:epoch (\d+), batch (\d+)/\d+|end of epoch (\d+))\)", out)
  assert m, out[-3000:]
  if m.group(4):
    return {"step": int(m.group(1)), "epoch": int(m.group(4)), "batch": None}
  return {"step": int(m.group(1)), "epoch": int(m.group(2)), "batch": int(m.group(3))}


def test_stage2_sigterm_and_exact_resume(reference, jsim_cache, tmp_path):
  w = tmp_path / "W"
  shutil.copytree(reference / "A_embedded", w)
  args = [*STAGE2, f"--workdir={w}"]
  ckpts = w / "stage2" / "checkpoints"

  run = Jsim(args, jsim_cache)
  run.wait_for_text("stage 2 epoch 1/4")
  run.send(signal.SIGTERM)
  assert run.finish() == 0, run.output[-3000:]
  # The bar shows before the first step: the signal lands during its compilation (the step
  # finishes and is saved) or, on a loaded machine, just before it (nothing to save).
  line = one_line_error(run.output, "SIGTERM at epoch 1, batch ")
  stopped_after_step = "batch 1/5 (step 1): checkpoint saved; rerun the same command" in line
  if stopped_after_step:
    assert checkpoint_steps(ckpts) == [1] and _meta(ckpts, 1)["sums"]["count"] == 24.0
  else:
    assert "batch 0/5 (step 0): no step taken yet; rerun the same command" in line and checkpoint_steps(ckpts) == []

  run = Jsim(args, jsim_cache)
  assert run.finish() == 0, run.output[-3000:]
  if stopped_after_step:
    assert _meta_line(run.output) == {"step": 1, "epoch": 1, "batch": 1}

  ref = reference / "A" / "stage2"
  assert_bitwise_equal(checkpoint_state(ckpts, STAGE2_STEPS), checkpoint_state(ref / "checkpoints", STAGE2_STEPS))
  got, want = _meta(ckpts, STAGE2_STEPS), _meta(ref / "checkpoints", STAGE2_STEPS)
  assert want["halving_epochs"] == [4]
  assert _rows(got["rows"]) == _rows(want["rows"]) and got["best"] == want["best"]
  assert _rows(_metrics_file(w / "stage2")) == _rows(_metrics_file(ref))
  assert _result(w / "stage2") == _result(ref)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(reference, jsim_cache, tmp_path):
  """A learning rate of 1e30 on a finished workdir, with overwrite: the derived outputs of the old
  stage 1 (embeddings, stage 2) go with it; the new run stops at the first NaN/Inf loss."""
  w = tmp_path / "W"
  shutil.copytree(reference / "A_done", w)
  proc = run_jsim(
    [
      *STAGE1,
      f"--workdir={w}",
      "--config.overwrite=True",
      "--config.classifier.learning_rate=1e30",
      "--config.classifier.checkpoint_every_steps=1",
      "--config.classifier.log_every_steps=1",
    ],
    jsim_cache,
    timeout=900,
  )
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out[-3000:]
  line = one_line_error(out, "stage 1: the training loss became NaN or Inf at step ")
  bad = int(re.search(r"at step (\d+)", line).group(1))
  ckpts = w / "stage1" / "checkpoints"
  good = max(checkpoint_steps(ckpts))
  assert good == bad - 1 and f"the last good checkpoint (step {good}) stays" in line
  state = checkpoint_state(ckpts, good)
  import jax

  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
  assert not tmp_checkpoint_steps(ckpts)

  # overwrite=True took the old stage 1 and everything computed from it.
  assert "overwrite: removing" in out
  assert not (w / "embeddings").exists() and not (w / "stage2").exists()
  assert not (w / "stage1" / "result.json").exists()
  assert json.loads((w / "stage1" / "config.json").read_text())["classifier"]["learning_rate"] == 1e30


@pytest.mark.parametrize(
  "args, expect",
  [
    # Another architecture's checkpoints.
    (
      ["--config.stage=classifier", "--config.model.name=vgg_tiny"],
      "stage1 was made by another configuration (model.name: 'resnet_tiny' in the workdir, 'vgg_tiny' now)",
    ),
    # Another split: another seed, or another number of seen classes.
    (["--config.stage=all", "--config.seed=1"], "stage1 was made by another configuration (seed: 0 in the workdir"),
    (
      ["--config.stage=classifier", "--config.data.num_seen_classes=5"],
      "data.num_seen_classes: 6 in the workdir, 5 now",
    ),
    # A stage that reads stage 1 with another model: refused before a confusing restore error.
    (
      ["--config.stage=embed", "--config.model.name=vgg_tiny"],
      "stage1 was made by another configuration (model.name: 'resnet_tiny' in the workdir, 'vgg_tiny' now)",
    ),
  ],
)
def test_workdir_of_another_configuration_is_refused(reference, jsim_cache, tmp_path, args, expect):
  w = tmp_path / "W"
  shutil.copytree(reference / "A_done", w)
  stages = [w / "stage1", w / "embeddings", w / "stage2"]
  before = snapshot(*stages), (w / "config.json").read_text()
  proc = run_jsim([*TINY1, f"--workdir={w}", *args], jsim_cache, timeout=300)
  assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
  one_line_error(proc.stdout + proc.stderr, expect)
  assert (snapshot(*stages), (w / "config.json").read_text()) == before  # the record too


def test_finished_stage_is_not_redone(reference, jsim_cache, tmp_path):
  w = tmp_path / "W"
  shutil.copytree(reference / "A_done", w)
  stages = [w / "stage1", w / "embeddings", w / "stage2"]
  before = snapshot(*stages)
  assert "stage 2 already finished" in run_ok([*STAGE2, f"--workdir={w}"], jsim_cache)
  assert snapshot(*stages) == before


def test_killed_first_claim_leaves_a_usable_stage_folder(tmp_path):
  """A run killed while writing a stage's config.json for the first time leaves only the temporary file."""
  from jsim import workdir as wd

  (tmp_path / "stage1").mkdir()
  (tmp_path / "stage1" / "config.json.999.tmp").write_text('{"seed":')
  stage_dir, finished = wd.claim_stage(tmp_path, wd.STAGE1, {"seed": 0}, overwrite=False)
  assert not finished and json.loads((stage_dir / "config.json").read_text()) == {"seed": 0}
  (tmp_path / "stage2").mkdir()
  (tmp_path / "stage2" / "stray.txt").write_text("not jsim's")
  with pytest.raises(ValueError, match="exists but has no config.json"):
    wd.claim_stage(tmp_path, wd.STAGE2, {"seed": 0}, overwrite=False)


def test_a_key_added_after_the_workdir_reads_as_its_default(tmp_path):
  """A stage recorded before a config key existed continues at that key's default, refuses another value."""
  from jsim import configs, workdir as wd
  from jsim.train import classifier

  config = configs.config_from_dict({"model": {"name": "resnet_tiny"}})
  identity = classifier.stage_identity(config)
  old = json.loads(json.dumps(identity, default=str))
  del old["data"]["benchmark_format"], old["classifier"]["nag_form"]  # keys an older jsim did not have
  (tmp_path / "stage1").mkdir()
  (tmp_path / "stage1" / "config.json").write_text(json.dumps(old))
  defaults = classifier.stage_identity(configs.base_config())
  with pytest.raises(ValueError, match="data.benchmark_format: None in the workdir, 'archive' now"):
    wd.check_stage(tmp_path, wd.STAGE1, identity, overwrite=False)  # without the defaults: refused
  assert wd.check_stage(tmp_path, wd.STAGE1, identity, overwrite=False, defaults=defaults) is False  # accepted
  config.data.benchmark_format = "tfds"
  with pytest.raises(ValueError, match="data.benchmark_format: 'archive' in the workdir, 'tfds' now"):
    wd.check_stage(tmp_path, wd.STAGE1, classifier.stage_identity(config), overwrite=False, defaults=defaults)
  # A key the base config does not have (a run id, say) is still compared as recorded.
  with pytest.raises(ValueError, match="stage1_run_id: None in the workdir, 'abc' now"):
    wd.check_stage(tmp_path, wd.STAGE1, dict(identity, stage1_run_id="abc"), overwrite=False, defaults=defaults)


def test_a_retired_key_at_its_old_default_reads_as_current(tmp_path):
  """loss_hparams.triplet.mining (now a miner): 'all' reads as miner 'none'; 'batch_hard' still refuses.
  The rates and the schedule may change on resume, as learning_rate may."""
  from jsim import configs, workdir as wd
  from jsim.train import classifier

  config = configs.config_from_dict({"model": {"name": "resnet_tiny"}, "classifier": {"loss": "multi_similarity"}})
  identity = classifier.stage_identity(config)
  defaults = classifier.default_identity(config)  # (with the metric fields, which a new miner key is among)
  old = json.loads(json.dumps(identity, default=str))
  del old["classifier"]["miner_hparams"]
  for hparams in old["classifier"]["loss_hparams"].values():
    hparams.pop("miner", None)
  (tmp_path / "stage1").mkdir()
  for mining, accepted in (("all", True), ("batch_hard", False)):
    old["classifier"]["loss_hparams"]["triplet"]["mining"] = mining
    (tmp_path / "stage1" / "config.json").write_text(json.dumps(old))
    if accepted:
      assert wd.check_stage(tmp_path, wd.STAGE1, identity, overwrite=False, defaults=defaults) is False
    else:
      with pytest.raises(ValueError, match="loss_hparams.triplet.mining: 'batch_hard' in the workdir, None now"):
        wd.check_stage(tmp_path, wd.STAGE1, identity, overwrite=False, defaults=defaults)
  old["classifier"]["loss_hparams"]["triplet"]["mining"] = "all"
  (tmp_path / "stage1" / "config.json").write_text(json.dumps(old))
  config.classifier.update(loss_learning_rate=0.3, schedule="plateau", patience=5)
  assert (
    wd.check_stage(tmp_path, wd.STAGE1, classifier.stage_identity(config), overwrite=False, defaults=defaults) is False
  )
  config.classifier.optimizer = "adam"  # another optimizer is another run
  with pytest.raises(ValueError, match="classifier.optimizer: 'sgd' in the workdir, 'adam' now"):
    wd.check_stage(tmp_path, wd.STAGE1, classifier.stage_identity(config), overwrite=False, defaults=defaults)
