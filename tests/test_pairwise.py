"""The streaming pair evaluator against plain numpy over all scores, and retrieval metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import xla_flags
from jsim.data import pairs as P
from jsim.evaluate import pairwise as PW
from jsim.evaluate import retrieval as R

TRACES = {"n": 0}


def prob_fn(params, e1, e2):
  """A stand-in Ms: P(same) = sigmoid(a - b * ||e1 - e2||^2); counts its traces."""
  TRACES["n"] += 1
  return jax.nn.sigmoid(params["a"] - params["b"] * jnp.sum((e1 - e2) ** 2, axis=-1))


PARAMS = {"a": jnp.float32(3.0), "b": jnp.float32(0.8)}


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  labels = rng.permutation(np.repeat(np.arange(12), 9)).astype(np.int32)  # 108 images, 12 classes
  centers = rng.normal(size=(12, 6)) * 0.9
  emb = (centers[labels] + rng.normal(size=(108, 6)) * 0.7).astype(np.float32)
  seen = np.arange(12) < 9
  ci = P.build_class_index(labels)
  test = P.sample_test_pairs(jax.random.key(1), ci, seen, per_ordered_class_pair=3, similar_per_class=40)
  return emb, labels, seen, test


def _np_scores(emb, pairs):
  d = ((emb[pairs[:, 0]] - emb[pairs[:, 1]]) ** 2).sum(-1)
  return 1 / (1 + np.exp(-(3.0 - 0.8 * d)))


def _exact_auc(pos, neg):
  """Trapezoid over the exact ROC of all distinct score thresholds (no histogram)."""
  t = np.unique(np.concatenate([pos, neg]))[::-1]
  tpr = np.concatenate([[0], [(pos >= x).mean() for x in t]])
  fpr = np.concatenate([[0], [(neg >= x).mean() for x in t]])
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def _bin_tie_bound(pos, neg, bins):
  """Max AUC change from merging scores within a bin: half the pos-neg pairs sharing a bin."""
  hp = np.bincount(np.clip(np.ceil(pos * bins).astype(int) - 1, 0, bins - 1), minlength=bins)
  hn = np.bincount(np.clip(np.ceil(neg * bins).astype(int) - 1, 0, bins - 1), minlength=bins)
  return 0.5 * float((hp * hn).sum()) / (len(pos) * len(neg))


def test_sampled_against_numpy_over_all_scores(data):
  emb, labels, seen, (pairs, same, case) = data
  pairs_np, same_np, case_np = np.asarray(pairs), np.asarray(same), np.asarray(case)
  thr = 0.37
  res = PW.evaluate_pairs(
    prob_fn, PARAMS, jnp.asarray(emb), labels, seen, (pairs, same, case), chunk_size=500, num_bins=200, threshold=thr
  )
  p = _np_scores(emb, pairs_np)
  assert res.num_pairs == len(p) == 12 * 11 * 3 + 12 * 40
  for c in range(1, 6):
    m = case_np == c
    assert res.count[c - 1] == m.sum()
    assert res.correct_05[c - 1] == ((p[m] > 0.5) == same_np[m]).sum()
    assert res.correct_threshold[c - 1] == ((p[m] > thr) == same_np[m]).sum()
    assert res.hist_pos[c - 1].sum() == (m & same_np).sum() and res.hist_neg[c - 1].sum() == (m & ~same_np).sum()
    np.testing.assert_allclose(res.case_accuracy()[c], ((p[m] > 0.5) == same_np[m]).mean())
  for group, cases in (("all", [1, 2, 3, 4, 5]), ("seen", [1, 2]), ("unseen", [4, 5])):
    m = np.isin(case_np, cases)
    np.testing.assert_allclose(res.accuracy(group), ((p[m] > 0.5) == same_np[m]).mean())
    np.testing.assert_allclose(res.accuracy(group, "threshold"), ((p[m] > thr) == same_np[m]).mean())
    pos, neg = p[m & same_np], p[m & ~same_np]
    exact = _exact_auc(pos, neg)
    assert abs(res.auc(group) - exact) <= _bin_tie_bound(pos, neg, 200) + 1e-9
    fpr, tpr = res.roc(group)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
  assert 0.6 < res.auc("all") < 1.0  # the stand-in model separates the classes, imperfectly
  # Pairs alone (no same/case): derived from the labels, same result.
  res2 = PW.evaluate_pairs(
    prob_fn, PARAMS, jnp.asarray(emb), labels, seen, pairs, chunk_size=500, num_bins=200, threshold=thr
  )
  np.testing.assert_array_equal(res2.hist_pos, res.hist_pos)
  np.testing.assert_array_equal(res2.correct_threshold, res.correct_threshold)


@pytest.mark.parametrize("chunk_size", [7, 64, 4096])
def test_padding_and_masking_any_chunk_size(data, chunk_size):
  emb, labels, seen, test = data
  ref = PW.evaluate_pairs(prob_fn, PARAMS, jnp.asarray(emb), labels, seen, test, chunk_size=876, num_bins=50)
  assert ref.num_pairs == 876  # one exact chunk
  res = PW.evaluate_pairs(prob_fn, PARAMS, jnp.asarray(emb), labels, seen, test, chunk_size=chunk_size, num_bins=50)
  for f in ("count", "correct_05", "correct_threshold", "hist_pos", "hist_neg"):
    np.testing.assert_array_equal(getattr(res, f), getattr(ref, f))


def test_one_compilation_for_all_chunks(data):
  emb, labels, seen, test = data
  TRACES["n"] = 0
  fn = lambda params, e1, e2: prob_fn(params, e1, e2)  # a fresh function: a fresh cache entry
  # 876 pairs: 9 chunks, the last one partial.
  PW.evaluate_pairs(fn, PARAMS, jnp.asarray(emb), labels, seen, test, chunk_size=100, num_bins=64)
  assert TRACES["n"] == 1
  PW.evaluate_pairs(fn, PARAMS, jnp.asarray(emb), labels, seen, test, chunk_size=100, num_bins=64, threshold=0.2)
  assert TRACES["n"] == 1  # another threshold reuses the program


def test_exhaustive_against_numpy(data):
  emb, labels, seen, _ = data
  n = 50
  emb, labels = emb[:n], labels[:n]
  res = PW.evaluate_pairs(
    prob_fn, PARAMS, jnp.asarray(emb), labels, seen, mode="exhaustive", chunk_size=300, num_bins=100, threshold=0.6
  )
  i, j = np.triu_indices(n, 1)
  p = _np_scores(emb, np.stack([i, j], 1))
  same = labels[i] == labels[j]
  sa, sb = seen[labels[i]], seen[labels[j]]
  case = np.select([same & sa, same & ~sa, sa & sb, sa ^ sb], [1, 4, 2, 3], 5)
  assert res.num_pairs == n * (n - 1) // 2 and res.mode == "exhaustive"
  for c in range(1, 6):
    m = case == c
    assert res.count[c - 1] == m.sum()
    assert res.correct_05[c - 1] == ((p[m] > 0.5) == same[m]).sum()
    assert res.correct_threshold[c - 1] == ((p[m] > 0.6) == same[m]).sum()


def test_choose_threshold_hand_made():
  # Edges 0.6 and 0.8 both give 10 correct; the one closer to 0.5 wins.
  assert PW.choose_threshold(np.array([0, 1, 0, 0, 5]), np.array([3, 0, 2, 0, 0])) == pytest.approx(0.6)
  # Leading axes (cases) are summed.
  hp = np.array([[0, 0, 0, 0, 4], [0, 0, 0, 0, 0]])
  hn = np.array([[0, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
  assert PW.choose_threshold(hp, hn) == pytest.approx(0.8)
  fpr, tpr, thr = PW.roc_from_histograms(hp, hn)
  np.testing.assert_allclose(thr, [1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
  np.testing.assert_allclose(tpr, [0, 1, 1, 1, 1, 1])
  np.testing.assert_allclose(fpr, [0, 0, 0.25, 0.5, 0.75, 1])
  assert PW.auc_from_roc(fpr, tpr) == 1.0


def test_chosen_threshold_accuracy_matches_counts(data):
  emb, labels, seen, test = data
  res = PW.evaluate_pairs(prob_fn, PARAMS, jnp.asarray(emb), labels, seen, test, chunk_size=512, num_bins=100)
  t = res.best_threshold()
  at_t = PW.evaluate_pairs(
    prob_fn, PARAMS, jnp.asarray(emb), labels, seen, test, chunk_size=512, num_bins=100, threshold=t
  )
  # The histogram's best edge is the best of all 101 edges, and the exact count agrees.
  b = round(t * 100)
  best = res.hist_pos.sum(0)[b:].sum() + res.hist_neg.sum(0)[:b].sum()
  assert at_t.correct_threshold.sum() == best >= at_t.correct_05.sum()


def test_bad_arguments(data):
  emb, labels, seen, test = data
  with pytest.raises(ValueError, match="mode"):
    PW.evaluate_pairs(prob_fn, PARAMS, emb, labels, seen, test, mode="all")
  with pytest.raises(ValueError, match=r"\[P, 2\]"):
    PW.evaluate_pairs(prob_fn, PARAMS, emb, labels, seen, np.zeros((3, 3), np.int32))


def test_mesh_sharded_chunks_match_single_device(tmp_path):
  """Two virtual CPU devices (a fresh process: the device count is fixed at jax start)."""
  script = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from jsim.data import pairs as P
    from jsim.evaluate import pairwise as PW
    assert jax.device_count() == 2
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 5).astype(np.int32)
    emb = rng.normal(size=(30, 4)).astype(np.float32)
    seen = np.arange(6) < 4
    fn = lambda p, a, b: jax.nn.sigmoid(p - jnp.sum((a - b) ** 2, -1))
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    kw = dict(mode="exhaustive", chunk_size=64, num_bins=20)
    a = PW.evaluate_pairs(fn, jnp.float32(4.0), emb, labels, seen, mesh=mesh, **kw)
    b = PW.evaluate_pairs(fn, jnp.float32(4.0), emb, labels, seen, **kw)
    assert a.num_pairs == 435
    for f in ("count", "correct_05", "hist_pos", "hist_neg"):
      np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    print("OK")
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"))
  out = subprocess.run(
    [sys.executable, "-c", script],
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


# ---------------------------------------------------------------------------
# Retrieval.

# 1-D embeddings: classes A = {0, 1}, B = {2, 3, 4}, C = {5} (alone: no query of its own).
RET_EMB = np.array([[0.0], [1.0], [10.0], [10.5], [2.5], [100.0]], np.float32)
RET_LABELS = np.array([0, 0, 1, 1, 1, 2], np.int32)


@pytest.mark.parametrize("pairs_per_block", [6, 24, 65536])
def test_retrieval_hand_made_negative_distance(pairs_per_block):
  # Rankings by distance (self excluded):
  #   q0: 1(A) 4 2 3 5 -> AP 1        q1: 0(A) 4 2 3 5 -> AP 1
  #   q2: 3(B) 4(B) 1 0 5 -> AP 1     q3: 2(B) 4(B) 1 0 5 -> AP 1
  #   q4: 1 0 2(B) 3(B) 5 -> AP (1/3 + 2/4) / 2, no hit in the top 2
  m = R.retrieval_metrics(R.negative_distance, None, RET_EMB, RET_LABELS, ks=(1, 2, 3), pairs_per_block=pairs_per_block)
  assert m["num_queries"] == 5
  assert m["recall@1"] == pytest.approx(0.8) and m["recall@2"] == pytest.approx(0.8)
  assert m["recall@3"] == pytest.approx(1.0)
  assert m["mAP"] == pytest.approx((4 + (1 / 3 + 2 / 4) / 2) / 5)
  r = R.rank_queries(R.negative_distance, None, RET_EMB, RET_LABELS, num_top=3, pairs_per_block=pairs_per_block)
  np.testing.assert_array_equal(r["top_indices"][4], [1, 0, 2])
  np.testing.assert_array_equal(r["top_indices"][2], [3, 4, 1])
  np.testing.assert_allclose(r["top_scores"][4], [-1.5, -2.5, -7.5])


def test_retrieval_with_a_probability_score():
  # A score that only looks at class-revealing coordinate 1: perfect retrieval.
  emb = np.stack([np.arange(6, dtype=np.float32), RET_LABELS.astype(np.float32) * 10], 1)
  score = lambda params, a, b: jax.nn.sigmoid(params - jnp.abs(a[:, 1] - b[:, 1]))
  m = R.retrieval_metrics(score, jnp.float32(1.0), emb, RET_LABELS, ks=(1,))
  assert m == {"recall@1": 1.0, "mAP": 1.0, "num_queries": 5, "precision@1": 1.0, "r_precision": 1.0, "map@r": 1.0}
  with pytest.raises(ValueError, match="ks"):
    R.retrieval_metrics(score, jnp.float32(1.0), emb, RET_LABELS, ks=(6,))
