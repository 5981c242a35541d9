"""The distance "similarity model": score a pair by the distance of its embeddings, calibrated to P(same).

For embeddings trained end to end by a metric-learning loss, the natural judge of
a pair is their distance, not a trained Ms. `similarity.model=distance` (with
`similarity.distance=l2|cosine`) makes stage 2 fit, on stage 2's validation pairs,

    P(same | d) = sigmoid(scale * d + bias)        (logistic regression on the distance)

so that every evaluator (five cases, ROC/AUC, threshold, retrieval) and predict,
which all take a prob_fn(params, e1, e2), work unchanged; the 0.5 threshold is the
distance -bias / scale, and the validation threshold is chosen on these
probabilities as for Ms. Distances: 'l2' = ||e1 - e2||, 'cosine' = 1 - cos(e1, e2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DISTANCES = ("l2", "cosine")


def pair_distance(e1: jax.Array, e2: jax.Array, distance: str) -> jax.Array:
  """[..., D] x [..., D] -> [...] in float32."""
  e1, e2 = e1.astype(jnp.float32), e2.astype(jnp.float32)
  if distance == "l2":
    s = jnp.sum(jnp.square(e1 - e2), axis=-1)
    return jnp.sqrt(jnp.maximum(s, 0.0))
  if distance == "cosine":
    n1 = jnp.maximum(jnp.linalg.norm(e1, axis=-1), 1e-12)
    n2 = jnp.maximum(jnp.linalg.norm(e2, axis=-1), 1e-12)
    return 1.0 - jnp.sum(e1 * e2, axis=-1) / (n1 * n2)
  raise ValueError(f"similarity.distance={distance!r}: expected one of {', '.join(DISTANCES)}")


def make_prob_fn(distance: str):
  """prob_fn(params {'scale', 'bias'}, e1, e2) -> P(same) [B]; build once and reuse (evaluators compile per fn)."""
  if distance not in DISTANCES:
    raise ValueError(f"similarity.distance={distance!r}: expected one of {', '.join(DISTANCES)}")

  def prob_fn(params, e1, e2):
    return jax.nn.sigmoid(params["scale"] * pair_distance(e1, e2, distance) + params["bias"])

  return prob_fn


def fit_logistic(d, same, *, l2: float = 1e-6, max_iters: int = 100) -> tuple[float, float]:
  """(scale, bias) maximising the mean log-likelihood of sigmoid(scale * d + bias) for labels `same`.

  Newton's method in float64 on the standardised distance, with a tiny ridge so that
  perfectly separated pairs still give finite parameters.
  """
  d = np.asarray(d, np.float64)
  y = np.asarray(same, np.float64)
  if d.ndim != 1 or d.shape != y.shape or len(d) < 2:
    raise ValueError(f"calibration needs distances and labels of one length >= 2, got {d.shape} and {y.shape}")
  if y.min() == y.max():
    raise ValueError("calibration needs similar and dissimilar validation pairs; got only one kind")
  mu, sd = d.mean(), d.std() or 1.0
  x = np.stack([(d - mu) / sd, np.ones_like(d)], axis=1)
  w = np.zeros(2)
  for _ in range(max_iters):
    p = 1.0 / (1.0 + np.exp(-(x @ w)))
    grad = x.T @ (p - y) / len(d) + l2 * np.array([w[0], 0.0])
    hess = (x * (p * (1 - p))[:, None]).T @ x / len(d) + l2 * np.diag([1.0, 0.0]) + 1e-12 * np.eye(2)
    step = np.linalg.solve(hess, grad)
    w -= step
    if np.max(np.abs(step)) < 1e-10:
      break
  scale = w[0] / sd
  return float(scale), float(w[1] - scale * mu)


def calibrate(emb, pairs, same, distance: str) -> dict:
  """{'scale', 'bias', 'distance_at_0.5', 'val_pairs'} from the pairs [P, 2] of embeddings `emb` [N, D]."""
  emb = jnp.asarray(emb)
  pairs = np.asarray(pairs)
  d = np.concatenate(
    [
      np.asarray(pair_distance(emb[pairs[s : s + 65536, 0]], emb[pairs[s : s + 65536, 1]], distance))
      for s in range(0, len(pairs), 65536)
    ]
  )
  scale, bias = fit_logistic(d, same)
  return {
    "scale": scale,
    "bias": bias,
    "distance_at_0.5": -bias / scale if scale else float("inf"),
    "val_pairs": int(len(pairs)),
    "distance": distance,
  }


def params_of(calibration: dict) -> dict:
  """The prob_fn's params (float32 scalars) from a calibration record."""
  return {"scale": jnp.float32(calibration["scale"]), "bias": jnp.float32(calibration["bias"])}
