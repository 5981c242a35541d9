"""Retrieval figures of embeddings by nearest neighbours: P@1, R-precision and MAP@R, fast.

Shared by stage 1 (the validation MAP@R of a metric-learning run picks its best epoch)
and the evaluation (jsim.evaluate.retrieval re-exports it), so it depends on neither.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("k", "distance"))
def _knn_block(reference, reference_labels, query, query_labels, self_index, *, k: int, distance: str):
  """Labels-agree [b, k] of the k nearest reference images of the queries [b, D] (by matmul), the query's
  own row of the reference (self_index, -1: none) left out."""
  e, q = reference.astype(jnp.float32), query.astype(jnp.float32)
  if distance == "cosine":
    e = e / jnp.maximum(jnp.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    q = q / jnp.maximum(jnp.linalg.norm(q, axis=1, keepdims=True), 1e-12)
  # -||q - e||^2 up to the query's own norm (which does not change its ranking).
  scores = 2.0 * jnp.matmul(q, e.T, precision=jax.lax.Precision.HIGHEST) - jnp.sum(e * e, axis=1)[None, :]
  scores = jnp.where(jnp.arange(e.shape[0])[None, :] == self_index[:, None], -jnp.inf, scores)
  _, top = jax.lax.top_k(scores, k)  # ties: lower index first, as the stable sort of rank_queries
  return reference_labels[top] == query_labels[:, None]


def class_mean(values: np.ndarray, labels: np.ndarray, avg_of_avgs: bool) -> float:
  """The mean of per-query values; avg_of_avgs: the mean over the queries' classes of each class's mean
  (PML's AccuracyCalculator(avg_of_avgs=True): every class counts the same, however many queries it has)."""
  if not avg_of_avgs:
    return float(np.mean(values))
  _, inverse = np.unique(labels, return_inverse=True)
  return float(np.mean(np.bincount(inverse, weights=values) / np.bincount(inverse)))


def embedding_metrics(
  embeddings,
  labels,
  *,
  distance: str = "l2",
  reference=None,
  reference_labels=None,
  query_in_reference=None,
  avg_of_avgs: bool = False,
  queries_per_block: int = 1024,
) -> dict[str, float]:
  """{'precision@1', 'r_precision', 'map@r', 'num_queries'} of the queries `embeddings` [N, D] by nearest
  neighbours in embedding space, as PML's AccuracyCalculator(k='max_bin_count') defines them.

  Without `reference`, every image is a query ranked against all the others (the same numbers as
  `retrieval_metrics(negative_distance, ...)`). With reference [M, D] and reference_labels [M], the
  queries are ranked against the reference set, and R is the number of reference images of the
  query's class (PML's get_accuracy(query, query_labels, reference, reference_labels));
  query_in_reference [N] gives each query's own row in the reference, left out of its ranking (and
  of its R), or -1 where it has none (e.g. unseen queries against a gallery of all test images:
  PML's ref_includes_query). Queries whose class has no other reference image are skipped.
  distance 'cosine' ranks L2-normalised embeddings. avg_of_avgs: each figure is the mean over the
  queries' classes of the class's mean (see `class_mean`). Computed from matmuls and the top max(R)
  neighbours only: fast enough to select epochs by MAP@R on a validation split of ~20,000 images.
  """
  if distance not in ("l2", "cosine"):
    raise ValueError(f"distance={distance!r}: expected 'l2' or 'cosine'")
  embeddings = jnp.asarray(embeddings)
  labels_np = np.asarray(labels)
  n = len(labels_np)
  if embeddings.ndim != 2 or embeddings.shape[0] != n or n < 1:
    raise ValueError(f"embeddings must be [N, D] with labels [N]; got {embeddings.shape}, {labels_np.shape}")
  if reference is None:
    if n < 2 or query_in_reference is not None or reference_labels is not None:
      raise ValueError(
        "without a reference set, the queries are ranked among themselves: N >= 2, no query_in_reference"
      )
    reference, ref_labels_np, self_index = embeddings, labels_np, np.arange(n)
  else:
    reference = jnp.asarray(reference)
    ref_labels_np = np.asarray(reference_labels)
    if reference.ndim != 2 or reference.shape != (len(ref_labels_np), embeddings.shape[1]):
      raise ValueError(
        f"reference must be [M, {embeddings.shape[1]}] with reference_labels [M]; got {reference.shape}, "
        f"{ref_labels_np.shape}"
      )
    self_index = np.full(n, -1) if query_in_reference is None else np.asarray(query_in_reference)
    if self_index.shape != (n,) or np.any(self_index >= len(ref_labels_np)) or np.any(self_index < -1):
      raise ValueError(f"query_in_reference must be [N] rows of the reference or -1; got {self_index.shape}")
    inside = self_index >= 0
    if np.any(ref_labels_np[self_index[inside]] != labels_np[inside]):
      raise ValueError("query_in_reference: a query's row of the reference has another label")
  # R: the reference images of the query's class, its own row left out.
  classes, ref_counts = np.unique(ref_labels_np, return_counts=True)
  pos = np.searchsorted(classes, labels_np)
  found = (pos < len(classes)) & (classes[np.minimum(pos, len(classes) - 1)] == labels_np)
  num_rel = np.where(found, ref_counts[np.minimum(pos, len(classes) - 1)], 0) - (self_index >= 0)
  has = num_rel > 0
  if not has.any():
    raise ValueError("retrieval: no query has another image of its class")
  k = int(max(1, num_rel.max()))
  ref_labels_dev = jnp.asarray(ref_labels_np, jnp.int32)
  rels = []
  for s in range(0, n, queries_per_block):
    q = np.minimum(np.arange(s, s + queries_per_block), n - 1)  # pad by repeating the last query
    rel = _knn_block(
      reference,
      ref_labels_dev,
      embeddings[jnp.asarray(q)],
      jnp.asarray(labels_np[q], jnp.int32),
      jnp.asarray(self_index[q], jnp.int32),
      k=k,
      distance=distance,
    )
    rels.append(np.asarray(rel)[: min(queries_per_block, n - s)])
  rel, num_rel, query_labels = np.concatenate(rels)[has], num_rel[has], labels_np[has]
  in_r = np.arange(k)[None, :] < num_rel[:, None]
  hit = rel & in_r
  precision = np.cumsum(hit, axis=1) / np.arange(1, k + 1)[None, :]
  return {
    "precision@1": class_mean(rel[:, 0].astype(np.float64), query_labels, avg_of_avgs),
    "r_precision": class_mean(hit.sum(1) / num_rel, query_labels, avg_of_avgs),
    "map@r": class_mean(np.where(hit, precision, 0.0).sum(1) / num_rel, query_labels, avg_of_avgs),
    "num_queries": int(has.sum()),
  }
