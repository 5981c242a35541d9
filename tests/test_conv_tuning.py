"""jsim.models.conv_tuning: the backward of a large kxk conv on a CPU, measured once per host and shape, recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsim.models import conv_tuning, layers
from conftest import REPO

# A conv whose output (32x32) is larger than 8x8, choose_impl's "tuned" backward on a CPU, of 1.5e8 multiply-adds
# (>= MIN_MACS: measured).
X_SHAPE, KERNEL_SHAPE, STRIDES, PADDING = (4, 32, 32, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1))
KEY = conv_tuning.shape_key(X_SHAPE, KERNEL_SHAPE, STRIDES, PADDING, jnp.float32)


@pytest.fixture
def record(tmp_path, monkeypatch):
  path = tmp_path / "tuning" / "conv_backward.json"
  monkeypatch.setenv("JSIM_CONV_TUNING", str(path))
  return path


def _gradient_primitives(grad_lowering: str) -> list[str]:
  """The primitives of the jaxpr of this conv's input and kernel gradients (a fresh trace each call)."""
  x, k = jnp.zeros(X_SHAPE), jnp.zeros(KERNEL_SHAPE)
  f = lambda x, k: layers.conv(
    x, k, strides=STRIDES, padding=PADDING, groups=1, lowering="xla", grad_lowering=grad_lowering
  ).sum()
  return [e.primitive.name for e in jax.make_jaxpr(jax.grad(f, (0, 1)))(x, k).jaxpr.eqns]


def test_choose_impl_leaves_the_backward_of_large_kxk_convs_to_the_record():
  shape = dict(kernel_size=(3, 3), in_features=64, groups=1, out_hw=(32, 32))
  assert layers.choose_impl("cpu", "auto", **shape) == ("xla", "tuned")
  assert layers.choose_impl("gpu", "auto", **shape) == ("xla", "xla")  # accelerators: XLA's conv, no measuring


def test_the_first_trace_measures_and_records_later_ones_read(record, monkeypatch):
  assert not record.exists()
  _gradient_primitives("tuned")
  records = json.loads(record.read_text())
  assert list(records) == [conv_tuning.host_key()]
  entry = records[conv_tuning.host_key()][KEY]
  ms = entry["ms"]
  assert set(ms) == {"xla", "taps"} and all(t > 0 for t in ms.values())
  assert entry["backward"] == ("xla" if ms["xla"] <= 0.9 * ms["taps"] else "taps")
  text = record.read_text()

  def measure(*args):
    raise AssertionError("measured again")

  monkeypatch.setattr(conv_tuning, "measure", measure)
  assert ("dot_general" in _gradient_primitives("tuned")) == (entry["backward"] == "taps")
  assert record.read_text() == text  # never rewritten


@pytest.mark.parametrize("recorded", ["xla", "taps"])
def test_the_recorded_lowering_is_the_one_traced(record, recorded):
  # XLA's backward transposes the conv twice (input and kernel gradient); the taps transpose it once (input)
  # and compute the kernel's gradient as k*k dots (each also traces the forward twice: in the step, in its vjp).
  record.parent.mkdir()
  record.write_text(json.dumps({conv_tuning.host_key(): {KEY: {"backward": recorded, "ms": {}}}}))
  prims = _gradient_primitives("tuned")
  assert prims.count("conv_general_dilated") == (4 if recorded == "xla" else 3), prims
  assert prims.count("dot_general") == (0 if recorded == "xla" else 9), prims


def test_the_tuned_gradient_is_the_conv_gradient(record):
  rng = np.random.default_rng(0)
  x, k = rng.standard_normal(X_SHAPE, dtype=np.float32), rng.standard_normal(KERNEL_SHAPE, dtype=np.float32)
  g = rng.standard_normal((4, 32, 32, 64), dtype=np.float32)

  def vjp(grad_lowering):
    conv = lambda x, k: layers.conv(
      x, k, strides=STRIDES, padding=PADDING, groups=1, lowering="xla", grad_lowering=grad_lowering
    )
    return jax.jit(lambda x, k, g: jax.vjp(conv, x, k)[1](g))(x, k, g)

  for got, want in zip(vjp("tuned"), vjp("xla")):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_a_folder_for_the_record_is_refused_naming_it(record):
  record.mkdir(parents=True)
  with pytest.raises(ValueError, match=rf"^{record} is a folder: \$JSIM_CONV_TUNING names the file"):
    _gradient_primitives("tuned")


@pytest.mark.parametrize("xla_ms, expect", [(89.9, "xla"), (90.1, "taps"), (120.0, "taps")])
def test_xla_replaces_the_taps_only_when_clearly_faster(record, monkeypatch, xla_ms, expect):
  monkeypatch.setattr(conv_tuning, "measure", lambda *args: {"xla": xla_ms, "taps": 100.0})
  assert ("dot_general" in _gradient_primitives("tuned")) == (expect == "taps")
  assert json.loads(record.read_text())[conv_tuning.host_key()][KEY]["backward"] == expect


