"""precision@1, R-precision, MAP@R and NMI against pytorch-metric-learning's AccuracyCalculator."""

from __future__ import annotations

import numpy as np
import pytest

from jsim.evaluate import retrieval

torch = pytest.importorskip("torch")
pytest.importorskip("faiss")
accuracy_calculator = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")


def _pml(emb, labels, include):
  calc = accuracy_calculator.AccuracyCalculator(include=include, k="max_bin_count")
  return calc.get_accuracy(torch.tensor(emb), torch.tensor(labels))


def _clustered(seed, num_classes=9, dim=6, spread=1.0):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(2, 12, size=num_classes)
  sizes[-1] = 1  # a lone query: skipped by both
  labels = np.repeat(np.arange(num_classes), sizes)
  centres = rng.normal(size=(num_classes, dim)) * 2.0
  emb = (centres[labels] + spread * rng.normal(size=(len(labels), dim))).astype(np.float32)
  return emb, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_r_precision_map_at_r_equal_pml(seed):
  emb, labels = _clustered(seed)
  want = _pml(emb, labels, ("precision_at_1", "r_precision", "mean_average_precision_at_r"))
  got = retrieval.retrieval_metrics(retrieval.negative_distance, None, emb, labels, pairs_per_block=64)
  assert 0.2 < got["map@r"] < 0.95  # neither trivial nor perfect, so the comparison means something
  np.testing.assert_allclose(got["precision@1"], want["precision_at_1"], rtol=1e-6)
  np.testing.assert_allclose(got["r_precision"], want["r_precision"], rtol=1e-6)
  np.testing.assert_allclose(got["map@r"], want["mean_average_precision_at_r"], rtol=1e-6)
  assert got["num_queries"] == len(labels) - 1
  assert got["precision@1"] == got["recall@1"]  # the old keys stay, with their meaning


def test_metrics_by_hand_on_a_tiny_ranking():
  # 1-D points: query 0 (class 0) ranks 1 (class 1), 2 (class 0), 3 (class 0) -> R = 2,
  # top 2 = [wrong, right]: R-precision 1/2, AP@R = (1/2) / 2 = 1/4, P@1 = 0.
  emb = np.array([[0.0], [1.0], [1.5], [3.5]], np.float32)
  labels = np.array([0, 1, 0, 0])
  r = retrieval.rank_queries(retrieval.negative_distance, None, emb, labels, ks=(1,), num_top=1)
  assert r["num_relevant"][0] == 2
  assert r["r_precision"][0] == pytest.approx(0.5)
  assert r["ap_at_r"][0] == pytest.approx(0.25)
  assert not r["hits"][0][0]


def test_nmi_equals_sklearn_formula():
  metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(0)
  for _ in range(5):
    a, b = rng.integers(0, 6, 200), rng.integers(0, 4, 200)
    b[:100] = a[:100] % 4  # partly dependent
    assert retrieval.normalized_mutual_information(a, b) == pytest.approx(
      metrics.normalized_mutual_info_score(a, b), rel=1e-9
    )
  assert retrieval.normalized_mutual_information([0, 0, 1, 1], [5, 5, 3, 3]) == pytest.approx(1.0)


def test_kmeans_nmi_equals_pml():
  # Overlapping clusters (NMI < 1) of enough points that k-means has one clear optimum.
  rng = np.random.default_rng(3)
  labels = np.repeat(np.arange(5), 60)
  centres = np.eye(5, 4) * 3.0
  emb = (centres[labels] + rng.normal(size=(len(labels), 4))).astype(np.float32)
  want = _pml(emb, labels, ("NMI",))["NMI"]
  got = retrieval.kmeans_nmi(emb, labels, seed=0)
  assert 0.5 < want < 1.0
  # k-means ends in a start-dependent local optimum (PML: one faiss run of 20 iterations; here
  # the best of 10 k-means++ starts), so overlapping clusters agree to about one point moved.
  assert got == pytest.approx(want, abs=0.005)
  assert retrieval.kmeans_nmi(emb, labels, seed=0) == got  # seeded: deterministic
  # Separated clusters with uneven sizes: one optimum, the same NMI.
  far = emb + labels[:, None] * 10.0
  far_labels = labels.copy()
  far_labels[:7] = 1  # a few points labelled against their cluster: NMI < 1
  want = _pml(far, far_labels, ("NMI",))["NMI"]
  assert 0.9 < want < 1.0
  assert retrieval.kmeans_nmi(far, far_labels) == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_embedding_metrics_equal_the_full_ranking_and_pml(distance):
  emb, labels = _clustered(4, num_classes=12)
  fast = retrieval.embedding_metrics(emb, labels, distance=distance, queries_per_block=16)
  ranked = emb / np.linalg.norm(emb, axis=1, keepdims=True) if distance == "cosine" else emb
  full = retrieval.retrieval_metrics(retrieval.negative_distance, None, ranked, labels)
  want = _pml(ranked, labels, ("precision_at_1", "r_precision", "mean_average_precision_at_r"))
  for key, pml_key in (
    ("precision@1", "precision_at_1"),
    ("r_precision", "r_precision"),
    ("map@r", "mean_average_precision_at_r"),
  ):
    assert fast[key] == pytest.approx(full[key], rel=1e-6)  # (float32 sums there)
    assert fast[key] == pytest.approx(want[pml_key], rel=1e-6)
  assert fast["num_queries"] == full["num_queries"]


