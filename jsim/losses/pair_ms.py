"""pair_ms: the protocol's similarity network Ms trained jointly with the backbone.

The two-stage method trains Ms on |e1 - e2| of frozen embeddings; here every
unordered pair i < j of the batch goes through Ms and the cross-entropy of
"same class or not" flows back into the backbone (the siamese network, trained in
one step). Similar pairs are far fewer than dissimilar ones in a batch, so the
two kinds are weighted equally: 0.5 * (mean CE over similar + mean CE over
dissimilar pairs), as the protocol's balanced pair sets do.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import optax

from jsim.losses import base
from jsim.models import similarity


@dataclasses.dataclass(frozen=True)
class PairMs(base.Loss):
  """Ms over pair features of every pair of the batch, params {"ms": Ms params}.

  feature: the pair feature kind (see jsim.models.similarity); hidden: () for the
  protocol's halving widths; normalize: L2-normalise embeddings first.
  """

  registry_name: ClassVar[str] = "pair_ms"
  param_name: ClassVar[str] = "ms"
  uses_dropout: ClassVar[bool] = True
  feature: str = "l1"
  hidden: tuple = ()
  dropout: float = 0.25
  normalize: bool = False

  def validate(self):
    similarity.parse_feature_kind(self.feature)
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"loss hyperparameter dropout={self.dropout!r} must be in [0, 1) (pair_ms)")

  def model(self) -> similarity.SimilarityMLP:
    return similarity.SimilarityMLP(hidden=tuple(self.hidden) or None, dropout_rate=self.dropout, feature=self.feature)

  def init(self, key, num_classes, dim):
    del num_classes
    x = jnp.zeros((1, dim), jnp.float32)
    return {"ms": self.model().init(key, x, x, train=False)["params"]}

  def pair_logits(self, params, embeddings, *, rng=None):
    """(logits [P, 2], (i, j)) over the P = B(B-1)/2 pairs i < j; dropout active when rng is given."""
    e = base.l2_normalize(embeddings) if self.normalize else embeddings.astype(jnp.float32)
    i, j = np.triu_indices(e.shape[0], k=1)
    kwargs = {"train": True, "rngs": {"dropout": rng}} if rng is not None else {"train": False}
    return self.model().apply({"params": params["ms"]}, e[i], e[j], **kwargs), (i, j)

  def apply(self, params, embeddings, labels, *, rng=None):
    logits, (i, j) = self.pair_logits(params, embeddings, rng=rng)
    same = labels[i] == labels[j]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, same.astype(jnp.int32))

    def mean_where(mask):
      n = jnp.sum(mask)
      return jnp.where(n > 0, jnp.sum(jnp.where(mask, ce, 0.0)) / jnp.maximum(n, 1), 0.0)

    return 0.5 * (mean_where(same) + mean_where(~same))
