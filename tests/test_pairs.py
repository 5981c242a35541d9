"""Index pairs: exact counts and balance, no self pairs, exclusion, the five cases, exhaustive mode."""

from __future__ import annotations

import collections
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsim.data import pairs as P


def _labels(sizes, seed=0):
  """Labels with class c repeated sizes[c] times, shuffled (so the index must sort them)."""
  labels = np.repeat(np.arange(len(sizes)), sizes)
  return np.random.default_rng(seed).permutation(labels).astype(np.int32)


def _keys(pairs):
  """Unordered pair -> one int64 key (numpy side, independent of the device search)."""
  p = np.asarray(pairs).astype(np.int64)
  return np.minimum(p[:, 0], p[:, 1]) * 10**9 + np.maximum(p[:, 0], p[:, 1])


def test_class_index_unequal_sizes():
  labels = _labels([3, 0, 5, 1])
  ci = P.build_class_index(labels, 4)
  np.testing.assert_array_equal(np.asarray(ci.count), [3, 0, 5, 1])
  np.testing.assert_array_equal(np.asarray(ci.start), [0, 3, 3, 8])
  order = np.asarray(ci.order)
  for c in range(4):
    s, n = int(ci.start[c]), int(ci.count[c])
    assert sorted(order[s : s + n]) == sorted(np.nonzero(labels == c)[0])
  with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
    P.build_class_index(labels, 3)


def test_small_counts_balance_no_self_pairs_and_determinism():
  sizes = [4, 7, 2, 9, 3]
  labels = _labels(sizes, seed=1)
  ci = P.build_class_index(labels)
  classes = jnp.asarray([0, 2, 3, 4], jnp.int32)
  k, s = 3, 5
  pairs, same = P.sample_pairs(jax.random.key(0), ci, classes, k, s)
  pairs, same = np.asarray(pairs), np.asarray(same)
  c = 4
  assert pairs.shape == (c * (c - 1) * k + c * s, 2) == (P.num_pairs(c, k, s), 2)
  assert pairs.dtype == np.int32 and same.dtype == bool
  la, lb = labels[pairs[:, 0]], labels[pairs[:, 1]]
  np.testing.assert_array_equal(same, la == lb)
  assert np.all(pairs[:, 0] != pairs[:, 1])
  assert set(la) | set(lb) <= {0, 2, 3, 4}
  ordered = collections.Counter(zip(la[~same].tolist(), lb[~same].tolist()))
  assert ordered == {(i, j): k for i in (0, 2, 3, 4) for j in (0, 2, 3, 4) if i != j}
  assert collections.Counter(la[same].tolist()) == {i: s for i in (0, 2, 3, 4)}
  # Same key, same pairs; another key, other pairs; shuffle is a permutation.
  again, _ = P.sample_pairs(jax.random.key(0), ci, classes, k, s)
  np.testing.assert_array_equal(np.asarray(again), pairs)
  other, _ = P.sample_pairs(jax.random.key(1), ci, classes, k, s)
  assert not np.array_equal(np.asarray(other), pairs)
  shuf, shuf_same = P.sample_pairs(jax.random.key(0), ci, classes, k, s, shuffle=True)
  assert sorted(map(tuple, np.asarray(shuf).tolist())) == sorted(map(tuple, pairs.tolist()))
  np.testing.assert_array_equal(np.asarray(shuf_same), labels[np.asarray(shuf)[:, 0]] == labels[np.asarray(shuf)[:, 1]])


