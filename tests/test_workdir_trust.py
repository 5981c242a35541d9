"""Workdirs you can trust: damaged checkpoints, overwrite + preemption, a lock, refused runs
that leave nothing behind, stale stage 2, split digests, signals outside training.

Real processes (`python -m jsim.main`), real signals, real orbax checkpoints damaged on disk (bad input's
one-line messages from the command line run in this process: conftest's jsim_main); the
uninterrupted reference runs are conftest's `reference` (trained once per test run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from conftest import (
  REPO,
  STAGE1,
  STAGE1_STEPS,
  STAGE2,
  TINY1,
  Jsim,
  assert_bitwise_equal,
  run_ok,
  one_line_error,
  snapshot,
  checkpoint_state,
  checkpoint_steps,
  forbid_stages,
  read_only,
  run_jsim,
)


def _array_file(step_dir: Path) -> Path:
  """The largest array data file of a checkpoint (the weights of a convolution, mostly)."""
  return max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


def _damage(path: Path, how: str) -> None:
  data = path.read_bytes()
  if how == "overwrite":  # 64 bytes inside the file: other values, or bytes that no longer decode
    mid = len(data) // 2
    path.write_bytes(data[:mid] + bytes(range(64)) + data[mid + 64 :])
  elif how == "truncate":
    path.write_bytes(data[: len(data) // 2])
  elif how == "empty":
    path.write_bytes(b"")
  else:
    raise ValueError(how)


# --- 2. damaged checkpoints ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["overwrite", "truncate", "empty"])
def test_checkpoint_checksums_catch_damage(tmp_path, how):
  """Real orbax files, damaged on disk: restore raises DamagedCheckpoint naming the step; meta damage too."""
  import jax.numpy as jnp
  from jsim.checkpoint import DamagedCheckpoint, StageCheckpoints, abstract_like

  state = {"w": jnp.arange(60000, dtype=jnp.float32).reshape(200, 300) / 7, "b": jnp.ones(3), "step": jnp.int32(5)}
  ckpts = StageCheckpoints(tmp_path / "checkpoints")
  ckpts.save(5, state, {"epoch": 1})
  restored, meta = ckpts.restore(5, abstract_like(state))
  assert meta["epoch"] == 1 and np.array_equal(restored["w"], state["w"])
  _damage(_array_file(tmp_path / "checkpoints" / "5"), how)
  with pytest.raises(DamagedCheckpoint, match=r"checkpoints/5 is damaged \(") as e:
    ckpts.restore(5, abstract_like(state))
  assert "\n" not in str(e.value) and len(str(e.value)) < 400
  ckpts.close()


@pytest.mark.parametrize(
  "file, garbage",
  [
    ("meta/metadata", "{not json"),
    ("meta/metadata", "edited"),
    ("state/_METADATA", "{not json"),
    ("state/array_metadatas/process_0", "{not json"),
  ],
)
def test_damaged_metadata_is_caught(tmp_path, file, garbage):
  """jsim's meta (garbage, or an edit that still parses) and orbax's own metadata files."""
  import jax.numpy as jnp
  from jsim.checkpoint import DamagedCheckpoint, StageCheckpoints, abstract_like

  state = {"w": jnp.ones((4, 4))}
  ckpts = StageCheckpoints(tmp_path / "checkpoints")
  ckpts.save(1, state, {"epoch": 1})
  path = tmp_path / "checkpoints" / "1" / file
  path.write_text(path.read_text().replace('"epoch": 1', '"epoch": 2') if garbage == "edited" else garbage)
  with pytest.raises(DamagedCheckpoint, match=r"checkpoints/1 is damaged \(") as e:
    ckpts.restore(1, abstract_like(state))
  assert "\n" not in str(e.value)
  ckpts.close()


def test_damaged_latest_checkpoint_falls_back_and_resumes_exactly(reference, jsim_cache, tmp_path):
  """64 bytes overwritten in the latest checkpoint of an unfinished stage 1: the resume says so in one line,
  moves it aside, resumes from the newest one that verifies and ends bitwise where the reference does."""
  w = tmp_path / "W"
  shutil.copytree(reference / "A" / "stage1", w / "stage1")
  for name in ("split.json", "preprocessing.json"):
    shutil.copy(reference / "A" / name, w / name)
  (w / "stage1" / "result.json").unlink()  # unfinished: it resumes from its latest checkpoint
  ckpts = w / "stage1" / "checkpoints"
  assert checkpoint_steps(ckpts)[-2:] == [40, STAGE1_STEPS]
  _damage(_array_file(ckpts / str(STAGE1_STEPS)), "overwrite")
  out = run_ok([*STAGE1, f"--workdir={w}"], jsim_cache)
  line = next(x for x in out.splitlines() if "damaged (" in x)  # (the workdir's path says 'damaged' too)
  # Where the 64 bytes land depends on how orbax laid the arrays out in the file: some fail to decode (a read
  # error), others decode to other values, which the checksum catches (both seen).
  reasons = ("its arrays do not match their checksum", "its arrays cannot be read: ")
  assert any(f"checkpoint of step {STAGE1_STEPS} damaged ({why}" in line for why in reasons), line
  assert "resuming from step 40, the newest checkpoint that verifies" in line, line
  assert "stage 1: resumed from step 40 (epoch 6, batch 5/7)" in out
  assert (w / "stage1" / "damaged_checkpoints" / str(STAGE1_STEPS)).is_dir()  # kept, out of the way
  ref = reference / "A" / "stage1" / "checkpoints"
  assert_bitwise_equal(checkpoint_state(ckpts, STAGE1_STEPS), checkpoint_state(ref, STAGE1_STEPS))
  assert "Traceback" not in out


def test_closed_event_loop_noise_is_dropped_and_other_errors_are_not(monkeypatch, capsys):
  """tensorstore's late callbacks after a failed read print 'Event loop is closed' through the hooks."""
  import threading

  from jsim import checkpoint

  monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
  monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
  monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
  checkpoint._quiet_closed_event_loop()
  checkpoint._quiet_closed_event_loop()  # once is enough: not wrapped twice
  noise, other = RuntimeError("Event loop is closed"), ValueError("a real error")
  sys.excepthook(RuntimeError, noise, None)

  def raise_in_thread(exc):
    def run():
      raise exc

    t = threading.Thread(target=run)
    t.start()
    t.join()

  raise_in_thread(noise)
  assert capsys.readouterr().err == ""
  sys.excepthook(ValueError, other, None)
  raise_in_thread(other)
  assert capsys.readouterr().err.count("ValueError: a real error") == 2


