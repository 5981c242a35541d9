"""cross_entropy: the protocol's stage-1 loss, softmax cross-entropy over the seen classes.

Its parameters are the classifier head, {"kernel": [D, C], "bias": [C]}. They stay in the
backbone, params["head"], where torchvision's weights and every stage-1 checkpoint keep
them, and the backbone applies them: in training the step hands this loss the logits the
head made (in the backbone's compute dtype), so `batch_losses` reads `logits`; `apply` makes
them itself from the head's parameters, for a caller that has only embeddings.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import optax

from jsim.losses import base


@dataclasses.dataclass(frozen=True)
class CrossEntropy(base.Loss):
  """softmax cross-entropy of the classifier head's logits, mean over the batch (torch's CrossEntropyLoss)."""

  registry_name: ClassVar[str] = "cross_entropy"
  classifies: ClassVar[bool] = True

  def params_in(self, params: dict) -> dict:
    return params["head"]

  def apply(self, params, embeddings, labels, *, rng=None):
    del rng
    logits = jnp.dot(embeddings, params["kernel"]) + params["bias"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  def batch_losses(self, params, logits, embeddings, labels, *, rng=None):
    del params, embeddings, rng
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return losses.mean(), losses

  def batch_correct(self, logits, embeddings, labels):
    del embeddings
    return jnp.argmax(logits, -1) == labels
