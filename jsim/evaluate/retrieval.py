"""Retrieval metrics: recall@k, mAP, precision@1, R-precision and MAP@R of a query set ranked against itself.

Every image of the set (e.g. the test images of the 20 unseen classes) is a query,
ranked against all OTHER images of the set by a score function (higher = more
similar), batched on the device: the Ms probability (`similarity.make_prob_fn`) or
the plain negative embedding distance (`negative_distance`).

* recall@k: fraction of queries with at least one same-class image among the top k.
* mAP: mean over queries of the average precision (mean of the precision at the rank
  of each same-class image). Queries whose class has no other image are skipped.
* precision@1, r_precision, map@r: as "A Metric Learning Reality Check" (Musgrave et
  al., 2020) and pytorch-metric-learning's AccuracyCalculator define them, with R the
  number of other images of the query's class: precision@1 is the fraction of queries
  whose nearest image is of their class (= recall@1); R-precision the fraction of the
  top R that are; MAP@R the mean over the top R of the precision at each same-class
  rank, divided by R.
* nmi (`kmeans_nmi`): normalised mutual information between the classes and a k-means
  clustering of the embeddings into as many clusters (sklearn's arithmetic normalisation).
Ties between scores are broken by image index (stable sort).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsim.knn_metrics import embedding_metrics  # noqa: F401  (the fast path, re-exported for evaluators)

ScoreFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def negative_distance(params: Any, e1: jax.Array, e2: jax.Array) -> jax.Array:
  """Score = -||e1 - e2||_2 (params unused): a baseline without Ms."""
  del params
  d = e1.astype(jnp.float32) - e2.astype(jnp.float32)
  return -jnp.sqrt(jnp.sum(d * d, axis=-1))


@functools.partial(jax.jit, static_argnames=("score_fn", "ks", "num_top"))
def _query_block(params, embeddings, labels, q_idx, *, score_fn: ScoreFn, ks: tuple[int, ...], num_top: int):
  """Ranks the queries q_idx [b] against all N images; per-query hits@k, AP, #relevant, R-precision, AP@R, top."""
  b, n = q_idx.shape[0], embeddings.shape[0]
  e1 = jnp.broadcast_to(embeddings[q_idx][:, None, :], (b, n, embeddings.shape[1])).reshape(b * n, -1)
  e2 = jnp.broadcast_to(embeddings[None], (b, n, embeddings.shape[1])).reshape(b * n, -1)
  scores = score_fn(params, e1, e2).astype(jnp.float32).reshape(b, n)
  is_self = jnp.arange(n)[None, :] == q_idx[:, None]
  scores = jnp.where(is_self, -jnp.inf, scores)
  order = jnp.argsort(-scores, axis=1, stable=True)  # self sorts last
  ranked_self = order == q_idx[:, None]
  rel = (labels[order] == labels[q_idx][:, None]) & ~ranked_self
  num_rel = jnp.sum(rel, axis=1)
  hits = jnp.stack([jnp.any(rel[:, :k], axis=1) for k in ks])
  ranks = jnp.arange(1, n + 1, dtype=jnp.float32)
  precision = jnp.cumsum(rel, axis=1).astype(jnp.float32) / ranks
  ap = jnp.sum(jnp.where(rel, precision, 0.0), axis=1) / jnp.maximum(num_rel, 1)
  in_r = jnp.arange(n)[None, :] < num_rel[:, None]  # the top R ranks
  r = jnp.maximum(num_rel, 1).astype(jnp.float32)
  r_precision = jnp.sum(rel & in_r, axis=1) / r
  ap_at_r = jnp.sum(jnp.where(rel & in_r, precision, 0.0), axis=1) / r
  return (
    hits,
    ap,
    num_rel,
    r_precision,
    ap_at_r,
    order[:, :num_top],
    jnp.take_along_axis(scores, order[:, :num_top], axis=1),
  )


