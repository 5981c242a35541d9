"""The explicit training state: a pytree, checkpointed as a whole."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # number of updates done (int32 scalar)
  params: Any
  batch_stats: Any  # {} for models without BatchNorm
  opt_state: optax.OptState

  @classmethod
  def create(cls, variables: dict, tx: optax.GradientTransformation) -> "TrainState":
    params = variables["params"]
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params),
    )

  @property
  def variables(self) -> dict:
    v = {"params": self.params}
    if self.batch_stats:
      v["batch_stats"] = self.batch_stats
    return v

  def apply_gradients(self, grads, tx: optax.GradientTransformation, new_variables: dict | None = None) -> "TrainState":
    """One optimizer step; `new_variables`: the mutable collections a train-mode apply returned."""
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return self.replace(
      step=self.step + 1,
      params=optax.apply_updates(self.params, updates),
      batch_stats=(new_variables or {}).get("batch_stats", self.batch_stats),
      opt_state=opt_state,
    )
