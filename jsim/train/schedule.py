"""The protocol's learning-rate rule, and the optimizer it drives.

After each epoch k > 3, with v_1..v_k the validation accuracies so far and
E_k = mean(v_1..v_k), halve the learning rate if
    E_k - (E_{k-1} + E_{k-2} + E_{k-3}) / 3 < alpha,
unless a halving happened fewer than `wait` epochs ago.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax


def running_means(val_accuracies: Sequence[float]) -> list[float]:
  """E_1..E_k: E_k is the mean of the first k validation accuracies."""
  means, total = [], 0.0
  for k, v in enumerate(val_accuracies, start=1):
    total += v
    means.append(total / k)
  return means


def should_halve(
  val_accuracies: Sequence[float], halving_epochs: Sequence[int], *, alpha: float, wait: int = 3
) -> bool:
  """Whether to halve the learning rate after epoch k = len(val_accuracies).

  Args:
    val_accuracies: v_1..v_k, one per finished epoch (epochs are 1-based).
    halving_epochs: the epochs after which the rate was halved so far.
    alpha: the threshold (0.02 in stage 1, 0.01 in stage 2).
    wait: epochs that must pass after a halving before the next; with wait=3 and
      a halving after epoch h, the next can come after epoch h + 3 at the earliest.
  """
  k = len(val_accuracies)
  if k <= 3:
    return False
  if halving_epochs and k - max(halving_epochs) < wait:
    return False
  e = running_means(val_accuracies)
  return e[k - 1] - (e[k - 2] + e[k - 3] + e[k - 4]) / 3.0 < alpha


NAG_FORMS = ("optax", "paper")


class PaperNagState(NamedTuple):
  u: Any  # the paper's u_{t-1}: the last step, learning rate included


def paper_nag(learning_rate, momentum: float) -> optax.GradientTransformation:
  """The protocol's NAG exactly, on the look-ahead parameters phi_t = theta_t - g u_{t-1}.

  u_t = g u_{t-1} + lr_t grad L(phi_t), theta_{t+1} = theta_t - u_t, so
  phi_{t+1} = phi_t + g u_{t-1} - (1 + g) u_t. The buffer holds u (learning rate
  inside), so after a halving the old steps keep their old rate, as in the source;
  optax.sgd(nesterov=True) keeps the rate outside its buffer and rescales them too.
  """
  g = momentum

  def init(params):
    return PaperNagState(u=jax.tree.map(jnp.zeros_like, params))

  def update(grads, state, params=None):
    del params
    u = jax.tree.map(lambda u_prev, gr: g * u_prev + learning_rate * gr, state.u, grads)
    updates = jax.tree.map(lambda u_prev, u_new: g * u_prev - (1 + g) * u_new, state.u, u)
    return updates, PaperNagState(u=u)

  return optax.GradientTransformation(init, update)


def make_optimizer(
  *,
  learning_rate: float,
  momentum: float,
  nesterov: bool = True,
  weight_decay: float = 0.0,
  nag_form: str = "optax",
  param_groups=None,
  rate_multipliers: dict[str, float] | None = None,
  frozen=None,
) -> optax.GradientTransformation:
  """SGD with Nesterov momentum, its learning rate a hyperparameter in the state.

  The protocol's NAG (u_t = g u_{t-1} + lr grad L(theta_t - g u_{t-1})) evaluates the
  gradient at a look-ahead point; optax.sgd(nesterov=True) is the equivalent
  reformulation whose parameters ARE the look-ahead points, so both follow the same
  trajectory while the rate is constant. At a halving they part: optax's buffer
  excludes the rate, so its next update rescales the accumulated momentum by the new
  rate, where the paper's u_{t-1} still carries the old one (docs/PROTOCOL.md gives
  the size of the difference). nag_form='paper' (with nesterov=True) is the paper's
  update exactly (`paper_nag`). inject_hyperparams lets `set_learning_rate` change the
  rate between epochs without recompiling the step.

  param_groups (a function of the params tree to group names, as optax.multi_transform
  takes) with rate_multipliers {group: factor}: each group's rate is learning_rate x its
  factor (optax.multi_transform), so halving the one injected rate halves them all.

  frozen (a function of the params tree to bools, jsim.models.freeze.frozen_fn): the parameters
  marked True get zero updates and no optimizer state (optax.set_to_zero), so neither momentum
  nor weight decay moves them; the rate stays the one injected hyperparameter.
  """
  if nag_form not in NAG_FORMS:
    raise ValueError(f"nag_form={nag_form!r}: expected one of {NAG_FORMS}")

  def sgd(learning_rate):
    if nag_form == "paper" and nesterov:
      tx = paper_nag(learning_rate, momentum)
    else:
      tx = optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)
    if weight_decay:
      tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
    return tx

  def grouped(learning_rate):
    if param_groups is None:
      return sgd(learning_rate)
    return optax.multi_transform({g: sgd(learning_rate * f) for g, f in rate_multipliers.items()}, param_groups)

  def with_frozen(learning_rate):
    if frozen is None:
      return grouped(learning_rate)
    labels = lambda params: jax.tree.map(lambda f: "frozen" if f else "trained", frozen(params))
    return optax.multi_transform({"trained": grouped(learning_rate), "frozen": optax.set_to_zero()}, labels)

  return optax.inject_hyperparams(with_frozen)(learning_rate=learning_rate)


def optimizer_from(cfg, **groups) -> optax.GradientTransformation:
  """make_optimizer with a config section's learning_rate, momentum, nesterov, weight_decay, nag_form."""
  return make_optimizer(
    learning_rate=cfg.learning_rate,
    momentum=cfg.momentum,
    nesterov=cfg.nesterov,
    weight_decay=cfg.weight_decay,
    nag_form=cfg.nag_form,
    **groups,
  )


def get_learning_rate(opt_state) -> float:
  return float(opt_state.hyperparams["learning_rate"])


def set_learning_rate(opt_state, lr: float):
  """Returns opt_state with a new rate: same dtype and sharding, so no retrace."""
  old = opt_state.hyperparams["learning_rate"]
  new = jnp.asarray(lr, dtype=old.dtype)
  if hasattr(old, "sharding"):
    new = jax.device_put(new, old.sharding)
  hyper = dict(opt_state.hyperparams, learning_rate=new)
  return opt_state._replace(hyperparams=hyper)
