"""Nothing silently wrong: stale evaluations, damaged or copied exports, changed gallery files, full disks,
read-only workdirs, and signals at the edges of a run.

Every fault is made for real: jsim's own processes (`python -m jsim.main`, `jsim.export`, `jsim.predict`)
get real signals; a full disk is a small tmpfs filled to the last byte (mounting one needs root: these
tests are skipped without it); a read-only workdir is a read-only bind mount (root) or a chmod (others).
The trained workdirs are the shared session fixtures of conftest (`reference`, `trained`, `sim`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import (
  REPO,
  STAGE1,
  STAGE2,
  TINY1,
  TINY_RUN,
  READ_ONLY_XLA_CACHE,
  Jsim,
  assert_bitwise_equal,
  run_ok,
  one_line_error,
  snapshot,
  checkpoint_state,
  checkpoint_steps,
  tmp_checkpoint_steps,
  fill,
  jsim_env,
  read_only,
  run_jsim,
  small_disk,
)

FULL = [*TINY1, *(a for a in STAGE2 if not a.startswith(("--config=", "--config.stage=")))]
EVALUATION = ("report.json", "report.md", "evaluation.npz", "figures", "evaluation")


# ----------------------------------------------------------------------------- real faults


def _tmp_files(root: Path) -> list[Path]:
  return [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".orbax-checkpoint-tmp" in p.name]


def _last_line(text: str) -> str:
  return [line for line in text.splitlines() if line.strip()][-1]


def _tool(module: str, *args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", module, *map(str, args)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=env,
  )


def _one_line(r: subprocess.CompletedProcess, prog: str | None, expect: str, code: int = 1) -> str:
  """One line on stderr, starting with `prog: ` (None: any prefix), that holds `expect`; status `code`."""
  assert r.returncode == code, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and expect in lines[0], r.stderr[-3000:]
  assert prog is None or lines[0].startswith(f"{prog}: "), lines[0]
  return lines[0]


def _copy(trained, dst: Path) -> Path:
  return shutil.copytree(trained.workdir, dst, ignore=shutil.ignore_patterns("predict_cache", "onnx"))


# ----------------------------------------------------------------------------- 1. stale evaluations


@pytest.mark.slow
def test_a_report_of_replaced_stages_is_removed_or_refused(reference, jsim_cache, tmp_path):
  """Evaluated, then stage 2 continued (a new run): predict does not take the old threshold and compare refuses
  the old figures; then stage 2 overwritten: everything the evaluation wrote goes with the stage."""
  from jsim import workdir as wd
  from jsim.evaluate import compare

  w = tmp_path / "W"
  shutil.copytree(reference / "A_done", w)
  run_ok([*FULL, f"--workdir={w}", "--config.stage=evaluate"], jsim_cache)
  assert wd.read_records(w).threshold is not None and not wd.read_records(w).notes
  run_ok([*FULL, f"--workdir={w}", "--config.stage=similarity", "--config.similarity.num_epochs=5"], jsim_cache)
  assert (w / "report.json").exists()  # (not removed: another run of the same stage; its readers refuse it)
  records = wd.read_records(w)
  assert records.threshold is None
  assert len(records.notes) == 1 and "report.json is stale: it evaluated another stage2 run" in records.notes[0]
  out = tmp_path / "roc.png"
  r = _tool("jsim.evaluate.compare", w, f"--out={out}", f"--table={tmp_path / 't.md'}")
  _one_line(r, None, "report.json is stale: it evaluated another stage2 run")
  assert not out.exists() and not (tmp_path / "t.md").exists()
  assert compare.main([str(w), f"--out={out}"]) == 1  # the figure alone reads evaluation.npz: refused too

  run_ok([*FULL, f"--workdir={w}", "--config.stage=similarity", "--config.overwrite=True"], jsim_cache)
  assert [name for name in EVALUATION if (w / name).exists()] == []
  assert wd.read_records(w).threshold is None and not wd.read_records(w).notes
  r = _tool("jsim.evaluate.compare", w, f"--out={out}")
  _one_line(r, None, "evaluation.npz is missing: evaluate that workdir first")


def test_overwrite_of_a_stage_removes_what_was_computed_from_it(tmp_path):
  """The removal itself, on a workdir's files: stage 1 takes everything after it, stage 2 the evaluation."""
  from jsim import workdir as wd

  def make(w: Path) -> None:
    for stage in (wd.STAGE1, wd.STAGE2):
      wd.write_json(w / stage / "config.json", {"model": "m"})
    for name in (wd.EMBEDDINGS, "figures", "evaluation", "onnx", "predict_cache", "sweep"):
      (w / name).mkdir(parents=True, exist_ok=True)
      (w / name / "x").write_text("x")
    for name in ("report.json", "report.md", "evaluation.npz", "split.json"):
      (w / name).write_text("{}")

  for stage, kept in ((wd.STAGE2, {"split.json", "stage1", "embeddings", "sweep"}), (wd.STAGE1, {"split.json"})):
    w = tmp_path / stage
    make(w)
    wd.start_run()
    wd.claim_stage(w, stage, {"model": "m"}, overwrite=True)
    assert {p.name for p in w.iterdir()} == kept | {stage}
    assert (w / stage / "config.json").exists() and [p.name for p in (w / stage).iterdir()] == ["config.json"]


def _evaluated(w: Path, seed: int = 0) -> None:
  """A workdir as the evaluation stage leaves it (both stages' result.json, report.json recording them)."""
  from jsim import workdir as wd
  from jsim.evaluate import compare, pairwise, report

  counts = np.array([10, 20, 5, 4, 2])
  result = pairwise.PairEvalResult(
    count=counts,
    correct_05=counts - 1,
    correct_threshold=counts - 1,
    hist_pos=np.ones((5, 8), np.int64),
    hist_neg=np.ones((5, 8), np.int64),
    threshold=0.5,
    mode="sampled",
    pairs_per_s=1.0,
  )
  extra = {}
  for stage in (wd.STAGE1, wd.STAGE2):
    r = {"best_step": 1}
    wd.finish_stage(w / stage, r)
    extra[stage] = r
  wd.write_json(w / "split.json", {"seen_classes": ["a", "b"], "seed": seed})
  pairwise.save_result(result, w / compare.RESULT_FILE)
  extra[compare.RESULT_DIGEST] = wd.file_digest(w / compare.RESULT_FILE)
  report.write_report(w, result, val_threshold=None, backbone="resnet50", extra=extra)


