"""The protocol's learning-rate rule, and the optimizer it drives.

After each epoch k > 3, with v_1..v_k the validation accuracies so far and
E_k = mean(v_1..v_k), halve the learning rate if
    E_k - (E_{k-1} + E_{k-2} + E_{k-3}) / 3 < alpha,
unless a halving happened fewer than `wait` epochs ago.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import optax


def running_means(val_accuracies: Sequence[float]) -> list[float]:
  """E_1..E_k: E_k is the mean of the first k validation accuracies."""
  means, total = [], 0.0
  for k, v in enumerate(val_accuracies, start=1):
    total += v
    means.append(total / k)
  return means


def should_halve(val_accuracies: Sequence[float], halving_epochs: Sequence[int], *, alpha: float,
                 wait: int = 3) -> bool:
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


def make_optimizer(*, learning_rate: float, momentum: float, nesterov: bool = True,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
  """SGD with Nesterov momentum, its learning rate a hyperparameter in the state.

  The protocol's NAG (u_t = g u_{t-1} + lr grad L(theta_t - g u_{t-1})) evaluates the
  gradient at a look-ahead point; optax.sgd(nesterov=True) is the equivalent
  reformulation whose parameters ARE the look-ahead points, so both follow the same
  trajectory. inject_hyperparams lets `set_learning_rate` change the rate between
  epochs without recompiling the step.
  """
  def sgd(learning_rate):
    tx = optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)
    if weight_decay:
      tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
    return tx
  return optax.inject_hyperparams(sgd)(learning_rate=learning_rate)


def get_learning_rate(opt_state) -> float:
  return float(opt_state.hyperparams["learning_rate"])


def set_learning_rate(opt_state, lr: float):
  """Returns opt_state with a new rate: same dtype and sharding, so no retrace."""
  old = opt_state.hyperparams["learning_rate"]
  new = jnp.asarray(lr, dtype=old.dtype)
  if hasattr(old, "sharding"):
    import jax
    new = jax.device_put(new, old.sharding)
  hyper = dict(opt_state.hyperparams, learning_rate=new)
  return opt_state._replace(hyperparams=hyper)
