"""Shared test setup: CPU only, float32 matmuls, quiet logs; the tiny pipeline as a fixture."""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="session")
def jsim_cache(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("jsim_cache")


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory, jsim_cache) -> Path:
  """A workdir where configs/tiny.py ran every stage (built once per test process)."""
  workdir = tmp_path_factory.mktemp("tiny") / "run"
  proc = run_jsim(
    ["--config=configs/tiny.py", f"--workdir={workdir}", "--config.evaluation.augmentation_examples=3"], jsim_cache
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir
