"""`python -m jsim.export` and `jsim-predict --backend=onnx|jax|auto` through the real command line.

On the tiny workdir test_predict.py trains (shared fixture): the exported graphs give the
embeddings the training pipeline stored (W/embeddings/test.npy) and the P(same) of Ms
restored by the trainer's code, within 1e-4 relative; both backends agree; the export in
W/onnx is made once, reused, and made again when a checkpoint changes; gallery caches of
the two backends are kept apart; bad input is one line and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from conftest import REPO, Trained, gallery_folder, predict_cli, predict_cli_json  # noqa: E402


def export_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "jsim.export", *map(str, args)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )


def one_line(r: subprocess.CompletedProcess, prog: str, expected: str) -> None:
  assert r.returncode == 1, (r.returncode, r.stderr)
  assert "Traceback" not in r.stderr
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith(f"{prog}: ") and expected in lines[0], lines[0]


def copy_workdir(trained: Trained, dst: Path) -> Path:
  return shutil.copytree(trained.workdir, dst, ignore=shutil.ignore_patterns("predict_cache", "onnx"))


def test_export_command_writes_graphs_that_match_training(trained, ms_reference, tmp_path):
  import onnxruntime as ort

  from jsim import predict

  out = tmp_path / "export"
  r = export_cli(f"--workdir={trained.workdir}", f"--out={out}")
  assert r.returncode == 0, r.stderr
  assert f"to {out}" in r.stdout and "Traceback" not in r.stderr
  meta = json.loads((out / "meta.json").read_text())
  w = trained.workdir
  split = json.loads((w / "split.json").read_text())
  assert meta["image_size"] == 32 and meta["input_size"] == 32 and meta["embedding_dim"] == trained.test.shape[1]
  assert meta["class_names"] == split["seen_classes"]
  assert meta["threshold"] == pytest.approx(trained.threshold)
  for stage in ("stage1", "stage2"):
    result = json.loads((w / stage / "result.json").read_text())
    assert meta["stage_ids"][stage] == {"best_step": result["best_step"], "run_id": result["run_id"]}

  # The images of stored rows, decoded as predict decodes them; embedded by embed.onnx in one batch of 5.
  embed = ort.InferenceSession(str(out / "embed.onnx"), providers=["CPUExecutionProvider"])
  rows = [0, 1, 2, 3, 7]
  x = np.stack([predict.prepare_image(trained.files[i], 32) for i in rows])
  e = embed.run(None, {"images": x})[0]
  scale = np.abs(trained.test).max()
  np.testing.assert_allclose(e, trained.test[rows], rtol=1e-4, atol=1e-5 * scale)
  assert embed.run(None, {"images": x[:1]})[0].shape == (1, meta["embedding_dim"])  # dynamic batch

  similarity = ort.InferenceSession(str(out / "similarity.onnx"), providers=["CPUExecutionProvider"])
  e1, e2 = trained.test[[0, 0, 1, 2]], trained.test[[1, 3, 7, 2]]
  p = similarity.run(None, {"e1": e1, "e2": e2})[0]
  np.testing.assert_allclose(p, ms_reference(e1, e2), rtol=1e-4, atol=1e-6)

  # Exporting again into the same folder replaces it; into another workdir's export it is refused.
  assert export_cli(f"--workdir={w}", f"--out={out}").returncode == 0
  other = copy_workdir(trained, tmp_path / "other")
  one_line(
    export_cli(f"--workdir={other}", f"--out={out}"),
    "python -m jsim.export",
    f"--out {out} holds an export of workdir {w.resolve()}",
  )
  assert json.loads((out / "meta.json").read_text())["workdir"] == str(w.resolve())  # untouched
  r = export_cli(f"--workdir={other}", f"--out={out}", "--overwrite")
  assert r.returncode == 0, r.stderr
  assert json.loads((out / "meta.json").read_text())["workdir"] == str(other.resolve())


@pytest.mark.parametrize("same", [True, False])
def test_backends_agree_through_the_command_line(trained, ms_reference, tmp_path, same):
  w = copy_workdir(trained, tmp_path / "w")
  i, j = trained.rows(same, start=0 if same else 1)
  a, b = trained.files[i], trained.files[j]
  jax_out, jax_err = predict_cli_json(f"--workdir={w}", "--backend=jax", a, b)
  assert not (w / "onnx").exists() and "exported" not in jax_err
  onnx_out, err = predict_cli_json(f"--workdir={w}", "--backend=onnx", a, b)
  assert "exported the model to" in err and (w / "onnx" / "meta.json").exists()  # first use
  stamp = (w / "onnx" / "embed.onnx").stat().st_mtime_ns
  auto_out, err = predict_cli_json(f"--workdir={w}", a, b)  # auto: onnx on this CPU, the cached export
  assert "exported" not in err and (w / "onnx" / "embed.onnx").stat().st_mtime_ns == stamp
  expected = ms_reference(trained.test[i], trained.test[j])[0]
  for out in (jax_out, onnx_out, auto_out):
    assert out["probability"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert out["same_at_val_threshold"] == (out["probability"] > trained.threshold)
  assert onnx_out["probability"] == pytest.approx(jax_out["probability"], rel=1e-4, abs=1e-6)


def test_api_onnx_backend_equals_jax(trained, sim, tmp_path):
  from jsim import predict

  w = copy_workdir(trained, tmp_path / "w")
  onnx_sim = predict.Similarity.load(w, backend="onnx")
  assert onnx_sim.backend == "onnx" and onnx_sim.exported_now
  assert not predict.Similarity.load(w, backend="onnx").exported_now  # cached
  files = trained.files[:6]
  e_onnx, e_jax = onnx_sim.embed(files), sim.embed(files)
  np.testing.assert_allclose(e_onnx, e_jax, rtol=1e-4, atol=1e-5 * np.abs(e_jax).max())
  assert onnx_sim.probability(files[0], files[1]) == pytest.approx(sim.probability(files[0], files[1]), rel=1e-4)
  np.testing.assert_allclose(onnx_sim.scores(e_jax[0], e_jax), sim.scores(e_jax[0], e_jax), rtol=1e-4, atol=1e-6)
  assert onnx_sim.threshold == sim.threshold and onnx_sim.dim == sim.dim


def test_export_is_redone_when_a_checkpoint_changes(trained, tmp_path):
  w = copy_workdir(trained, tmp_path / "w")
  a, b = trained.files[0], trained.files[1]
  r = export_cli(f"--workdir={w}")  # no --out: W/onnx, the folder predict uses
  assert r.returncode == 0 and f"to {w / 'onnx'}" in r.stdout, r.stderr
  _, err = predict_cli_json(f"--workdir={w}", "--backend=onnx", a, b)
  assert "exported" not in err
  first = json.loads((w / "onnx" / "meta.json").read_text())["export_id"]
  # Stage 2 retrained (a new run id, as jsim.workdir.finish_stage writes): stale, exported again.
  result = w / "stage2" / "result.json"
  result.write_text(json.dumps({**json.loads(result.read_text()), "run_id": "retrained"}))
  _, err = predict_cli_json(f"--workdir={w}", "--backend=onnx", a, b)
  assert "exported" in err
  assert json.loads((w / "onnx" / "meta.json").read_text())["export_id"] != first
  # Content decides, not times: a stage-1 checkpoint and the graphs touched (or copied) are the same export.
  ckpt = w / "stage1" / "checkpoints" / str(json.loads((w / "stage1" / "result.json").read_text())["best_step"])
  for path in (ckpt, w / "onnx" / "similarity.onnx"):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  _, err = predict_cli_json(f"--workdir={w}", "--backend=onnx", a, b)
  assert "exported" not in err
  # A changed graph (the same size): not used, exported again.
  graph = bytearray((w / "onnx" / "similarity.onnx").read_bytes())
  graph[-1] ^= 0xFF
  (w / "onnx" / "similarity.onnx").write_bytes(bytes(graph))
  _, err = predict_cli_json(f"--workdir={w}", "--backend=onnx", a, b)
  assert "exported" in err


def test_gallery_caches_of_the_two_backends_are_kept_apart(trained, ms_reference, tmp_path):
  w = copy_workdir(trained, tmp_path / "w")
  gal, rows = gallery_folder(trained, tmp_path)
  args = (f"--workdir={w}", f"--query={trained.files[0]}", f"--gallery={gal}", "--top=0")
  runs = {}
  for backend in ("onnx", "jax", "onnx", "jax"):
    out, _ = predict_cli_json(*args, f"--backend={backend}")
    if backend in runs:  # the second run of each backend: all from its own cache
      assert out["cache"]["embedded"] == 0 and out["cache"]["reused"] == len(rows), backend
    else:
      assert out["cache"]["embedded"] == len(rows), backend
    runs[backend] = {Path(m["path"]).relative_to(gal).as_posix(): m["probability"] for m in out["results"]}
  caches = sorted(p.name for p in (w / "predict_cache").iterdir())
  assert len(caches) == 2 and caches[0].endswith(".npz") and caches[1].endswith(".onnx.npz")
  assert set(runs["onnx"]) == set(runs["jax"]) == set(rows)
  for rel, row in rows.items():
    expected = ms_reference(trained.test[0], trained.test[row])[0]
    assert runs["onnx"][rel] == pytest.approx(expected, rel=1e-4, abs=1e-6), rel
    assert runs["jax"][rel] == pytest.approx(expected, rel=1e-4, abs=1e-6), rel
  # A new export (another export id) makes the ONNX cache stale, not the JAX one.
  meta = w / "onnx" / "meta.json"
  meta.unlink()
  out, _ = predict_cli_json(*args, "--backend=onnx")
  assert out["cache"]["embedded"] == len(rows)
  out, _ = predict_cli_json(*args, "--backend=jax")
  assert out["cache"]["embedded"] == 0


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def no_onnxruntime(tmp_path) -> dict:
  """The environment of a Python where `import onnxruntime` (and `import onnx`) fail."""
  for name in ("onnxruntime", "onnx"):
    (tmp_path / "blocked" / name).mkdir(parents=True)
    (tmp_path / "blocked" / name / "__init__.py").write_text(f'raise ImportError("No module named {name}")\n')
  return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocked"), str(REPO)])}


def test_bad_input_is_one_line_and_nonzero(trained, tmp_path, no_onnxruntime):
  w, a, b = trained.workdir, trained.files[0], trained.files[1]
  (tmp_path / "empty").mkdir()
  one_line(
    export_cli(f"--workdir={tmp_path / 'empty'}", f"--out={tmp_path / 'x'}"),
    "python -m jsim.export",
    "preprocessing.json is missing",
  )
  assert not (tmp_path / "x").exists()  # a refused export leaves nothing behind
  no_stage2 = copy_workdir(trained, tmp_path / "no_stage2")
  shutil.rmtree(no_stage2 / "stage2")
  one_line(export_cli(f"--workdir={no_stage2}"), "python -m jsim.export", "stage 2 never ran here")
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "todo.txt").write_text("mine")
  one_line(
    export_cli(f"--workdir={w}", f"--out={tmp_path / 'notes'}"),
    "python -m jsim.export",
    "holds no jsim export; choose a new or empty --out",
  )
  assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"

  # An export of another workdir, or a stale one, given to predict.
  other = copy_workdir(trained, tmp_path / "other")
  assert export_cli(f"--workdir={other}", f"--out={tmp_path / 'other_export'}").returncode == 0
  one_line(
    predict_cli(f"--workdir={w}", f"--onnx_dir={tmp_path / 'other_export'}", a, b),
    "jsim-predict",
    f"was exported from workdir {other.resolve()}, not {w.resolve()}",
  )
  result = other / "stage1" / "result.json"
  result.write_text(json.dumps({**json.loads(result.read_text()), "run_id": "retrained"}))
  one_line(
    predict_cli(f"--workdir={other}", "--backend=onnx", f"--onnx_dir={tmp_path / 'other_export'}", a, b),
    "jsim-predict",
    "is stale: the checkpoints of",
  )
  one_line(
    predict_cli(f"--workdir={w}", f"--onnx_dir={tmp_path / 'notes'}", a, b), "jsim-predict", "holds no jsim ONNX export"
  )

  # No onnxruntime / onnx: one line for the explicit backend and the export; auto quietly uses JAX.
  r = subprocess.run(
    [sys.executable, "-m", "jsim.predict", f"--workdir={w}", "--backend=onnx", a, b],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=no_onnxruntime,
  )
  one_line(r, "jsim-predict", "the ONNX backend needs onnxruntime; pip install")
  one_line(
    export_cli(f"--workdir={w}", f"--out={tmp_path / 'y'}", env=no_onnxruntime),
    "python -m jsim.export",
    "the ONNX export needs the onnx package",
  )
  r = subprocess.run(
    [sys.executable, "-m", "jsim.predict", f"--workdir={w}", "--json", a, b],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=no_onnxruntime,
  )
  assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
  assert 0 <= json.loads(r.stdout)["probability"] <= 1