def rank_queries(
  score_fn: ScoreFn,
  params: Any,
  embeddings,
  labels,
  *,
  ks: Sequence[int] = (1, 5),
  num_top: int = 5,
  pairs_per_block: int = 65536,
) -> dict[str, np.ndarray]:
  """Per-query results: {'hits': bool [len(ks), N], 'ap': [N], 'num_relevant': [N], 'r_precision': [N],
  'ap_at_r': [N], 'top_indices': int [N, num_top], 'top_scores': [N, num_top]} (self excluded).

  Queries are processed in blocks of about pairs_per_block / N, the last block padded.
  """
  embeddings = jnp.asarray(embeddings)
  labels = jnp.asarray(labels, jnp.int32)
  n = embeddings.shape[0]
  if embeddings.ndim != 2 or labels.shape != (n,):
    raise ValueError(f"embeddings must be [N, D] with labels [N]; got {embeddings.shape} and {labels.shape}")
  if n < 2:
    raise ValueError(f"retrieval needs at least 2 images, got {n}")
  ks = tuple(int(k) for k in ks)
  if any(k < 1 or k > n - 1 for k in ks) or not 1 <= num_top <= n - 1:
    raise ValueError(f"ks {ks} and num_top {num_top} must lie in [1, {n - 1}] (N - 1 other images)")
  block = max(1, min(n, pairs_per_block // n))
  parts = []
  for s in range(0, n, block):
    q = np.minimum(np.arange(s, s + block), n - 1).astype(np.int32)  # pad by repeating the last query
    out = _query_block(params, embeddings, labels, jnp.asarray(q), score_fn=score_fn, ks=ks, num_top=num_top)
    keep = min(block, n - s)
    parts.append([np.asarray(x)[..., :keep] if i == 0 else np.asarray(x)[:keep] for i, x in enumerate(out)])
  names = ("hits", "ap", "num_relevant", "r_precision", "ap_at_r", "top_indices", "top_scores")
  return {name: np.concatenate([p[i] for p in parts], axis=1 if i == 0 else 0) for i, name in enumerate(names)}


def retrieval_metrics(
  score_fn: ScoreFn, params: Any, embeddings, labels, *, ks: Sequence[int] = (1, 5), pairs_per_block: int = 65536
) -> dict[str, float]:
  """{'recall@k' for k in ks, 'mAP', 'precision@1', 'r_precision', 'map@r', 'num_queries'} of the set
  ranked against itself (queries without another image of their class skipped).

  score_fn(params, e1 [B, D], e2 [B, D]) -> scores [B], higher = more similar; jittable,
  and reused as the same object to avoid recompiling.
  """
  ks = tuple(int(k) for k in ks)
  ranked_ks = ks if 1 in ks else (1,) + ks  # precision@1 needs the top 1
  r = rank_queries(
    score_fn, params, embeddings, labels, ks=ranked_ks, num_top=max(ranked_ks), pairs_per_block=pairs_per_block
  )
  has = r["num_relevant"] > 0
  if not has.any():
    raise ValueError("retrieval: no query has another image of its class")
  hits = {k: r["hits"][i][has] for i, k in enumerate(ranked_ks)}
  out = {f"recall@{k}": float(hits[k].mean()) for k in ks}
  out["mAP"] = float(r["ap"][has].mean())
  out["precision@1"] = float(hits[1].mean())
  out["r_precision"] = float(r["r_precision"][has].mean())
  out["map@r"] = float(r["ap_at_r"][has].mean())
  out["num_queries"] = int(has.sum())
  return out


def kmeans(embeddings, num_clusters: int, *, seed: int = 0, num_iters: int = 100, num_starts: int = 10) -> np.ndarray:
  """Cluster of each row of embeddings [N, D]: Lloyd's k-means from `num_starts` seeded k-means++
  starts, keeping the one of least within-cluster sum of squares (so that the result rarely
  depends on the start)."""
  x = np.asarray(embeddings, np.float64)
  n = x.shape[0]
  if not 1 <= num_clusters <= n:
    raise ValueError(f"k-means: {num_clusters} clusters for {n} points")
  rng = np.random.default_rng(seed)
  sq = np.sum(x * x, axis=1)
  best, best_inertia = None, np.inf
  for _ in range(num_starts):
    centers = [x[rng.integers(n)]]
    d2 = np.sum((x - centers[0]) ** 2, axis=1)
    for _ in range(1, num_clusters):  # k-means++: the next centre with probability ~ d^2
      total = d2.sum()
      i = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
      centers.append(x[i])
      d2 = np.minimum(d2, np.sum((x - x[i]) ** 2, axis=1))
    centers = np.stack(centers)
    assign = None
    for _ in range(num_iters):
      dist = sq[:, None] + np.sum(centers * centers, 1)[None] - 2 * x @ centers.T
      new = np.argmin(dist, axis=1)
      if assign is not None and np.array_equal(new, assign):
        break
      assign = new
      for c in range(num_clusters):
        members = x[assign == c]
        if len(members):
          centers[c] = members.mean(axis=0)
    inertia = float(np.sum((x - centers[assign]) ** 2))
    if inertia < best_inertia:
      best, best_inertia = assign, inertia
  return best


def normalized_mutual_information(labels_a, labels_b) -> float:
  """NMI with the arithmetic mean of the entropies (sklearn's default), in [0, 1]."""
  _, a = np.unique(np.asarray(labels_a), return_inverse=True)
  _, b = np.unique(np.asarray(labels_b), return_inverse=True)
  n = len(a)
  joint = np.zeros((a.max() + 1, b.max() + 1))
  np.add.at(joint, (a, b), 1.0)
  p = joint / n
  pa, pb = p.sum(1), p.sum(0)
  nz = p > 0
  mi = float(np.sum(p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])))
  ha, hb = -float(np.sum(pa * np.log(pa))), -float(np.sum(pb * np.log(pb)))
  if ha == 0 and hb == 0:
    return 1.0  # both a single cluster: identical partitions
  return max(0.0, mi / max((ha + hb) / 2, 1e-15))


def kmeans_nmi(embeddings, labels, *, seed: int = 0) -> float:
  """NMI between `labels` and k-means (as many clusters as classes) of the embeddings."""
  labels = np.asarray(labels)
  return normalized_mutual_information(labels, kmeans(embeddings, len(np.unique(labels)), seed=seed))