def test_draws_are_uniform_within_unequal_classes():
  # Class 0: 3 images, class 1: 7 images. Every image of a class is equally likely,
  # and the two images of a similar pair are equally likely to be any distinct pair.
  labels = _labels([3, 7], seed=2)
  ci = P.build_class_index(labels)
  pairs, same = P.sample_pairs(jax.random.key(3), ci, jnp.asarray([0, 1]), 20000, 21000)
  pairs, same = np.asarray(pairs), np.asarray(same)
  dis = pairs[~same]
  for col, cls in ((0, 0), (1, 1)):
    idx = dis[labels[dis[:, col]] == cls, col]
    freq = np.bincount(idx, minlength=10)[labels == cls] / idx.size
    np.testing.assert_allclose(freq, 1 / (labels == cls).sum(), atol=0.012)
  sim0 = pairs[same & (labels[pairs[:, 0]] == 0)]
  unordered = collections.Counter(map(tuple, np.sort(sim0, axis=1).tolist()))
  assert len(unordered) == 3  # the 3 distinct pairs of 3 images
  np.testing.assert_allclose(np.array(list(unordered.values())) / len(sim0), 1 / 3, atol=0.015)


def test_class_too_small_is_an_error():
  ci = P.build_class_index(_labels([1, 4]))
  with pytest.raises(ValueError, match="class 0 has 1 images"):
    P.sample_pairs(jax.random.key(0), ci, jnp.asarray([0, 1]), 1, 1)
  with pytest.raises(ValueError, match="duplicates"):
    P.sample_pairs(jax.random.key(0), ci, jnp.asarray([1, 1]), 1, 1)


def test_protocol_numbers_180_classes_with_validation_exclusion():
  labels = _labels([500] * 200, seed=4)  # synthetic T180-like set (plus 20 unused classes)
  ci = P.build_class_index(labels)
  classes = jnp.asarray(np.random.default_rng(5).permutation(200)[:180].astype(np.int32))
  val, val_same = P.sample_pairs(jax.random.key(10), ci, classes, 6, 1074)
  assert val.shape == (386640, 2) and int(val_same.sum()) == 193320
  exclusion = P.make_exclusion(val)
  pairs, same, stats = P.sample_pairs_with_stats(jax.random.key(11), ci, classes, 10, 1790, exclusion)
  pairs, same = np.asarray(pairs), np.asarray(same)
  assert pairs.shape == (644400, 2)
  assert int(same.sum()) == 322200 and int((~same).sum()) == 322200
  la, lb = labels[pairs[:, 0]], labels[pairs[:, 1]]
  np.testing.assert_array_equal(same, la == lb)
  assert np.all(pairs[:, 0] != pairs[:, 1])
  ordered = np.bincount(la[~same] * 200 + lb[~same], minlength=200 * 200).reshape(200, 200)
  sel = np.asarray(classes)
  expected = np.where(np.eye(180, dtype=bool), 0, 10)
  np.testing.assert_array_equal(ordered[np.ix_(sel, sel)], expected)
  assert ordered.sum() == 322200
  per_class = np.bincount(la[same], minlength=200)
  np.testing.assert_array_equal(per_class[sel], 1790)
  # ~15 similar collisions per class are expected (1790 * 1074 / 124,750): all redrawn.
  assert 1000 < int(stats["collisions"]) < 5000
  assert int(stats["remaining"]) == 0 and 1 <= int(stats["rounds"]) <= 4
  assert not np.isin(_keys(pairs), _keys(val)).any()


