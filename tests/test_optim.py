"""Optimizers by name against torch.optim, per-group rates and frozen parameters, the schedules, and every
optimizer and schedule resumed after a SIGTERM mid-epoch equal (bitwise) to an uninterrupted run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jsim import configs, validate
from jsim.train import loop, schedule
from jsim.train.state import TrainState
from conftest import TOY_BATCHES, TOY_DIM, ToyPlan, loop_rows, parametrize_fast_first

torch = pytest.importorskip("torch")

A = np.array([3.0, -1.0, 0.5, 2.0])


def _loss_grad(p):
  return A * p + np.cos(p)  # d/dp of 0.5 a p^2 + sin p


TORCH = {
  "sgd": lambda p, lr, wd: torch.optim.SGD([p], lr=lr, momentum=0.8, nesterov=True, weight_decay=wd),
  "adam": lambda p, lr, wd: torch.optim.Adam([p], lr=lr, betas=(0.8, 0.99), eps=1e-7, weight_decay=wd),
  "adamw": lambda p, lr, wd: torch.optim.AdamW([p], lr=lr, betas=(0.8, 0.99), eps=1e-7, weight_decay=wd),
  "rmsprop": lambda p, lr, wd: torch.optim.RMSprop([p], lr=lr, alpha=0.95, eps=1e-7, weight_decay=wd),
}


@pytest.mark.parametrize("name", schedule.OPTIMIZERS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_optimizers_equal_torch_optim(name, weight_decay):
  lr = 0.05
  p0 = np.array([1.0, 2.0, -1.0, 0.3])
  tp = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
  opt = TORCH[name](tp, lr, weight_decay)
  with jax.enable_x64():
    tx = schedule.make_optimizer(
      learning_rate=lr,
      momentum=0.8,
      weight_decay=weight_decay,
      optimizer=name,
      b1=0.8,
      b2=0.99,
      eps=1e-7,
      rms_decay=0.95,
    )
    p = jnp.asarray(p0)
    state = tx.init(p)
    for t in range(8):
      if t == 5:  # a rate change (a halving) between steps, as the loop makes it
        state = schedule.set_learning_rate(state, lr / 2)
        for group in opt.param_groups:
          group["lr"] = lr / 2
      opt.zero_grad()
      tp.grad = torch.tensor(_loss_grad(tp.detach().numpy()))
      opt.step()
      updates, state = tx.update(jnp.asarray(_loss_grad(np.asarray(p))), state, p)
      p = optax.apply_updates(p, updates)
      np.testing.assert_allclose(np.asarray(p), tp.detach().numpy(), rtol=1e-12, atol=1e-14, err_msg=f"step {t}")


def test_group_rates_and_frozen_parameters_with_adam():
  params = {"backbone": jnp.ones(2), "head": jnp.ones(2), "loss": jnp.ones(2)}
  groups = lambda tree: {k: k for k in tree}
  frozen = lambda tree: {k: k == "backbone" for k in tree}
  tx = schedule.make_optimizer(
    learning_rate=0.01,
    momentum=0.0,
    optimizer="adam",
    param_groups=groups,
    rate_multipliers={"backbone": 1.0, "head": 2.0, "loss": 10.0},
    frozen=frozen,
  )
  grads = {"backbone": jnp.ones(2), "head": jnp.ones(2), "loss": -jnp.ones(2)}
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step is lr * sign(grad): each group at its rate; the frozen backbone does not move.
  np.testing.assert_allclose(updates["head"], -0.02, rtol=1e-5)
  np.testing.assert_allclose(updates["loss"], 0.1, rtol=1e-5)
  np.testing.assert_array_equal(updates["backbone"], 0.0)
  with pytest.raises(ValueError, match="optimizer='lamb': expected one of sgd, adam, adamw, rmsprop"):
    schedule.make_optimizer(learning_rate=0.1, momentum=0.0, optimizer="lamb")


def test_plateau_rule_waits_for_patience_and_smoothing_ignores_a_dip():
  rise = [0.1, 0.2, 0.3, 0.4]
  assert not schedule.plateau_should_halve(rise, [], patience=2)
  flat = rise + [0.4, 0.4]
  assert not schedule.plateau_should_halve(flat[:5], [], patience=2)
  assert schedule.plateau_should_halve(flat, [], patience=2)
  # Counted afresh after a halving: the next comes `patience` stalled epochs later.
  assert not schedule.plateau_should_halve(flat + [0.4], [6], patience=2)
  assert schedule.plateau_should_halve(flat + [0.4, 0.4], [6], patience=2)
  # One noisy dip in a rising curve: halves raw with patience 1, not once smoothed.
  noisy = [0.10, 0.30, 0.42, 0.35, 0.50]
  assert schedule.plateau_should_halve(noisy[:4], [], patience=1)
  assert not schedule.plateau_should_halve(noisy[:4], [], patience=1, smoothing=0.6)
  np.testing.assert_allclose(schedule.smoothed([1.0, 0.0, 0.0], 0.5), [1.0, 0.5, 0.25])
  # min_delta: an improvement smaller than it counts as a stall.
  assert schedule.plateau_should_halve([0.5, 0.505, 0.51], [], patience=2, min_delta=0.01)


def test_warmup_cosine_and_constant_rates():
  s = schedule.Schedule(kind="warmup_cosine", warmup_epochs=2, final_rate_factor=0.1)
  rates = [s.epoch_rate(1.0, e, 7) for e in range(1, 8)]
  np.testing.assert_allclose(rates[:3], [1 / 3, 2 / 3, 1.0])  # warm-up, then the full rate
  assert all(a > b for a, b in zip(rates[2:], rates[3:]))  # then down a half cosine
  np.testing.assert_allclose(rates[-1], 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 4 / 5)))
  assert schedule.Schedule(kind="constant").epoch_rate(1.0, 3, 7) is None
  assert not schedule.Schedule(kind="constant").halve([0.5] * 10, [])


@pytest.mark.parametrize(
  "key,value,expect",
  [
    ("optimizer", "lamb", "classifier.optimizer='lamb': expected one of 'sgd', 'adam'"),
    ("b2", 1.0, "classifier.b2=1.0: must be in [0, 1)"),
    ("eps", 0.0, "classifier.eps=0.0: must be > 0"),
    ("schedule", "cosine", "classifier.schedule='cosine': expected one of halving, plateau"),
    ("patience", 0, "classifier.patience=0: must be >= 1"),
    ("smoothing", 1.0, "classifier.smoothing=1.0: must be in [0, 1)"),
    ("final_rate_factor", 2.0, "classifier.final_rate_factor=2.0: must be in [0, 1]"),
  ],
)
def test_config_errors_name_the_key(key, value, expect):
  c = configs.base_config()
  c.classifier[key] = value
  with pytest.raises(ValueError, match=expect.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
    validate.check_config(c)


# Accuracies that make plateau halve (a stall from epoch 3) and the halving rule too.
STALL = [0.5, 0.5, 0.49, 0.5, 0.48, 0.5]
CASES = [
  ("adam", "halving"),
  ("adamw", "plateau"),
  ("rmsprop", "warmup_cosine"),
  ("sgd", "constant"),
  ("adam", "warmup_cosine"),
]


def _fit(stage_dir, optimizer, kind, **plan_kw):
  lr = 0.05
  tx = schedule.make_optimizer(learning_rate=lr, momentum=0.8, weight_decay=0.01, optimizer=optimizer)
  state = TrainState.create({"params": {"w": jnp.zeros(TOY_DIM, jnp.float32)}}, tx)
  rule = schedule.Schedule(kind=kind, patience=2, warmup_epochs=2, final_rate_factor=0.1)
  settings = loop.LoopSettings(
    num_epochs=6, alpha=0.02, log_every_steps=2, name="toy", learning_rate=lr, rate_schedule=rule
  )
  plan = ToyPlan(tx, STALL, **plan_kw)
  state, meta = loop.fit(plan, state, stage_dir, settings)
  return plan, state, meta


@parametrize_fast_first("optimizer,kind", CASES)
def test_every_optimizer_and_schedule_resumes_bitwise(tmp_path, optimizer, kind):
  _, whole, whole_meta = _fit(tmp_path / "whole", optimizer, kind)
  lrs = [r["lr"] for r in whole_meta["rows"]]
  if kind in ("halving", "plateau"):
    assert whole_meta["halving_epochs"] and lrs[-1] < lrs[0]
  elif kind == "constant":
    assert lrs == [lrs[0]] * 6 and whole_meta["halving_epochs"] == []
  else:
    rule = schedule.Schedule(kind=kind, warmup_epochs=2, final_rate_factor=0.1)
    np.testing.assert_allclose(lrs, [rule.epoch_rate(0.05, e, 6) for e in range(1, 7)], rtol=1e-6)
  with pytest.raises(loop.Preempted):
    _fit(tmp_path / "cut", optimizer, kind, signal_at_step=2 * TOY_BATCHES + 2)  # in epoch 3
  plan, resumed, meta = _fit(tmp_path / "cut", optimizer, kind)
  assert plan.steps_run[0] == 2 * TOY_BATCHES + 3
  np.testing.assert_array_equal(np.asarray(resumed.params["w"]), np.asarray(whole.params["w"]))
  for a, b in zip(jax.tree.leaves(resumed.opt_state), jax.tree.leaves(whole.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert loop_rows(meta) == loop_rows(whole_meta)
