"""Orbax checkpoints of a training stage: the latest few, the best, and resume.

A checkpoint holds the state pytree (params, batch_stats, opt_state, step) and a
JSON `meta` dict with everything the loop needs to continue exactly where it
stopped (epoch, batch within the epoch, learning-rate history, metric rows).
Orbax writes each step into a temporary folder and renames it when complete, so
a run killed mid-save leaves only a temporary folder, which is removed at the
next start.

The best checkpoint is the one saved with the highest `val_accuracy` metric. The
metric is written beside the checkpoint (orbax does so only when `best_fn` is
set), so that a resumed run still knows which one it is and does not delete it.

Checksums: orbax verifies only that a save completed (its commit markers; the
zarr3 shard index carries a crc32c, the array data does not), so a damaged array
file restores silently, with other values. Every save therefore records, in the
checkpoint's own `meta` item (written in the same atomic save), a SHA-256 of the
state's array bytes and one of the meta itself; `restore` recomputes both and
raises `DamagedCheckpoint` on a mismatch or an unreadable file.
"""

from __future__ import annotations

import hashlib
import json
import logging as logging_std
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jsim import workdir as wd

BEST_METRIC = "val_accuracy"
CHECKSUM_KEY = "checksum"  # in meta: {"state": sha256 hex, "meta": sha256 hex}
DAMAGED_DIR = "damaged_checkpoints"  # beside checkpoints/: where damaged steps are moved


class DamagedCheckpoint(ValueError):
  """A checkpoint that cannot be read, or whose contents do not match its checksums."""


def _host_array(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable and x.is_fully_replicated:
    x = x.addressable_data(0)  # (a replicated multi-process array: every process has all of it)
  return np.ascontiguousarray(np.asarray(x))


def state_digest(state: Any) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes, in tree order."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    a = _host_array(leaf)
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
    h.update(memoryview(a).cast("B") if a.size else b"")
  return h.hexdigest()


def meta_digest(meta: dict) -> str:
  """SHA-256 of meta as orbax stores it (JSON), without its checksum."""
  plain = {k: v for k, v in meta.items() if k != CHECKSUM_KEY}
  return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()


def _first_line(e: BaseException) -> str:
  text = str(e).split("See full TensorStore details")[0].strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200].rstrip('. ') if text else ''}".rstrip(": ")


class _NoMissingMetricWarning(logging_std.Filter):
  """Checkpoints saved without a metric are meant to be (mid-epoch, not a new best)."""

  def filter(self, record):
    return "did not provide metrics" not in record.getMessage()


logging_std.getLogger("absl").addFilter(_NoMissingMetricWarning())


class StageCheckpoints:
  """The checkpoints/ folder of one stage."""

  def __init__(self, directory: str | Path, *, keep: int = 2):
    self.directory = Path(directory).absolute()
    preservation = policies.AnyPreservationPolicy(
      [
        policies.LatestN(n=keep),
        policies.BestN(
          get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1, keep_checkpoints_without_metrics=False
        ),
      ]
    )
    options = ocp.CheckpointManagerOptions(
      preservation_policy=preservation,
      best_fn=lambda m: m[BEST_METRIC],
      best_mode="max",
      cleanup_tmp_directories=True,
      enable_async_checkpointing=False,
      create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
    # orbax removes an earlier run's unfinished checkpoints in a thread of its own and waits for it only at
    # the first save: a run stopped before that (a SIGTERM while compiling) removes what it created while
    # the thread still lists it, and the thread's traceback follows jsim's one line. Wait for it here.
    self._manager._maybe_await_cleanup_tmp_directory()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, *, val_accuracy: float | None = None) -> None:
    """Saves synchronously (a preempted process must not exit mid-write).

    Of the checkpoints saved with a `val_accuracy`, the one with the highest (the latest
    of tied ones) is kept besides the latest few.
    """
    metrics = None if val_accuracy is None else {BEST_METRIC: float(val_accuracy)}
    meta = json.loads(json.dumps(meta, default=str))  # as it will be read back
    meta[CHECKSUM_KEY] = {"state": state_digest(state), "meta": meta_digest(meta)}
    if step in self._manager.all_steps():  # orbax does not overwrite a step (e.g. preempted after
      self._manager.delete(step)  # an epoch's last batch, then saved again at its end)
    try:
      self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics,
        force=True,
      )
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore wrap the OSError, or keep only its text
      if not wd.is_no_space(e):
        raise
      # Orbax wrote into a temporary folder: remove it (the next start would, but the disk is full now).
      if jax.process_index() == 0:
        for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
          shutil.rmtree(tmp, ignore_errors=True)
      raise wd.no_space(self.step_dir(step), " (writing a checkpoint)") from None

  def step_dir(self, step: int) -> Path:
    return self.directory / str(step)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores into the shapes, dtypes and shardings of `abstract_state`, verified.

    Raises DamagedCheckpoint when a file cannot be read or the checksums differ.
    """
    meta = self.restore_meta(step)
    _quiet_closed_event_loop()
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))[
        "state"
      ]
    except Exception as e:  # noqa: BLE001 - tensorstore/orbax read errors have no common type
      if not _is_read_error(e):
        raise
      raise DamagedCheckpoint(
        f"{self.step_dir(step)} is damaged (its arrays cannot be read: {_first_line(e)})"
      ) from None
    recorded = meta.get(CHECKSUM_KEY)
    if recorded is not None and state_digest(state) != recorded.get("state"):
      raise DamagedCheckpoint(f"{self.step_dir(step)} is damaged (its arrays do not match their checksum)")
    return state, meta

  def restore_meta(self, step: int) -> dict:
    """The meta of a checkpoint, verified against its checksum (DamagedCheckpoint if not)."""
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - a JSON error, or orbax not finding the item
      raise DamagedCheckpoint(f"{self.step_dir(step)} is damaged (its meta cannot be read: {_first_line(e)})") from None
    if not isinstance(meta, dict):
      raise DamagedCheckpoint(f"{self.step_dir(step)} is damaged (its meta is not a JSON object)")
    recorded = meta.get(CHECKSUM_KEY)
    if recorded is not None and (not isinstance(recorded, dict) or meta_digest(meta) != recorded.get("meta")):
      raise DamagedCheckpoint(f"{self.step_dir(step)} is damaged (its meta does not match its checksum)")
    return meta

  def set_aside(self, step: int) -> Path:
    """Moves a damaged step out of the checkpoints (kept for inspection); returns where it went."""
    target = self.directory.parent / DAMAGED_DIR / str(step)
    n = 1
    while target.exists():
      target, n = self.directory.parent / DAMAGED_DIR / f"{step}.{n}", n + 1
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.step_dir(step)), str(target))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self._manager.reload()
    return target

  def close(self) -> None:
    self._manager.close()


def _is_closed_loop(exc: BaseException | None) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _quiet_closed_event_loop() -> None:
  """Drops 'RuntimeError: Event loop is closed' tracebacks from the exception hooks.

  After a failed read, tensorstore's late callbacks reach orbax's event loop once it is closed;
  their tracebacks would bury jsim's one-line error about the damaged checkpoint. Other errors
  pass through unchanged.
  """
  if getattr(sys.excepthook, "jsim_quiet", False):
    return

  def quiet(hook, exc_of):
    def filtered(*args):
      if not _is_closed_loop(exc_of(*args)):
        hook(*args)

    filtered.jsim_quiet = True
    return filtered

  sys.excepthook = quiet(sys.excepthook, lambda _type, value, _tb: value)
  threading.excepthook = quiet(threading.excepthook, lambda args: args.exc_value)
  sys.unraisablehook = quiet(sys.unraisablehook, lambda args: args.exc_value)


def _is_read_error(e: BaseException) -> bool:
  """Whether an exception from orbax's restore means unreadable files (not a state of another shape)."""
  text = f"{e} {e.__cause__ or ''}".lower()
  return isinstance(e, (OSError, json.JSONDecodeError, UnicodeDecodeError)) or any(
    m in text
    for m in (
      "data_loss",
      "error reading",
      "error while reading",
      "error decoding",
      "error opening",
      "out_of_range",
      "unexpected end",
      "corrupt",
      "truncated",
      "expecting value",
    )
  )