@pytest.mark.parametrize("how", ["overwrite", "truncate", "meta"])
def test_damaged_best_checkpoint_is_one_line_naming_it(reference, jsim_cache, tmp_path, how):
  """Damaged arrays, or garbage in the checkpoint's metadata: embed stops with one line naming the checkpoint."""
  w = tmp_path / "W"
  shutil.copytree(reference / "A_done", w, ignore=shutil.ignore_patterns("embeddings", "stage2"))
  best = json.loads((w / "stage1" / "result.json").read_text())["best_step"]
  if how == "meta":
    (w / "stage1" / "checkpoints" / str(best) / "meta" / "metadata").write_text('{"epoch": 3, "best": ')
  else:
    _damage(_array_file(w / "stage1" / "checkpoints" / str(best)), how)
  proc = run_jsim([*TINY1, f"--workdir={w}", "--config.stage=embed"], jsim_cache, timeout=300)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out[-3000:]
  line = one_line_error(out, f"stage1/checkpoints/{best} is damaged (")
  assert "the best checkpoint of stage1" in line and "--config.overwrite=True" in line
  assert not (w / "embeddings").exists()


# --- 1. overwrite + preemption -----------------------------------------------------------------------------------

# Every stage with the reference's settings (stage 1 as in TINY1, stage 2 as in STAGE2).
FULL = [*TINY1, *(a for a in STAGE2 if not a.startswith(("--config=", "--config.stage=")))]


