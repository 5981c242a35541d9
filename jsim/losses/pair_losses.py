"""Losses over the pairs and triplets of a batch: contrastive, triplet, multi-similarity (each with a miner).

Every pair (i, j), i != j, is used in both orders, as PML does (get_all_pairs_indices).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jsim.losses import base, miners


@dataclasses.dataclass(frozen=True)
class MinedLoss(base.Loss):
  """A loss over a batch's pairs or triplets, chosen by a miner (jsim.losses.miners), PML's indices_tuple.

  miner: 'none' (every pair / triplet) or a miner's name; miner_settings: its hyperparameters as
  sorted (name, value) items, set by losses.build(..., miner_hparams=) (not a config key of the loss:
  the config has classifier.miner_hparams.<miner>).
  """

  miner: str = miners.NONE
  miner_settings: tuple = dataclasses.field(default=(), metadata={"config": False})

  def validate(self):
    self.build_miner()

  def build_miner(self) -> miners.Miner | None:
    if self.miner == miners.NONE:
      return None
    try:
      return miners.build(self.miner, **dict(self.miner_settings))
    except ValueError as e:
      raise ValueError(f"loss hyperparameter miner={self.miner!r}: {e}") from None

  def mined(self, embeddings, labels, mined):
    """The pairs / triplets to use: `mined` if given, else this loss's miner's, else None (all of them)."""
    if mined is not None:
      return mined
    miner = self.build_miner()
    return miner.mine(embeddings, labels) if miner is not None else None

  def pairs(self, embeddings, labels, mined) -> miners.Pairs:
    mined = self.mined(embeddings, labels, mined)
    return miners.all_pairs(labels) if mined is None else miners.as_pairs(mined)


def _too_few_pairs(pairs: miners.Pairs) -> jax.Array:
  """PML's GenericPairLoss gives 0 when neither kind has more than one pair."""
  return (jnp.sum(pairs.pos) <= 1) & (jnp.sum(pairs.neg) <= 1)


@dataclasses.dataclass(frozen=True)
class Contrastive(MinedLoss):
  """PML ContrastiveLoss(pos_margin=0, neg_margin=1) on L2-normalised embeddings."""

  registry_name: ClassVar[str] = "contrastive"
  pos_margin: float = 0.0
  neg_margin: float = 1.0

  def apply(self, params, embeddings, labels, *, rng=None, mined=None):
    del params, rng
    pairs = self.pairs(embeddings, labels, mined)
    d = base.l2_distance_matrix(embeddings, embeddings)
    pos_loss = jax.nn.relu(d - self.pos_margin)
    neg_loss = jax.nn.relu(self.neg_margin - d)
    value = base.mean_of_nonzero(pos_loss, pairs.pos) + base.mean_of_nonzero(neg_loss, pairs.neg)
    return jnp.where(_too_few_pairs(pairs), 0.0, value)


@dataclasses.dataclass(frozen=True)
class Triplet(MinedLoss):
  """PML TripletMarginLoss(margin=0.05) on L2-normalised embeddings: every triplet, or those of its miner
  (pairs from a pair miner become the triplets of a mined positive and a mined negative pair of an anchor)."""

  registry_name: ClassVar[str] = "triplet"
  margin: float = 0.05

  def apply(self, params, embeddings, labels, *, rng=None, mined=None):
    del params, rng
    mined = self.mined(embeddings, labels, mined)
    triplets = miners.all_triplets(labels) if mined is None else miners.as_triplets(mined)
    d = base.l2_distance_matrix(embeddings, embeddings)
    violation = d[:, :, None] - d[:, None, :] + self.margin  # [anchor, positive, negative]
    return base.mean_of_nonzero(jax.nn.relu(violation), triplets.count)


@dataclasses.dataclass(frozen=True)
class MultiSimilarity(MinedLoss):
  """PML MultiSimilarityLoss(alpha=2, beta=50, base=0.5) on cosine similarity, mean over anchors.

  Per anchor: log(1 + sum_pos exp(-alpha (s - base))) / alpha + log(1 + sum_neg exp(beta (s - base))) / beta,
  over its positive and negative pairs (those its miner chose, each once).
  """

  registry_name: ClassVar[str] = "multi_similarity"
  alpha: float = 2.0
  beta: float = 50.0
  base: float = 0.5

  def validate(self):
    base.check_positive(self.registry_name, self.alpha, "alpha")
    base.check_positive(self.registry_name, self.beta, "beta")
    super().validate()

  def apply(self, params, embeddings, labels, *, rng=None, mined=None):
    del params, rng
    pairs = self.pairs(embeddings, labels, mined)
    s = base.cosine_matrix(embeddings, embeddings)
    pos_loss = base.logsumexp_add_one(self.alpha * (self.base - s), pairs.pos > 0, axis=1) / self.alpha
    neg_loss = base.logsumexp_add_one(self.beta * (s - self.base), pairs.neg > 0, axis=1) / self.beta
    return jnp.where(_too_few_pairs(pairs), 0.0, jnp.mean(pos_loss + neg_loss))
