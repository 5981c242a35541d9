"""The epoch loop both stages share: resume, the halving rule, checkpoints,
metrics, preemption and non-finite losses.

A stage supplies an `EpochPlan`: how many batches an epoch has, a jitted step
over (state, epoch, batch index, running sums), and an evaluation. Everything an
epoch draws (the permutation, the pairs) is a function of (seed, epoch), so a run
resumed inside an epoch continues the same sequence of batches.

Preemption: inside `interrupts.preemption_guard()` (run.py holds one around each
training stage, `fit` opens its own otherwise) the first SIGTERM/SIGINT only sets a flag.
`fit` polls it before every step (with several processes, every few steps, where
they agree) and after every epoch: it saves a checkpoint at the current step (a
mid-epoch one keeps the epoch's running sums) and raises `Preempted`.
Nothing is saved with a NaN/Inf loss or parameters: `NonFiniteLoss` leaves the
last good checkpoint as the latest.

Every restore is verified (jsim.checkpoint's checksums). A resume starts from the
newest checkpoint that verifies: newer damaged ones are moved to
W/<stage>/damaged_checkpoints/ with one line saying so. A damaged best checkpoint
is an error naming it (the stage's result would otherwise come from another one).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jsim import console, parallel, workdir as wd
from jsim.interrupts import preemption_guard
from jsim.checkpoint import DamagedCheckpoint, StageCheckpoints, abstract_like
from jsim.train import schedule
from jsim.train.metrics_writer import MetricsWriter, progress_bar

NO_BAD_STEP = np.iinfo(np.int32).max
# With several processes, every how many steps they agree whether one got a signal.
AGREE_EVERY_STEPS = 8


class Preempted(Exception):
  """SIGTERM/SIGINT arrived; a checkpoint was saved at the current step."""


class NonFiniteLoss(Exception):
  """A NaN or Inf loss; the run stopped and the last good checkpoint stays."""


def zero_sums() -> dict:
  """Running sums of an epoch's training metrics, kept on the device."""
  return {
    "loss_sum": jnp.zeros((), jnp.float32),
    "correct": jnp.zeros((), jnp.float32),
    "count": jnp.zeros((), jnp.float32),
    "first_bad_step": jnp.asarray(NO_BAD_STEP, jnp.int32),
  }


def add_to_sums(sums: dict, losses: jax.Array, correct: jax.Array, step: jax.Array) -> dict:
  """Adds one batch (per-example losses and 0/1 correctness) inside a jitted step."""
  loss = jnp.sum(losses)
  bad = jnp.where(jnp.isfinite(loss), sums["first_bad_step"], jnp.minimum(sums["first_bad_step"], step))
  return {
    "loss_sum": sums["loss_sum"] + loss,
    "correct": sums["correct"] + jnp.sum(correct),
    "count": sums["count"] + losses.shape[0],
    "first_bad_step": bad.astype(jnp.int32),
  }


class EpochPlan(Protocol):
  items_per_batch: int
  item_name: str  # 'img' or 'pair', for the progress bar

  def num_batches(self, epoch: int) -> int: ...
  def begin_epoch(self, epoch: int) -> None: ...
  def train_step(self, state: Any, epoch: int, batch: int, sums: dict) -> tuple[Any, dict]: ...
  # {'loss': float or None, 'accuracy': float (what selects the best epoch and drives the halving rule),
  #  'extra': {name: float} (optional, more columns of metrics.jsonl)}
  def evaluate(self, state: Any) -> dict: ...


