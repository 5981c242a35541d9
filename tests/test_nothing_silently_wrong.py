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
import shutil
import signal
import subprocess
import sys
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
  Jsim,
  _assert_bitwise_equal,
  _ok,
  _one_line_error,
  _snapshot,
  _state,
  _steps,
  _tmp_steps,
  fill,
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
  _ok([*FULL, f"--workdir={w}", "--config.stage=evaluate"], jsim_cache)
  assert wd.read_records(w).threshold is not None and not wd.read_records(w).notes
  _ok([*FULL, f"--workdir={w}", "--config.stage=similarity", "--config.similarity.num_epochs=5"], jsim_cache)
  assert (w / "report.json").exists()  # (not removed: another run of the same stage; its readers refuse it)
  records = wd.read_records(w)
  assert records.threshold is None
  assert len(records.notes) == 1 and "report.json is stale: it evaluated another stage2 run" in records.notes[0]
  out = tmp_path / "roc.png"
  r = _tool("jsim.evaluate.compare", w, f"--out={out}", f"--table={tmp_path / 't.md'}")
  _one_line(r, None, "report.json is stale: it evaluated another stage2 run")
  assert not out.exists() and not (tmp_path / "t.md").exists()
  assert compare.main([str(w), f"--out={out}"]) == 1  # the figure alone reads evaluation.npz: refused too

  _ok([*FULL, f"--workdir={w}", "--config.stage=similarity", "--config.overwrite=True"], jsim_cache)
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


def test_a_damaged_report_is_one_line_for_predict(trained, tmp_path):
  w = tmp_path / "w"
  for f in trained.workdir.rglob("*.json"):  # the records only: predict checks them before JAX loads
    if "checkpoints" not in f.parts:
      (w / f.relative_to(trained.workdir)).parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(f, w / f.relative_to(trained.workdir))
  for stage in ("stage1", "stage2"):
    (w / stage / "checkpoints").mkdir(parents=True, exist_ok=True)
  (w / "report.json").write_text("[]")
  r = _tool("jsim.predict", f"--workdir={w}", trained.files[0], trained.files[1])
  _one_line(r, "jsim-predict", f"{w / 'report.json'}: not a jsim report (a JSON object expected, found list)")


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


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_is_one_line_and_the_rerun_resumes_exactly(reference, jsim_cache, tmp_path):
  with small_disk(tmp_path / "disk") as disk:
    w = disk / "W"
    ckpts = w / "stage1" / "checkpoints"
    run = Jsim([*STAGE1, f"--workdir={w}"], jsim_cache)
    run.wait_until(lambda: 4 in _steps(ckpts), "the checkpoint of step 4")
    run.send(signal.SIGSTOP)
    filler = fill(disk)
    run.send(signal.SIGCONT)
    assert run.finish() == 1, run.output[-3000:]
    line = _one_line_error(run.output, "no space left on device")
    assert str(w) in line and "rerun the same command" in line
    assert _tmp_files(w) == [] and _steps(ckpts)[0] == 4
    filler.unlink()
    out = _ok([*STAGE1, f"--workdir={w}"], jsim_cache)
    assert "resum" in out
    ref = reference / "A" / "stage1" / "checkpoints"
    _assert_bitwise_equal(_state(ckpts, 42), _state(ref, 42))


