"""Miners looked up by name: which pairs or triplets of a batch a loss is computed over.

    from jsim.losses import miners
    miner = miners.build("triplet_margin", margin=0.2, type_of_triplets="semihard")
    mined = miner.mine(embeddings, labels)        # Pairs or Triplets, static shapes
    loss = losses.build("triplet", miner="triplet_margin", miner_hparams={"margin": 0.2})

The choices, defaults and distances are those of pytorch-metric-learning (PML) 2.x
(tests/test_miners.py compares the selections with PML's on the same inputs):

  multi_similarity  MultiSimilarityMiner(epsilon=0.1), cosine similarity: a positive pair is kept when
                    its similarity - epsilon is below the anchor's most similar negative, a negative
                    pair when its similarity + epsilon is above the anchor's least similar positive
  batch_hard        BatchHardMiner: per anchor its farthest positive and nearest negative (LpDistance)
  pair_margin       PairMarginMiner(pos_margin=0.2, neg_margin=0.8): positive pairs farther than
                    pos_margin, negative pairs nearer than neg_margin (LpDistance)
  triplet_margin    TripletMarginMiner(margin=0.2, type_of_triplets='all'): triplets with
                    d_an - d_ap <= margin; 'hard' also <= 0, 'semihard' also > 0, 'easy' > margin

PML returns index tuples of data-dependent length; here a miner returns masks over all the
batch's pairs or triplets (jit-able, the same shapes every step): `Pairs(pos, neg)`, int32 [B, B]
counts of (anchor, positive) and (anchor, negative) pairs, or `Triplets(count)`, int32 [B, B, B]
over (anchor, positive, negative). Counts rather than booleans, because PML's conversions repeat
pairs: a triplet miner's (a, p, n) become the pairs (a, p) and (a, n) once per triplet, so a
contrastive loss averages a pair as often as it was mined. Mining reads no gradient (PML mines
under no_grad; a mask has none).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jsim.losses import base


class Pairs(NamedTuple):
  """(anchor, positive) and (anchor, negative) pairs as counts, int32 [B, B] each."""

  pos: jax.Array
  neg: jax.Array


class Triplets(NamedTuple):
  """(anchor, positive, negative) triplets as counts, int32 [B, B, B]."""

  count: jax.Array


Mined = Pairs | Triplets


def all_pairs(labels: jax.Array) -> Pairs:
  """Every ordered pair i != j, as PML's get_all_pairs_indices."""
  pos, neg = base.label_masks(labels)
  return Pairs(pos.astype(jnp.int32), neg.astype(jnp.int32))


def all_triplets(labels: jax.Array) -> Triplets:
  """Every (a, p, n) with p a positive and n a negative of a, as PML's get_all_triplets_indices."""
  pos, neg = base.label_masks(labels)
  return Triplets((pos[:, :, None] & neg[:, None, :]).astype(jnp.int32))


def as_pairs(mined: Mined) -> Pairs:
  """PML's convert_to_pairs: a triplet (a, p, n) gives the pairs (a, p) and (a, n), once per triplet."""
  if isinstance(mined, Pairs):
    return mined
  return Pairs(jnp.sum(mined.count, axis=2), jnp.sum(mined.count, axis=1))


def as_triplets(mined: Mined) -> Triplets:
  """PML's convert_to_triplets: pairs give every (a, p, n) of a mined positive and a mined negative pair
  of the same anchor (as many times as the two pairs were mined)."""
  if isinstance(mined, Triplets):
    return mined
  return Triplets(mined.pos[:, :, None] * mined.neg[:, None, :])


