"""Losses over the pairs and triplets of a batch: contrastive, triplet (with its miners), multi-similarity.

Every pair (i, j), i != j, is used in both orders, as PML does (get_all_pairs_indices).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jsim.losses import base

MINING = ("all", "batch_hard", "semi_hard")


@dataclasses.dataclass(frozen=True)
class Contrastive(base.Loss):
  """PML ContrastiveLoss(pos_margin=0, neg_margin=1) on L2-normalised embeddings."""

  registry_name: ClassVar[str] = "contrastive"
  pos_margin: float = 0.0
  neg_margin: float = 1.0

  def apply(self, params, embeddings, labels, *, rng=None):
    del params, rng
    d = base.l2_distance_matrix(embeddings, embeddings)
    pos, neg = base.label_masks(labels)
    pos_loss = jax.nn.relu(d - self.pos_margin)
    neg_loss = jax.nn.relu(self.neg_margin - d)
    return base.mean_of_nonzero(pos_loss, pos) + base.mean_of_nonzero(neg_loss, neg)


@dataclasses.dataclass(frozen=True)
class Triplet(base.Loss):
  """PML TripletMarginLoss(margin=0.05) on L2-normalised embeddings, with a miner.

  mining: 'all' (every triplet), 'batch_hard' (PML BatchHardMiner: per anchor the farthest
  positive and the nearest negative) or 'semi_hard' (PML TripletMarginMiner with the
  loss's margin and type 'semihard': 0 < d_an - d_ap <= margin).
  """

  registry_name: ClassVar[str] = "triplet"
  margin: float = 0.05
  mining: str = "all"

  def validate(self):
    if self.mining not in MINING:
      raise ValueError(f"loss hyperparameter mining={self.mining!r}: expected one of {', '.join(MINING)}")

  def apply(self, params, embeddings, labels, *, rng=None):
    del params, rng
    d = base.l2_distance_matrix(embeddings, embeddings)
    pos, neg = base.label_masks(labels)
    if self.mining == "batch_hard":
      d_ap = jnp.max(jnp.where(pos, d, -jnp.inf), axis=1)
      d_an = jnp.min(jnp.where(neg, d, jnp.inf), axis=1)
      keep = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
      violation = jnp.where(keep, d_ap - d_an + self.margin, 0.0)
      return base.mean_of_nonzero(jax.nn.relu(violation), keep)
    d_ap = d[:, :, None]  # [anchor, positive, negative]
    d_an = d[:, None, :]
    triplet = pos[:, :, None] & neg[:, None, :]
    if self.mining == "semi_hard":
      gap = d_an - d_ap
      triplet = triplet & (gap > 0) & (gap <= self.margin)
    return base.mean_of_nonzero(jax.nn.relu(d_ap - d_an + self.margin), triplet)


@dataclasses.dataclass(frozen=True)
class MultiSimilarity(base.Loss):
  """PML MultiSimilarityLoss(alpha=2, beta=50, base=0.5) on cosine similarity, mean over anchors.

  Per anchor: log(1 + sum_pos exp(-alpha (s - base))) / alpha + log(1 + sum_neg exp(beta (s - base))) / beta.
  """

  registry_name: ClassVar[str] = "multi_similarity"
  alpha: float = 2.0
  beta: float = 50.0
  base: float = 0.5

  def validate(self):
    base.check_positive(self.registry_name, self.alpha, "alpha")
    base.check_positive(self.registry_name, self.beta, "beta")

  def apply(self, params, embeddings, labels, *, rng=None):
    del params, rng
    s = base.cosine_matrix(embeddings, embeddings)
    pos, neg = base.label_masks(labels)
    pos_loss = base.logsumexp_add_one(self.alpha * (self.base - s), pos, axis=1) / self.alpha
    neg_loss = base.logsumexp_add_one(self.beta * (s - self.base), neg, axis=1) / self.beta
    return jnp.mean(pos_loss + neg_loss)