def abstract_like(tree: Any, sharding: Any = None) -> Any:
  """ShapeDtypeStructs of a live or `jax.eval_shape`d pytree, for restoring without initialising.

  Each leaf keeps its own sharding unless `sharding` (e.g. `parallel.replicated(mesh)`) is given.
  """
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=sharding if sharding is not None else getattr(x, "sharding", None)
    ),
    tree,
  )


def restore_best(stage_dir: str | Path, abstract_state: Any, what: str = "stage") -> tuple[Any, dict]:
  """The checkpoint with the best validation accuracy of a finished (or running) stage, verified.

  Which one is best is read from the newest checkpoint whose meta verifies; the best itself
  must verify. Raises FileNotFoundError when the stage has no checkpoint or no finished
  epoch, DamagedCheckpoint naming the best checkpoint when it is damaged, and ValueError
  (naming `what`, e.g. 'stage-1') when it does not fit `abstract_state`.
  """
  stage_dir = Path(stage_dir)
  ckpts = StageCheckpoints(stage_dir / "checkpoints")
  try:
    steps = sorted(ckpts.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"{stage_dir}/checkpoints: no checkpoint; train this stage first")
    meta, errors = None, []
    for step in steps:
      try:
        meta = ckpts.restore_meta(step)
        break
      except DamagedCheckpoint as e:
        errors.append(str(e))
    if meta is None:
      raise DamagedCheckpoint(
        f"{errors[0]}; no checkpoint of {stage_dir} can be read: redo the stage with --config.overwrite=True"
      )
    if not meta.get("best"):
      raise FileNotFoundError(f"{stage_dir}/checkpoints: no finished epoch yet; train this stage first")
    best = meta["best"]
    redo = f"redo {stage_dir.name} with --config.overwrite=True (or restore that folder from a copy)"
    if best["step"] not in steps and errors:
      # The best named by an older meta is no longer kept, so a newer checkpoint replaced it as the best, and
      # every newer one is damaged: the best is among them.
      which = "it is" if len(errors) == 1 else f"it or another of the {len(errors)} newest checkpoints is"
      raise DamagedCheckpoint(f"{errors[0]}; {which} the best checkpoint of {stage_dir.name}: {redo}")
    if best["step"] not in steps:
      raise DamagedCheckpoint(
        f"{ckpts.step_dir(best['step'])}, the best checkpoint of {stage_dir.name} (epoch "
        f"{best['epoch']}), is missing; {redo}"
      )
    try:
      return ckpts.restore(best["step"], abstract_state)
    except DamagedCheckpoint as e:
      raise DamagedCheckpoint(
        f"{e}; it is the best checkpoint of {stage_dir.name} (epoch {best['epoch']}), "
        f"which this stage's results come from: {redo}"
      ) from None
    except FileNotFoundError:
      raise
    except Exception as e:  # orbax: shapes or structure that do not fit the config
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise ValueError(
        f"{stage_dir}/checkpoints: the {what} checkpoint does not fit the recorded config "
        f"({type(e).__name__}: {first[:300]})"
      ) from None
  finally:
    ckpts.close()