@dataclasses.dataclass(frozen=True)
class Miner:
  """A miner: hyperparameters as dataclass fields; `mine(embeddings, labels)` -> Pairs | Triplets."""

  @classmethod
  def hyperparameter_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  def hyperparameters(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def validate(self) -> None:
    """ValueError naming a hyperparameter whose value is out of range."""

  def mine(self, embeddings: jax.Array, labels: jax.Array) -> Mined:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class MultiSimilarityMiner(Miner):
  registry_name: ClassVar[str] = "multi_similarity"
  epsilon: float = 0.1

  def mine(self, embeddings, labels):
    s = base.cosine_matrix(*(jax.lax.stop_gradient(embeddings),) * 2)
    pos, neg = base.label_masks(labels)
    hardest_neg = jnp.max(jnp.where(neg, s, -jnp.inf), axis=1, keepdims=True)  # -inf: no negative
    easiest_pos = jnp.min(jnp.where(pos, s, jnp.inf), axis=1, keepdims=True)  # +inf: no positive
    return Pairs(
      (pos & (s - self.epsilon < hardest_neg)).astype(jnp.int32),
      (neg & (s + self.epsilon > easiest_pos)).astype(jnp.int32),
    )


@dataclasses.dataclass(frozen=True)
class BatchHardMiner(Miner):
  registry_name: ClassVar[str] = "batch_hard"

  def mine(self, embeddings, labels):
    d = base.l2_distance_matrix(*(jax.lax.stop_gradient(embeddings),) * 2)
    pos, neg = base.label_masks(labels)
    p = jnp.argmax(jnp.where(pos, d, -jnp.inf), axis=1)  # the first of ties, as torch.max on CPU
    n = jnp.argmin(jnp.where(neg, d, jnp.inf), axis=1)
    keep = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
    b = labels.shape[0]
    one_p = jax.nn.one_hot(p, b, dtype=bool)
    one_n = jax.nn.one_hot(n, b, dtype=bool)
    return Triplets((keep[:, None, None] & one_p[:, :, None] & one_n[:, None, :]).astype(jnp.int32))


@dataclasses.dataclass(frozen=True)
class PairMarginMiner(Miner):
  registry_name: ClassVar[str] = "pair_margin"
  pos_margin: float = 0.2
  neg_margin: float = 0.8

  def mine(self, embeddings, labels):
    d = base.l2_distance_matrix(*(jax.lax.stop_gradient(embeddings),) * 2)
    pos, neg = base.label_masks(labels)
    return Pairs((pos & (d > self.pos_margin)).astype(jnp.int32), (neg & (d < self.neg_margin)).astype(jnp.int32))


TRIPLET_TYPES = ("all", "hard", "semihard", "easy")


@dataclasses.dataclass(frozen=True)
class TripletMarginMiner(Miner):
  registry_name: ClassVar[str] = "triplet_margin"
  margin: float = 0.2
  type_of_triplets: str = "all"

  def validate(self):
    if self.type_of_triplets not in TRIPLET_TYPES:
      raise ValueError(
        f"miner hyperparameter type_of_triplets={self.type_of_triplets!r}: expected one of {', '.join(TRIPLET_TYPES)}"
      )

  def mine(self, embeddings, labels):
    d = base.l2_distance_matrix(*(jax.lax.stop_gradient(embeddings),) * 2)
    gap = d[:, None, :] - d[:, :, None]  # d_an - d_ap over [anchor, positive, negative]
    if self.type_of_triplets == "easy":
      keep = gap > self.margin
    else:
      keep = gap <= self.margin
      if self.type_of_triplets == "hard":
        keep &= gap <= 0
      elif self.type_of_triplets == "semihard":
        keep &= gap > 0
    return Triplets(all_triplets(labels).count * keep)


_REGISTRY: dict[str, type] = {
  cls.registry_name: cls for cls in (MultiSimilarityMiner, BatchHardMiner, PairMarginMiner, TripletMarginMiner)
}
NONE = "none"


def available() -> list[str]:
  """Names accepted by `build`, sorted ('none', no miner, is a loss's default and not one of them)."""
  return sorted(_REGISTRY)


def build(name: str, **kwargs: Any) -> Miner:
  """The miner `name` with its hyperparameters (PML's defaults for those not given); ValueError naming
  an unknown name, hyperparameter or value."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown miner {name!r}; available: {', '.join(available())} (or {NONE!r})")
  cls = _REGISTRY[name]
  unknown = sorted(set(kwargs) - set(cls.hyperparameter_names()))
  if unknown:
    raise ValueError(
      f"miner {name!r} has no hyperparameter {unknown[0]!r}; its hyperparameters: "
      f"{', '.join(cls.hyperparameter_names()) or 'none'}"
    )
  miner = cls(**kwargs)
  miner.validate()
  return miner
