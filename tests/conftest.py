"""Shared test setup: CPU only, float32 matmuls, quiet logs; the tiny config, the one trained tiny
workdir, the reliability reference runs, and the helpers several test modules use.

Two tiers (Makefile): `make test-fast` runs the tests not marked slow (the edit-test loop),
`make test` runs them all (CI). A test is slow if it is marked so (by hand: it compiles a whole
model's step or init, or runs real weights, or is a further case of a grid whose first case takes the
same code path, `parametrize_fast_first`: what keeps make test-fast under 4 minutes on 2 cores), or if it
uses a trained workdir (trained, tiny_workdir, reference and what builds on them) or starts a
process: marked here, at collection. The tests marked default_codegen run in a process of their own (below).
"""

import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
import warnings
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# XLA:CPU's own kernels (fusions, loops) compiled by LLVM at -O0, for this process and the ones it starts: the
# tests' programs are small and run a few times, so compiling is most of their time. The HLO passes, the
# convolutions and dots (library calls) and the programs' meaning are the same; a kernel's floating-point
# rounding may differ in the last bit from -O2's, so a test compares runs made under the same flags, and
# torch or PML within tolerances. make test on the 2-core Zen 4 host: 13 min 2 s against 17 min 49 s at the
# default level (2026-12-05, the same 736 tests passing). XLA_FLAGS that name a level keep theirs.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
# And by XLA:CPU's older fusion emitters (LLVM IR written directly, not through MLIR), unless
# JSIM_TEST_CODEGEN=default: they compile a program 2-2.5x faster (a tiny stage-1 step with its augmentation:
# 1.6 s against 4.1 s; a tiny run from an empty cache 16 s against 24 s), the same HLO passes and library calls
# as the default. What they do not give is bitwise the same results from two differently fused programs that
# compute the same thing (N devices and 1, a streamed batch and a device-resident one, cached features and the
# frozen backbone): the default emitters do, and jsim promises it for what users run. The tests of such
# equalities are marked `default_codegen`: left out of this suite's processes and run by
# test_harness.py::test_default_codegen_tests in a pytest process with XLA's default emitters. The whole suite
# (-n 2) on the 2-core Zen 3 host: 10 min 54 s against 13 min 50 s - 14 min 3 s in three runs (2026-12-05).
FAST_CODEGEN = "--xla_cpu_use_fusion_emitters=false"
# (jaxlib 0.11 and later have only the default emitters: XLA stops a process at a flag it does not know.)
OLDER_EMITTERS = tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2]) < (0, 11)
DEFAULT_CODEGEN = os.environ.get("JSIM_TEST_CODEGEN") == "default" or not OLDER_EMITTERS
if DEFAULT_CODEGEN:  # (a pytest process that test_default_codegen_tests starts inherits the flag)
  os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ["XLA_FLAGS"].split() if f != FAST_CODEGEN)
elif "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + FAST_CODEGEN

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
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
PROCESS_CALLS = ("run_jsim(", "Jsim(", "run_ok(", "cli(", "cli_json(", "export_cli(", "subprocess.", "_launch(")


def _starts_a_process(function) -> bool:
  try:
    source = inspect.getsource(function)
  except (OSError, TypeError):
    return False
  return any(call in source for call in PROCESS_CALLS)


def pytest_report_header(config):
  if DEFAULT_CODEGEN:
    return "XLA:CPU codegen: the default fusion emitters (JSIM_TEST_CODEGEN=default)"
  return "XLA:CPU codegen: the older fusion emitters; tests marked default_codegen run in test_harness.py"


def pytest_collection_modifyitems(config, items):
  for item in items:
    function = getattr(item, "function", None)
    if TRAINED_FIXTURES & set(getattr(item, "fixturenames", ())) or (function and _starts_a_process(function)):
      item.add_marker(pytest.mark.slow)
  if not DEFAULT_CODEGEN:  # (above: test_harness.py runs them)
    config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("default_codegen")])
    items[:] = [item for item in items if not item.get_closest_marker("default_codegen")]
  # The slow tests first (a stable sort): a worker that draws a long process test near the end would leave the
  # other idle (make test on the Zen 4 host: 10 min 25 s against 10 min 42 s, one run each: a hint).
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def config_module(name: str):
  """The module of configs/NAME.py (its get_config)."""
  spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parametrize_fast_first(argnames: str, cases: list, **kwargs):
  """pytest.mark.parametrize(argnames, cases, **kwargs) whose first case runs in both tiers and the others only
  in `make test`: one case of a grid (one seed, one optimizer, one shape) takes the code path in the edit-test
  loop, the full suite takes them all."""
  several = "," in argnames
  slow = [pytest.param(*(c if several else (c,)), marks=pytest.mark.slow) for c in cases[1:]]
  return pytest.mark.parametrize(argnames, [cases[0], *slow], **kwargs)


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