@pytest.mark.slow
def test_full_disk_while_embedding_is_one_line_and_the_rerun_completes(reference, jsim_cache, tmp_path):
  with small_disk(tmp_path / "disk") as disk:
    w = disk / "W"
    shutil.copytree(reference / "A_embedded", w, ignore=shutil.ignore_patterns("embeddings"))
    filler = fill(disk)
    proc = run_jsim([*TINY1, f"--workdir={w}", "--config.stage=embed"], jsim_cache, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    line = _one_line_error(out, "no space left on device")
    assert str(w) in line
    assert _tmp_files(w) == [] and not (w / "embeddings" / "meta.json").exists()
    filler.unlink()
    _ok([*TINY1, f"--workdir={w}", "--config.stage=embed"], jsim_cache)
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


# ----------------------------------------------------------------------------- 6. a truncated archive


def test_a_truncated_benchmark_archive_is_one_line_naming_it(tmp_path):
  import test_benchmarks
  from jsim.data import sources

  test_benchmarks.make_cub(tmp_path)
  archive = tmp_path / "CUB_200_2011.tgz"
  archive.write_bytes(archive.read_bytes()[: archive.stat().st_size * 2 // 3])
  with pytest.raises(ValueError, match=f"^{archive}: cannot unpack .*truncated or damaged: download it again$"):
    sources.load_image_sets(test_benchmarks._config("cub200", tmp_path, tmp_path / "cache").data)
  assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and "extracted" in p.parts]


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
    before = _snapshot(w)
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
    assert _snapshot(w) == before


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


@pytest.mark.slow
@pytest.mark.xfail(
  reason="flaky beside other tests since the merges of 2026-12-03 (passes alone; failed twice under -n 2): open in "
  "issue 24",
  strict=False,
)
def test_double_ctrl_c_in_stage_1_is_one_line_and_130(jsim_cache, tmp_path):
  """The first Ctrl-C saves a checkpoint and stops; the second comes while orbax writes it (its temporary
  folder exists; the run is held with SIGSTOP so that the signal lands there)."""
  ckpts = tmp_path / "W" / "stage1" / "checkpoints"
  run = Jsim([*STAGE1, f"--workdir={tmp_path / 'W'}"], jsim_cache)
  run.wait_for_text("stage 1 epoch 1/6  loss")  # (a log shows no progress lines between compiling and done)
  run.send(signal.SIGINT)
  run.wait_until(lambda: _tmp_steps(ckpts), "orbax writing the checkpoint of the first Ctrl-C")
  run.send(signal.SIGSTOP)
  run.send(signal.SIGINT)
  run.send(signal.SIGCONT)
  assert run.finish() == 130, run.output[-3000:]
  out = run.output
  assert "Traceback" not in out and "Exception ignored" not in out and "Task exception" not in out, out[-3000:]
  assert _last_line(out) == "jsim: interrupted; rerun the same command to resume from the last checkpoint"


@pytest.mark.slow
@pytest.mark.xfail(
  reason="since the merges of 2026-12-03 the run exits 0 after a SIGTERM sent after its summary, 5 tries of 5: "
  "issue 24 item 10 is open again",
  strict=False,
)
def test_sigterm_after_the_end_of_run_summary_is_one_line(reference, jsim_cache, tmp_path):
  """A finished workdir: the run skips every stage and prints its summary; stopped right after it (SIGSTOP, so
  that the signal lands between the summary and the exit), a SIGTERM gives one line and 143."""
  w = tmp_path / "W"
  shutil.copytree(reference / "A_done", w)
  for _ in range(5):
    run = Jsim([*FULL, f"--workdir={w}", "--config.stage=similarity"], jsim_cache)
    run.wait_for_text("tensorboard --logdir")
    run.send(signal.SIGSTOP)
    if run.proc.poll() is not None:
      run.finish()
      continue
    run.send(signal.SIGTERM)
    run.send(signal.SIGCONT)
    # 0: the stop came while the process was already exiting, so the signal met no Python code; try again
    # (a missing handler would end with -15, not 0)
    if (code := run.finish()) != 0:
      break
  else:
    pytest.fail("the run always exited before it could be stopped after its summary")
  assert code == 143, run.output[-3000:]
  assert "Traceback" not in run.output
  assert _last_line(run.output) in (
    "jsim: SIGTERM after the run finished; its outputs are complete",
    # (stopped in the instant between the summary and the end of run.run)
    "jsim: stopped by SIGTERM; finished stages and saved checkpoints are kept, rerun the same command to continue",
  ), run.output[-3000:]