@pytest.mark.slow
def test_exclusion_remove_or_redraw_at_protocol_numbers():
  # The source removes training pairs that are validation pairs; jsim redraws them by default.
  labels = _labels([500] * 180, seed=8)  # T180: 180 classes x 500 train-folder images
  ci = P.build_class_index(labels)
  classes = jnp.arange(180, dtype=jnp.int32)
  val, _ = P.sample_pairs(jax.random.key(12), ci, classes, 6, 1074)
  exclusion = P.make_exclusion(val)
  key = jax.random.key(13)
  redrawn, _, stats = P.sample_pairs_with_stats(key, ci, classes, 10, 1790, exclusion)
  kept, kept_same = P.sample_pairs(key, ci, classes, 10, 1790, exclusion, exclusion="remove")
  kept, kept_same = np.asarray(kept), np.asarray(kept_same)
  assert redrawn.shape[0] == 644400 and -(-644400 // 256) == 2518
  # Removing leaves the first draw minus its collisions (~15.4 similar pairs per class and
  # ~0.1 dissimilar: about 2,790), in the same order: about 641,600 pairs, 2,507 updates of 256.
  assert kept.shape[0] == 644400 - int(stats["collisions"])
  assert abs(kept.shape[0] - 641600) < 300, kept.shape[0]
  assert -(-kept.shape[0] // 256) == 2507
  assert not np.isin(_keys(kept), _keys(val)).any()
  la, lb = labels[kept[:, 0]], labels[kept[:, 1]]
  np.testing.assert_array_equal(kept_same, la == lb)
  per_class = np.bincount(la[kept_same], minlength=180)
  assert per_class.max() <= 1790 and per_class.sum() < 322200 - 2000  # the similar pairs are the ones removed
  # Shuffled, the kept pairs are the same set in another order.
  shuffled, _ = P.sample_pairs(key, ci, classes, 10, 1790, exclusion, exclusion="remove", shuffle=True)
  assert shuffled.shape == kept.shape and not np.array_equal(np.asarray(shuffled), kept)
  np.testing.assert_array_equal(np.sort(_keys(shuffled)), np.sort(_keys(kept)))
  with pytest.raises(ValueError, match="exclusion"):
    P.sample_pairs(key, ci, classes, 1, 2, exclusion, exclusion="drop")


def test_exclusion_on_tiny_set_with_frequent_collisions():
  labels = _labels([4, 5, 3], seed=6)
  ci = P.build_class_index(labels)
  classes = jnp.arange(3, dtype=jnp.int32)
  val, _ = P.sample_pairs(jax.random.key(0), ci, classes, 4, 2)
  exclusion = P.make_exclusion(val)
  val_keys = np.unique(_keys(val))
  assert exclusion.size == val_keys.size
  # Membership is exact and order-free; a pair absent from the set is not found.
  assert bool(exclusion.contains(val[:, ::-1]).all())
  all_pairs = np.array(list(itertools.combinations(range(12), 2)), np.int32)
  np.testing.assert_array_equal(
    np.asarray(exclusion.contains(jnp.asarray(all_pairs))), np.isin(_keys(all_pairs), val_keys)
  )
  for seed in range(3):
    pairs, same, stats = P.sample_pairs_with_stats(jax.random.key(100 + seed), ci, classes, 30, 30, exclusion)
    assert int(stats["collisions"]) > 10  # collisions are frequent here ...
    assert int(stats["remaining"]) == 0 and int(stats["rounds"]) <= 16  # ... and all redrawn
    assert not np.isin(_keys(pairs), val_keys).any()
    la, lb = labels[np.asarray(pairs)[:, 0]], labels[np.asarray(pairs)[:, 1]]
    np.testing.assert_array_equal(np.asarray(same), la == lb)  # redraws keep the classes
    assert collections.Counter(la[np.asarray(same)].tolist()) == {0: 30, 1: 30, 2: 30}


def test_exclusion_that_cannot_be_satisfied_fails_loudly():
  labels = _labels([2, 3], seed=7)
  ci = P.build_class_index(labels)
  a, b = np.nonzero(labels == 0)[0]
  exclusion = P.make_exclusion(np.array([[b, a]]))  # the only pair of class 0
  with pytest.raises(ValueError, match="still collide"):
    P.sample_pairs(jax.random.key(0), ci, jnp.asarray([0, 1]), 1, 2, exclusion, max_redraw_rounds=4)
  empty = P.make_exclusion(np.zeros((0, 2), np.int32))
  assert not bool(empty.contains(jnp.asarray([[0, 1], [0, 0]])).any())


def test_pair_case_table():
  seen = jnp.asarray([True, True, False, False])
  a = jnp.asarray([0, 0, 0, 2, 2, 3, 1])
  b = jnp.asarray([0, 1, 2, 0, 2, 2, 3])
  np.testing.assert_array_equal(np.asarray(P.pair_case(a, b, seen)), [1, 2, 3, 3, 4, 5, 3])
  assert P.pair_case(a, b, seen).dtype == jnp.int8


def test_five_case_counts_at_protocol_numbers():
  labels = _labels([50] * 200, seed=8)
  ci = P.build_class_index(labels)
  seen = np.zeros(200, bool)
  seen[np.random.default_rng(9).permutation(200)[:180]] = True
  pairs, same, case = P.sample_test_pairs(jax.random.key(0), ci, seen)
  pairs, same, case = np.asarray(pairs), np.asarray(same), np.asarray(case)
  assert pairs.shape == (3980000, 2) and case.dtype == np.int8
  counts = np.bincount(case, minlength=6)
  np.testing.assert_array_equal(counts, [0, 1791000, 1611000, 360000, 199000, 19000])
  assert np.all(pairs[:, 0] != pairs[:, 1])
  la, lb = labels[pairs[:, 0]], labels[pairs[:, 1]]
  np.testing.assert_array_equal(same, la == lb)
  sa, sb = seen[la], seen[lb]
  expected = np.select([same & sa, same & ~sa, sa & sb, sa ^ sb], [1, 4, 2, 3], 5)
  np.testing.assert_array_equal(case, expected)
  np.testing.assert_array_equal(np.bincount(la[same], minlength=200), 9950)


_linear_to_pair = jax.jit(P.linear_to_pair, static_argnums=1)
_chunk = jax.jit(P.exhaustive_pairs_chunk, static_argnums=(1, 2))


@pytest.mark.parametrize("n", [2, 3, 7, 33])
def test_exhaustive_matches_combinations(n):
  total = P.num_exhaustive_pairs(n)
  ref = np.array(list(itertools.combinations(range(n), 2)), np.int32)
  i, j = _linear_to_pair(jnp.arange(total, dtype=jnp.int32), n)
  np.testing.assert_array_equal(np.stack([i, j], 1), ref)
  # Chunks that do not divide the total: the tail is masked, nothing repeats unmasked.
  got = []
  for start in range(0, total, 5):
    chunk, valid = _chunk(start, 5, n)
    got.append(np.asarray(chunk)[np.asarray(valid)])
  np.testing.assert_array_equal(np.concatenate(got), ref)


def _reference_pairs(k, n):
  """int64 numpy: row = last row start <= k."""
  rows = np.arange(n - 1, dtype=np.int64)
  row_start = rows * (2 * n - rows - 1) // 2
  i = np.searchsorted(row_start, k, side="right") - 1
  return i, k - row_start[i] + i + 1


@pytest.mark.parametrize("n", [10000, 65536])
def test_exhaustive_large_n_row_boundaries_and_last_pair(n):
  total = P.num_exhaustive_pairs(n)
  assert total == n * (n - 1) // 2
  if n == 10000:
    assert total == 49995000
  rows = np.arange(n - 1, dtype=np.int64)
  row_start = rows * (2 * n - rows - 1) // 2
  rng = np.random.default_rng(n)
  k = np.concatenate([row_start, row_start[1:] - 1, row_start[1:] + 1, [total - 1], rng.integers(0, total, 200000)])
  k = k[(k >= 0) & (k < total)]
  i, j = _linear_to_pair(jnp.asarray(k.astype(np.int32)), n)
  ri, rj = _reference_pairs(k, n)
  np.testing.assert_array_equal(np.asarray(i), ri)
  np.testing.assert_array_equal(np.asarray(j), rj)
  # The last chunk: start close to int32's limit for n = 65,536, never overflowing.
  start = total - 3
  chunk, valid = _chunk(start, 1024, n)
  assert int(valid.sum()) == 3
  np.testing.assert_array_equal(np.asarray(chunk)[:3], [[n - 3, n - 2], [n - 3, n - 1], [n - 2, n - 1]])
  with pytest.raises(ValueError):
    P.num_exhaustive_pairs(65537)
