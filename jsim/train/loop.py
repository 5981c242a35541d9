"""The epoch loop both stages share: resume, the halving rule, checkpoints,
metrics, preemption and non-finite losses.

A stage supplies an `EpochPlan`: how many batches an epoch has, a jitted step
over (state, epoch, batch index, running sums), and an evaluation. Everything an
epoch draws (the permutation, the pairs) is a function of (seed, epoch), so a run
resumed inside an epoch continues the same sequence of batches.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jsim import parallel
from jsim.checkpoint import StageCheckpoints, abstract_like
from jsim.train import schedule
from jsim.train.metrics_writer import MetricsWriter, progress_bar

NO_BAD_STEP = np.iinfo(np.int32).max


class Preempted(Exception):
  """SIGTERM/SIGINT arrived; a checkpoint was saved at the current step."""


class NonFiniteLoss(Exception):
  """A NaN or Inf loss; the run stopped and the last good checkpoint stays."""


def zero_sums() -> dict:
  """Running sums of an epoch's training metrics, kept on the device."""
  return {"loss_sum": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.float32),
          "count": jnp.zeros((), jnp.float32), "first_bad_step": jnp.asarray(NO_BAD_STEP, jnp.int32)}


def add_to_sums(sums: dict, losses: jax.Array, correct: jax.Array, step: jax.Array) -> dict:
  """Adds one batch (per-example losses and 0/1 correctness) inside a jitted step."""
  loss = jnp.sum(losses)
  bad = jnp.where(jnp.isfinite(loss), sums["first_bad_step"], jnp.minimum(sums["first_bad_step"], step))
  return {"loss_sum": sums["loss_sum"] + loss, "correct": sums["correct"] + jnp.sum(correct),
          "count": sums["count"] + losses.shape[0], "first_bad_step": bad.astype(jnp.int32)}


class EpochPlan(Protocol):
  items_per_batch: int
  item_name: str                              # 'img' or 'pair', for the progress bar

  def num_batches(self, epoch: int) -> int: ...
  def begin_epoch(self, epoch: int) -> None: ...
  def train_step(self, state: Any, epoch: int, batch: int, sums: dict) -> tuple[Any, dict]: ...
  def evaluate(self, state: Any) -> dict: ...  # {'loss': float, 'accuracy': float}


@dataclasses.dataclass
class LoopSettings:
  num_epochs: int
  alpha: float
  halving_wait: int = 3
  log_every_steps: int = 50
  checkpoint_every_steps: int = 0        # 0: at epoch ends (and on preemption) only
  keep_checkpoints: int = 2
  name: str = "stage"

  @classmethod
  def from_config(cls, cfg, name: str) -> "LoopSettings":
    return cls(num_epochs=cfg.num_epochs, alpha=cfg.alpha, halving_wait=cfg.halving_wait,
               log_every_steps=cfg.log_every_steps, checkpoint_every_steps=cfg.checkpoint_every_steps,
               keep_checkpoints=cfg.keep_checkpoints, name=name)