def test_small_convs_keep_the_taps_unmeasured(record, monkeypatch):
  # 2x12x12 3x3 4->8: 8e4 multiply-adds; what a tiny run or the demo trains keeps the rule's taps whatever the host.
  monkeypatch.setattr(conv_tuning, "measure", lambda *args: pytest.fail("measured"))
  f = lambda x, k: layers.conv(
    x, k, strides=(1, 1), padding=PADDING, groups=1, lowering="xla", grad_lowering="tuned"
  ).sum()
  prims = [
    e.primitive.name
    for e in jax.make_jaxpr(jax.grad(f, (0, 1)))(jnp.zeros((2, 12, 12, 4)), jnp.zeros((3, 3, 4, 8))).jaxpr.eqns
  ]
  assert prims.count("dot_general") == 9
  assert not record.exists()


def test_records_of_other_hosts_and_shapes_are_kept(record):
  other = {"another CPU, 64 cpus, jaxlib 0.10.2": {KEY: {"backward": "xla", "ms": {"xla": 1.0, "taps": 2.0}}}}
  record.parent.mkdir()
  record.write_text(json.dumps(other))
  _gradient_primitives("tuned")
  records = json.loads(record.read_text())
  assert records[next(iter(other))] == other[next(iter(other))]
  assert KEY in records[conv_tuning.host_key()]


@pytest.mark.parametrize(
  "text",
  ["{not json", '{"host": {"shape": {"backward": "im2col"}}}', "[1, 2]", '{"host": {"shape": "taps"}}'],
  ids=["not_json", "unknown_lowering", "a_list", "no_entry"],
)
def test_a_file_that_is_not_a_record_is_refused_naming_it_and_kept(record, text):
  record.parent.mkdir()
  record.write_text(text)
  with pytest.raises(ValueError, match=rf"^{record}: not a record of conv backward lowerings .*delete it to measure"):
    _gradient_primitives("tuned")
  assert record.read_text() == text


def test_the_record_lives_in_jsims_cache_unless_jsim_conv_tuning_names_a_file(monkeypatch, tmp_path):
  monkeypatch.delenv("JSIM_CONV_TUNING", raising=False)
  monkeypatch.setenv("JSIM_CACHE", str(tmp_path / "cache"))
  assert conv_tuning.record_path() == tmp_path / "cache" / "conv_backward.json"
  monkeypatch.setenv("JSIM_CONV_TUNING", str(tmp_path / "mine.json"))
  assert conv_tuning.record_path() == tmp_path / "mine.json"


def test_the_host_key_names_the_cpu_and_jaxlib():
  import jaxlib

  key = conv_tuning.host_key()
  assert key.endswith(f", {os.cpu_count()} cpus, jaxlib {jaxlib.__version__}")
  cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
  models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
  if models:  # (x86 Linux; an ARM /proc/cpuinfo has no model name, the key then names platform.processor())
    assert key.startswith(models[0])


TRACE = """
import jax, jax.numpy as jnp
from jsim.models import layers
from absl import logging
logging.set_verbosity("info")
f = lambda x, k: layers.conv(x, k, strides=(1, 1), padding=((1, 1), (1, 1)), groups=1, lowering="xla",
                             grad_lowering="tuned").sum()
jax.make_jaxpr(jax.grad(f, (0, 1)))(jnp.zeros({x}), jnp.zeros({k}))
"""


@pytest.mark.slow
def test_concurrent_first_traces_measure_once_and_agree(record):
  # Three processes trace the same conv's gradient at once, with no record yet: one measures under the lock,
  # the others wait and read its record.
  env = {**os.environ, "JSIM_CONV_TUNING": str(record), "JAX_PLATFORMS": "cpu"}
  code = TRACE.format(x=X_SHAPE, k=KERNEL_SHAPE)
  procs = [
    subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    for _ in range(3)
  ]
  errs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0, 0], errs
  assert sum("timed once on this host and recorded in" in e for e in errs) == 1, errs
  records = json.loads(record.read_text())
  assert list(records[conv_tuning.host_key()]) == [KEY]
  assert not list(record.parent.glob("*.tmp*"))


@pytest.mark.slow
def test_a_damaged_record_stops_a_run_with_one_line_naming_it(jsim_main, record, tmp_path, monkeypatch):
  monkeypatch.setattr(conv_tuning, "MIN_MACS", 0)  # (a tiny run's convs are all below it: none would read the record)
  record.parent.mkdir()
  record.write_text("{not json")
  proc = jsim_main(["--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}"])
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
  last = [line for line in out.splitlines() if line.strip()][-1]
  assert last.startswith(f"jsim: {record}: not a record of conv backward lowerings"), last
  assert record.read_text() == "{not json"