def _run_id(stage_dir: Path) -> str:
  return json.loads((stage_dir / "result.json").read_text())["run_id"]


def test_preempted_overwrite_run_resumes_on_its_verbatim_rerun(reference, jsim_cache, tmp_path):
  """stage=all with overwrite on a finished workdir, SIGTERM in stage 2; the verbatim rerun (a requeue) keeps the
  stage 1 that this run remade, resumes stage 2, and ends bitwise where the reference does."""
  w = tmp_path / "W"
  shutil.copytree(reference / "A_done", w)
  old_run = _run_id(w / "stage1")
  args = [*FULL, "--config.stage=all", "--config.overwrite=True", f"--workdir={w}"]
  run = Jsim(args, jsim_cache)
  run.wait_for_text("stage 2 epoch 1/4")
  run.send(signal.SIGTERM)
  assert run.finish() == 0, run.output[-3000:]
  assert "overwrite: removing" in run.output
  line = one_line_error(run.output, "jsim: SIGTERM at epoch 1, batch ")  # (step 0 or 1: the bar shows first)
  assert "rerun the same command" in line, line
  stopped_at = int(re.search(r"\(step (\d+)\)", line).group(1))
  new_run = _run_id(w / "stage1")
  assert new_run != old_run and (w / "overwrite.json").exists()

  run = Jsim(args, jsim_cache)
  assert run.finish() == 0, run.output[-3000:]
  assert "overwrite: removing" not in run.output, run.output[-3000:]
  assert "stage 1 already finished" in run.output and "embeddings are current" in run.output
  if stopped_at:
    assert f"stage 2: resumed from step {stopped_at} (epoch 1, batch {stopped_at}/5)" in run.output
  assert _run_id(w / "stage1") == new_run
  assert not (w / "overwrite.json").exists()  # complete: the next overwrite run replaces again
  assert (w / "report.json").exists()
  ckpts, ref = w / "stage2" / "checkpoints", reference / "A" / "stage2" / "checkpoints"
  assert_bitwise_equal(checkpoint_state(ckpts, 20), checkpoint_state(ref, 20))


# --- 5. one run at a time -------------------------------------------------------------------------------------------


def test_second_run_is_refused_naming_the_first_and_sigkill_leaves_no_stale_lock(jsim_cache, tmp_path):
  import socket

  w = tmp_path / "W"
  args = [*STAGE1, f"--workdir={w}"]
  first = Jsim(args, jsim_cache)
  first.wait_for_text("stage 1 epoch 1/6")
  # Stopped there, holding the workdir's lock: with its programs compiled it could otherwise finish stage 1
  # while the second run starts, or save the end of epoch 1 that the third would resume after.
  first.send(signal.SIGSTOP)
  before = snapshot(w)
  proc = run_jsim(args, jsim_cache, timeout=300)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out[-3000:]
  one_line_error(out, f"{w} is in use by process {first.proc.pid} on host {socket.gethostname()}")
  assert {p for p in snapshot(w) if "checkpoints" not in str(p)} >= {
    p for p in before if "checkpoints" not in str(p)
  }  # it removed nothing
  first.send(signal.SIGKILL)
  assert first.finish() == -signal.SIGKILL
  assert (w / ".jsim.lock").exists()  # left by the killed run, but not held: the kernel dropped the lock
  third = Jsim(args, jsim_cache)
  third.wait_for_text("stage 1 epoch 1/6")
  third.send(signal.SIGKILL)
  third.finish()
  assert "in use by" not in third.output


# --- 6. refused runs leave nothing behind -----------------------------------------------------------------------