class _PreemptionGuard:
  """Turns the first SIGTERM/SIGINT into a flag the loop polls between steps."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt   # a second Ctrl-C: stop now
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _sums_to_host(sums: dict) -> dict:
  return {k: v.item() for k, v in jax.device_get(sums).items()}


def _sums_from_host(d: dict | None) -> dict:
  if not d:
    return zero_sums()
  z = zero_sums()
  return {k: jnp.asarray(d[k], z[k].dtype) for k in z}


def fit(plan: EpochPlan, state: Any, stage_dir: str | Path, settings: LoopSettings, *,
        place_state: Callable[[Any], Any] = lambda s: s) -> tuple[Any, dict]:
  """Trains `state` to `settings.num_epochs`, resuming from stage_dir/checkpoints.

  Returns the final state and the meta dict (rows, best checkpoint, ...).
  Raises Preempted (checkpoint saved) or NonFiniteLoss (nothing saved).
  """
  stage_dir = Path(stage_dir)
  ckpts = StageCheckpoints(stage_dir / "checkpoints", keep=settings.keep_checkpoints)
  writer = MetricsWriter(stage_dir)
  try:
    return _fit(plan, state, ckpts, writer, settings, place_state)
  finally:
    writer.close()
    ckpts.close()


def _fit(plan, state, ckpts, writer, settings, place_state):
  meta = {"epoch": 0, "batch_in_epoch": 0, "sums": None, "rows": [], "val_accuracies": [],
          "halving_epochs": [], "best": None, "finished": False}
  latest = ckpts.latest_step()
  if latest is not None:
    state, meta = ckpts.restore(latest, abstract_like(state))
    state = place_state(state)
    logging.info("%s: resumed from step %d (epoch %d, batch %d)", settings.name, latest, meta["epoch"],
                 meta["batch_in_epoch"])
  writer.reset(meta["rows"])

  def save(val_accuracy=None):
    step = int(state.step)
    if step in ckpts.all_steps():     # e.g. preempted after an epoch's last batch
      ckpts._manager.delete(step)
    ckpts.save(step, state, meta, val_accuracy=val_accuracy)

  with _PreemptionGuard() as guard:
    for epoch in range(meta["epoch"] + 1, settings.num_epochs + 1):
      plan.begin_epoch(epoch)
      num_batches = plan.num_batches(epoch)
      first = meta["batch_in_epoch"]
      sums = _sums_from_host(meta["sums"])
      bar = progress_bar(num_batches * plan.items_per_batch, first * plan.items_per_batch,
                         f"{settings.name} epoch {epoch}/{settings.num_epochs}", plan.item_name)
      start = time.perf_counter()
      for batch in range(first, num_batches):
        state, sums = plan.train_step(state, epoch, batch, sums)
        bar.update(plan.items_per_batch)
        done = batch + 1
        if guard.signal_name:
          _check_finite(sums, settings)
          meta.update(batch_in_epoch=done, sums=_sums_to_host(sums))
          save()
          bar.close()
          raise Preempted(f"{guard.signal_name} at epoch {epoch}, batch {done}/{num_batches} "
                          f"(step {int(state.step)}): checkpoint saved; rerun the same command to resume")
        if done % settings.log_every_steps == 0:
          host = _check_finite(sums, settings)
          bar.set_postfix(loss=f"{host['loss_sum'] / max(host['count'], 1):.4f}")
          writer.write_scalars(int(state.step), {"train/loss": host["loss_sum"] / max(host["count"], 1)})
        if settings.checkpoint_every_steps and int(state.step) % settings.checkpoint_every_steps == 0 \
            and done < num_batches:
          meta.update(batch_in_epoch=done, sums=_sums_to_host(sums))
          save()
      host = _check_finite(sums, settings)
      seconds = time.perf_counter() - start
      bar.close()
      val = plan.evaluate(state)
      lr = schedule.get_learning_rate(state.opt_state)
      meta["val_accuracies"].append(val["accuracy"])
      halve = schedule.should_halve(meta["val_accuracies"], meta["halving_epochs"], alpha=settings.alpha,
                                    wait=settings.halving_wait)
      row = {"epoch": epoch, "step": int(state.step), "lr": lr,
             "train_loss": host["loss_sum"] / host["count"], "train_accuracy": host["correct"] / host["count"],
             "val_loss": val["loss"], "val_accuracy": val["accuracy"],
             "items_per_s": (num_batches - first) * plan.items_per_batch / seconds, "halved": halve}
      if halve:
        meta["halving_epochs"].append(epoch)
        state = state.replace(opt_state=schedule.set_learning_rate(state.opt_state, lr / 2))
      if meta["best"] is None or val["accuracy"] > meta["best"]["val_accuracy"]:
        meta["best"] = {"step": int(state.step), "epoch": epoch, "val_accuracy": val["accuracy"]}
      meta["rows"].append(row)
      meta.update(epoch=epoch, batch_in_epoch=0, sums=None)
      save(val_accuracy=val["accuracy"])
      writer.write_epoch(row)
      logging.info("%s epoch %d: %s", settings.name, epoch,
                   ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
  meta["finished"] = True
  return state, meta


def _check_finite(sums: dict, settings: LoopSettings) -> dict:
  host = _sums_to_host(sums)
  if host["first_bad_step"] != NO_BAD_STEP:
    raise NonFiniteLoss(f"{settings.name}: the training loss became NaN or Inf at step {host['first_bad_step'] + 1}; "
                        f"stopped without saving — the last good checkpoint stays")
  return host


def restore_best(stage_dir: str | Path, abstract_state: Any) -> tuple[Any, dict]:
  """The checkpoint with the best validation accuracy of a finished (or running) stage."""
  ckpts = StageCheckpoints(Path(stage_dir) / "checkpoints")
  try:
    latest = ckpts.latest_step()
    if latest is None:
      raise FileNotFoundError(f"{stage_dir}/checkpoints: no checkpoint; train this stage first")
    meta = ckpts.restore_meta(latest)
    if not meta.get("best"):
      raise FileNotFoundError(f"{stage_dir}/checkpoints: no finished epoch yet; train this stage first")
    step = meta["best"]["step"]
    state, best_meta = ckpts.restore(step, abstract_state)
    return state, best_meta
  finally:
    ckpts.close()
