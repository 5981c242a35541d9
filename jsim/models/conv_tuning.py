"""On a CPU, the backward of a kxk conv with an output above 8x8: XLA's transposes or the taps, whichever
this host computes faster for the shape, measured once and recorded.

    lowering = backward_lowering(x.shape, kernel.shape, g.shape, strides, padding, dtype, backward)  # xla | taps

(backward(x, kernel, g, lowering): the conv's input and kernel gradients at cotangent g by that lowering.)

`layers.choose_impl` picks ("xla", "tuned") for such convs under conv_impl=auto on a CPU, and the backward
asks this module when it is traced (a forward-only program, an embedding or an export, never does). Which
of the two is faster depends on the host, the same way for the conv alone and for a whole training step,
2-core AMD EPYC hosts, jax 0.10.2, float32, quiet (backward alone, 16x64x64x64 3x3 64->64, XLA's / taps,
ms; a whole fwd+bwd at 64 px batch 16 with XLA's backward above 8x8 / with taps, ms):
  Zen 3 (family 25, model 1)   350 / 187    VGG16 1,518 / 1,422   ResNet50 340 / 337   (2026-12-05)
  Zen 4 (family 25, model 17)  118 / 144    VGG16 XLA's 1.078x faster, ResNet50 1.038x (2026-12-05)
  an earlier host              665 / 213    VGG16 3,357 / 2,647   ResNet50 607 / 569   (2026-12-04)
(im2col's backward, faster than both alone on some of these shapes, made whole steps slower: not a
candidate. `benchmarks/cpu_convs.py --layers` measures all three per shape.)

The first trace of such a backward on a host times both on random inputs of its shape (a call of each to
compile, then the best of ROUNDS calls each, interleaved) and records the choice (XLA's if it was at least
MARGIN faster, else the taps; a conv under MIN_MACS multiply-adds keeps the taps, unmeasured) and the timings in
record_path() ($JSIM_CONV_TUNING, else conv_backward.json in $JSIM_CACHE or ~/.cache/jsim), under this
host's key (host_key: CPU model, core count, jaxlib). Every later trace on the host reads that record, so a
resumed run computes what the uninterrupted one did (and N devices what one does: the traced shape is the
global one). A record is written once, under a file lock (concurrent first traces agree), and never
changed; delete the file to measure again. A file that is not such a record is refused, not overwritten.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

CANDIDATES = ("xla", "taps")
ROUNDS = 2
RECORD_FILE = "conv_backward.json"
# Below this many multiply-adds (forward) a conv keeps the taps, unmeasured: its backward takes milliseconds,
# where a timing decides by noise (the demo's 3x3 8->8 at 32x16x16, 4.7e6: XLA's 1.21 against 1.48 ms in one
# measurement), and a run's result should not depend on the noise of the first run on its host.
MIN_MACS = 10**8
# XLA's backward replaces the taps only when it measured this much faster: a close call keeps the rule of the
# hosts measured before (taps), whatever the noise of one measurement.
MARGIN = 0.1


def record_path() -> Path:
  """$JSIM_CONV_TUNING, else conv_backward.json in jsim's cache folder ($JSIM_CACHE or ~/.cache/jsim)."""
  from jsim import workdir as wd

  return Path(os.environ.get("JSIM_CONV_TUNING") or wd.default_cache_dir() / RECORD_FILE).expanduser()


@functools.cache
def host_key() -> str:
  """What the timings depend on besides the shape: the CPU (model name, family and model), the cores XLA
  uses, and jaxlib (XLA:CPU's conv kernels)."""
  import jaxlib

  fields = {}
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      name, _, value = line.partition(":")
      fields.setdefault(name.strip(), value.strip())
  except OSError:  # (not Linux)
    pass
  cpu = fields.get("model name") or platform.processor() or platform.machine()
  if "cpu family" in fields:
    cpu += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
  return f"{cpu}, {os.cpu_count()} cpus, jaxlib {jaxlib.__version__}"


def shape_key(x_shape: Sequence[int], kernel_shape: Sequence[int], strides, padding, dtype) -> str:
  """e.g. '16x64x64x64 * 3x3x64x64, stride 1x1, padding 1-1x1-1, float32'."""
  pads = "x".join(f"{lo}-{hi}" for lo, hi in padding)
  return (
    f"{'x'.join(map(str, x_shape))} * {'x'.join(map(str, kernel_shape))}, "
    f"stride {'x'.join(map(str, strides))}, padding {pads}, {jnp.dtype(dtype).name}"
  )


