"""A backbone trained by a metric-learning loss: an optional embedding head, and the loss's parameters.

    model = MetricModel(backbone=models.build("resnet50", num_classes=C), head_dim=128,
                        loss=losses.build("proxy_anchor"), num_classes=C)
    variables = model.init({"params": key, "dropout": key}, x, train=False)
    # params: {"backbone": ..., "embedding_head": ... (head_dim > 0), "loss": ... (a loss with parameters)}
    logits, embedding = model.apply(variables, x, train=False)

It returns what every backbone returns, (logits, embedding), so the embedding
stage, the evaluators and predict use it unchanged. The embedding is the
backbone's (the input of its classifier head) or, with head_dim > 0, a linear
projection of it to head_dim, L2-normalised. The loss's proxies or class weights
live in the same parameter tree, so they are checkpointed, restored, replicated
and checked for NaN with the rest; they do not take part in `apply`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# torch.nn.functional.normalize's eps.
NORMALIZE_EPS = 1e-12


def l2_normalize(x, axis: int = -1):
  """torch.nn.functional.normalize: x / max(||x||, 1e-12), in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), NORMALIZE_EPS)


class MetricModel(nn.Module):
  backbone: nn.Module
  head_dim: int = 0  # 0: the backbone's embedding as it is
  loss: Any = None  # a jsim.losses.Loss whose parameters (if any) the model holds under "loss"
  num_classes: int = 0  # classes of the loss's parameters

  @property
  def dtype(self) -> Any:
    return getattr(self.backbone, "dtype", jnp.float32)

  @property
  def embedding_dim(self) -> int:
    return self.head_dim or self.backbone.embedding_dim

  @nn.compact
  def __call__(self, x, train: bool = False, from_embedding: bool = False):
    # from_embedding: x is the frozen backbone's output (jsim.train.feature_cache); the heads run on it.
    logits, e = self.backbone(x, train=train, **({"from_embedding": True} if from_embedding else {}))
    if self.head_dim:
      e = nn.Dense(self.head_dim, dtype=jnp.float32, param_dtype=jnp.float32, name="embedding_head")(
        e.astype(jnp.float32)
      )
      e = l2_normalize(e)
    if self.loss is not None and self.loss.param_name is not None:
      dim = e.shape[-1]
      self.param("loss", lambda key: self.loss.init(key, self.num_classes, dim))
    return logits, e.astype(jnp.float32)


def param_group(path: tuple) -> str:
  """The optimizer group of a parameter: 'backbone', 'head' or 'loss' (by its top-level key)."""
  top = getattr(path[0], "key", path[0])
  return {"embedding_head": "head", "loss": "loss"}.get(top, "backbone")
