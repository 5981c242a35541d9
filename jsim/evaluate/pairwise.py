"""The streaming pair evaluator: accuracy per case, ROC and AUC without holding all scores.

Pairs go through Ms in fixed-size chunks inside ONE jitted step (the last chunk is
padded and masked: never dropped, never counted twice). Per evaluation case (1..5,
see jsim.data.pairs.CASE_NAMES) the device accumulates the pair count, the correct
predictions at 0.5 and at a given threshold, and histograms of the scores of
positive ("same") and negative pairs. Accuracies are exact; ROC curves and AUC come
from the histograms (exact up to the bin width, 1/num_bins).

Decision rule everywhere: "same" iff p > threshold (at 0.5 this is argmax of the two
logits, ties going to "different"). Histogram bin b holds scores in (b/B, (b+1)/B]
(bin 0 also holds p = 0), so "p > b/B" is exactly "bin >= b" and the ROC points and
`choose_threshold` agree with the counted accuracies at the bin edges.

    prob_fn = similarity.make_prob_fn(model)           # (params, e1, e2) -> P(same) [B]
    result = evaluate_pairs(prob_fn, params, emb, labels, seen_mask, pairs=test_pairs)
    result.case_accuracy(), result.accuracy("unseen"), result.auc("seen")
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jsim.data import pairs as pairs_lib

NUM_CASES = 5
GROUPS: dict[str, tuple[int, ...]] = {
  "all": (1, 2, 3, 4, 5),
  "seen": pairs_lib.SEEN_CASES,
  "unseen": pairs_lib.UNSEEN_CASES,
}
ProbFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


# ---------------------------------------------------------------------------
# Host-side metrics from histograms.


def roc_from_histograms(hist_pos, hist_neg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ROC points (fpr, tpr, thresholds) from score histograms [..., B] (leading axes summed).

  Point b uses the rule "same iff p > b/B", for b = B, B-1, ..., 0, so fpr and tpr rise
  from (0, 0) to (1, 1). With no positives (negatives) tpr (fpr) is NaN.
  """
  pos = np.asarray(hist_pos, np.float64).reshape(-1, np.shape(hist_pos)[-1]).sum(0)
  neg = np.asarray(hist_neg, np.float64).reshape(-1, np.shape(hist_neg)[-1]).sum(0)
  bins = pos.shape[0]
  # Scores above edge b: the sum of bins >= b, for b = B .. 0.
  pos_above = np.concatenate([[0.0], np.cumsum(pos[::-1])])
  neg_above = np.concatenate([[0.0], np.cumsum(neg[::-1])])
  with np.errstate(invalid="ignore", divide="ignore"):
    tpr = pos_above / pos.sum()
    fpr = neg_above / neg.sum()
  thresholds = np.arange(bins, -1, -1) / bins
  return fpr, tpr, thresholds


def auc_from_roc(fpr: np.ndarray, tpr: np.ndarray) -> float:
  """Area under a ROC curve by the trapezoid rule (NaN if the curve is undefined)."""
  fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
  if fpr.size < 2 or np.isnan(fpr).any() or np.isnan(tpr).any():
    return float("nan")
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def choose_threshold(hist_pos, hist_neg) -> float:
  """The bin edge b/B maximising accuracy of "same iff p > b/B" (e.g. on the validation pairs).

  Histograms [..., B] (leading axes summed). Among equally good edges the one closest
  to 0.5 wins (so a sparse histogram does not push the threshold to an extreme).
  """
  pos = np.asarray(hist_pos, np.int64).reshape(-1, np.shape(hist_pos)[-1]).sum(0)
  neg = np.asarray(hist_neg, np.int64).reshape(-1, np.shape(hist_neg)[-1]).sum(0)
  bins = pos.shape[0]
  # correct(b) = positives in bins >= b + negatives in bins < b, for b = 0 .. B.
  pos_at_or_above = np.concatenate([np.cumsum(pos[::-1])[::-1], [0]])
  neg_below = np.concatenate([[0], np.cumsum(neg)])
  correct = pos_at_or_above + neg_below
  edges = np.arange(bins + 1) / bins
  best = np.flatnonzero(correct == correct.max())
  return float(edges[best[np.argmin(np.abs(edges[best] - 0.5))]])


# ---------------------------------------------------------------------------
# The result.