@dataclasses.dataclass
class LoopSettings:
  num_epochs: int
  alpha: float
  halving_wait: int = 3
  log_every_steps: int = 50
  checkpoint_every_steps: int = 0  # 0: at epoch ends (and on preemption) only
  keep_checkpoints: int = 2
  name: str = "stage"
  learning_rate: float | None = None  # the configured rate: a change on resume is applied and recorded
  config_key: str = ""  # 'classifier' | 'similarity', for the messages
  rate_schedule: schedule.Schedule | None = None  # None: the halving rule with alpha and halving_wait

  @classmethod
  def from_config(cls, cfg, name: str) -> "LoopSettings":
    return cls(
      num_epochs=cfg.num_epochs,
      alpha=cfg.alpha,
      halving_wait=cfg.halving_wait,
      log_every_steps=cfg.log_every_steps,
      checkpoint_every_steps=cfg.checkpoint_every_steps,
      keep_checkpoints=cfg.keep_checkpoints,
      name=name,
      learning_rate=cfg.learning_rate,
      config_key="classifier" if name == "stage 1" else "similarity",
      rate_schedule=schedule.Schedule.from_config(cfg),
    )


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def epoch_batch_sizes(num_items: int, batch_size: int, num_devices: int) -> list[int]:
  """The batch sizes of an epoch over `num_items`: full batches, then the remainder.

  The last batch is kept (985 updates a protocol stage-1 epoch), trimmed to a
  multiple of the device count so that it can be sharded.
  """
  remainder = (num_items % batch_size) // num_devices * num_devices
  return [batch_size] * (num_items // batch_size) + ([remainder] if remainder else [])


def add_eval_sums(total: dict | None, sums: dict) -> dict:
  """Adds one evaluation batch's {'loss_sum', 'correct', 'count'} (device arrays) to the running total."""
  return sums if total is None else jax.tree.map(jnp.add, total, sums)


def eval_metrics(total: dict) -> dict:
  """{'loss', 'accuracy', 'count'} of summed evaluation batches."""
  t = {k: float(v) for k, v in jax.device_get(total).items()}
  return {"loss": t["loss_sum"] / t["count"], "accuracy": t["correct"] / t["count"], "count": int(t["count"])}


def _sums_to_host(sums: dict) -> dict:
  return {k: v.item() for k, v in jax.device_get(sums).items()}


def _sums_from_host(d: dict | None) -> dict:
  if not d:
    return zero_sums()
  z = zero_sums()
  return {k: jnp.asarray(d[k], z[k].dtype) for k in z}


def fit(
  plan: EpochPlan,
  state: Any,
  stage_dir: str | Path,
  settings: LoopSettings,
  *,
  place_state: Callable[[Any], Any] = lambda s: s,
  config_dict: dict | None = None,
  writer: MetricsWriter | None = None,
) -> tuple[Any, dict]:
  """Trains `state` to `settings.num_epochs`, resuming from stage_dir/checkpoints.

  `place_state` puts a host or restored pytree (the state, the running sums) where
  the jitted step expects it, so that a resumed run compiles the same step.
  `config_dict` (the resolved config) goes to TensorBoard as text and hparams.
  `writer`: a MetricsWriter the caller opened and closes (to add to the same event file after fit).
  Returns the final state and the meta dict (rows, best checkpoint, ...).
  Raises Preempted (checkpoint saved) or NonFiniteLoss (nothing saved).
  """
  stage_dir = Path(stage_dir)
  ckpts = StageCheckpoints(stage_dir / "checkpoints", keep=settings.keep_checkpoints)
  own_writer = writer is None
  writer = writer if writer is not None else MetricsWriter(stage_dir)
  try:
    with preemption_guard() as guard:
      return _fit(plan, state, ckpts, writer, settings, place_state, guard, config_dict)
  finally:
    if own_writer:
      writer.close()
    ckpts.close()


def write_result(stage_dir, meta: dict, extra: dict, name: str) -> dict:
  """A trained stage's result.json: `extra` and what fit's meta says (best epoch, step and validation
  accuracy, epochs, halving epochs); written by process 0 while the others wait. Returns it."""
  best = meta["best"]
  result = {
    **extra,
    "best_epoch": best["epoch"],
    "best_step": best["step"],
    "best_val_accuracy": best["val_accuracy"],
    "epochs": len(meta["rows"]),
    "halving_epochs": meta["halving_epochs"],
  }
  if parallel.is_main_process():
    wd.finish_stage(stage_dir, result)
  parallel.sync_processes(f"{name} result")
  return result


def _fit(plan, state, ckpts, writer, settings, place_state, guard, config_dict=None):
  meta = {
    "epoch": 0,
    "batch_in_epoch": 0,
    "sums": None,
    "rows": [],
    "val_accuracies": [],
    "halving_epochs": [],
    "best": None,
    "finished": False,
  }
  latest, restored = _restore_latest(ckpts, state, settings.name)
  if latest is not None:
    state, meta = place_state(restored[0]), restored[1]
    if meta["batch_in_epoch"]:  # numbered as the stop message numbers it: epoch N, batch b/B
      where = f"epoch {meta['epoch'] + 1}, batch {meta['batch_in_epoch']}/{plan.num_batches(meta['epoch'] + 1)}"
    else:
      where = f"end of epoch {meta['epoch']}"
    logging.info("%s: resumed from step %d (%s)", settings.name, latest, where)
    state = _apply_learning_rate_change(state, meta, latest, settings)
  if settings.learning_rate is not None:
    meta["learning_rate"] = settings.learning_rate
  writer.reset(meta["rows"])
  if config_dict is not None:
    writer.write_config(config_dict)
  saved = [latest]  # the step of the latest checkpoint

  def save(sums, val_accuracy=None):
    step = int(state.step)
    _check_finite(sums, state, settings, saved[0])  # never save a NaN state over the last good one
    ckpts.save(step, state, meta, val_accuracy=val_accuracy)
    saved[0] = step

  def preempt(epoch, done, num_batches, sums):
    step = int(state.step)
    if step != (saved[0] or 0):  # not at a saved step, nor at the very start
      meta.update(batch_in_epoch=done, sums=_sums_to_host(sums))
      save(sums)
      what = "checkpoint saved"
    else:
      what = "no step taken yet" if step == 0 else "its checkpoint is current"
    raise Preempted(
      f"{guard.signal_name} at epoch {epoch}, batch {done}/{num_batches} (step {step}): {what}; "
      f"rerun the same command to resume"
    )

  rule = settings.rate_schedule or schedule.Schedule(alpha=settings.alpha, wait=settings.halving_wait)
  if rule.kind == "warmup_cosine" and settings.learning_rate is None:
    raise ValueError(f"{settings.name}: schedule 'warmup_cosine' needs the configured learning_rate")
  first_epoch = meta["epoch"] + 1  # (its bar announces the compilation of the step in a log)
  for epoch in range(first_epoch, settings.num_epochs + 1):
    rate = rule.epoch_rate(settings.learning_rate, epoch, settings.num_epochs)
    if rate is not None:  # (a function of the epoch: the same after a resume)
      state = state.replace(opt_state=schedule.set_learning_rate(state.opt_state, rate))
    plan.begin_epoch(epoch)
    num_batches = plan.num_batches(epoch)
    first = meta["batch_in_epoch"]
    sums = place_state(_sums_from_host(meta["sums"]))
    bar = progress_bar(
      num_batches * plan.items_per_batch,
      first * plan.items_per_batch,
      f"{settings.name} epoch {epoch}/{settings.num_epochs}",
      plan.item_name,
      announce=epoch == first_epoch,
    )
    start = time.perf_counter()
    first_step = int(state.step)  # counted on the host from here: no device sync per step
    try:  # (the bar is closed before any message: it would share its line)
      for batch in range(first, num_batches):
        if guard.stop_requested(agree=batch % AGREE_EVERY_STEPS == 0):
          preempt(epoch, batch, num_batches, sums)
        state, sums = plan.train_step(state, epoch, batch, sums)
        bar.update(plan.items_per_batch)
        done = batch + 1
        if done % settings.log_every_steps == 0:
          host = _check_finite(sums, None, settings, saved[0])
          bar.set_postfix(f"loss {host['loss_sum'] / max(host['count'], 1):.4f}")
          writer.write_scalars(int(state.step), {"train/loss": host["loss_sum"] / max(host["count"], 1)})
        if (
          settings.checkpoint_every_steps
          and (first_step + done - first) % settings.checkpoint_every_steps == 0
          and done < num_batches
        ):
          meta.update(batch_in_epoch=done, sums=_sums_to_host(sums))
          save(sums)
      jax.block_until_ready(sums)  # the epoch's steps done: its rate counts no compilation of what follows
      rate = bar.rate()  # (without the first step's compilation)
      host = _check_finite(sums, state, settings, saved[0])
    finally:
      bar.close()
    seconds = time.perf_counter() - start
    items_per_s = rate or (num_batches - first) * plan.items_per_batch / seconds
    val = plan.evaluate(state)
    lr = schedule.get_learning_rate(state.opt_state)
    meta["val_accuracies"].append(val["accuracy"])
    halve = rule.halve(meta["val_accuracies"], meta["halving_epochs"])
    row = {
      "epoch": epoch,
      "step": int(state.step),
      "lr": lr,
      "train_loss": host["loss_sum"] / host["count"],
      "train_accuracy": host["correct"] / host["count"],
      "val_loss": val["loss"],
      "val_accuracy": val["accuracy"],
      **val.get("extra", {}),
      "items_per_s": items_per_s,
      "halved": halve,
    }
    if halve:
      meta["halving_epochs"].append(epoch)
      state = state.replace(opt_state=schedule.set_learning_rate(state.opt_state, lr / 2))
    changes = [c for c in meta.get("learning_rate_changes", []) if c["epoch"] == epoch]
    if changes:
      row["learning_rate_changed"] = changes[-1]  # (recorded in metrics.jsonl with the epoch it happened in)
    new_best = meta["best"] is None or val["accuracy"] > meta["best"]["val_accuracy"]
    if new_best:
      meta["best"] = {"step": int(state.step), "epoch": epoch, "val_accuracy": val["accuracy"]}
    meta["rows"].append(row)
    meta.update(epoch=epoch, batch_in_epoch=0, sums=None)
    # Only a new best carries the metric: orbax's best-1 policy then keeps exactly meta["best"]
    # (given every epoch's accuracy it would keep the latest of tied ones, not the first).
    save(sums, val_accuracy=val["accuracy"] if new_best else None)
    writer.write_epoch(row)
    logging.info("%s", console.epoch_line(settings.name, row, settings.num_epochs))
    if guard.stop_requested():  # e.g. a signal during the evaluation; also after the last epoch
      raise Preempted(
        f"{guard.signal_name} at the end of epoch {epoch} (step {int(state.step)}): checkpoint "
        f"saved; rerun the same command to resume"
      )
  meta["finished"] = True
  return state, meta


def _apply_learning_rate_change(state: Any, meta: dict, step: int, settings: LoopSettings) -> Any:
  """A resumed run with another learning_rate (e.g. after a NaN stop) continues at the new rate.

  learning_rate is the rate before any halving: the rate now becomes the new one halved as
  often as the run has halved so far. The change goes into meta and the epoch's metrics row.
  """
  if settings.learning_rate is None:
    return state
  current = schedule.get_learning_rate(state.opt_state)
  halvings = len(meta["halving_epochs"])
  before = meta.get("learning_rate", current * 2**halvings)  # (checkpoints that predate the record)
  if abs(before - settings.learning_rate) <= 1e-6 * abs(settings.learning_rate):
    return state
  new = settings.learning_rate * 0.5**halvings
  epoch = meta["epoch"] + 1
  meta.setdefault("learning_rate_changes", []).append(
    {"step": step, "epoch": epoch, "from": before, "to": settings.learning_rate, "rate": new}
  )
  logging.warning(
    "%s: %s.learning_rate changed from %g to %g on resume at step %d: the rate is now %g%s",
    settings.name,
    settings.config_key,
    before,
    settings.learning_rate,
    step,
    new,
    f" (after {halvings} halving{'s' if halvings > 1 else ''})" if halvings else "",
  )
  return state.replace(opt_state=schedule.set_learning_rate(state.opt_state, new))


def _check_finite(sums: dict, state: Any, settings: LoopSettings, last_saved: int | None) -> dict:
  """The running sums on the host; NonFiniteLoss if a loss (or a parameter of `state`) is NaN/Inf."""
  host = _sums_to_host(sums)
  problem = None
  if host["first_bad_step"] != NO_BAD_STEP:
    problem = f"the training loss became NaN or Inf at step {host['first_bad_step'] + 1}"
  elif state is not None and not bool(_all_finite(state.params)):
    problem = f"the parameters became NaN or Inf by step {int(state.step)}"
  if problem:
    kept = (
      f"the last good checkpoint (step {last_saved}) stays" if last_saved is not None else "no checkpoint was saved"
    )
    key = f"--config.{settings.config_key}.learning_rate" if settings.config_key else "a lower learning rate"
    go_on = (
      f"rerun with a lower {key}: it resumes from step {last_saved} at that rate"
      if last_saved is not None
      else f"rerun with a lower {key}"
    )
    raise NonFiniteLoss(
      f"{settings.name}: {problem}; stopped without saving, {kept}. A lower learning rate may help: {go_on}"
    )
  return host


def _restore_latest(ckpts: StageCheckpoints, state: Any, name: str) -> tuple[int | None, tuple | None]:
  """(step, (state, meta)) of the newest checkpoint that verifies, or (None, None).

  Damaged newer ones are moved aside, and one line says which and where resuming starts.
  """
  damaged, reason = [], ""
  for step in sorted(ckpts.all_steps(), reverse=True):
    try:
      restored = ckpts.restore(step, abstract_like(state))
    except DamagedCheckpoint as e:
      reason = reason or str(e).split(" is damaged ", 1)[-1]
      damaged.append((step, ckpts.set_aside(step)))
      continue
    if damaged:
      logging.warning(
        "%s: %s; moved to %s; resuming from step %d, the newest checkpoint that verifies",
        name,
        _damaged_steps(damaged, reason),
        damaged[0][1].parent,
        step,
      )
    return step, restored
  if damaged:
    logging.warning(
      "%s: %s; moved to %s; no checkpoint verifies, so the stage starts from the beginning",
      name,
      _damaged_steps(damaged, reason),
      damaged[0][1].parent,
    )
  return None, None


def _damaged_steps(damaged: list, reason: str) -> str:
  steps = ", ".join(str(s) for s, _ in damaged)
  reason = reason[1:-1] if reason.startswith("(") and reason.endswith(")") else reason
  return (
    f"checkpoint{'s' if len(damaged) > 1 else ''} of step{'s' if len(damaged) > 1 else ''} {steps} damaged ({reason})"
  )
