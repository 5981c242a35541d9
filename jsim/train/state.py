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
