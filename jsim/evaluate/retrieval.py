"""Retrieval metrics: recall@k and mAP of a query set ranked against itself.

Every image of the set (e.g. the test images of the 20 unseen classes) is a query,
ranked against all OTHER images of the set by a score function (higher = more
similar), batched on the device: the Ms probability (`similarity.make_prob_fn`) or
the plain negative embedding distance (`negative_distance`).

* recall@k: fraction of queries with at least one same-class image among the top k.
* mAP: mean over queries of the average precision (mean of the precision at the rank
  of each same-class image). Queries whose class has no other image are skipped.
Ties between scores are broken by image index (stable sort).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ScoreFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def negative_distance(params: Any, e1: jax.Array, e2: jax.Array) -> jax.Array:
  """Score = -||e1 - e2||_2 (params unused): a baseline without Ms."""
  del params
  d = e1.astype(jnp.float32) - e2.astype(jnp.float32)
  return -jnp.sqrt(jnp.sum(d * d, axis=-1))


@functools.partial(jax.jit, static_argnames=("score_fn", "ks", "num_top"))
def _query_block(params, embeddings, labels, q_idx, *, score_fn: ScoreFn, ks: tuple[int, ...], num_top: int):
  """Ranks the queries q_idx [b] against all N images; per-query hits@k, AP, #relevant, top indices."""
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
  return hits, ap, num_rel, order[:, :num_top], jnp.take_along_axis(scores, order[:, :num_top], axis=1)


def rank_queries(score_fn: ScoreFn, params: Any, embeddings, labels, *, ks: Sequence[int] = (1, 5),
                 num_top: int = 5, pairs_per_block: int = 65536) -> dict[str, np.ndarray]:
  """Per-query results: {'hits': bool [len(ks), N], 'ap': [N], 'num_relevant': [N],
  'top_indices': int [N, num_top], 'top_scores': [N, num_top]} (self excluded).

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
  hits, ap, num_rel, top, top_scores = (np.concatenate([p[i] for p in parts], axis=1 if i == 0 else 0)
                                        for i in range(5))
  return {"hits": hits, "ap": ap, "num_relevant": num_rel, "top_indices": top, "top_scores": top_scores}


def retrieval_metrics(score_fn: ScoreFn, params: Any, embeddings, labels, *, ks: Sequence[int] = (1, 5),
                      pairs_per_block: int = 65536) -> dict[str, float]:
  """{'recall@k' for k in ks, 'mAP', 'num_queries'} of the set ranked against itself.

  score_fn(params, e1 [B, D], e2 [B, D]) -> scores [B], higher = more similar; jittable,
  and reused as the same object to avoid recompiling.
  """
  r = rank_queries(score_fn, params, embeddings, labels, ks=ks, num_top=max(ks), pairs_per_block=pairs_per_block)
  has = r["num_relevant"] > 0
  if not has.any():
    raise ValueError("retrieval: no query has another image of its class")
  out = {f"recall@{k}": float(r["hits"][i][has].mean()) for i, k in enumerate(ks)}
  out["mAP"] = float(r["ap"][has].mean())
  out["num_queries"] = int(has.sum())
  return out