def test_compare_reads_only_current_intact_evaluations(tmp_path, capsys):
  """Item 6 and 1 for compare's readers: one line naming the file for each fault, nothing written."""
  from jsim import workdir as wd
  from jsim.evaluate import compare

  def refused(w: Path, expect: str) -> None:
    capsys.readouterr()
    out = tmp_path / "roc.png"
    assert compare.main([str(w), f"--out={out}", f"--table={tmp_path / 't.md'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert not out.exists() and not (tmp_path / "t.md").exists()

  a, b = tmp_path / "a", tmp_path / "b"
  _evaluated(a)
  _evaluated(b)
  assert compare.main([str(a), str(b), f"--out={tmp_path / 'ok.png'}", f"--table={tmp_path / 'ok.md'}"]) == 0
  assert "split" not in (tmp_path / "ok.md").read_text()  # (the same split: no column for it)

  refused(tmp_path / "a_typo", f"{tmp_path / 'a_typo'}: no such workdir")
  npz = a / "evaluation.npz"
  good = npz.read_bytes()
  npz.write_bytes(good[: len(good) // 2])  # truncated: also no longer the one report.json recorded
  refused(a, f"{npz} is not the evaluation that {a / 'report.json'} was written with")
  report = json.loads((a / "report.json").read_text())
  report["extra"].pop(compare.RESULT_DIGEST)  # (a report from before the digest was recorded)
  (a / "report.json").write_text(json.dumps(report))
  refused(a, f"{npz}: damaged or truncated (BadZipFile")
  npz.write_bytes(good)
  (a / "report.json").write_text("[1, 2]")
  refused(a, f"{a / 'report.json'}: not a jsim report (a JSON object expected, found list)")
  (a / "report.json").write_text(json.dumps({k: v for k, v in report.items() if k != "cases"}))
  refused(a, f"{a / 'report.json'}: not a jsim report (no 'cases')")
  (a / "report.json").write_text('{"cases": ')
  refused(a, f"{a / 'report.json'}: not valid JSON")
  (a / "report.json").write_text(json.dumps(report))
  wd.finish_stage(a / wd.STAGE1, {"best_step": 2})  # stage 1 retrained since
  refused(a, "report.json is stale: it evaluated another stage1 run")

  # Workdirs of different splits: compared, but flagged in the table and in one line.
  c = tmp_path / "c"
  _evaluated(c, seed=1)
  capsys.readouterr()
  assert compare.main([str(b), str(c), f"--out={tmp_path / 'bc.png'}", f"--table={tmp_path / 'bc.md'}"]) == 0
  err = capsys.readouterr().err
  assert "the workdirs were split differently" in err and len(err.strip().splitlines()) == 1
  lines = (tmp_path / "bc.md").read_text().splitlines()
  assert "| split |" in lines[0] and wd.split_digest(b)[:12] in lines[2] and wd.split_digest(c)[:12] in lines[3]


def _val_threshold(text: str) -> str:
  report = json.loads(text)
  report["val_threshold"] = "0.5"
  return json.dumps(report)


@pytest.mark.parametrize(
  "file, damage, expect",
  [
    ("report.json", lambda t: "[]", "not a jsim report (a JSON object expected, found list)"),
    ("report.json", _val_threshold, "not a jsim report (val_threshold '0.5', not a probability)"),
    # Valid JSON of the wrong shape: each was a KeyError, TypeError or AttributeError traceback.
    ("preprocessing.json", lambda t: "{}", "not a jsim record (no 'mean')"),
    ("preprocessing.json", lambda t: '{"mean": "abc", "std": [1, 1, 1]}', "not a jsim record ('mean': could not"),
    ("split.json", lambda t: "{}", "not a jsim record (no 'seen_classes')"),
    ("config.json", lambda t: "[]", "not a jsim record (a JSON object expected, found list)"),
    ("stage1/config.json", lambda t: "[1]", "not a jsim record (a JSON object expected, found list)"),
    ("stage1/result.json", lambda t: "{}", "not a jsim record (no 'best_step')"),
    ("embeddings/meta.json", lambda t: "[]", "not a jsim record (a JSON object expected, found list)"),
    ("stage2/config.json", lambda t: "[]", "not a jsim record (a JSON object expected, found list)"),
  ],
)
def test_a_damaged_record_or_report_is_one_line_for_predict(trained, tmp_path, file, damage, expect):
  w = tmp_path / "w"
  for f in trained.workdir.rglob("*.json"):  # the records only: predict checks them before JAX loads
    if "checkpoints" not in f.parts:
      (w / f.relative_to(trained.workdir)).parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(f, w / f.relative_to(trained.workdir))
  for stage in ("stage1", "stage2"):
    (w / stage / "checkpoints").mkdir(parents=True, exist_ok=True)
  (w / file).write_text(damage((w / file).read_text()))
  r = _tool("jsim.predict", f"--workdir={w}", trained.files[0], trained.files[1])
  _one_line(r, "jsim-predict", f"{w / file}: {expect}")


# ----------------------------------------------------------------------------- 2, 7. exports by content


@pytest.mark.slow
def test_a_copied_export_is_used_and_a_changed_one_is_refused_then_replaced(trained, tmp_path):
  w, a, b = trained.workdir, trained.files[0], trained.files[1]
  d = tmp_path / "export"
  assert _tool("jsim.export", f"--workdir={w}", f"--out={d}").returncode == 0
  copy = tmp_path / "copy"
  subprocess.run(["cp", "-r", str(d), str(copy)], check=True)  # new times, same bytes
  subprocess.run(["touch", str(copy / "embed.onnx")], check=True)
  r = _tool("jsim.predict", f"--workdir={w}", f"--onnx_dir={copy}", "--json", a, b)
  assert r.returncode == 0, r.stderr
  p = json.loads(r.stdout)["probability"]
  # A changed graph, of the same size and time: refused in one line, not a wrong P(same).
  graph = copy / "similarity.onnx"
  data, st = bytearray(graph.read_bytes()), graph.stat()
  data[len(data) // 2] ^= 0xFF
  graph.write_bytes(bytes(data))
  os.utime(graph, ns=(st.st_atime_ns, st.st_mtime_ns))
  r = _tool("jsim.predict", f"--workdir={w}", f"--onnx_dir={copy}", "--json", a, b)
  _one_line(r, "jsim-predict", f"--onnx_dir {copy}: its graphs are not those its meta.json records")
  assert f"python -m jsim.export --workdir={w} --out={copy}" in r.stderr
  # The command it suggests is accepted, and the export is good again.
  assert _tool("jsim.export", f"--workdir={w}", f"--out={copy}").returncode == 0
  r = _tool("jsim.predict", f"--workdir={w}", f"--onnx_dir={copy}", "--json", a, b)
  assert r.returncode == 0 and json.loads(r.stdout)["probability"] == p, r.stderr


def _blocked_in_open(pid: int, path: Path, timeout: float = 300) -> None:
  """Waits until process `pid` waits in open() on the FIFO `path` (its writer blocks until a reader comes)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    with contextlib.suppress(OSError):
      if Path(f"/proc/{pid}/wchan").read_text() in ("fifo_open", "wait_for_partner") and path.exists():
        return
    time.sleep(0.01)
  pytest.fail(f"process {pid} never opened {path}")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_export_leaves_no_temporary_file_and_its_rerun_succeeds(trained, tmp_path, sig):
  """Stopped while it writes embed.onnx (its temporary file is a FIFO: the write blocks there, for sure):
  one line, and the temporary file is gone; after a SIGKILL the rerun removes it. The rerun succeeds,
  and --overwrite works on the result."""
  w = _copy(trained, tmp_path / "w")
  d = tmp_path / "export"
  d.mkdir()
  proc = subprocess.Popen(
    [sys.executable, "-m", "jsim.export", f"--workdir={w}", f"--out={d}"],
    cwd=REPO,
    env=dict(os.environ, **READ_ONLY_XLA_CACHE),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  fifo = d / f"embed.onnx.{proc.pid}.tmp"
  os.mkfifo(fifo)
  try:
    _blocked_in_open(proc.pid, fifo)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  if sig == signal.SIGKILL:
    assert proc.returncode == -signal.SIGKILL and fifo.exists()
  else:
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and _last_line(err).startswith(
      f"python -m jsim.export: stopped by {signal.Signals(sig).name}"
    ), err
    assert sorted(p.name for p in d.iterdir()) == []
  r = _tool("jsim.export", f"--workdir={w}", f"--out={d}")
  assert r.returncode == 0, r.stderr
  assert sorted(p.name for p in d.iterdir()) == ["embed.onnx", "meta.json", "similarity.onnx"]
  r = _tool("jsim.export", f"--workdir={w}", f"--out={d}", "--overwrite")
  assert r.returncode == 0, r.stderr


def test_predict_removes_what_a_killed_export_left_in_its_cache(trained, tmp_path):
  w = _copy(trained, tmp_path / "w")
  (w / "onnx").mkdir()
  orphan = w / "onnx" / "embed.onnx.999999.tmp"
  orphan.write_bytes(b"half a graph")
  r = _tool("jsim.predict", f"--workdir={w}", "--backend=onnx", trained.files[0], trained.files[1])
  assert r.returncode == 0, r.stderr
  assert not orphan.exists() and sorted(p.name for p in (w / "onnx").iterdir()) == [
    "embed.onnx",
    "meta.json",
    "similarity.onnx",
  ]


# ----------------------------------------------------------------------------- 3. the gallery cache


def test_a_gallery_file_replaced_by_another_of_the_same_size_and_time_is_embedded_again(trained, sim, tmp_path):
  files = trained.files
  # Two test images; the smaller one padded to the other's size (bytes after a JPEG's end are ignored).
  small, big = sorted(range(2), key=lambda i: files[i].stat().st_size)
  gal = tmp_path / "gallery"
  gal.mkdir()
  for i in range(2, 6):
    shutil.copyfile(files[i], gal / f"{i}.jpg")
  target = gal / "x.jpg"
  shutil.copyfile(files[big], target)
  first = sim.gallery(gal)
  assert first.embedded == 5
  st = target.stat()
  data = files[small].read_bytes()
  target.write_bytes(data + b"\0" * (st.st_size - len(data)))
  os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
  second = sim.gallery(gal)
  assert second.embedded == 1 and second.reused == 4
  row = second.files.index("x.jpg")
  np.testing.assert_allclose(second.embeddings[row], sim.embed([files[small]])[0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(second.embeddings[row], first.embeddings[row])


# ----------------------------------------------------------------------------- 4. batches that cannot train


@pytest.mark.parametrize(
  "overrides, expect",
  [
    (
      {"classifier.sampler_m": 8},
      "classifier.sampler_m=8 with classifier.batch_size=8: every batch would hold a single class",
    ),
    (
      {"classifier.loss_hparams.multi_similarity.alpha": float("nan")},
      "classifier.loss_hparams.multi_similarity.alpha=nan: must be a finite",
    ),
    (
      {"classifier.loss_hparams.triplet.margin": float("inf")},
      "classifier.loss_hparams.triplet.margin=inf: must be a finite number",
    ),
    ({"classifier.loss_learning_rate": float("nan")}, "classifier.loss_learning_rate=nan: must be a finite number"),
  ],
)
def test_a_batch_or_loss_that_cannot_train_is_refused(overrides, expect):
  from jsim import configs, validate

  c = configs.base_config()
  configs.use_metric_loss(c, "multi_similarity")
  c.classifier.batch_size = 8
  validate.check_config(c)  # (the setting itself is fine)
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  with pytest.raises(ValueError) as e:
    validate.check_config(c)
  assert str(e.value).startswith(expect)


# ----------------------------------------------------------------------------- 5. full disks


def test_full_disk_while_writing_a_record_or_taking_the_lock_is_one_line(tmp_path):
  from jsim import workdir as wd

  with small_disk(tmp_path / "disk", "1m") as disk:
    w = disk / "W"
    wd.write_json(w / "embeddings" / "meta.json", {"old": 1})
    filler = fill(disk)
    with pytest.raises(wd.NoSpace) as e:
      wd.write_json(w / "embeddings" / "meta.json", {"new": "x" * 100_000})
    assert str(e.value).startswith(f"{w / 'embeddings' / 'meta.json'}: no space left on device;")
    assert json.loads((w / "embeddings" / "meta.json").read_text()) == {"old": 1}  # the old one stays whole
    assert _tmp_files(disk) == []
    with pytest.raises(wd.NoSpace, match=r"\.jsim\.lock: no space left on device \(the workdir's lock\)"):
      with wd.locked(w):
        pass
    assert not (w / ".jsim.lock").exists()
    filler.unlink()
    with wd.locked(w):
      wd.write_json(w / "embeddings" / "meta.json", {"new": 1})
    assert json.loads((w / "embeddings" / "meta.json").read_text()) == {"new": 1}


def _event_records(path: Path) -> list[bytes]:
  """The records of a TensorBoard event file, each checked against its CRCs; the file must end after a whole one."""
  from tensorboardX.record_writer import masked_crc32c

  data, pos, records = path.read_bytes(), 0, []
  while pos < len(data):
    header = data[pos : pos + 8]
    (length,) = struct.unpack("Q", header)
    assert struct.unpack("I", data[pos + 8 : pos + 12])[0] == masked_crc32c(header), f"{path}: bad header at {pos}"
    record = data[pos + 12 : pos + 12 + length]
    end = pos + 12 + length
    assert len(record) == length and end + 4 <= len(data), f"{path}: half a record at {pos}"
    assert struct.unpack("I", data[end : end + 4])[0] == masked_crc32c(record), f"{path}: bad record at {pos}"
    records.append(record)
    pos = end + 4
  return records


def _epoch_row(epoch: int) -> dict:
  return {
    "epoch": epoch,
    "step": 7 * epoch,
    "lr": 0.01,
    "train_loss": 1.0,
    "train_accuracy": 0.5,
    "val_loss": 1.0,
    "val_accuracy": 0.25 * epoch,
    "items_per_s": 10.0,
    "halved": False,
  }


def test_full_disk_in_the_metrics_writer_is_one_line_and_leaves_whole_files(tmp_path):
  """metrics.jsonl and the TensorBoard event file on a full disk: NoSpace naming the file, the file as it was (no
  half line, no half record), nothing temporary; once space is freed the same writer goes on (no writer thread
  died on the way)."""
  from jsim import workdir as wd
  from jsim.train.metrics_writer import METRICS_FILE, MetricsWriter

  noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)  # (a PNG of ~50 kB)
  with small_disk(tmp_path / "disk", "1m") as disk:
    stage = disk / "stage1"
    writer = MetricsWriter(stage)
    writer.reset([])
    writer.write_epoch(_epoch_row(1))
    writer.write_scalars(8, {"train/loss": 0.9})
    (events,) = (stage / "tb").glob("events.out.tfevents.*")
    size, metrics = events.stat().st_size, (stage / METRICS_FILE).read_text()
    records = _event_records(events)
    filler = fill(disk)
    with pytest.raises(wd.NoSpace) as e:
      writer.write_image("augmentations", noise)
    assert str(e.value).startswith(f"{events}: no space left on device;")
    assert events.stat().st_size == size and _event_records(events) == records
    with pytest.raises(wd.NoSpace) as e:
      writer.write_epoch(_epoch_row(2))
    assert str(e.value).startswith(f"{stage / METRICS_FILE}: no space left on device;")
    assert (stage / METRICS_FILE).read_text() == metrics and _tmp_files(disk) == []
    filler.unlink()
    writer.write_epoch(_epoch_row(2))
    writer.write_image("augmentations", noise)
    writer.close()
    assert [json.loads(line) for line in (stage / METRICS_FILE).read_text().splitlines()] == [
      _epoch_row(1),
      _epoch_row(2),
    ]
    assert len(_event_records(events)) == len(records) + 9  # (the second epoch's 8 scalars and the image)


def test_full_disk_while_drawing_a_figure_or_a_table_keeps_the_old_one_whole(tmp_path):
  """A figure (jsim.evaluate.figures) and a comparison table (python -m jsim.evaluate.compare --table, the
  sweep's) redrawn on a full disk: NoSpace naming it, the one drawn before byte for byte, nothing temporary."""
  from jsim import workdir as wd
  from jsim.evaluate import figures, report

  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text("".join(json.dumps(_epoch_row(e)) + "\n" for e in range(1, 4)))
  rows = [{"name": "ce", "test_accuracy": 0.8, "auc": 0.9}]
  with small_disk(tmp_path / "disk", "1m") as disk:
    png, md, js = disk / "figures" / "stage1.png", disk / "cmp.md", disk / "cmp.json"
    figures.plot_stage_curves(metrics, png, "stage 1")
    report.write_comparison(rows, md, js)
    before = {p: p.read_bytes() for p in (png, md, js)}
    filler = fill(disk)
    with pytest.raises(wd.NoSpace, match=f"^{png}: no space left on device;"):
      figures.plot_stage_curves(metrics, png, "stage 1, redrawn")
    with pytest.raises(wd.NoSpace, match=f"^{md}: no space left on device;"):
      report.write_comparison([*rows, {"name": "ms", "test_accuracy": 0.7, "auc": 0.8}], md, js)
    assert {p: p.read_bytes() for p in (png, md, js)} == before and _tmp_files(disk) == []
    filler.unlink()
    figures.plot_stage_curves(metrics, png, "stage 1, redrawn")
    assert png.read_bytes() != before[png] and png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_is_one_line_and_the_rerun_resumes_exactly(reference, jsim_cache, tmp_path):
  with small_disk(tmp_path / "disk") as disk:
    w = disk / "W"
    ckpts = w / "stage1" / "checkpoints"
    run = Jsim([*STAGE1, f"--workdir={w}"], jsim_cache)
    run.wait_until(lambda: 4 in checkpoint_steps(ckpts), "the checkpoint of step 4")
    run.send(signal.SIGSTOP)
    filler = fill(disk)
    run.send(signal.SIGCONT)
    assert run.finish() == 1, run.output[-3000:]
    line = one_line_error(run.output, "no space left on device")
    assert str(w) in line and "rerun the same command" in line
    assert _tmp_files(w) == [] and checkpoint_steps(ckpts)[0] == 4
    filler.unlink()
    out = run_ok([*STAGE1, f"--workdir={w}"], jsim_cache)
    assert "resum" in out
    ref = reference / "A" / "stage1" / "checkpoints"
    assert_bitwise_equal(checkpoint_state(ckpts, 42), checkpoint_state(ref, 42))


@pytest.mark.slow
def test_full_disk_while_embedding_is_one_line_and_the_rerun_completes(reference, jsim_cache, tmp_path):
  with small_disk(tmp_path / "disk") as disk:
    w = disk / "W"
    shutil.copytree(reference / "A_embedded", w, ignore=shutil.ignore_patterns("embeddings"))
    filler = fill(disk)
    proc = run_jsim([*TINY1, f"--workdir={w}", "--config.stage=embed"], jsim_cache, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    line = one_line_error(out, "no space left on device")
    assert str(w) in line
    assert _tmp_files(w) == [] and not (w / "embeddings" / "meta.json").exists()
    filler.unlink()
    run_ok([*TINY1, f"--workdir={w}", "--config.stage=embed"], jsim_cache)
    for name in ("train", "test"):
      np.testing.assert_array_equal(
        np.load(w / "embeddings" / f"{name}.npy"), np.load(reference / "A_embedded" / "embeddings" / f"{name}.npy")
      )


def test_full_disk_during_an_export_is_one_line_and_leaves_nothing(trained, tmp_path):
  with small_disk(tmp_path / "disk", "2m") as disk:
    filler = fill(disk)
    d = disk / "export"
    r = _tool("jsim.export", f"--workdir={trained.workdir}", f"--out={d}")
    _one_line(r, "python -m jsim.export", "no space left on device")
    assert _tmp_files(disk) == [] and not (d / "meta.json").exists()
    filler.unlink()


# (6. a truncated archive: in test_benchmarks.py, beside the archives it makes.)


# ----------------------------------------------------------------------------- 8. a read-only finished workdir


@pytest.mark.slow
def test_a_read_only_finished_workdir_can_be_evaluated_predicted_and_exported(trained, tmp_path):
  w = _copy(trained, tmp_path / "w")
  cache = tmp_path / "user_cache"
  env = {**os.environ, "JSIM_CACHE": str(cache)}
  a, b = trained.files[0], trained.files[1]
  with read_only(w):
    with pytest.raises(OSError) as e:
      (w / "probe").write_text("x")
    assert e.value.errno in (errno.EROFS, errno.EACCES)
    before = snapshot(w)
    args = [*TINY_RUN, f"--workdir={w}", "--config.stage=evaluate"]  # (the trained fixture's own config)
    proc = run_jsim(args, trained.cache, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "evaluation is current" in proc.stdout + proc.stderr
    # predict: the ONNX backend's export and the gallery cache go to the user's cache folder, said in one line
    r = _tool("jsim.predict", f"--workdir={w}", "--backend=onnx", "--json", a, b, env=env)
    assert r.returncode == 0, r.stderr
    assert f"{w} is read-only: its onnx cache is kept in {cache}" in r.stderr and "Traceback" not in r.stderr
    gal = tmp_path / "gallery"
    gal.mkdir()
    for i in range(2, 5):
      shutil.copyfile(trained.files[i], gal / f"{i}.jpg")
    for _ in range(2):
      r = _tool("jsim.predict", f"--workdir={w}", f"--query={a}", f"--gallery={gal}", "--json", env=env)
      assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cache"]["reused"] == 3  # the second search: all from the cache outside W
    # export: to another --out; into W itself, one line
    assert _tool("jsim.export", f"--workdir={w}", f"--out={tmp_path / 'd'}").returncode == 0
    _one_line(_tool("jsim.export", f"--workdir={w}"), "python -m jsim.export", f"{w} is read-only: cannot export")
    assert snapshot(w) == before


@pytest.mark.slow
@pytest.mark.parametrize(
  "args, path",
  [
    (["--config.classifier.num_epochs=3"], "stage1/config.json"),  # a stage to continue
    (["--config.stage=evaluate", "--config.evaluation.test_per_ordered_class_pair=3"], "figures/"),  # a new one
  ],
)
def test_a_run_that_must_write_a_read_only_workdir_is_one_line(trained, tmp_path, args, path):
  # (Was a 50-line traceback: the write failed with EROFS, then removing its temporary file failed again.)
  w = _copy(trained, tmp_path / "w")
  with read_only(w):
    before = snapshot(w)
    proc = run_jsim([*TINY_RUN, f"--workdir={w}", *args], trained.cache, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    line = one_line_error(out, "cannot be written")
    assert f"jsim: {w / path}" in line and "this run has to write to the workdir" in line, line
    assert snapshot(w) == before


# ----------------------------------------------------------------------------- 9, 10. signals at the edges


@pytest.mark.slow
def test_ctrl_c_during_a_gallery_search_is_one_line_and_130(trained, tmp_path):
  w = _copy(trained, tmp_path / "w")
  assert _tool("jsim.export", f"--workdir={w}").returncode == 0  # (W/onnx: the search starts at once)
  gal = tmp_path / "gallery"
  gal.mkdir()
  for i in range(20_000):  # (hard links: a big gallery, made fast)
    os.link(trained.files[i % len(trained.files)], gal / f"{i:05d}.jpg")
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "jsim.predict",
      f"--workdir={w}",
      "--backend=onnx",
      f"--query={trained.files[0]}",
      f"--gallery={gal}",
    ],
    cwd=REPO,
    env=dict(os.environ, **READ_ONLY_XLA_CACHE),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    # As from a terminal: a shell's background job (pytest started with &) would pass SIGINT on ignored.
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
  )
  # onnxruntime's threads are running once its library is loaded and the sessions made; then a few seconds in.
  deadline = time.monotonic() + 120
  while "onnxruntime" not in Path(f"/proc/{proc.pid}/maps").read_text():
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
    time.sleep(0.05)
  time.sleep(3)
  assert proc.poll() is None, "the search ended before the signal: use a bigger gallery"
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err and "Segmentation" not in err
  assert _last_line(err) == "jsim-predict: stopped by SIGINT", err[-3000:]


def _stopped(pid: int, timeout: float = 30) -> bool:
  """Waits until every thread of `pid` is stopped (after SIGSTOP; one in a disk write stops when it ends):
  True, or False if the process ended first."""
  deadline = time.monotonic() + timeout
  while True:
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
      with contextlib.suppress(OSError):
        states.append((task / "stat").read_text().rpartition(")")[2].split()[0])
    if any(s in "ZX" for s in states):
      return False
    if states and all(s in "tT" for s in states):
      return True
    assert time.monotonic() < deadline, f"process {pid} did not stop: thread states {states}"
    time.sleep(0.001)


@pytest.mark.slow
def test_double_ctrl_c_in_stage_1_is_one_line_and_130(jsim_cache, tmp_path):
  """The first Ctrl-C saves a checkpoint and stops; the second comes while orbax writes that checkpoint.

  The first comes while the first step compiles: the run stops after that step and saves it, so a
  temporary folder of step 1 is the first Ctrl-C's save (no other save is at step 1: those are every 4
  steps and at the end of each 7-step epoch). The run is stopped (SIGSTOP) as soon as that folder appears,
  and the second Ctrl-C is sent only if the save is still unfinished while it is stopped; a run whose save
  finished first (or whose first Ctrl-C came before the first step, so that nothing was saved) is tried
  again, in a new workdir."""
  for attempt in range(4):
    ckpts = tmp_path / f"W{attempt}" / "stage1" / "checkpoints"
    run = Jsim([*STAGE1, f"--workdir={ckpts.parent.parent}"], jsim_cache)
    run.wait_for_text("stage 1 epoch 1/6:   0% 0/42 img, compiling")
    run.send(signal.SIGINT)
    deadline = time.monotonic() + 600
    while 1 not in tmp_checkpoint_steps(ckpts) and run.proc.poll() is None:
      assert time.monotonic() < deadline, run.output[-3000:]
      time.sleep(0.001)
    if run.proc.poll() is None:
      run.send(signal.SIGSTOP)
      if _stopped(run.proc.pid) and 1 in tmp_checkpoint_steps(
        ckpts
      ):  # stopped while orbax writes the first Ctrl-C's checkpoint
        break
      run.send(signal.SIGCONT)
    assert run.finish() == 0, run.output[-3000:]  # (the first Ctrl-C alone: a checkpoint, or none before step 1)
    one_line_error(run.output, "SIGINT at epoch 1, batch")
  else:
    pytest.fail("in 4 runs, the first Ctrl-C's checkpoint was always written before the run could be stopped")
  run.send(signal.SIGINT)
  run.send(signal.SIGCONT)
  assert run.finish() == 130, run.output[-3000:]
  out = run.output
  assert "Traceback" not in out and "Exception ignored" not in out and "Task exception" not in out, out[-3000:]
  assert _last_line(out) == "jsim: interrupted; rerun the same command to resume from the last checkpoint"


def _full_pipe() -> tuple[int, int]:
  """(read end, write end) of a pipe filled to the last byte, as behind a reader that stopped reading (a stalled
  pager or log collector): the next write to it blocks. Filled through a file description of its own, so that
  the write end stays blocking."""
  read_fd, write_fd = os.pipe()
  filler = os.open(f"/proc/self/fd/{write_fd}", os.O_WRONLY | os.O_NONBLOCK)
  try:
    for size in (4096, 1):
      with contextlib.suppress(BlockingIOError):
        while True:
          os.write(filler, b"." * size)
  finally:
    os.close(filler)
  return read_fd, write_fd


_WRITE = {"x86_64": 1, "aarch64": 64}  # the write system call's number


@pytest.mark.slow
def test_sigterm_while_the_summary_is_printed_is_one_line(reference, jsim_cache, tmp_path):
  """A finished workdir: the run skips every stage, then prints its summary to a stdout that nobody reads (a full
  pipe, as behind a stalled pager or log collector). Held there, with every output written, a SIGTERM gives one
  line saying that the outputs are complete and 143, and the workdir is as it was."""
  if platform.machine() not in _WRITE:
    pytest.skip(f"the write system call's number on {platform.machine()} is not known here")
  w = tmp_path / "W"
  shutil.copytree(reference / "A_done", w)
  before = snapshot(w)
  read_fd, write_fd = _full_pipe()
  try:
    proc = subprocess.Popen(
      [sys.executable, "-m", "jsim.main", *FULL, f"--workdir={w}", "--config.stage=similarity"],
      cwd=REPO,
      env=jsim_env(jsim_cache, **READ_ONLY_XLA_CACHE),
      stdout=write_fd,
      stderr=subprocess.PIPE,
      text=True,
    )
  finally:
    os.close(write_fd)
  err: list[str] = []
  reader = threading.Thread(target=lambda: err.extend(iter(proc.stderr.readline, "")), daemon=True)
  reader.start()
  # The last line before the summary is stage 2's; the summary is the run's only write to stdout.
  deadline = time.monotonic() + 300
  while not (
    any("stage 2 already finished" in line for line in err)
    and Path(f"/proc/{proc.pid}/syscall").read_text().split()[:2] == [str(_WRITE[platform.machine()]), "0x1"]
  ):
    assert proc.poll() is None and time.monotonic() < deadline, (proc.returncode, "".join(err)[-3000:])
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  with open(read_fd, "rb") as out:  # (reading lets the print go on, should the signal not interrupt it)
    summary = out.read().lstrip(b".").decode()
  assert proc.wait(60) == 143, (summary, "".join(err)[-3000:])
  reader.join(10)
  assert "Traceback" not in "".join(err), "".join(err)[-3000:]
  assert _last_line("".join(err)) == "jsim: SIGTERM after the run finished; its outputs are complete"
  # Every output as it was; the lock file is left by the exit (not held: the kernel dropped the lock), and
  # config.json, the record of the last run, was replaced (whole) before the summary.
  assert json.loads((w / "config.json").read_text())["stage"] == "similarity"
  left_as_they_were = {p: s for p, s in before.items() if p.name != "config.json"}
  assert {p: s for p, s in snapshot(w).items() if p.name not in (".jsim.lock", "config.json")} == (left_as_they_were), (
    summary
  )


@pytest.mark.slow
def test_sigterm_after_the_end_of_run_summary_is_one_line(reference, jsim_cache, tmp_path):
  """A finished workdir: the run skips every stage, prints its summary and exits. Stopped (SIGSTOP) after the
  summary and sent a SIGTERM, which the kernel then hands to whichever of its threads runs first (seldom the
  main one, the only one that runs Python's handlers), it ends with one line and 143: three times. A stop that
  meets a process already exiting (it cannot stop) is no trial: that run finished before the signal."""
  w = tmp_path / "W"
  shutil.copytree(reference / "A_done", w)
  trials = runs = 0
  while trials < 3:
    runs += 1
    assert runs <= 30, f"only {trials} of {runs - 1} runs could be stopped after their summary"
    run = Jsim([*FULL, f"--workdir={w}", "--config.stage=similarity"], jsim_cache)
    run.wait_for_text("(pip install tensorboard)\n")  # (the summary's last line, whole)
    run.send(signal.SIGSTOP)
    if not _stopped(run.proc.pid):
      assert run.finish() == 0, run.output[-3000:]
      continue
    run.send(signal.SIGTERM)
    run.send(signal.SIGCONT)
    assert run.finish() == 143, run.output[-3000:]
    assert "Traceback" not in run.output, run.output[-3000:]
    assert _last_line(run.output) == "jsim: SIGTERM after the run finished; its outputs are complete", run.output
    trials += 1


# ----------------------------------------------------------------------------- derived files changed in place


def _in_trained_cache(monkeypatch, trained) -> None:
  monkeypatch.setenv("JSIM_CACHE", str(trained.cache))  # (its data: no second decode of the synthetic set)


def _main(jsim_main, caplog, args: list[str]) -> tuple[int, str]:
  """jsim_main(args): (its status, its output with its log lines, which pytest captures in this process)."""
  caplog.clear()
  with caplog.at_level("INFO"):
    proc = jsim_main(args)
  return proc.returncode, caplog.text + proc.stdout + proc.stderr


@pytest.mark.slow
def test_embeddings_changed_in_place_are_never_read_as_current(trained, jsim_main, caplog, monkeypatch, tmp_path):
  """W/embeddings/test.npy zeroed in place (same shape, same dtype, a later time): the evaluation refuses it in
  one line naming it, as it refuses a deleted folder; stage=all computes the embeddings again from the stage-1
  checkpoint, as for a deleted folder, and what was evaluated from the original ones stays only because the
  embeddings computed again are, by content, the original ones."""
  _in_trained_cache(monkeypatch, trained)
  w = _copy(trained, tmp_path / "W")
  test_npy = w / "embeddings" / "test.npy"
  zeroed = np.load(test_npy)
  zeroed[:] = 0
  np.save(test_npy, zeroed)
  report = (w / "report.json").read_bytes()

  code, out = _main(jsim_main, caplog, [*TINY_RUN, f"--workdir={w}", "--config.stage=evaluate"])
  assert code == 1, out[-3000:]
  line = one_line_error(out, f"{test_npy} changed since it was written")
  assert "--config.stage=embed --config.overwrite=True" in line and "evaluation is current" not in out
  assert (w / "report.json").read_bytes() == report and np.load(test_npy).max() == 0

  code, out = _main(jsim_main, caplog, [*TINY_RUN, f"--workdir={w}"])
  assert code == 0, out[-3000:]
  assert f"{test_npy} changed since it was written" in out and "the embeddings are computed again" in out
  assert np.array_equal(np.load(test_npy), trained.test)  # the stage-1 checkpoint's embeddings again
  assert "evaluation is current" in out  # (bitwise the evaluated embeddings: by content, nothing changed)
  assert (w / "report.json").read_bytes() == report

  # Embeddings computed again with other bits (another batch size: other float rounding on XLA:CPU) are not
  # the ones the report was made from: the evaluation is redone, saying why; bitwise the same ones change nothing.
  proc = jsim_main(
    [*TINY_RUN, f"--workdir={w}", "--config.stage=embed", "--config.overwrite=True", "--config.embed.batch_size=8"]
  )
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  same = np.array_equal(np.load(test_npy), trained.test) and np.array_equal(
    np.load(w / "embeddings" / "train.npy"), np.load(trained.pristine / "embeddings" / "train.npy")
  )
  code, out = _main(jsim_main, caplog, [*TINY_RUN, f"--workdir={w}", "--config.stage=evaluate"])
  assert code == 0, out[-3000:]
  assert ("evaluation is current" in out) == same and ("the embeddings were computed again" in out) != same, out


@pytest.mark.slow
@pytest.mark.parametrize("digests", [True, False], ids=["recorded", "made-before-digests"])
def test_a_truncated_embeddings_file_is_one_line_naming_it(trained, jsim_main, caplog, monkeypatch, tmp_path, digests):
  _in_trained_cache(monkeypatch, trained)
  w = _copy(trained, tmp_path / "W")
  test_npy = w / "embeddings" / "test.npy"
  os.truncate(test_npy, test_npy.stat().st_size // 2)
  if not digests:  # a meta.json written before the digests were recorded: the file itself is what is read
    meta = json.loads((w / "embeddings" / "meta.json").read_text())
    del meta["sha256"]
    (w / "embeddings" / "meta.json").write_text(json.dumps(meta))
  code, out = _main(jsim_main, caplog, [*TINY_RUN, f"--workdir={w}", "--config.stage=evaluate"])
  assert code == 1, out[-3000:]
  expect = f"{test_npy} changed since it was written" if digests else f"{test_npy}: damaged or truncated"
  line = one_line_error(out, expect)
  assert line.endswith("rerun with --config.stage=embed --config.overwrite=True to compute the embeddings again")


def test_a_feature_cache_file_changed_in_place_is_computed_again(tmp_path, caplog):
  from jsim.train import feature_cache

  key = {"train_count": 5, "test_count": 3, "model": "m"}
  arrays = {"train": np.arange(20, dtype=np.float32).reshape(5, 4), "test": np.ones((3, 4), np.float32)}
  feature_cache.write(tmp_path, key, arrays)
  got = feature_cache.load(tmp_path, key)
  assert got is not None and all(np.array_equal(got[k], arrays[k]) for k in arrays)
  path = tmp_path / feature_cache.CACHE_DIR / "train.npy"
  changed = np.load(path)
  changed[2] = 0  # same shape, dtype and size: only its content says it
  np.save(path, changed)
  with caplog.at_level("WARNING"):
    assert feature_cache.load(tmp_path, key) is None
  assert f"{path} changed since it was written" in caplog.text and "computed again" in caplog.text


# ----------------------------------------------------------------------------- a free key on a finished stage


@pytest.mark.slow
def test_a_changed_learning_rate_on_finished_stages_is_named_and_not_recorded_as_trained(
  trained, jsim_main, caplog, monkeypatch, tmp_path
):
  """The learning rates may change for a resumed stage (a NaN stop continues at a lower one), so they do not
  refuse a finished stage; nor do they retrain it. The skip lines say so, naming both values, and report.json and
  W/config.json keep the rates the stages were trained with: the evaluation of the finished stages is current."""
  _in_trained_cache(monkeypatch, trained)
  w = _copy(trained, tmp_path / "W")
  stage1 = json.loads((w / "stage1" / "config.json").read_text())["classifier"]["learning_rate"]
  stage2 = json.loads((w / "stage2" / "config.json").read_text())["similarity"]["learning_rate"]
  new1, new2 = stage1 * 3, stage2 * 7
  checkpoints = snapshot(w / "stage1", w / "stage2")
  report = (w / "report.json").read_bytes()
  rates = [f"--config.classifier.learning_rate={new1}", f"--config.similarity.learning_rate={new2}"]

  code, out = _main(jsim_main, caplog, [*TINY_RUN, f"--workdir={w}", *rates])
  assert code == 0, out[-3000:]
  skip1 = next(line for line in out.splitlines() if "stage 1 already finished" in line)
  skip2 = next(line for line in out.splitlines() if "stage 2 already finished" in line)
  assert f"classifier.learning_rate: {stage1!r} in the workdir, {new1!r} now" in skip1, skip1
  assert f"similarity.learning_rate: {stage2!r} in the workdir, {new2!r} now" in skip2, skip2
  assert "not retrained (--config.overwrite=True retrains it)" in skip2
  assert "evaluation is current" in out and (w / "report.json").read_bytes() == report
  assert snapshot(w / "stage1", w / "stage2") == checkpoints
  recorded = json.loads((w / "config.json").read_text())
  assert (recorded["classifier"]["learning_rate"], recorded["similarity"]["learning_rate"]) == (stage1, stage2)

  # The evaluation redone with the new rates on the command line records the trained ones.
  code, out = _main(
    jsim_main, caplog, [*TINY_RUN, f"--workdir={w}", "--config.stage=evaluate", "--config.overwrite=True", *rates]
  )
  assert code == 0, out[-3000:]
  assert "evaluation: stage 2 is evaluated, as trained, not with this run's values (similarity.learning_rate: " in out
  config = json.loads((w / "report.json").read_text())["config"]
  assert (config["classifier"]["learning_rate"], config["similarity"]["learning_rate"]) == (stage1, stage2)
  assert snapshot(w / "stage1", w / "stage2") == checkpoints


# ----------------------------------------------------------------------------- atomic writes reach the disk


@pytest.mark.parametrize("writer", ["write_json", "write_npy", "write_file"])
def test_an_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, writer):
  """What a power loss needs (a renamed file whose data never reached the disk is empty after it), seen in the
  system calls of a real process (strace): fsync of the temporary file, then the rename, then fsync of the folder."""
  if shutil.which("strace") is None:
    pytest.skip("strace is not installed")
  target = tmp_path / "out" / {"write_json": "a.json", "write_npy": "a.npy", "write_file": "a.txt"}[writer]
  write = {
    "write_json": "wd.write_json(p, {'a': 1})",
    "write_npy": "wd.write_npy(p, np.arange(3))",
    "write_file": "wd.write_file(p, lambda tmp: tmp.write_text('x'))",
  }[writer]
  code = (
    f"import numpy as np; from pathlib import Path; from jsim import workdir as wd; p = Path({str(target)!r}); {write}"
  )
  trace = tmp_path / "trace"
  r = subprocess.run(
    [
      "strace",
      "-f",
      "-y",
      "-e",
      "trace=fsync,fdatasync,rename,renameat,renameat2",
      "-o",
      str(trace),
      sys.executable,
      "-c",
      code,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  if r.returncode != 0 and "ptrace" in r.stderr:
    pytest.skip(f"strace cannot trace here: {r.stderr.strip()[:200]}")
  assert r.returncode == 0, r.stderr[-3000:]
  calls = [line.split(None, 1)[1] for line in trace.read_text().splitlines() if "(" in line and "+++" not in line]
  rename = next(i for i, c in enumerate(calls) if c.startswith("rename") and f'"{target}"' in c)
  synced = re.compile(rf"^fsync\(\d+<{re.escape(str(target))}\.\d+\.tmp>\)\s+= 0$")
  assert any(synced.match(c) for c in calls[:rename]), calls
  assert calls[rename + 1].startswith("fsync(") and f"<{target.parent}>" in calls[rename + 1], calls
  assert target.exists() and not list(target.parent.glob("*.tmp"))
