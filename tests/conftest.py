"""Shared test setup: CPU only, float32 matmuls, quiet logs; the tiny config, the one trained tiny
workdir, the reliability reference runs, and the helpers several test modules use.

Two tiers (Makefile): `make test-fast` runs the tests not marked slow (the edit-test loop),
`make test` runs them all (CI). A test is slow if it is marked so, or if it uses a trained
workdir (trained, tiny_workdir, reference and what builds on them): marked here, at
collection.
"""

import dataclasses
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.py"
# What trained ran (a rerun with these arguments finds every stage finished).
TINY_RUN = ["--config=configs/tiny.py", "--config.evaluation.augmentation_examples=3"]
# Stage 1: 42 train images in batches of 6 = 7 steps an epoch, 6 epochs = 42 steps. With
# alpha=0.5 the halving rule always fires once allowed (consecutive running means of
# accuracies differ by far less than 0.5): after epochs 4, 5 and 6 (halving_wait=1).
# A checkpoint every 4 steps gives mid-epoch ones (4, 8, 12, ..., 32, 36, 40).
TINY1 = [
  "--config=configs/tiny.py",
  "--config.classifier.batch_size=6",
  "--config.classifier.num_epochs=6",
  "--config.classifier.alpha=0.5",
  "--config.classifier.halving_wait=1",
  "--config.classifier.checkpoint_every_steps=4",
]
STAGE1 = [*TINY1, "--config.stage=classifier"]
STAGE1_STEPS = 42
# Stage 2: 6*5*2 + 6*10 = 120 pairs in batches of 24 = 5 steps an epoch; halving after epoch 4.
STAGE2 = [
  "--config=configs/tiny.py",
  "--config.stage=similarity",
  "--config.similarity.batch_size=24",
  "--config.similarity.num_epochs=4",
  "--config.similarity.alpha=0.5",
  "--config.similarity.halving_wait=1",
]
STAGE2_STEPS = 20
# A test is slow if it uses a fixture that trains (directly or through another fixture), or starts a
# process (the CLI, predict, export, a worker): its source calls one of these.
TRAINED_FIXTURES = {"trained", "tiny_workdir", "reference"}
PROCESS_CALLS = ("run_jsim(", "Jsim(", "_ok(", "cli(", "cli_json(", "export_cli(", "subprocess.", "_launch(")


def _starts_a_process(function) -> bool:
  try:
    source = inspect.getsource(function)
  except (OSError, TypeError):
    return False
  return any(call in source for call in PROCESS_CALLS)


def pytest_collection_modifyitems(config, items):
  for item in items:
    function = getattr(item, "function", None)
    if TRAINED_FIXTURES & set(getattr(item, "fixturenames", ())) or (function and _starts_a_process(function)):
      item.add_marker(pytest.mark.slow)


def config_module(name: str):
  """The module of configs/NAME.py (its get_config)."""
  spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_config(**overrides):
  """configs/tiny.py with dotted-key overrides, e.g. tiny_config(**{"model.dtype": "bfloat16"})."""
  config = config_module("tiny").get_config()
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


def fake_stage1_data(num_images: int = 64, size: int = 32, num_classes: int = 6, seed: int = 0):
  """The fields of jsim.data.prepare.Prepared that jsim.train.classifier.Stage1Plan reads."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num_images, size, size, 3), dtype=np.uint8)
  n_train = num_images * 3 // 4
  return types.SimpleNamespace(
    train_set=types.SimpleNamespace(images=images),
    train_idx=np.arange(n_train),
    val_idx=np.arange(n_train, num_images),
    train_head_labels=rng.integers(0, num_classes, num_images).astype(np.int32),
    mean=(0.48, 0.45, 0.40),
    std=(0.23, 0.22, 0.22),
  )


def jsim_env(cache_dir: Path, **extra: str) -> dict:
  """Environment of a jsim subprocess: CPU, its own data cache, unbuffered output."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JSIM_CACHE=str(cache_dir), PYTHONUNBUFFERED="1")
  env.update(extra)
  return env