def interleaved_ms(fns: dict[str, Callable], args: tuple, steps: int, rounds: int) -> dict[str, float]:
  """{name: best ms per call}: after a call of each (compiling it), `rounds` rounds that run every fn in turn
  (A, B, ..., A, B, ...) `steps` calls each, so that all see the same machine load."""
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  best = {name: float("inf") for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(steps):
        out = fn(*args)
      jax.block_until_ready(out)
      best[name] = min(best[name], (time.perf_counter() - t0) / steps)
  return {name: round(1e3 * t, 3) for name, t in best.items()}


def measure(shapes: tuple, dtype, backward: Callable) -> dict[str, float]:
  """{candidate: best ms} of `backward` alone (input and kernel gradients) of this conv on this host, on
  random (x, kernel, g) of `shapes`."""
  rng = np.random.default_rng(0)
  with jax.ensure_compile_time_eval():  # (called while a step is traced: run now, not staged into it)
    x, kernel, g = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype) for shape in shapes)
    fns = {lo: jax.jit(functools.partial(backward, lowering=lo)) for lo in CANDIDATES}
    return interleaved_ms(fns, (x, kernel, g), steps=1, rounds=ROUNDS)


def backward_lowering(x_shape, kernel_shape, g_shape, strides, padding, dtype, backward: Callable) -> str:
  """The recorded backward lowering (of CANDIDATES) of this conv on this host; measured and recorded first
  if there is none (see the module doc). "taps" for a conv of fewer than MIN_MACS multiply-adds."""
  if np.prod(g_shape) * np.prod(kernel_shape[:3]) < MIN_MACS:  # (outputs x the multiply-adds of each)
    return "taps"
  path, host = record_path(), host_key()
  key = shape_key(x_shape, kernel_shape, strides, padding, dtype)
  if (path, key) not in _chosen:  # (a model traces many convs of one shape: the file is read once)
    _chosen[path, key] = _recorded(path, host, key, (x_shape, kernel_shape, g_shape), dtype, backward)
  return _chosen[path, key]


_chosen: dict[tuple[Path, str], str] = {}  # this process's choices: (record path, shape key) -> lowering


def _recorded(path: Path, host: str, key: str, shapes: tuple, dtype, backward: Callable) -> str:
  """The choice recorded in `path` for (host, key), measured and recorded first if there is none."""
  choice = _read(path).get(host, {}).get(key, {}).get("backward")
  if choice is not None:
    return choice
  from absl import logging

  from jsim import workdir as wd

  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path.parent / f".{path.name}.lock", "a")
  except OSError as e:
    if wd.is_no_space(e):
      raise wd.no_space(path) from None
    if wd.is_read_only(e):
      raise wd.read_only(path, e) from None
    raise
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # (released when the file closes)
    records = _read(path)
    entry = records.get(host, {}).get(key)
    if entry is None:
      ms = measure(shapes, dtype, backward)
      entry = {"backward": "xla" if ms["xla"] <= (1 - MARGIN) * ms["taps"] else "taps", "ms": ms}
      records.setdefault(host, {})[key] = entry
      wd.write_json(path, records)
      logging.info(
        "conv backward %s: %s (XLA's %.1f ms, the taps' %.1f), timed once on this host and recorded in %s",
        key,
        "XLA's" if entry["backward"] == "xla" else "the taps",
        ms["xla"],
        ms["taps"],
        path,
      )
  return entry["backward"]


def _read(path: Path) -> dict:
  """The records in `path` ({} if there is none); ValueError naming the file if it is not such a record."""
  try:
    records = json.loads(path.read_text())
  except FileNotFoundError:
    return {}
  except IsADirectoryError:
    raise ValueError(f"{path} is a folder: $JSIM_CONV_TUNING names the file of conv backward lowerings") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a record of conv backward lowerings ({e}); delete it to measure again") from None
  valid = isinstance(records, dict) and all(
    isinstance(shapes, dict)
    and all(isinstance(entry, dict) and entry.get("backward") in CANDIDATES for entry in shapes.values())
    for shapes in records.values()
  )
  if not valid:
    raise ValueError(
      f"{path}: not a record of conv backward lowerings (expected {{host: {{shape: {{'backward': "
      f"{' or '.join(CANDIDATES)}, ...}}}}}}); delete it to measure again"
    )
  return records
