"""loop.fit in-process, on a toy EpochPlan: resume (at an epoch end and mid-epoch, after a
real SIGTERM), the halving rule, and a NaN loss. Real orbax checkpoints in tmp_path."""

from __future__ import annotations

import asyncio

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TOY_BATCHES, TOY_DIM, ToyPlan, loop_rows
from jsim.checkpoint import StageCheckpoints
from jsim.train import loop, schedule
from jsim.train.state import TrainState


def _start(lr=0.1):
  tx = schedule.make_optimizer(learning_rate=lr, momentum=0.8, nesterov=True, weight_decay=0.0)
  return tx, TrainState.create({"params": {"w": jnp.zeros(TOY_DIM, jnp.float32)}}, tx)


def _settings(num_epochs, **kw):
  return loop.LoopSettings(
    **{"num_epochs": num_epochs, "alpha": 0.02, "halving_wait": 3, "log_every_steps": 2, "name": "toy", **kw}
  )


def _fit(stage_dir, num_epochs, accuracies, **plan_kw):
  tx, state = _start()
  settings_kw = {k: plan_kw.pop(k) for k in ("checkpoint_every_steps",) if k in plan_kw}
  plan = ToyPlan(tx, accuracies, **plan_kw)
  state, meta = loop.fit(plan, state, stage_dir, _settings(num_epochs, **settings_kw))
  return plan, state, meta


RISING = [0.3, 0.5, 0.6, 0.7, 0.75, 0.8]


def test_resume_at_an_epoch_end_equals_an_uninterrupted_run(tmp_path):
  _, whole, whole_meta = _fit(tmp_path / "whole", 6, RISING)
  _fit(tmp_path / "parts", 2, RISING)
  plan, resumed, meta = _fit(tmp_path / "parts", 6, RISING)
  assert plan.steps_run == list(range(2 * TOY_BATCHES, 6 * TOY_BATCHES))  # only the missing epochs ran
  assert int(resumed.step) == int(whole.step) == 6 * TOY_BATCHES
  np.testing.assert_array_equal(np.asarray(resumed.params["w"]), np.asarray(whole.params["w"]))
  assert loop_rows(meta) == loop_rows(whole_meta) and meta["best"] == whole_meta["best"] == {
    "step": 6 * TOY_BATCHES,
    "epoch": 6,
    "val_accuracy": 0.8,
  }
  # A finished run asked for no more epochs trains nothing.
  plan, again, _ = _fit(tmp_path / "whole", 6, RISING)
  assert plan.steps_run == [] and int(again.step) == 6 * TOY_BATCHES


def test_sigterm_mid_epoch_saves_and_the_rerun_continues_the_same_batches(tmp_path):
  _, whole, whole_meta = _fit(tmp_path / "whole", 3, RISING)
  with pytest.raises(loop.Preempted, match=r"SIGTERM at epoch 2, batch 3/5 \(step 8\): checkpoint saved"):
    _fit(tmp_path / "cut", 3, RISING, signal_at_step=7)
  ckpts = StageCheckpoints(tmp_path / "cut" / "checkpoints")
  try:
    assert ckpts.latest_step() == 8 and ckpts.restore_meta(8)["batch_in_epoch"] == 3
  finally:
    ckpts.close()
  plan, resumed, meta = _fit(tmp_path / "cut", 3, RISING)
  assert plan.steps_run == list(range(8, 3 * TOY_BATCHES))
  np.testing.assert_array_equal(np.asarray(resumed.params["w"]), np.asarray(whole.params["w"]))
  # The interrupted epoch's training metrics include the batches before the signal.
  assert loop_rows(meta) == loop_rows(whole_meta)


def test_orbax_cleanup_thread_is_done_when_the_checkpoints_are_opened(tmp_path, monkeypatch):
  # A run stopped before its first save removes its new workdir; orbax's thread that cleans up unfinished
  # checkpoints must not be listing it then (it printed a traceback after jsim's one line).
  from orbax.checkpoint._src.path import temporary_paths

  real, finished = temporary_paths.cleanup_temporary_paths, []

  async def slow_cleanup(directory, **kw):
    await asyncio.sleep(0.5)
    await real(directory, **kw)
    finished.append(directory)

  monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow_cleanup)
  ckpts = StageCheckpoints(tmp_path / "new" / "checkpoints")
  assert finished, "StageCheckpoints returned while orbax was still cleaning up its directory"
  ckpts.close()


def test_mid_epoch_checkpoints(tmp_path):
  _fit(tmp_path / "s", 2, RISING, checkpoint_every_steps=3)
  ckpts = StageCheckpoints(tmp_path / "s" / "checkpoints", keep=10)
  try:
    # Mid-epoch saves every 3 steps (not at an epoch's last batch), the epoch ends, latest 2 + best kept.
    assert ckpts.all_steps() == [9, 10]
  finally:
    ckpts.close()


def test_halving_rule_halves_the_learning_rate_and_survives_a_resume(tmp_path):
  flat = [0.5] * 8  # E_k - mean(E_{k-1..k-3}) = 0 < alpha from epoch 4; then every 3 epochs
  _, _, meta = _fit(tmp_path / "whole", 8, flat)
  assert meta["halving_epochs"] == [4, 7]
  lrs = [r["lr"] for r in meta["rows"]]
  np.testing.assert_allclose(lrs, [0.1] * 4 + [0.05] * 3 + [0.025], rtol=1e-6)
  assert [r["halved"] for r in meta["rows"]] == [k in (4, 7) for k in range(1, 9)]
  # The first best stays the best when later epochs only tie it.
  assert meta["best"] == {"step": TOY_BATCHES, "epoch": 1, "val_accuracy": 0.5}
  _fit(tmp_path / "parts", 5, flat)
  _, _, resumed = _fit(tmp_path / "parts", 8, flat)
  assert resumed["halving_epochs"] == [4, 7] and loop_rows(resumed) == loop_rows(meta)
  # Rising accuracies never halve.
  _, _, rising = _fit(tmp_path / "rising", 6, RISING)
  assert rising["halving_epochs"] == []


def test_nan_loss_stops_without_saving_and_keeps_the_last_good_checkpoint(tmp_path):
  with pytest.raises(
    loop.NonFiniteLoss,
    match=r"NaN or Inf at step 7; stopped without saving, the last good "
    r"checkpoint \(step 5\) stays",
  ):
    _fit(tmp_path / "s", 3, RISING, nan_at_step=6)
  ckpts = StageCheckpoints(tmp_path / "s" / "checkpoints")
  try:
    assert ckpts.all_steps() == [TOY_BATCHES] and ckpts.restore_meta(TOY_BATCHES)["epoch"] == 1
  finally:
    ckpts.close()
  # A NaN in the first epoch: nothing was saved at all.
  with pytest.raises(loop.NonFiniteLoss, match="no checkpoint was saved"):
    _fit(tmp_path / "first", 2, RISING, nan_at_step=0)