def run_jsim(args: list[str], cache_dir: Path, *, timeout: float = 900, **env) -> subprocess.CompletedProcess:
  """`python -m jsim.main ARGS` from the repository root; output captured as text."""
  return subprocess.run(
    [sys.executable, "-m", "jsim.main", *args],
    cwd=REPO,
    env=jsim_env(cache_dir, **env),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def built_once(tmp_path_factory, name: str, build) -> Path:
  """The folder `name` of this test run, shared by its pytest-xdist workers: made by build(folder) in the
  first one that asks (under a file lock; the others wait), and only read by the rest."""
  from filelock import FileLock

  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # this run's folder, shared by its workers
  root = base / name
  with FileLock(str(base / f"{name}.lock")):
    if not (root / "done").exists():
      shutil.rmtree(root, ignore_errors=True)
      root.mkdir(parents=True)
      build(root)
      (root / "done").touch()
  return root


@pytest.fixture(scope="session")
def jsim_cache(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("jsim_cache")


@dataclasses.dataclass(frozen=True)
class Trained:
  workdir: Path  # every stage of TINY_RUN: read it (predict writes its caches and exports there)
  pristine: Path  # the same run, untouched: copy it to change it (tiny_workdir)
  cache: Path  # its JSIM_CACHE
  files: list[Path]  # files[r]: the image file of row r of W/embeddings/test.npy
  test: np.ndarray  # stored test embeddings
  labels: np.ndarray  # their classes
  threshold: float

  def rows(self, same: bool, start: int = 0) -> tuple[int, int]:
    """Two rows of the same class (same=True) or of different classes."""
    i = start
    j = next(j for j in range(len(self.labels)) if j != i and (self.labels[j] == self.labels[i]) == same)
    return i, j


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
  """configs/tiny.py through every stage (TINY_RUN), trained once per test run and shared by the
  xdist workers (~1-2 min on a loaded 2-core machine)."""

  def build(root: Path) -> None:
    _ok([*TINY_RUN, f"--workdir={root / 'pristine'}"], root / "cache", timeout=1800)  # (the other workers wait)
    shutil.copytree(root / "pristine", root / "W")

  root = built_once(tmp_path_factory, "trained", build)
  w = root / "W"
  images = next((root / "cache").glob("synthetic-*")) / "val" / "images"
  test_ids = json.loads((w / "split.json").read_text())["test_ids"]
  # test.npy row r embeds test_set[test_index[r]]; test_ids is in test_set order (file names).
  files = [images / test_ids[i] for i in np.load(w / "embeddings" / "test_index.npy")]
  return Trained(
    workdir=w,
    pristine=root / "pristine",
    cache=root / "cache",
    files=files,
    test=np.load(w / "embeddings" / "test.npy"),
    labels=np.load(w / "embeddings" / "test_labels.npy"),
    threshold=json.loads((w / "report.json").read_text())["val_threshold"],
  )


@pytest.fixture(scope="session")
def tiny_workdir(trained, tmp_path_factory) -> Path:
  """This test process's copy of trained's workdir, to run more stages in (with trained.cache)."""
  return shutil.copytree(trained.pristine, tmp_path_factory.mktemp("tiny") / "run")


@pytest.fixture(scope="session")
def sim(trained):
  from jsim import predict

  return predict.Similarity.load(trained.workdir)


@pytest.fixture(scope="session")
def ms_reference(trained):
  """P(same) on embeddings, from the trainer's own config (configs/tiny.py) and restore code, not predict's."""
  from jsim import parallel
  from jsim.models.similarity import make_prob_fn
  from jsim.train import similarity

  config = tiny_config()
  dim = trained.test.shape[1]
  mesh = parallel.make_mesh()
  model = similarity.build_similarity(config, dim)
  _, state = similarity.restore_similarity(config, trained.workdir, mesh, dim=dim)
  prob = jax.jit(make_prob_fn(model))
  return lambda e1, e2: np.asarray(prob(state.params, np.atleast_2d(e1), np.atleast_2d(e2)), np.float64)


def _ok(args: list[str], cache: Path, timeout: float = 900) -> str:
  """Runs jsim and asserts that it succeeded; its output."""
  proc = run_jsim(args, cache, timeout=timeout)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  return out


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
  """Uninterrupted runs of the reliability tests' configuration (STAGE1, STAGE2), which the interrupted
  ones must equal bitwise: root/A has stage 1, the embeddings and stage 2; root/A_embedded is A before
  stage 2; root/A_done a copy of the finished A (for the tests that modify it). Built once per test run."""

  def build(root: Path) -> None:
    a, cache = root / "A", root / "cache"
    _ok([*STAGE1, f"--workdir={a}"], cache)
    _ok([*TINY1, f"--workdir={a}", "--config.stage=embed"], cache)
    shutil.copytree(a, root / "A_embedded")
    _ok([*STAGE2, f"--workdir={a}"], cache)
    shutil.copytree(a, root / "A_done")

  return built_once(tmp_path_factory, "reliability_reference", build)
