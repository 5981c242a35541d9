"""What every loss shares: the interface, PML's distances, its reducers, its masked logsumexp."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jsim.models.metric_model import NORMALIZE_EPS, l2_normalize  # noqa: F401  (one definition, shared)


@dataclasses.dataclass(frozen=True)
class Loss:
  """A loss: hyperparameters as dataclass fields, parameters (if any) as an explicit pytree.

  Class attributes:
    param_name: the key of its parameters in `init`'s dict ('proxies', 'weights', 'ms'), or None.
    uses_dropout: whether `apply` takes an `rng` for dropout (pair_ms).
    classifies: whether it trains a classifier head (cross_entropy): stage 1 then judges an epoch
      by the head's validation accuracy; otherwise by MAP@R of the embeddings.
  """

  param_name: ClassVar[str | None] = None
  uses_dropout: ClassVar[bool] = False
  classifies: ClassVar[bool] = False

  @classmethod
  def hyperparameter_names(cls) -> tuple[str, ...]:
    """The fields a config sets (loss_hparams.<loss>.<name>); fields with metadata config=False are set by build."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("config", True))

  @property
  def name(self) -> str:
    return type(self).registry_name

  def hyperparameters(self) -> dict[str, Any]:
    return {name: getattr(self, name) for name in self.hyperparameter_names()}

  def validate(self) -> None:
    """ValueError naming a hyperparameter whose value is out of range."""

  def init(self, key: jax.Array, num_classes: int, dim: int) -> dict:
    """The loss's parameters: {} for a loss without any."""
    del key, num_classes, dim
    return {}

  def apply(
    self, params: dict, embeddings: jax.Array, labels: jax.Array, *, rng: jax.Array | None = None, mined=None
  ) -> jax.Array:
    """The loss of a batch; `mined` (a miner's Pairs or Triplets, losses with a `miner` field only): the
    pairs or triplets to use instead of the loss's own miner, as PML's loss(embeddings, labels, indices_tuple)."""
    raise NotImplementedError

  # What stage 1's step (jsim.train.step) asks of a loss.

  def params_in(self, params: dict) -> dict:
    """The loss's parameters within stage 1's parameter tree (jsim.models.metric_model keeps them under 'loss')."""
    return params.get("loss", {})

  def batch_losses(self, params, logits, embeddings, labels, *, rng=None) -> tuple[jax.Array, jax.Array]:
    """(the batch's loss, float32 [B] per image) from the model's outputs: what the gradient and the epoch's
    loss sum take. A loss over the whole batch counts once per image, so the sum over an epoch / its images
    is the mean batch loss."""
    del logits
    value = self.apply(params, embeddings, labels, rng=rng if self.uses_dropout else None)
    return value, jnp.full(labels.shape, value, jnp.float32)

  def batch_correct(self, logits, embeddings, labels) -> jax.Array:
    """bool [B], stage 1's train_accuracy: whether the nearest other image of the batch (L2) is of its class."""
    del logits
    d = l2_distance_matrix(embeddings, embeddings)
    d = jnp.where(jnp.eye(d.shape[0], dtype=bool), jnp.inf, d)
    return labels[jnp.argmin(d, axis=1)] == labels


def safe_sqrt(s: jax.Array) -> jax.Array:
  """sqrt(max(s, 0)) with a zero (not NaN) gradient at 0, e.g. for two identical embeddings."""
  pos = s > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)


def l2_distance_matrix(a: jax.Array, b: jax.Array) -> jax.Array:
  """PML's LpDistance (p=2, normalize_embeddings=True): ||a_i/|a_i| - b_j/|b_j| ||_2, [Na, Nb]."""
  a, b = l2_normalize(a), l2_normalize(b)
  sq = (
    jnp.sum(a * a, -1)[:, None]
    + jnp.sum(b * b, -1)[None, :]
    - 2.0 * jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  )
  return safe_sqrt(sq)


def cosine_matrix(a: jax.Array, b: jax.Array) -> jax.Array:
  """PML's CosineSimilarity: <a_i/|a_i|, b_j/|b_j|>, [Na, Nb]."""
  return jnp.matmul(l2_normalize(a), l2_normalize(b).T, precision=jax.lax.Precision.HIGHEST)


def label_masks(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(positive, negative) bool [B, B]: same label and not the same element / different label."""
  same = labels[:, None] == labels[None, :]
  return same & ~jnp.eye(labels.shape[0], dtype=bool), ~same


def mean_of_nonzero(losses: jax.Array, counts: jax.Array) -> jax.Array:
  """PML's AvgNonZeroReducer: the mean of the terms that are > 0, each `counts` times (a bool mask, or how
  often a miner chose it); 0 when there are none."""
  weights = jnp.where(losses > 0, counts, 0).astype(losses.dtype)
  total = jnp.sum(weights)
  return jnp.where(total > 0, jnp.sum(weights * losses) / jnp.maximum(total, 1), 0.0)


def logsumexp_add_one(x: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  """PML's lmu.logsumexp(x, keep_mask, add_one=True): log(1 + sum_mask exp(x)); 0 where nothing is kept."""
  x = jnp.where(mask, x, -jnp.inf)
  m = jnp.maximum(jnp.max(x, axis=axis, keepdims=True), 0.0)  # the added one is exp(0)
  m = jax.lax.stop_gradient(m)
  s = jnp.sum(jnp.where(mask, jnp.exp(x - m), 0.0), axis=axis, keepdims=True) + jnp.exp(-m)
  out = jnp.squeeze(m + jnp.log(s), axis)
  return jnp.where(jnp.any(mask, axis=axis), out, 0.0)


def check_positive(name: str, value: float, what: str) -> None:
  if not value > 0:
    raise ValueError(f"loss hyperparameter {what}={value!r} must be > 0 ({name})")
