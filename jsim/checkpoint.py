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
"""

from __future__ import annotations

import logging as logging_std
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "val_accuracy"


class _NoMissingMetricWarning(logging_std.Filter):
  """Checkpoints saved without a metric are meant to be (mid-epoch, not a new best)."""

  def filter(self, record):
    return "did not provide metrics" not in record.getMessage()


logging_std.getLogger("absl").addFilter(_NoMissingMetricWarning())


class StageCheckpoints:
  """The checkpoints/ folder of one stage."""

  def __init__(self, directory: str | Path, *, keep: int = 2):
    self.directory = Path(directory).absolute()
    preservation = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation, best_fn=lambda m: m[BEST_METRIC], best_mode="max",
        cleanup_tmp_directories=True, enable_async_checkpointing=False, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

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
    if step in self._manager.all_steps():   # orbax does not overwrite a step (e.g. preempted after
      self._manager.delete(step)            # an epoch's last batch, then saved again at its end)
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)),
                       metrics=metrics, force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores into the shapes, dtypes and shardings of `abstract_state`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def close(self) -> None:
    self._manager.close()


def abstract_like(tree: Any, sharding: Any = None) -> Any:
  """ShapeDtypeStructs of a live or `jax.eval_shape`d pytree, for restoring without initialising.

  Each leaf keeps its own sharding unless `sharding` (e.g. `parallel.replicated(mesh)`) is given.
  """
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=sharding if sharding is not None else getattr(x, "sharding", None)), tree)


def restore_best(stage_dir: str | Path, abstract_state: Any, what: str = "stage") -> tuple[Any, dict]:
  """The checkpoint with the best validation accuracy of a finished (or running) stage.

  Raises FileNotFoundError when the stage has no checkpoint or no finished epoch, and
  ValueError (naming `what`, e.g. 'stage-1') when it does not fit `abstract_state`.
  """
  ckpts = StageCheckpoints(Path(stage_dir) / "checkpoints")
  try:
    latest = ckpts.latest_step()
    if latest is None:
      raise FileNotFoundError(f"{stage_dir}/checkpoints: no checkpoint; train this stage first")
    meta = ckpts.restore_meta(latest)
    if not meta.get("best"):
      raise FileNotFoundError(f"{stage_dir}/checkpoints: no finished epoch yet; train this stage first")
    try:
      return ckpts.restore(meta["best"]["step"], abstract_state)
    except FileNotFoundError:
      raise
    except Exception as e:  # orbax: shapes or structure that do not fit the config
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise ValueError(f"{stage_dir}/checkpoints: the {what} checkpoint does not fit the recorded config "
                       f"({type(e).__name__}: {first[:300]})") from None
  finally:
    ckpts.close()
