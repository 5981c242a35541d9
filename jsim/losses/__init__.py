"""Stage 1's losses looked up by name: pure JAX, jittable, differentiable.

    from jsim import losses
    loss = losses.build("multi_similarity", alpha=2.0, beta=50.0, base=0.5)
    params = loss.init(key, num_classes=C, dim=D)   # {} without parameters;
                                                    # {"proxies": [C, D]}, {"weights": [C, D]} or {"ms": ...}
    value = loss.apply(params, embeddings, labels)   # [B, D] float, int [B] -> float32 scalar
    losses.available()                               # the metric-learning losses

Defaults, distances, embedding normalisation and reductions are those of
pytorch-metric-learning (PML) 2.x, so that a user moving from PML gets the same
numbers (tests/test_losses.py compares every loss with PML itself):

  contrastive         LpDistance (L2-normalised), relu(d - pos_margin) over positive pairs and
                      relu(neg_margin - d) over negative pairs, each averaged over its non-zero terms
  triplet             LpDistance, relu(d_ap - d_an + margin) averaged over the non-zero triplets
  multi_similarity    CosineSimilarity, PML's MultiSimilarityLoss, mean over anchors
  proxy_anchor        CosineSimilarity to learned proxies, PML's DivisorReducer
  normalized_softmax  softmax over cosine / temperature to learned class weights
  arcface             additive angular margin on the target's cosine, scaled
  pair_ms             the protocol's Ms (an MLP on |e1 - e2| or another pair feature) on every
                      pair of the batch, trained with the backbone: cross-entropy, similar and
                      dissimilar pairs weighted equally (no PML counterpart)

  cross_entropy       the protocol's classifier loss (stage 1's default): softmax cross-entropy of the
                      classifier head's logits; the head (kept in the backbone, params["head"]) is
                      its parameters. Not in `available()`, which lists the metric-learning losses
                      (each with its hyperparameters in config.classifier.loss_hparams).

contrastive, triplet and multi_similarity take a miner (jsim.losses.miners: multi_similarity,
batch_hard, pair_margin, triplet_margin), PML's loss(embeddings, labels, miner(embeddings, labels)):
    losses.build("triplet", miner="triplet_margin", miner_hparams={"type_of_triplets": "semihard"})
(in a config: classifier.loss_hparams.triplet.miner, classifier.miner_hparams.triplet_margin.*).

PML keeps class weights as [D, C]; here every class-parameter array is [C, D]
(transpose to compare). Adding a loss means adding a class with `init` / `apply` and
one `register` call; stage 1's step (jsim.train.step) calls every loss the same way.
"""

from __future__ import annotations

from typing import Any

from jsim.losses import cross_entropy, miners, pair_losses, pair_ms, proxy_losses
from jsim.losses.base import Loss

CROSS_ENTROPY = "cross_entropy"
_REGISTRY: dict[str, type] = {}


def register(name: str, cls: type) -> None:
  """Registers a loss class (a dataclass with `init` and `apply`) under `name`."""
  if name in _REGISTRY:
    raise ValueError(f"loss {name!r} is already registered")
  _REGISTRY[name] = cls


def available() -> list[str]:
  """The metric-learning losses `build` accepts (every name but cross_entropy), sorted."""
  return sorted(n for n in _REGISTRY if n != CROSS_ENTROPY)


def build(name: str, *, miner_hparams: dict | None = None, **kwargs: Any) -> Loss:
  """The loss `name` with its hyperparameters (PML's defaults for those not given).

  miner_hparams: the hyperparameters of the loss's `miner` (kwargs['miner'], a name of
  jsim.losses.miners; PML's defaults for those not given). An unknown name or
  hyperparameter is a ValueError naming it and what is accepted.
  """
  if name not in _REGISTRY:
    raise ValueError(
      f"unknown loss {name!r}; available: {', '.join(available())} (or 'cross_entropy' for the classifier head)"
    )
  cls = _REGISTRY[name]
  fields = cls.hyperparameter_names()
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(
      f"loss {name!r} has no hyperparameter {unknown[0]!r}; its hyperparameters: {', '.join(fields) or 'none'}"
    )
  if kwargs.get("miner", miners.NONE) != miners.NONE:
    kwargs["miner_settings"] = tuple(sorted(dict(miner_hparams or {}).items()))
  loss = cls(**kwargs)
  loss.validate()
  return loss


register(CROSS_ENTROPY, cross_entropy.CrossEntropy)
register("contrastive", pair_losses.Contrastive)
register("triplet", pair_losses.Triplet)
register("multi_similarity", pair_losses.MultiSimilarity)
register("proxy_anchor", proxy_losses.ProxyAnchor)
register("normalized_softmax", proxy_losses.NormalizedSoftmax)
register("arcface", proxy_losses.ArcFace)
register("pair_ms", pair_ms.PairMs)

__all__ = ["CROSS_ENTROPY", "Loss", "available", "build", "miners", "register"]
