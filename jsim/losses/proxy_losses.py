"""Losses against learned class parameters: proxy-anchor (proxies), normalised softmax and ArcFace (weights).

Parameters are [C, D] (PML keeps NormalizedSoftmax's and ArcFace's W as [D, C]).
Their initialisation follows PML: proxies kaiming_normal_(mode='fan_out'), i.e.
N(0, 2 / C) for a [C, D] tensor; weights normal_ N(0, 1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

from jsim.losses import base


def _check_labels(labels: jax.Array, num_classes: int) -> None:
  if not isinstance(labels, jax.core.Tracer) and labels.size:
    lo, hi = int(jnp.min(labels)), int(jnp.max(labels))
    if lo < 0 or hi >= num_classes:
      raise ValueError(
        f"labels outside [0, {num_classes}) (min {lo}, max {hi}): the loss was built for {num_classes} classes"
      )


@dataclasses.dataclass(frozen=True)
class ProxyAnchor(base.Loss):
  """PML ProxyAnchorLoss(margin=0.1, alpha=32) on cosine similarity to {"proxies": [C, D]}.

  sum over proxies with a positive of log(1 + sum_pos exp(-alpha (s - margin))) / #those proxies
  + sum over all proxies of log(1 + sum_neg exp(alpha (s + margin))) / C.
  """

  registry_name: ClassVar[str] = "proxy_anchor"
  param_name: ClassVar[str] = "proxies"
  margin: float = 0.1
  alpha: float = 32.0

  def init(self, key, num_classes, dim):
    return {"proxies": jax.random.normal(key, (num_classes, dim), jnp.float32) * math.sqrt(2.0 / num_classes)}

  def apply(self, params, embeddings, labels, *, rng=None):
    del rng
    proxies = params["proxies"]
    _check_labels(labels, proxies.shape[0])
    cos = base.cosine_matrix(embeddings, proxies)  # [B, C]
    pos = jax.nn.one_hot(labels, proxies.shape[0], dtype=bool)
    pos_term = base.logsumexp_add_one(self.alpha * (self.margin - cos), pos, axis=0)  # [C]
    neg_term = base.logsumexp_add_one(self.alpha * (cos + self.margin), ~pos, axis=0)
    with_pos = jnp.sum(jnp.any(pos, axis=0))
    pos_loss = jnp.where(with_pos > 0, jnp.sum(pos_term) / jnp.maximum(with_pos, 1), 0.0)
    return pos_loss + jnp.sum(neg_term) / proxies.shape[0]


@dataclasses.dataclass(frozen=True)
class NormalizedSoftmax(base.Loss):
  """PML NormalizedSoftmaxLoss(temperature=0.05): cross-entropy of cos(e, w_c) / temperature, mean."""

  registry_name: ClassVar[str] = "normalized_softmax"
  param_name: ClassVar[str] = "weights"
  temperature: float = 0.05

  def validate(self):
    base.check_positive(self.registry_name, self.temperature, "temperature")

  def init(self, key, num_classes, dim):
    return {"weights": jax.random.normal(key, (num_classes, dim), jnp.float32)}

  def apply(self, params, embeddings, labels, *, rng=None):
    del rng
    weights = params["weights"]
    _check_labels(labels, weights.shape[0])
    logits = base.cosine_matrix(embeddings, weights) / self.temperature
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


@dataclasses.dataclass(frozen=True)
class ArcFace(base.Loss):
  """PML ArcFaceLoss(margin=28.6 degrees, scale=64): cross-entropy of scale * cos with cos(theta + m) for the target.

  Past theta > pi - m the target logit is cos(theta) - m sin(m) (monotonic), as in PML.
  cos(theta + m) is computed as cos(theta) cos(m) - sin(theta) sin(m), which has a finite
  gradient where cos(theta) = 1 (arccos does not).
  """

  registry_name: ClassVar[str] = "arcface"
  param_name: ClassVar[str] = "weights"
  margin: float = 28.6  # degrees
  scale: float = 64.0

  def init(self, key, num_classes, dim):
    return {"weights": jax.random.normal(key, (num_classes, dim), jnp.float32)}

  def apply(self, params, embeddings, labels, *, rng=None):
    del rng
    weights = params["weights"]
    _check_labels(labels, weights.shape[0])
    m = math.radians(self.margin)
    cos = base.cosine_matrix(embeddings, weights)  # [B, C]
    target = jax.nn.one_hot(labels, weights.shape[0], dtype=bool)
    c = jnp.clip(jnp.sum(jnp.where(target, cos, 0.0), axis=1), -1.0, 1.0)
    sin = base.safe_sqrt(1.0 - c * c)
    with_margin = jnp.where(c >= math.cos(math.pi - m), c * math.cos(m) - sin * math.sin(m), c - m * math.sin(m))
    logits = jnp.where(target, with_margin[:, None], cos) * self.scale
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
