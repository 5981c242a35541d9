"""Stage 2's similarity model Ms: an MLP over a symmetric feature of two embeddings.

The protocol's Ms takes |e1 - e2| (feature kind 'l1') through two hidden layers,
each half the width of the layer before (2048 -> 1024 -> 512 -> 2 for ResNet50
embeddings), ReLU, dropout 0.25 on the hidden layers, He initialisation and a
2-unit output whose softmax gives P(same class) as class 1.

Other feature kinds (the source's future work) are named by strings and joined
with '+': 'l1', 'sq', 'prod', 'cos', 'l2', e.g. 'l1+prod' = [|e1-e2|, e1*e2].
Every kind is symmetric in (e1, e2), so Ms(a, b) == Ms(b, a) by construction.

    model = SimilarityMLP(feature="l1")
    params = model.init(key, e1, e2, train=False)["params"]
    logits = model.apply({"params": params}, e1, e2, train=True, rngs={"dropout": k})
    p_same = same_probability(logits)
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# Width of each feature kind, as a function of the embedding width D.
_FEATURE_WIDTH: dict[str, Callable[[int], int]] = {
  "l1": lambda d: d,  # |e1 - e2| (the protocol)
  "sq": lambda d: d,  # (e1 - e2)^2
  "prod": lambda d: d,  # e1 * e2
  "cos": lambda d: 1,  # cosine similarity
  "l2": lambda d: 1,  # Euclidean distance
}
FEATURE_KINDS: tuple[str, ...] = tuple(_FEATURE_WIDTH)
# How each kind reads in titles ('l1' alone is read as 'I1' in a sans-serif font).
_FEATURE_FORMULA = {
  "l1": "|e1 - e2|",
  "sq": "(e1 - e2)^2",
  "prod": "e1 * e2",
  "cos": "cos(e1, e2)",
  "l2": "||e1 - e2||",
}

# torch.nn.init.kaiming_normal_(mode='fan_in', nonlinearity='relu'): N(0, 2 / fan_in), untruncated.
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def parse_feature_kind(kind: str) -> tuple[str, ...]:
  """Splits 'l1+prod' into ('l1', 'prod'); ValueError for an unknown or empty part."""
  parts = tuple(p.strip() for p in str(kind).split("+"))
  for p in parts:
    if p not in _FEATURE_WIDTH:
      raise ValueError(
        f"unknown pair feature kind {p!r} in {kind!r}; valid kinds: {', '.join(FEATURE_KINDS)} "
        "(join several with '+', e.g. 'l1+prod')"
      )
  return parts


def feature_formula(kind: str) -> str:
  """'l1' -> '|e1 - e2|', 'l1+prod' -> '[|e1 - e2|, e1 * e2]': the feature as a formula, for titles."""
  parts = [_FEATURE_FORMULA[p] for p in parse_feature_kind(kind)]
  return parts[0] if len(parts) == 1 else f"[{', '.join(parts)}]"


def feature_dim(kind: str, embedding_dim: int) -> int:
  """Width F of `pair_features(e1, e2, kind)` for embeddings of width `embedding_dim`."""
  return sum(_FEATURE_WIDTH[p](embedding_dim) for p in parse_feature_kind(kind))


def _safe_norm(x: jax.Array) -> jax.Array:
  # sqrt with a finite gradient at 0 (identical embeddings), exact value elsewhere.
  s = jnp.sum(x * x, axis=-1, keepdims=True)
  pos = s > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)


def _one_feature(e1: jax.Array, e2: jax.Array, kind: str) -> jax.Array:
  if kind == "l1":
    return jnp.abs(e1 - e2)
  if kind == "sq":
    return jnp.square(e1 - e2)
  if kind == "prod":
    return e1 * e2
  if kind == "l2":
    return _safe_norm(e1 - e2)
  if kind == "cos":
    dot = jnp.sum(e1 * e2, axis=-1, keepdims=True)
    return dot / jnp.maximum(_safe_norm(e1) * _safe_norm(e2), 1e-12)
  raise ValueError(f"unknown pair feature kind {kind!r}")  # unreachable after parsing


def pair_features(e1: jax.Array, e2: jax.Array, kind: str = "l1") -> jax.Array:
  """The symmetric feature of two embeddings [..., D] -> [..., F] (F = feature_dim(kind, D)).

  Computed in float32 (cosine and distances need the precision), whatever the input dtype.
  """
  if e1.shape != e2.shape:
    raise ValueError(f"pair_features: embeddings of different shapes {e1.shape} and {e2.shape}")
  e1 = e1.astype(jnp.float32)
  e2 = e2.astype(jnp.float32)
  parts = [_one_feature(e1, e2, p) for p in parse_feature_kind(kind)]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def default_hidden(embedding_dim: int) -> tuple[int, int]:
  """The protocol's hidden widths: halving from the embedding width, (D // 2, D // 4)."""
  if embedding_dim < 4:
    raise ValueError(f"embedding_dim={embedding_dim} is too small for two halving hidden layers")
  return (embedding_dim // 2, embedding_dim // 4)


class SimilarityMLP(nn.Module):
  """Ms: pair feature -> [Dense, ReLU, Dropout] per hidden width -> Dense(2) logits.

  Attributes:
    hidden: hidden widths; None means `default_hidden(D)` from the embedding width D
      (not the feature width, which differs for e.g. 'l1+prod').
    dropout_rate: dropout after each hidden ReLU (active only with train=True; rng 'dropout').
    feature: pair feature kind (see `pair_features`).
    dtype: compute dtype of the Dense layers; parameters stay float32, logits are float32.
  """

  hidden: tuple[int, ...] | None = None
  dropout_rate: float = 0.25
  feature: str = "l1"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, e1: jax.Array, e2: jax.Array, train: bool = False) -> jax.Array:
    """Logits [..., 2] float32 for embeddings e1, e2 [..., D]; class 1 means "same class"."""
    hidden = self.hidden if self.hidden is not None else default_hidden(e1.shape[-1])
    x = pair_features(e1, e2, self.feature).astype(self.dtype)
    for i, width in enumerate(hidden):
      x = nn.Dense(
        width,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=he_normal,
        bias_init=nn.initializers.zeros,
        name=f"hidden{i}",
      )(x)
      x = nn.relu(x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(
      2, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=he_normal, bias_init=nn.initializers.zeros, name="out"
    )(x)
    return x.astype(jnp.float32)


def same_probability(logits: jax.Array) -> jax.Array:
  """P(same class) = softmax(logits)[..., 1], in float32."""
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]


def make_prob_fn(model: SimilarityMLP) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """prob_fn(params, e1, e2) -> P(same) [B], in eval mode: what the evaluators take.

  Build it once and reuse the same function object: the evaluators compile per prob_fn.
  """

  def prob_fn(params, e1, e2):
    return same_probability(model.apply({"params": params}, e1, e2, train=False))

  return prob_fn
