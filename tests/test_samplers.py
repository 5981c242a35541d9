"""m-per-class batches: class balance, no repeats within a class, determinism from (seed, epoch)."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from jsim.data.samplers import MPerClassSampler


def _labels():
  rng = np.random.default_rng(0)
  sizes = [9, 2, 7, 12, 5, 3, 8, 6, 10, 4]  # class 1 and 5 have fewer than m=4 images
  labels = np.repeat(np.arange(len(sizes)), sizes)
  return labels[rng.permutation(len(labels))]


def test_every_batch_has_p_classes_of_m_images():
  labels = _labels()
  s = MPerClassSampler(labels, m=4, batch_size=16)
  batches = np.asarray(s.epoch(seed=3, epoch=1))
  assert batches.shape == (len(labels) // 16, 16)
  seen = collections.Counter()
  for b in batches:
    classes = collections.Counter(labels[b].tolist())
    assert len(classes) == 4 and set(classes.values()) == {4}
    for c in classes:
      idx = b[labels[b] == c]
      size = int(np.sum(labels == c))
      # Without replacement where the class has m images; else every image, in turn.
      assert len(set(idx.tolist())) == min(4, size)
      seen[c] += 1
  # Over many epochs, every class is drawn about equally often (P of 10 per batch).
  counts = collections.Counter()
  for e in range(800):
    for b in np.asarray(s.epoch(seed=3, epoch=e)):
      counts.update(set(labels[b].tolist()))
  freq = np.array([counts[c] for c in range(10)]) / (800 * len(batches))
  np.testing.assert_allclose(freq, 0.4, atol=0.035)  # ~4 standard deviations


def test_images_of_a_class_are_drawn_uniformly():
  labels = np.repeat(np.arange(4), [20, 20, 20, 20])
  s = MPerClassSampler(labels, m=2, batch_size=4)
  hits = collections.Counter()
  for e in range(300):
    hits.update(np.asarray(s.epoch(0, e)).ravel().tolist())
  freq = np.array([hits[i] for i in range(80)], float)
  assert freq.min() > 0.6 * freq.mean() and freq.max() < 1.4 * freq.mean()


def test_deterministic_from_seed_and_epoch():
  labels = _labels()
  s = MPerClassSampler(labels, m=2, batch_size=8)
  a = np.asarray(s.epoch(1, 5))
  np.testing.assert_array_equal(a, np.asarray(MPerClassSampler(labels, m=2, batch_size=8).epoch(1, 5)))
  assert not np.array_equal(a, np.asarray(s.epoch(1, 6)))
  assert not np.array_equal(a, np.asarray(s.epoch(2, 5)))


def test_refuses_impossible_batches():
  labels = _labels()
  with pytest.raises(ValueError, match="sampler_m=3: must be >= 1 and divide the batch size 16"):
    MPerClassSampler(labels, m=3, batch_size=16)
  with pytest.raises(ValueError, match="needs 16 classes, but only 10 have training images"):
    MPerClassSampler(labels, m=2, batch_size=32)
