"""The test harness itself: what `make test` relies on from pytest and pytest-xdist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import DEFAULT_CODEGEN, REPO, worker_env


def test_loadgroup_runs_an_xdist_group_on_one_worker(tmp_path):
  # make test runs `-n 2 --dist loadgroup`; modules marked xdist_group build their shared fixtures once only
  # if all their tests go to one worker (pytest 9.2 broke that silently: pyproject.toml pins pytest < 9.2).
  (tmp_path / "test_grouped.py").write_text(
    textwrap.dedent(
      """
      import pytest

      pytestmark = pytest.mark.xdist_group("one")


      @pytest.mark.parametrize("i", range(4))
      def test_grouped(i):
        pass
      """
    )
  )
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
  proc = subprocess.run(
    [sys.executable, "-m", "pytest", "-v", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider", "."],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  workers = re.findall(r"\[(gw\d+)\].*PASSED", proc.stdout)
  assert len(workers) == 4 and len(set(workers)) == 1, proc.stdout


# The modules with tests marked default_codegen (conftest.py leaves them out of the other processes): one
# wrapper test per module, so that the two workers share them.
CODEGEN_MODULES = sorted(
  p.name
  for p in (REPO / "tests").glob("test_*.py")
  if p.name != Path(__file__).name and "mark.default_codegen" in p.read_text()
)


@pytest.mark.skipif(DEFAULT_CODEGEN, reason="this suite compiles with XLA's default emitters: they ran in it")
@pytest.mark.parametrize("module", CODEGEN_MODULES)
def test_default_codegen_tests(module, tmp_path):
  # Bitwise equalities of two differently fused programs, under XLA:CPU's default fusion emitters (what users
  # run), in a pytest process of their own: its exit status is 0 only if some ran and none failed.
  env = {k: v for k, v in worker_env(JSIM_TEST_CODEGEN="default").items() if not k.startswith("PYTEST_")}
  proc = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "default_codegen"]
    + [f"--basetemp={tmp_path}", f"tests/{module}"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=1200,
  )
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