# What a process a test interrupts runs with (jsim_env(cache, **READ_ONLY_XLA_CACHE)): it reads the shared
# compilation cache (pytest_configure) but never writes to it (JAX writes an entry only if it took longer than
# this to compile), as JAX writes an entry in place: a signal mid-write would leave a torn entry that every
# later process would read with a warning on stderr.
READ_ONLY_XLA_CACHE = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1e9"}


def run_folder(tmp_path_factory) -> Path:
  """This test run's folder, shared by its pytest-xdist workers (each has a folder of its own in it)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.hookimpl(trylast=True)  # (after the tmp_path plugin's: it makes config._tmp_path_factory)
def pytest_configure(config):
  """One persistent XLA compilation cache for this test run: it starts empty (nothing compiled by an earlier run
  is used) and is shared by the pytest-xdist workers and the processes they start (os.environ, which those
  inherit); JAX locks the cache when it has a size limit, so that no process reads an entry while another
  writes it.

  The processes (jsim runs) keep every program: most of them compile the same tiny programs. The pytest
  processes keep only what took over a second to compile (JAX's default): their tests compile thousands of
  small programs that no other test compiles (with every program kept, the tests of `make test-fast` summed
  600 and 619 s in two runs, without the cache 411-526 s in three, on an earlier host), but several tests build
  the same model's init or step. make test on the 2-core Zen 4 host, both at -O0 (above): 11 min 45 s with
  this, 13 min 2 s without the cache in the pytest processes (2026-12-05)."""
  cache_dir, max_size = str(run_folder(config._tmp_path_factory) / "xla_cache"), 8 << 30
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(max_size)
  # Every program in a jsim process: the small programs are most of a tiny run's compiling (configs/tiny.py's
  # run, the cache filled by the same run: 31 s with JAX's default, 25 s).
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  # One record of the conv backward lowerings measured on this host (jsim.models.conv_tuning) for the whole run,
  # as for a user's runs on one host: every process of the run computes the same gradients for the same shape.
  os.environ["JSIM_CONV_TUNING"] = str(run_folder(config._tmp_path_factory) / "conv_backward.json")
  # This process imported jax before these were set (a pytest-xdist worker inherits them from the controller).
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_compilation_cache_max_size", max_size)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def xla_flags(*flags: str) -> str:
  """XLA_FLAGS for a process with these flags too (this run's flags kept: the optimization level above)."""
  return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


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


@pytest.fixture
def jsim_main(monkeypatch, capsys, jsim_cache):
  """`python -m jsim.main ARGS` in this process, up to its exit: call(args) -> a CompletedProcess (returncode,
  stdout, stderr) like run_jsim's.

  main.parse_flags then main.main, as absl's app.run calls them, in the repository root with jsim_cache;
  for the messages of refused runs (seconds less each than a process). What needs a real process
  (signals, the exit, another device count, the entry point's own handling) runs one: run_jsim, Jsim.
  """
  from absl import flags
  from absl import logging as absl_logging

  from jsim import main

  monkeypatch.chdir(REPO)
  monkeypatch.setenv("JSIM_CACHE", str(jsim_cache))
  handler = absl_logging.get_absl_handler()
  formatter, filters, verbosity = handler.formatter, list(handler.filters), absl_logging.get_verbosity()

  def call(args: list[str]) -> subprocess.CompletedProcess:
    argv = [str(REPO / "jsim" / "main.py"), *args]  # (sys.argv[0] of python -m jsim.main)
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the --config.KEY overrides from sys.argv
    defined = set(flags.FLAGS)
    code = 0
    try:
      with warnings.catch_warnings():  # (ml_collections loads the config file with load_module)
        warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
        main.main(main.parse_flags(argv))
    except SystemExit as e:  # as main.entry_point maps it
      if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
      for name in set(flags.FLAGS) - defined:  # the --config.KEY flags ml_collections defined for this call
        delattr(flags.FLAGS, name)
      flags.FLAGS.unparse_flags()
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)

  yield call
  handler.setFormatter(formatter)  # (main.main set up jsim's log format)
  handler.filters[:] = filters
  absl_logging.set_verbosity(verbosity)


def forbid_stages(monkeypatch, *, data: bool = True) -> None:
  """Makes a stage that starts fail the test, and with data=False also preparing the data: in this process,
  "refused before anything compiled" (the stages compile; a compiled function may be cached here, so
  JAX_LOG_COMPILES would not show it)."""
  from jsim import run
  from jsim.data import prepare

  def started(*args, **kwargs):
    raise AssertionError("a refused run went on: a stage (or the data's preparation) started")

  for name, stage in run.STAGES.items():
    monkeypatch.setitem(run.STAGES, name, dataclasses.replace(stage, function=started))
  if not data:
    monkeypatch.setattr(prepare, "prepare", started)


# ----------------------------------------------------------------------------- a jsim process, checkpoints, faults


TMP_CHECKPOINT = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


class Jsim:
  """A jsim subprocess, to be interrupted (READ_ONLY_XLA_CACHE); a thread collects its output (stdout + stderr:
  tqdm writes '\\r', not lines)."""

  def __init__(self, args: list[str], cache: Path):
    self.args = args
    self.proc = subprocess.Popen(
      [sys.executable, "-m", "jsim.main", *args],
      cwd=REPO,
      env=jsim_env(cache, **READ_ONLY_XLA_CACHE),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    self._chunks: list[bytes] = []
    self._reader = threading.Thread(target=self._pump, daemon=True)
    self._reader.start()

  def _pump(self) -> None:
    fd = self.proc.stdout.fileno()
    while chunk := os.read(fd, 65536):
      self._chunks.append(chunk)

  @property
  def output(self) -> str:
    return b"".join(self._chunks).decode(errors="replace")

  def wait_until(self, predicate, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
      if self.proc.poll() is not None:
        self._reader.join(5)
        pytest.fail(f"the run exited ({self.proc.returncode}) before {what}:\n{self.output[-3000:]}")
      if time.monotonic() > deadline:
        self.proc.kill()
        pytest.fail(f"no {what} within {timeout} s:\n{self.output[-3000:]}")
      time.sleep(0.005)

  def wait_for_text(self, text: str, timeout: float = 600) -> None:
    self.wait_until(lambda: text in self.output, repr(text), timeout)

  def send(self, sig: int) -> None:
    os.kill(self.proc.pid, sig)

  def finish(self, timeout: float = 600) -> int:
    try:
      rc = self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      pytest.fail(f"still running after {timeout} s:\n{self.output[-3000:]}")
    self._reader.join(10)
    return rc


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
  """The complete checkpoints (orbax renames a step's temporary folder when it is written)."""
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if ckpt_dir.exists() else []


def tmp_checkpoint_steps(ckpt_dir: Path, min_step: int = 0) -> list[int]:
  names = os.listdir(ckpt_dir) if ckpt_dir.exists() else []
  return sorted(int(m.group(1)) for n in names if (m := TMP_CHECKPOINT.match(n)) and int(m.group(1)) >= min_step)


def checkpoint_state(ckpt_dir: Path, step: int) -> dict:
  """The saved state pytree as numpy arrays, restored without the model (its stored structure)."""
  import orbax.checkpoint as ocp

  state = ocp.StandardCheckpointer().restore((ckpt_dir / str(step) / "state").absolute())
  return jax.tree.map(np.asarray, state)


# --- real faults: a full disk, a read-only workdir --------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str = "24m"):
  """A tmpfs of `size` at `path` (root only: skipped elsewhere)."""
  path.mkdir(parents=True, exist_ok=True)
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
  if r.returncode != 0:
    pytest.skip(f"a full disk is a small tmpfs, and mount -t tmpfs is not allowed here ({r.stderr.decode().strip()})")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=True)


def fill(disk: Path) -> Path:
  """Fills the file system of `disk` to the last byte; returns the filler (unlink it to free the space)."""
  filler = disk / "filler"
  with open(filler, "wb", buffering=0) as f:
    for chunk in (1 << 20, 4096, 1):
      with contextlib.suppress(OSError):
        while True:
          f.write(b"\0" * chunk)
  return filler


@contextlib.contextmanager
def read_only(path: Path):
  """`path` read-only for this process and its children: a read-only bind mount for root (who ignores the
  permission bits), else the write bits cleared."""
  if os.geteuid() == 0:
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
      subprocess.run(["mount", "-o", "remount,bind,ro", str(path), str(path)], check=True)
      yield path
    finally:
      subprocess.run(["umount", str(path)], check=True)
    return
  everything = [path, *path.rglob("*")]
  for p in everything:
    p.chmod(p.stat().st_mode & ~0o222)
  try:
    yield path
  finally:
    for p in everything:
      p.chmod(p.stat().st_mode | 0o200)


def assert_bitwise_equal(a, b) -> None:
  paths_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  paths_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  assert tree_a == tree_b
  assert len(paths_a) > 3
  for (path, x), (_, y) in zip(paths_a, paths_b):
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs: max |diff| {np.max(np.abs(x - y))}"


def snapshot(*dirs: Path) -> dict:
  return {p: (p.stat().st_mtime_ns, p.stat().st_size) for d in dirs for p in d.rglob("*") if p.is_file()}


def one_line_error(out: str, expect: str) -> str:
  assert "Traceback" not in out, out[-3000:]
  line = [x for x in out.splitlines() if x.strip()][-1]
  assert line.startswith("jsim: ") and expect in line, out[-3000:]
  return line


def built_once(tmp_path_factory, name: str, build) -> Path:
  """The folder `name` of this test run, shared by its pytest-xdist workers: made by build(folder) in the
  first one that asks (under a file lock; the others wait), and only read by the rest."""
  from filelock import FileLock

  base = run_folder(tmp_path_factory)
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
    run_ok([*TINY_RUN, f"--workdir={root / 'pristine'}"], root / "cache", timeout=1800)  # (the other workers wait)
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


def run_ok(args: list[str], cache: Path, timeout: float = 900) -> str:
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
    run_ok([*STAGE1, f"--workdir={a}"], cache)
    run_ok([*TINY1, f"--workdir={a}", "--config.stage=embed"], cache)
    shutil.copytree(a, root / "A_embedded")
    run_ok([*STAGE2, f"--workdir={a}"], cache)
    shutil.copytree(a, root / "A_done")

  return built_once(tmp_path_factory, "reliability_reference", build)


# ----------------------------------------------------------------------------- helpers several test modules use


def predict_agrees_with_the_stored_embeddings(w, stage2):
  """jsim.predict restores this workdir (metric backbone, Ms or the distance) and scores like the stages,
  with the JAX backend and with the ONNX export."""
  from jsim import configs
  from jsim.data import sources
  from jsim.models import distance
  from jsim.predict import Similarity
  from jsim.train.embeddings import load_embeddings

  emb = load_embeddings(w)
  config = configs.config_from_dict(json.loads((w / "stage1" / "config.json").read_text()))
  images = sources.load_image_sets(config.data)["test"].images
  a, b = (np.asarray(images[emb["test_index"][k]]) for k in (0, 1))
  sim = Similarity.load(w)
  e = sim.embed([a, b])
  np.testing.assert_allclose(e, emb["test"][:2], atol=1e-5 * max(1.0, np.abs(emb["test"]).max()))
  p = sim.probability(a, b)
  assert 0.0 <= p <= 1.0
  if stage2.get("model") == "distance":
    d = float(distance.pair_distance(jnp.asarray(e[:1]), jnp.asarray(e[1:]), stage2["distance"])[0])
    assert p == pytest.approx(1 / (1 + np.exp(-(stage2["scale"] * d + stage2["bias"]))), abs=1e-5)
  # The ONNX export of the same workdir (W/onnx, made on first use): the same embeddings and P(same).
  onnx_sim = Similarity.load(w, backend="onnx")
  np.testing.assert_allclose(onnx_sim.embed([a, b]), e, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(e).max()))
  assert onnx_sim.probability(a, b) == pytest.approx(p, rel=1e-4, abs=1e-6)


def worker_env(**extra) -> dict:
  """Environment of a worker script a test starts (python tests/test_NAME.py ...): CPU, the repository on the
  path, none of this process's multi-process settings (JSIM_COORDINATOR, JSIM_NUM_*, JSIM_PROCESS_*)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JSIM_COORDINATOR", "JSIM_NUM", "JSIM_PROCESS"))}
  env.update(
    JAX_PLATFORMS="cpu",
    PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    TF_CPP_MIN_LOG_LEVEL="3",
    PYTHONUNBUFFERED="1",
  )
  env.update(extra)
  return env


def predict_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "jsim.predict", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout
  )


def predict_cli_json(*args: str) -> tuple[dict, str]:
  r = predict_cli(*args, "--json")
  assert r.returncode == 0, r.stderr
  assert "Traceback" not in r.stderr
  return json.loads(r.stdout), r.stderr


def gallery_folder(trained, tmp_path) -> tuple[Path, dict[str, int]]:
  """A folder with copies of test images (nested, mixed extension case, one PNG) -> {relative path: row}."""
  from PIL import Image

  gal = tmp_path / "gallery"
  (gal / "sub" / "deeper").mkdir(parents=True)
  rows = {"a.jpg": 2, "b.JPEG": 3, "sub/c.Jpg": 4, "sub/deeper/d.jpeg": 5, "sub/e.JPG": 6}
  for rel, row in rows.items():
    shutil.copyfile(trained.files[row], gal / rel)
  Image.open(trained.files[7]).convert("RGB").save(gal / "f.PNG")  # lossless: decodes to the same pixels
  rows["f.PNG"] = 7
  (gal / "notes.txt").write_text("not an image")
  (gal / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  (gal / ".hidden.jpg").write_bytes(b"ignored")
  return gal, rows


TOY_BATCHES, TOY_BATCH, TOY_DIM = 5, 4, 3


def toy_step(state, x, sums, *, tx):
  """Least squares towards the batch: per-example loss |x - w|^2, 'correct' when below 1."""
  import optax

  from jsim.train import loop

  def loss_fn(params):
    losses = jnp.sum((x - params["w"]) ** 2, axis=-1)
    return losses.mean(), losses

  grads, losses = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
  return new_state, loop.add_to_sums(sums, losses, losses < 1.0, state.step)


class ToyPlan:
  """TOY_BATCHES batches of TOY_BATCH random vectors per epoch, drawn from (epoch, batch) alone.

  accuracies: the validation accuracy after each epoch (scripted, to drive the halving
  rule); nan_at_step: the step whose batch is NaN; signal_at_step: the step before
  which the process sends itself a SIGTERM.
  """

  item_name = "item"
  items_per_batch = TOY_BATCH

  def __init__(self, tx, accuracies, *, nan_at_step=None, signal_at_step=None):
    self.accuracies, self.nan_at_step, self.signal_at_step = accuracies, nan_at_step, signal_at_step
    self._step = jax.jit(functools.partial(toy_step, tx=tx))
    self.steps_run = []

  def num_batches(self, epoch: int) -> int:
    return TOY_BATCHES

  def begin_epoch(self, epoch: int) -> None:
    self._epoch = epoch

  def train_step(self, state, epoch: int, batch: int, sums: dict):
    step = (epoch - 1) * TOY_BATCHES + batch
    if step == self.signal_at_step:
      self.signal_at_step = None
      os.kill(os.getpid(), signal.SIGTERM)  # handled by fit's guard: stops before the next step
    x = np.random.default_rng([epoch, batch]).normal(size=(TOY_BATCH, TOY_DIM)).astype(np.float32)
    if step == self.nan_at_step:
      x[0, 0] = np.nan
    self.steps_run.append(step)
    return self._step(state, jnp.asarray(x), sums)

  def evaluate(self, state) -> dict:
    epoch = int(state.step) // TOY_BATCHES
    return {"loss": float(jnp.sum(state.params["w"] ** 2)), "accuracy": self.accuracies[epoch - 1]}


def loop_rows(meta):
  return [{k: v for k, v in r.items() if k != "items_per_s"} for r in meta["rows"]]


def drawn_png(path):
  from PIL import Image

  assert path.is_file() and path.stat().st_size > 1000
  with Image.open(path) as im:
    arr = np.asarray(im.convert("RGB"))
  assert arr.std() > 5  # something was drawn
  return arr


def write_evaluated_workdir(w, r, **kw) -> None:
  """An evaluated workdir as the evaluate stage leaves it: both stages' result.json, report.json recording them."""
  from jsim import workdir as wd
  from jsim.evaluate import compare, pairwise, report

  extra = {}
  for stage in (wd.STAGE1, wd.STAGE2):
    result = {"best_step": 1}
    wd.finish_stage(w / stage, result)
    extra[stage] = result
  pairwise.save_result(r, w / compare.RESULT_FILE)
  extra[compare.RESULT_DIGEST] = wd.file_digest(w / compare.RESULT_FILE)
  report.write_report(w, r, val_threshold=None, extra=extra, **kw)
