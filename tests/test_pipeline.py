"""Every stage through the real command line on the tiny config: the workdir contract."""

import json

import numpy as np

import pytest

from conftest import run_jsim

# The tests on the shared tiny workdir run in one pytest-xdist worker (make test: --dist loadgroup),
# which builds it once.
pytestmark = pytest.mark.xdist_group("tiny_workdir")


def _json(path):
  return json.loads(path.read_text())


def _tensorboard_values(tb_dir):
  """Every summary value in a TensorBoard folder's event files (TFRecord framing, tensorboardX's protos)."""
  import struct
  from tensorboardX.proto import event_pb2

  values = []
  for path in sorted(tb_dir.glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      values += list(event.summary.value)
      pos += 12 + length + 4
  return values


def test_workdir_contract(tiny_workdir):
  w = tiny_workdir
  split = _json(w / "split.json")
  assert split["counts"] == {"seen_classes": 6, "unseen_classes": 2, "train": 42, "val": 18, "test": 32}
  pre = _json(w / "preprocessing.json")
  assert pre["normalization"] == "t180" and len(pre["mean"]) == 3 and pre["image_size"] == 32

  for stage, epochs in (("stage1", 2), ("stage2", 3)):
    rows = [json.loads(line) for line in (w / stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    for r in rows:
      assert {"lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "items_per_s", "halved"} <= set(r)
    assert list((w / stage / "tb").glob("events.out.tfevents.*"))
    result = _json(w / stage / "result.json")
    assert result["epochs"] == epochs
    steps = sorted(int(p.name) for p in (w / stage / "checkpoints").iterdir() if p.name.isdigit())
    assert rows[-1]["step"] in steps and result["best_step"] in steps
    assert _json(w / stage / "config.json")["model"]  # the defining settings are recorded

  s1 = _json(w / "stage1" / "result.json")
  assert s1["test_images"] == 24 and 0.0 <= s1["test_accuracy"] <= 1.0  # seen-class test images only

  meta = _json(w / "embeddings" / "meta.json")
  assert meta["stage1_step"] == s1["best_step"] and meta["dim"] == 256
  train, test = np.load(w / "embeddings" / "train.npy"), np.load(w / "embeddings" / "test.npy")
  assert train.shape == (60, 256) and test.shape == (32, 256) and np.isfinite(train).all()

  report = _json(w / "report.json")
  pairs = [c["pairs"] for c in report["cases"]]
  # 8 classes (6 seen), 4 test images each, 2 per ordered class pair, 14 per class.
  assert pairs == [6 * 14, 6 * 5 * 2, 2 * 6 * 2 * 2, 2 * 14, 2 * 1 * 2]
  assert 0.0 <= report["val_threshold"] <= 1.0
  assert set(report["auc"]) == {"overall", "seen", "unseen"}
  assert report["retrieval"]["num_queries"] == 8
  assert "| 1. similar, seen class |" in (w / "report.md").read_text()
  for fig in ("stage1_curves", "stage2_curves", "roc", "retrieval_unseen", "augmentations"):
    assert (w / "figures" / f"{fig}.png").stat().st_size > 1000
  assert "figures/augmentations.png" in (w / "report.md").read_text()
  # Stage 1 also logged the augmentation figure to TensorBoard (the source's Table 1).
  images = [v for v in _tensorboard_values(w / "stage1" / "tb") if v.tag == "augmentations" and v.HasField("image")]
  assert len(images) == 1 and images[0].image.width > 300 and images[0].image.encoded_image_string[:4] == b"\x89PNG"
  # The evaluation also wrote its test-pair histograms, which `jsim.evaluate.compare` reads.
  assert (w / "evaluation.npz").is_file()


def test_rerun_resumes_instead_of_restarting(tiny_workdir, trained):
  before = {p: p.stat().st_mtime_ns for p in (tiny_workdir / "stage1" / "checkpoints").rglob("*")}
  proc = run_jsim(["--config=configs/tiny.py", f"--workdir={tiny_workdir}", "--config.stage=classifier"], trained.cache)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "stage 1 already finished" in proc.stderr
  after = {p: p.stat().st_mtime_ns for p in (tiny_workdir / "stage1" / "checkpoints").rglob("*")}
  assert before == after


def test_ensemble_of_two_backbones(tiny_workdir, trained, tmp_path):
  """configs/ensemble_sim.py's recipe: Ms on [ResNet, VGG] embeddings in a copy of the ResNet workdir."""
  import shutil

  vgg = tmp_path / "vgg"
  proc = run_jsim(
    ["--config=configs/tiny.py", f"--workdir={vgg}", "--config.model.name=vgg_tiny", "--config.stage=similarity"],
    trained.cache,
  )
  assert proc.returncode != 0 and "stage 1 has not finished" in proc.stderr  # embeddings need stage 1
  proc = run_jsim(
    [
      "--config=configs/tiny.py",
      f"--workdir={vgg}",
      "--config.model.name=vgg_tiny",
      "--config.stage=all",
      "--config.evaluation.retrieval=False",
    ],
    trained.cache,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  ens = tmp_path / "ensemble"
  shutil.copytree(tiny_workdir, ens)
  for name in ("stage2", "figures", "report.json", "report.md"):
    shutil.rmtree(ens / name) if (ens / name).is_dir() else (ens / name).unlink()
  args = ["--config=configs/tiny.py", f"--workdir={ens}", f"--config.similarity.ensemble_workdirs=('{vgg}',)"]
  proc = run_jsim(args, trained.cache)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "stage 1 already finished" in proc.stderr  # the copied ResNet stage 1 is reused
  assert json.loads((ens / "stage2" / "result.json").read_text())["embedding_dim"] == 256 + 32
  report = json.loads((ens / "report.json").read_text())
  assert report["backbone"] == "resnet_tiny+vgg_tiny" and report["num_pairs"] == 224


def test_feature_sweep_writes_one_comparison_table(tiny_workdir, trained):
  proc = run_jsim(["--config=configs/tiny.py", f"--workdir={tiny_workdir}", "--config.stage=sweep"], trained.cache)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = json.loads((tiny_workdir / "sweep" / "comparison.json").read_text())
  assert [r["feature"] for r in rows] == ["l1", "prod"]  # configs/tiny.py's sweep.features
  for r in rows:
    assert 0.0 <= r["test_accuracy"] <= 1.0 and (tiny_workdir / "sweep" / r["feature"] / "result.json").exists()
  table = (tiny_workdir / "sweep" / "comparison.md").read_text()
  assert "| sweep/l1 | resnet_tiny | l1 |" in table and "| sweep/prod | resnet_tiny | prod |" in table


def test_the_event_files_are_written_without_importing_torch(tmp_path):
  """tensorboardX's package imports torch where it is installed (seconds of every run's start); jsim's
  writer keeps it out, and a later `import torch` in the same process still works."""
  import subprocess
  import sys

  from conftest import REPO

  script = (
    "import sys\n"
    "from pathlib import Path\n"
    "from jsim.train.metrics_writer import MetricsWriter\n"
    f"w = MetricsWriter(Path({str(tmp_path)!r}))\n"
    "w.write_epoch({'epoch': 1, 'step': 7, 'train_loss': 0.5, 'lr': 0.01})\n"
    "print('torch' in sys.modules)\n"
    "import torch\n"
    "print(torch.ones(2).sum().item())\n"
  )
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["False", "2.0"]
  values = {v.tag: v.simple_value for v in _tensorboard_values(tmp_path / "tb") if v.HasField("simple_value")}
  assert values == {"epoch": 1.0, "train/epoch_loss": 0.5, "learning_rate": pytest.approx(0.01)}