def test_refused_run_leaves_nothing_and_loses_nothing(reference, jsim_cache, tmp_path):
  missing = tmp_path / "no_such_data"
  w = tmp_path / "new"
  proc = run_jsim(
    [*TINY1, f"--workdir={w}", "--config.data.source=folder", f"--config.data.root={missing}"], jsim_cache, timeout=300
  )
  assert proc.returncode == 1
  one_line_error(proc.stdout + proc.stderr, str(missing))
  assert not w.exists()  # not even the empty workdir

  # With overwrite on a finished workdir: refused before anything of the old stage 1 is removed.
  w = tmp_path / "W"
  shutil.copytree(reference / "A_done", w)
  before = snapshot(w)
  proc = run_jsim(
    [
      *STAGE1,
      f"--workdir={w}",
      "--config.overwrite=True",
      "--config.data.source=folder",
      f"--config.data.root={missing}",
    ],
    jsim_cache,
    timeout=300,
  )
  assert proc.returncode == 1
  one_line_error(proc.stdout + proc.stderr, str(missing))
  assert snapshot(w) == before


def test_bad_image_refusal_then_the_suggested_command_is_accepted(jsim_cache, tmp_path):
  from jsim.data import synthetic

  root = synthetic.write_synthetic_tiny_imagenet(tmp_path / "data", 8, 10, 4, image_size=32, seed=0, corrupt_files=1)
  w = tmp_path / "W"
  args = [
    *STAGE1,
    f"--workdir={w}",
    "--config.data.source=folder",
    f"--config.data.root={root}",
    "--config.classifier.num_epochs=1",
  ]
  proc = run_jsim([*args, "--config.data.on_bad_image=error"], jsim_cache, timeout=300)
  assert proc.returncode == 1
  one_line_error(proc.stdout + proc.stderr, "on_bad_image=skip")
  assert not w.exists()
  proc = run_jsim([*args, "--config.data.on_bad_image=skip"], jsim_cache, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  assert (w / "stage1" / "result.json").exists()


# --- 3. stale stage 2 ----------------------------------------------------------------------------------------------


def test_stage2_on_old_embeddings_is_not_evaluated_and_all_retrains_it(reference, jsim_cache, tmp_path):
  w = tmp_path / "W"
  shutil.copytree(reference / "A_done", w)
  old_stage2 = _run_id(w / "stage2")
  run_ok([*STAGE1, f"--workdir={w}", "--config.classifier.num_epochs=7"], jsim_cache)  # stage 1 continues
  proc = run_jsim(
    [*FULL, f"--workdir={w}", "--config.stage=evaluate", "--config.classifier.num_epochs=7"], jsim_cache, timeout=300
  )
  assert proc.returncode == 1
  one_line_error(proc.stdout + proc.stderr, "embeddings come from an earlier stage 1")
  assert not (w / "report.json").exists()

  out = run_ok([*FULL, f"--workdir={w}", "--config.stage=all", "--config.classifier.num_epochs=7"], jsim_cache)
  assert "stage2 was computed from other inputs" in out and "replacing it" in out
  assert _run_id(w / "stage2") != old_stage2
  trained_on = json.loads((w / "stage2" / "config.json").read_text())["embeddings"][0]["stage1_run_id"]
  assert trained_on == _run_id(w / "stage1")
  report = json.loads((w / "report.json").read_text())
  assert report["extra"]["stage2"]["run_id"] == _run_id(w / "stage2")


def test_evaluate_refuses_a_stage2_trained_on_other_embeddings(reference, jsim_cache, tmp_path):
  w = tmp_path / "W"
  shutil.copytree(reference / "A_done", w)
  record = w / "stage2" / "config.json"
  d = json.loads(record.read_text())
  d["embeddings"][0]["stage1_step"] = 7  # as if stage 2 had been trained on an earlier stage 1's embeddings
  record.write_text(json.dumps(d))
  proc = run_jsim([*FULL, f"--workdir={w}", "--config.stage=evaluate"], jsim_cache, timeout=300)
  assert proc.returncode == 1
  one_line_error(proc.stdout + proc.stderr, "stage2 was trained on other embeddings (stage-1 step 7; now")


# --- 4. a NaN stop continues at a lower rate -----------------------------------------------------------------------


def test_nan_stop_is_continued_with_a_lower_learning_rate(jsim_cache, tmp_path):
  w = tmp_path / "W"
  args = [
    *STAGE1,
    f"--workdir={w}",
    "--config.classifier.num_epochs=2",
    "--config.classifier.checkpoint_every_steps=2",
    "--config.classifier.log_every_steps=1",
  ]
  # A rate of 30 diverges after a few checkpoints (step 11 with this seed).
  proc = run_jsim([*args, "--config.classifier.learning_rate=30"], jsim_cache, timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out[-3000:]
  line = one_line_error(out, "became NaN or Inf")
  assert "the last good checkpoint (step " in line, line
  good = int(line.split("the last good checkpoint (step ")[1].split(")")[0])
  assert f"rerun with a lower --config.classifier.learning_rate: it resumes from step {good}" in line
  # The lower rate is accepted (not "made by another configuration") and applied from the good checkpoint on.
  # Whether it then recovers depends on how far the parameters had gone: not asserted.
  proc = run_jsim([*args, "--config.classifier.learning_rate=0.01"], jsim_cache, timeout=600)
  out = proc.stdout + proc.stderr
  assert "another configuration" not in out and "Traceback" not in out, out[-3000:]
  assert f"stage 1: resumed from step {good}" in out
  assert "classifier.learning_rate changed from 30 to 0.01 on resume" in out
  assert json.loads((w / "stage1" / "config.json").read_text())["classifier"]["learning_rate"] == 0.01
  if proc.returncode == 0:
    row = [json.loads(x) for x in (w / "stage1" / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["learning_rate_changed"]["from"] == 30 and row["learning_rate_changed"]["to"] == 0.01
    assert row["lr"] == pytest.approx(0.01)
  else:
    one_line_error(out, f"the last good checkpoint (step {good}) stays")


# --- 7, 8. config files: one line naming the file (and the line) --------------------------------------------------

_CONFIG_HEAD = "from jsim import configs\n\n\ndef get_config():\n  c = configs.base_config()\n  cl = c.classifier\n"


@pytest.mark.parametrize(
  "body, expect",
  [
    (
      "  cl.batch_sise = 32\n  return c\n",
      "cfg.py:7 (cl.batch_sise = 32): the config has no key 'batch_sise' (a config file sets keys of "
      "jsim.configs.base_config, it cannot add any); did you mean 'batch_size'?",
    ),
    ('  cl.batch_size = "32"\n  return c\n', 'cfg.py:7 (cl.batch_size = "32"): TypeError: Could not override field'),
    ("  cl.batch_size = (\n  return c\n", "cfg.py:7: not valid Python ("),
    ("  return c.nothing_here\n", "cfg.py:7 (return c.nothing_here): AttributeError: \"'nothing_here'\""),
    (  # a value refused: its message, without the source line that raised it
      '  raise ValueError("classifier.batch_size=0, expected at least 1")\n',
      "cfg.py:7: classifier.batch_size=0, expected at least 1",
    ),
    (None, "--config=CFG: no such file"),
  ],
)
def test_config_file_errors_are_one_line_naming_file_and_line(jsim_main, tmp_path, body, expect):
  cfg = tmp_path / "cfg.py"
  if body is not None:
    cfg.write_text(_CONFIG_HEAD + body)
  proc = jsim_main([f"--config={cfg}", f"--workdir={tmp_path / 'w'}"])
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out[-3000:]
  assert "Traceback" not in out and "\\n" not in out, out[-3000:]
  line = [x for x in out.splitlines() if x.strip()][-1]
  assert expect.replace("CFG", str(cfg)) in line, line
  assert str(cfg) in line and line.count("\n") == 0
  assert not (tmp_path / "w").exists()


def test_base_config_is_locked():
  from jsim import configs

  c = configs.base_config()
  c.classifier.batch_size = 32  # setting a key is fine
  with pytest.raises(AttributeError, match="batch_sise"):
    c.classifier.batch_sise = 32


# --- 9. more bad input: one line, before anything compiles -------------------------------------------------------


def _damage_workdir(w: Path, what: str) -> None:
  if what == "split []":
    (w / "split.json").write_text("[]")
  elif what == "result {}":
    (w / "stage1" / "result.json").write_text("{}")
  elif what == "record [1, 2]":
    (w / "stage1" / "config.json").write_text("[1, 2]")


@pytest.mark.parametrize(
  "what, args, expect",
  [
    ("split []", ["--config.stage=classifier"], "split.json: not a valid split file (a JSON object expected"),
    ("result {}", ["--config.stage=classifier"], "stage1/result.json: not a jsim result (no 'best_step')"),
    ("record [1, 2]", ["--config.stage=classifier"], "stage1/config.json: not a jsim stage record"),
    ("record [1, 2]", ["--config.stage=embed"], "stage1/config.json: not a jsim stage record"),
  ],
)
def test_damaged_workdir_files_are_one_line_naming_the_file(reference, jsim_cache, tmp_path, what, args, expect):
  w = tmp_path / "W"
  shutil.copytree(reference / "A_done", w)
  _damage_workdir(w, what)
  before = snapshot(w)
  proc = run_jsim([*TINY1, f"--workdir={w}", *args], jsim_cache, timeout=300, JAX_LOG_COMPILES="1")
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out[-3000:]
  one_line_error(out, expect)
  assert "Compiling jit(train_step)" not in out and "Compiling jit(embed)" not in out
  assert snapshot(w) == before


@pytest.mark.parametrize(
  "args, expect",
  [
    (["--config.data.val_fraction=0.005"], "data.val_fraction=0.005 leaves stage-1 validation with no images (of 60"),
    (
      ["--config.evaluation.test_per_ordered_class_pair=1000000000"],
      "evaluation.test_per_ordered_class_pair=1,000,000,000 gives 56,000,000,112 pairs over 8 classes, more than int32",
    ),
    (
      ["--config.evaluation.test_per_ordered_class_pair=3000000000"],
      "evaluation.test_per_ordered_class_pair=3000000000: too many pairs",
    ),
    (["--config.classifier.learning_rate=nan"], "classifier.learning_rate=nan: must be a finite number"),
    (["--config.similarity.learning_rate=inf"], "similarity.learning_rate=inf: must be a finite number"),
    (
      [
        "--config.classifier.loss=multi_similarity",
        "--config.classifier.batch_size=4",
        "--config.classifier.sampler_m=4",
      ],
      "classifier.sampler_m=4 with classifier.batch_size=4: every batch would hold a single class",
    ),
    (
      ["--config.classifier.loss=triplet", "--config.classifier.loss_hparams.triplet.margin=nan"],
      "classifier.loss_hparams.triplet.margin=nan: must be a finite number",
    ),
  ],
)
def test_impossible_values_are_refused_before_compiling(jsim_main, monkeypatch, tmp_path, args, expect):
  w = tmp_path / "w"
  forbid_stages(monkeypatch)  # (the stages compile jit(init) and jit(train_step))
  proc = jsim_main(["--config=configs/tiny.py", f"--workdir={w}", *args])
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out[-3000:]
  one_line_error(out, expect)
  assert not w.exists()


def test_workdir_that_is_a_file(jsim_main, tmp_path):
  f = tmp_path / "a_file"
  f.write_text("mine")
  proc = jsim_main(["--config=configs/tiny.py", f"--workdir={f}"])
  assert proc.returncode == 1
  one_line_error(proc.stdout + proc.stderr, f"--workdir={f} is a file, not a folder")
  assert f.read_text() == "mine"


# --- 10. an edited split.json ------------------------------------------------------------------------------------


def test_edited_split_is_refused_by_later_stages(reference, jsim_cache, tmp_path):
  w = tmp_path / "W"
  shutil.copytree(reference / "A_done", w, ignore=shutil.ignore_patterns("embeddings", "stage2"))
  split = json.loads((w / "split.json").read_text())
  split["seen_classes"][0], split["unseen_classes"][0] = split["unseen_classes"][0], split["seen_classes"][0]
  (w / "split.json").write_text(json.dumps(split))
  for stage in ("embed", "classifier"):
    proc = run_jsim([*TINY1, f"--workdir={w}", f"--config.stage={stage}"], jsim_cache, timeout=300)
    assert proc.returncode == 1
    one_line_error(proc.stdout + proc.stderr, "split.json is not the split that stage1 was made with")
  assert not (w / "embeddings").exists()


# --- 11. signals outside the training stages ---------------------------------------------------------------------


def _catches(pid: int, sig: int) -> bool:
  """Whether the process has a handler for `sig` (the SigCgt mask of /proc/PID/status)."""
  try:
    status = Path(f"/proc/{pid}/status").read_text()
  except FileNotFoundError:
    return False
  mask = int(next(x for x in status.splitlines() if x.startswith("SigCgt:")).split()[1], 16)
  return bool(mask >> (sig - 1) & 1)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize("when", ["handlers", "config file"])
def test_signal_at_startup_is_one_line_and_leaves_nothing(jsim_cache, tmp_path, sig, code, when):
  """As soon as jsim's handlers are installed (the libraries still import), or while flag parsing runs the
  config file (one that takes its time): one line, the usual exit code, no workdir."""
  w = tmp_path / "w"
  cfg = tmp_path / "slow_config.py"
  cfg.write_text(
    "import os\nimport time\n\nfrom jsim import configs\n\n\ndef get_config():\n"
    # (one write: print's text and its newline are two, and the signal's line could land between them)
    "  os.write(1, b'loading the config\\n')\n  time.sleep(60)\n  return configs.base_config()\n"
  )
  run = Jsim([f"--config={cfg}", f"--workdir={w}"], jsim_cache)
  if when == "handlers":
    run.wait_until(lambda: _catches(run.proc.pid, signal.SIGTERM), "jsim's signal handlers", timeout=60)
  else:
    run.wait_for_text("loading the config")
  run.send(sig)
  assert run.finish() == code, run.output[-3000:]
  one_line_error(run.output, f"jsim: stopped by {signal.Signals(sig).name}")
  assert not w.exists()


@pytest.mark.parametrize("how", ["stopped", "refused"])
def test_a_second_signal_while_the_command_line_exits_is_ignored(tmp_path, how):
  """A signal that arrives while entry_point is already on its way out (a first signal stopped the run, or the
  run ended with a one-line refusal) raises nothing there: the exit's one line and code stay, no traceback."""
  driver = tmp_path / "driver.py"
  driver.write_text(
    "import os, signal, sys, time\n"
    "from jsim import interrupts, main\n\n"
    "def second_signal():  # inside entry_point's handler of the first exit, before it exits\n"
    "  os.kill(os.getpid(), signal.SIGTERM)\n"
    "  time.sleep(0.5)  # (Python runs the handler at its next check, within this sleep)\n\n"
    "class Refusal(str):\n"
    "  def __str__(self):  # (entry_point prints it)\n"
    "    second_signal()\n"
    "    return str.__str__(self)\n\n"
    "def run(*args, **kwargs):\n"
    "  if sys.argv[1] == 'stopped':\n"
    "    raise interrupts.Interrupted(signal.SIGINT)\n"
    "  raise SystemExit(Refusal('jsim: refused, for the test'))\n\n"
    "main.app.run = run\n"
    "main._close_progress_bars = second_signal\n"
    "main.entry_point()\n"
  )
  proc = subprocess.run([sys.executable, str(driver), how], capture_output=True, text=True, timeout=120)
  out = proc.stdout + proc.stderr
  assert proc.returncode == (130 if how == "stopped" else 1), out[-3000:]
  one_line_error(out, "jsim: stopped by SIGINT" if how == "stopped" else "jsim: refused, for the test")


def test_sigterm_during_evaluation_is_one_line_and_leaves_nothing_half_written(reference, jsim_cache, tmp_path):
  w = tmp_path / "W"
  shutil.copytree(reference / "A_done", w)
  run = Jsim([*FULL, f"--workdir={w}", "--config.stage=evaluate"], jsim_cache)
  run.wait_for_text("validation pairs (threshold)")  # (about 2 s before report.json on a quiet machine)
  run.send(signal.SIGTERM)
  assert run.finish() == 143, run.output[-3000:]
  one_line_error(run.output, "jsim: stopped by SIGTERM")
  if (w / "report.json").exists():  # the signal came after the report (a loaded machine): then all of it is there
    assert "Five-case test accuracy" in run.output, run.output[-3000:]
    assert json.loads((w / "report.json").read_text())["cases"] and (w / "report.md").stat().st_size
  assert not [p for p in w.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
  assert not (w / ".jsim.lock").exists()


# --- 12. the installed package wins over a folder named jsim ----------------------------------------------------


def _installed_jsim() -> str | None:
  """Where the running environment's jsim distribution is recorded (None if it has none), read afresh."""
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      "import importlib.metadata as m\ntry: print(m.distribution('jsim')._path)\nexcept m.PackageNotFoundError: print(None)",
    ],
    capture_output=True,
    text=True,
    timeout=120,
    cwd="/",
  )
  return proc.stdout.strip()


def test_installed_package_wins_from_the_folder_above_a_clone_named_jsim(tmp_path):
  """`pip install -e` of a clone named jsim, then Python started in the folder that holds the clone: the
  clone's root (a namespace package `jsim` there) must not shadow the installed package."""
  clone = tmp_path / "jsim"
  shutil.copytree(
    REPO,
    clone,
    ignore=shutil.ignore_patterns(
      ".git", ".venv", "runs", "__pycache__", "*.egg-info", "build", "tests", "benchmarks", "docs"
    ),
  )
  prefix = tmp_path / "prefix"
  installed = _installed_jsim()
  pip = subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "install",
      "-q",
      "--no-deps",
      "--no-build-isolation",
      "--no-index",
      "--ignore-installed",  # (without it pip uninstalls the running environment's jsim: `make demo` then fails)
      f"--prefix={prefix}",
      "-e",
      str(clone),
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=tmp_path,
  )
  assert pip.returncode == 0, pip.stderr[-3000:]
  assert _installed_jsim() == installed, "the test's install into its own prefix changed the environment's jsim"
  site_dir = next(prefix.rglob("site-packages"))
  # The clone's install first, then the environment's own packages (its jsim, if installed, comes after it).
  code = (
    f"import site; site.addsitedir({str(site_dir)!r}); site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
    "from jsim.predict import Similarity\n"
    "import jsim, jsim.configs; jsim.configs.base_config()\n"
    "print(jsim.__file__)"
  )
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run(
    [sys.executable, "-S", "-c", code],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(env, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == str(clone / "jsim" / "__init__.py")


# --- 13. a finished workdir: nothing to do, nothing written --------------------------------------------------------


def test_finished_workdir_is_left_untouched_and_may_be_read_only(reference, jsim_cache, tmp_path):
  w = tmp_path / "W"
  shutil.copytree(reference / "A_done", w)
  run_ok([*FULL, f"--workdir={w}", "--config.stage=all"], jsim_cache)  # the report, once
  before = snapshot(w), sorted(p.name for p in w.iterdir())
  out = run_ok([*FULL, f"--workdir={w}", "--config.stage=all"], jsim_cache)
  assert "evaluation is current" in out
  assert (snapshot(w), sorted(p.name for p in w.iterdir())) == before
  with read_only(w):  # (a read-only bind mount for root, who writes read-only folders anyway)
    for stage in ("all", "evaluate"):
      out = run_ok([*FULL, f"--workdir={w}", f"--config.stage={stage}"], jsim_cache)
      assert "evaluation is current" in out and "Traceback" not in out
  assert (snapshot(w), sorted(p.name for p in w.iterdir())) == before