def _pml_calc(emb, labels, reference=None, reference_labels=None, *, ref_includes_query=False, avg_of_avgs=False):
  calc = accuracy_calculator.AccuracyCalculator(
    include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count", avg_of_avgs=avg_of_avgs
  )
  t = lambda a: None if a is None else torch.tensor(a)
  return calc.get_accuracy(t(emb), t(labels), t(reference), t(reference_labels), ref_includes_query=ref_includes_query)


def _assert_equal_pml(got, want):
  for key, pml_key in (
    ("precision@1", "precision_at_1"),
    ("r_precision", "r_precision"),
    ("map@r", "mean_average_precision_at_r"),
  ):
    assert got[key] == pytest.approx(want[pml_key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("avg_of_avgs", [False, True])
def test_separate_query_and_reference_sets_equal_pml(distance, avg_of_avgs):
  emb, labels = _clustered(5, num_classes=10)
  rng = np.random.default_rng(0)
  is_query = rng.random(len(labels)) < 0.4
  q, q_labels = emb[is_query], labels[is_query]
  ref, ref_labels = emb[~is_query], labels[~is_query]
  q_labels = q_labels.copy()
  q_labels[0] = 99  # a class the reference lacks: skipped by both
  norm = lambda e: e / np.linalg.norm(e, axis=1, keepdims=True) if distance == "cosine" else e
  got = retrieval.embedding_metrics(
    q, q_labels, reference=ref, reference_labels=ref_labels, distance=distance, avg_of_avgs=avg_of_avgs
  )
  want = _pml_calc(norm(q), q_labels, norm(ref), ref_labels, avg_of_avgs=avg_of_avgs)
  assert 0.2 < got["map@r"] < 0.95
  _assert_equal_pml(got, want)
  assert got["num_queries"] == np.isin(q_labels, ref_labels).sum() < len(q_labels)


@pytest.mark.parametrize("avg_of_avgs", [False, True])
def test_queries_inside_the_gallery_equal_pml_ref_includes_query(avg_of_avgs):
  # e.g. the unseen test images as queries against a gallery of all test images (themselves left out).
  emb, labels = _clustered(6, num_classes=12)
  rng = np.random.default_rng(1)
  unseen = np.flatnonzero(labels >= 8)
  order = rng.permutation(len(labels))  # the queries anywhere in the gallery
  gallery, gallery_labels = emb[order], labels[order]
  row = np.argsort(order)[unseen]  # each query's row in the gallery
  got = retrieval.embedding_metrics(
    emb[unseen],
    labels[unseen],
    reference=gallery,
    reference_labels=gallery_labels,
    query_in_reference=row,
    avg_of_avgs=avg_of_avgs,
  )
  # PML wants the queries first in the reference.
  rest = np.setdiff1d(np.arange(len(labels)), unseen)
  pml_ref = np.concatenate([emb[unseen], emb[rest]])
  pml_ref_labels = np.concatenate([labels[unseen], labels[rest]])
  want = _pml_calc(
    emb[unseen], labels[unseen], pml_ref, pml_ref_labels, ref_includes_query=True, avg_of_avgs=avg_of_avgs
  )
  _assert_equal_pml(got, want)
  # Among themselves (no reference) equals PML's default, with and without avg_of_avgs.
  _assert_equal_pml(
    retrieval.embedding_metrics(emb, labels, avg_of_avgs=avg_of_avgs), _pml_calc(emb, labels, avg_of_avgs=avg_of_avgs)
  )
  # avg_of_avgs changes the figure where classes have different numbers of queries.
  plain = retrieval.embedding_metrics(emb, labels)["map@r"]
  assert retrieval.embedding_metrics(emb, labels, avg_of_avgs=True)["map@r"] != pytest.approx(plain)


def test_reference_errors_are_one_line():
  emb, labels = _clustered(0)
  with pytest.raises(ValueError, match=r"reference must be \[M, 6\]"):
    retrieval.embedding_metrics(emb, labels, reference=emb[:, :3], reference_labels=labels)
  with pytest.raises(ValueError, match="another label"):
    retrieval.embedding_metrics(
      emb[:1], labels[:1], reference=emb, reference_labels=labels, query_in_reference=np.array([len(labels) - 1])
    )