@dataclasses.dataclass(frozen=True)
class PairEvalResult:
  """Accumulated counts of one evaluation. Arrays are indexed by case - 1 (cases 1..5).

  Attributes:
    count: int64 [5], pairs per case.
    correct_05: int64 [5], correct predictions at threshold 0.5.
    correct_threshold: int64 [5], correct predictions at `threshold`.
    hist_pos, hist_neg: int64 [5, num_bins], score histograms of same / different pairs.
    threshold: the second decision threshold (e.g. chosen on the validation pairs).
    mode: 'sampled' or 'exhaustive'.
    pairs_per_s: throughput of the evaluation (0 if unknown).
  """

  count: np.ndarray
  correct_05: np.ndarray
  correct_threshold: np.ndarray
  hist_pos: np.ndarray
  hist_neg: np.ndarray
  threshold: float
  mode: str = "sampled"
  pairs_per_s: float = 0.0

  @property
  def num_bins(self) -> int:
    return self.hist_pos.shape[-1]

  @property
  def num_pairs(self) -> int:
    return int(self.count.sum())

  def _correct(self, at: str) -> np.ndarray:
    if at == "0.5":
      return self.correct_05
    if at == "threshold":
      return self.correct_threshold
    raise ValueError(f"at must be '0.5' or 'threshold', got {at!r}")

  @staticmethod
  def _cases(group: str) -> list[int]:
    if group not in GROUPS:
      raise ValueError(f"unknown case group {group!r}; valid: {', '.join(GROUPS)}")
    return [c - 1 for c in GROUPS[group]]

  def case_accuracy(self, at: str = "0.5") -> dict[int, float]:
    """{case: accuracy} for cases 1..5 (NaN for a case without pairs)."""
    correct = self._correct(at)
    return {c + 1: (float(correct[c] / self.count[c]) if self.count[c] else float("nan")) for c in range(NUM_CASES)}

  def accuracy(self, group: str = "all", at: str = "0.5") -> float:
    """Accuracy over a group of cases: 'all' (1-5), 'seen' (1-2) or 'unseen' (4-5)."""
    idx = self._cases(group)
    n = self.count[idx].sum()
    return float(self._correct(at)[idx].sum() / n) if n else float("nan")

  def roc(self, group: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the group's pairs, from the histograms."""
    idx = self._cases(group)
    fpr, tpr, _ = roc_from_histograms(self.hist_pos[idx], self.hist_neg[idx])
    return fpr, tpr

  def auc(self, group: str = "all") -> float:
    return auc_from_roc(*self.roc(group))

  def best_threshold(self, group: str = "all") -> float:
    """`choose_threshold` on this result's histograms (use it on the validation result)."""
    idx = self._cases(group)
    return choose_threshold(self.hist_pos[idx], self.hist_neg[idx])

  def summary(self) -> dict:
    """Plain-Python numbers (JSON-ready, NaN kept as float) of every metric."""
    out = {
      "mode": self.mode,
      "num_pairs": self.num_pairs,
      "threshold": float(self.threshold),
      "num_bins": self.num_bins,
      "pairs_per_s": float(self.pairs_per_s),
      "pairs_per_case": {c + 1: int(self.count[c]) for c in range(NUM_CASES)},
    }
    for at in ("0.5", "threshold"):
      out[f"accuracy_at_{at}"] = {"case": self.case_accuracy(at), **{g: self.accuracy(g, at) for g in GROUPS}}
    out["auc"] = {g: self.auc(g) for g in GROUPS}
    return out


# ---------------------------------------------------------------------------
# The device side.


def _zero_acc(num_bins: int) -> dict:
  z = lambda *s: jnp.zeros(s, jnp.int32)
  return {
    "count": z(NUM_CASES),
    "correct_05": z(NUM_CASES),
    "correct_threshold": z(NUM_CASES),
    "hist_pos": z(NUM_CASES * num_bins),
    "hist_neg": z(NUM_CASES * num_bins),
  }


def score_bins(p: jax.Array, num_bins: int) -> jax.Array:
  """Bin of each score: b with p in (b/B, (b+1)/B], p = 0 in bin 0, clipped to [0, B)."""
  b = jnp.ceil(p * num_bins).astype(jnp.int32) - 1
  return jnp.clip(b, 0, num_bins - 1)


def accumulate(
  acc: dict, p: jax.Array, same: jax.Array, case: jax.Array, valid: jax.Array, threshold: jax.Array, num_bins: int
) -> dict:
  """Adds one chunk of scores p [B] (with same, case 1..5, valid masks) to the counts."""
  w = valid.astype(jnp.int32)
  c = jnp.clip(case.astype(jnp.int32) - 1, 0, NUM_CASES - 1)
  ok05 = ((p > 0.5) == same).astype(jnp.int32) * w
  okt = ((p > threshold) == same).astype(jnp.int32) * w
  flat = c * num_bins + score_bins(p, num_bins)
  pos = same.astype(jnp.int32) * w
  return {
    "count": acc["count"].at[c].add(w),
    "correct_05": acc["correct_05"].at[c].add(ok05),
    "correct_threshold": acc["correct_threshold"].at[c].add(okt),
    "hist_pos": acc["hist_pos"].at[flat].add(pos),
    "hist_neg": acc["hist_neg"].at[flat].add(w - pos),
  }


@functools.partial(jax.jit, static_argnames=("prob_fn", "chunk_size", "num_bins", "exhaustive", "mesh"))
def _eval_chunk(
  acc,
  params,
  embeddings,
  labels,
  seen_mask,
  pairs,
  same,
  case,
  start,
  threshold,
  *,
  prob_fn: ProbFn,
  chunk_size: int,
  num_bins: int,
  exhaustive: bool,
  mesh: Mesh | None,
):
  start = jnp.asarray(start, jnp.int32)
  if exhaustive:
    idx, valid = pairs_lib.exhaustive_pairs_chunk(start, chunk_size, embeddings.shape[0])
    la, lb = labels[idx[:, 0]], labels[idx[:, 1]]
    same_c, case_c = la == lb, pairs_lib.pair_case(la, lb, seen_mask)
  else:
    remaining = pairs.shape[0] - start
    offs = jnp.arange(chunk_size, dtype=jnp.int32)
    valid = offs < remaining
    rows = start + jnp.minimum(offs, remaining - 1)  # padding repeats the last pair, masked out
    idx, same_c, case_c = pairs[rows], same[rows], case[rows]
  if mesh is not None:
    # Split the chunk's pairs over the devices; XLA partitions the gathers and the MLP.
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    idx, valid, same_c, case_c = (jax.lax.with_sharding_constraint(x, sharding) for x in (idx, valid, same_c, case_c))
  p = prob_fn(params, embeddings[idx[:, 0]], embeddings[idx[:, 1]]).astype(jnp.float32)
  return accumulate(acc, p, same_c, case_c, valid, threshold, num_bins)


def evaluate_pairs(
  prob_fn: ProbFn,
  params: Any,
  embeddings: jax.Array,
  labels,
  seen_mask,
  pairs=None,
  mode: str = "sampled",
  chunk_size: int = 65536,
  num_bins: int = 1000,
  threshold: float = 0.5,
  mesh: Mesh | None = None,
  *,
  key: jax.Array | None = None,
  progress: bool = False,
  desc: str | None = None,
) -> PairEvalResult:
  """Streams pairs of `embeddings` [N, D] through `prob_fn` and accumulates the metrics per case.

  Args:
    prob_fn: jittable (params, e1 [B, D], e2 [B, D]) -> P(same) [B]. Reuse one function
      object across calls: the chunk step compiles once per prob_fn and shapes.
    params: prob_fn's parameters.
    embeddings: [N, D] (on device); labels: int [N]; seen_mask: bool [num_classes].
    pairs: mode 'sampled': an int [P, 2] index array, or a tuple (pairs, same, case) as
      returned by `jsim.data.pairs.sample_test_pairs` (same/case are derived from labels
      when absent), or None to draw the protocol's test pairs (50 per ordered class pair,
      9,950 per class) with `key` (default jax.random.key(0)). Ignored for 'exhaustive'.
    mode: 'sampled', or 'exhaustive' for every unordered pair i < j of the N embeddings.
    chunk_size: pairs per step (the last chunk is padded and masked).
    num_bins: score histogram bins on [0, 1].
    threshold: second decision threshold (e.g. `choose_threshold` on the validation pairs).
    mesh: optional mesh with a 'data' axis: each chunk's pairs are sharded over it, the
      rest replicated (chunk_size must divide by its size).
    progress: show a progress bar (titled `desc`).
  """
  if mode not in pairs_lib.EVALUATION_MODES:
    raise ValueError(f"mode must be one of {pairs_lib.EVALUATION_MODES}, got {mode!r}")
  if chunk_size < 1 or num_bins < 1:
    raise ValueError(f"chunk_size ({chunk_size}) and num_bins ({num_bins}) must be positive")
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"threshold must be in [0, 1], got {threshold}")
  embeddings = jnp.asarray(embeddings)
  labels = jnp.asarray(labels, jnp.int32)
  seen_mask = jnp.asarray(seen_mask, bool)
  if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
    raise ValueError(f"embeddings must be [N, D] with labels [N]; got {embeddings.shape} and {labels.shape}")
  if mesh is not None:
    if "data" not in mesh.axis_names:
      raise ValueError(f"mesh needs a 'data' axis, has {mesh.axis_names}")
    if chunk_size % mesh.shape["data"]:
      raise ValueError(f"chunk_size={chunk_size} is not divisible by the mesh's {mesh.shape['data']} devices")

  exhaustive = mode == "exhaustive"
  if exhaustive:
    total = pairs_lib.num_exhaustive_pairs(embeddings.shape[0])
    pair_arr = same = case = jnp.zeros((1,), jnp.int32)  # unused placeholders
  else:
    if pairs is None:
      class_index = pairs_lib.build_class_index(np.asarray(labels), seen_mask.shape[0])
      pairs = pairs_lib.sample_test_pairs(key if key is not None else jax.random.key(0), class_index, seen_mask)
    if isinstance(pairs, (tuple, list)):
      pair_arr, same, case = (tuple(pairs) + (None, None))[:3]
    else:
      pair_arr, same, case = pairs, None, None
    pair_arr = jnp.asarray(pair_arr, jnp.int32)
    if pair_arr.ndim != 2 or pair_arr.shape[1] != 2 or pair_arr.shape[0] == 0:
      raise ValueError(f"pairs must be a non-empty int array [P, 2], got shape {pair_arr.shape}")
    la, lb = labels[pair_arr[:, 0]], labels[pair_arr[:, 1]]
    same = (la == lb) if same is None else jnp.asarray(same, bool)
    case = pairs_lib.pair_case(la, lb, seen_mask) if case is None else jnp.asarray(case, jnp.int8)
    total = pair_arr.shape[0]

  operands = (params, embeddings, labels, seen_mask, pair_arr, same, case)
  if mesh is not None and jax.process_count() == 1:
    operands = jax.device_put(operands, NamedSharding(mesh, PartitionSpec()))
  acc = _zero_acc(num_bins)
  thr = jnp.float32(threshold)
  step = functools.partial(
    _eval_chunk, prob_fn=prob_fn, chunk_size=chunk_size, num_bins=num_bins, exhaustive=exhaustive, mesh=mesh
  )
  starts = range(0, total, chunk_size)
  bar = None
  if progress:
    from jsim.progress import progress

    bar = progress(total, desc or f"pairs ({mode})", "pair", announce=True)
  t0 = time.perf_counter()
  try:
    for start in starts:
      acc = step(acc, *operands, start, thr)
      if bar is not None:  # (waits for the chunk: the bar shows what is done, not what is queued)
        jax.block_until_ready(acc)
        bar.update(min(chunk_size, total - start))
    acc = jax.device_get(acc)
  finally:
    if bar is not None:
      bar.close()
  seconds = time.perf_counter() - t0
  count = np.asarray(acc["count"], np.int64)
  if count.sum() != total:  # the padding/masking contract, checked every time
    raise RuntimeError(f"evaluated {count.sum()} pairs, expected {total}")
  return PairEvalResult(
    count=count,
    correct_05=np.asarray(acc["correct_05"], np.int64),
    correct_threshold=np.asarray(acc["correct_threshold"], np.int64),
    hist_pos=np.asarray(acc["hist_pos"], np.int64).reshape(NUM_CASES, num_bins),
    hist_neg=np.asarray(acc["hist_neg"], np.int64).reshape(NUM_CASES, num_bins),
    threshold=float(threshold),
    mode=mode,
    pairs_per_s=total / max(seconds, 1e-9),
  )


def save_result(result: PairEvalResult, path) -> None:
  """Writes a PairEvalResult (counts and histograms, a few kB) to an .npz, atomically."""
  from pathlib import Path

  from jsim import workdir as wd

  def write(tmp):
    with open(tmp, "wb") as out:
      np.savez(out, **{f.name: np.asarray(getattr(result, f.name)) for f in dataclasses.fields(result)})

  wd.write_file(Path(path), write)


def load_result(path) -> PairEvalResult:
  """The PairEvalResult that `save_result` wrote."""
  with np.load(path, allow_pickle=False) as z:
    missing = [f.name for f in dataclasses.fields(PairEvalResult) if f.name not in z.files]
    if missing:
      raise ValueError(f"{path}: not an evaluation result (missing {', '.join(missing)})")
    return PairEvalResult(
      count=z["count"],
      correct_05=z["correct_05"],
      correct_threshold=z["correct_threshold"],
      hist_pos=z["hist_pos"],
      hist_neg=z["hist_neg"],
      threshold=float(z["threshold"]),
      mode=str(z["mode"]),
      pairs_per_s=float(z["pairs_per_s"]),
    )
