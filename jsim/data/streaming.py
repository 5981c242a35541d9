"""Streaming batches from random-access records, for data sets too large to hold in memory.

A grain pipeline reads the records of one epoch in the order fixed by
`epoch_permutation(seed, epoch, n)` -- the same rule as the in-memory path --
decodes them (tiny_imagenet.decode_image; resizing to image_size x image_size
when needed) and stacks them into uint8 batches; on-device augmentation comes
after, as for in-memory data. The order depends only on (seed, epoch), not on
the number of worker processes or threads, so a run resumed at `start_batch`
continues the same sequence.

    for images, labels in stream_batches(records, train_indices, 64, seed, epoch, 64):
      ...

(`records`: stage 1's train images, or e.g. `tfds.data_source(...)` with the
label map of `tfds_source.open_tfds_split`.)
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import grain
from absl import flags
import numpy as np

from jsim.data.tiny_imagenet import decode_image


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order in which epoch `epoch` visits n examples: a permutation of range(n).

  Plain numpy, a function of (seed, epoch) only, so the streaming and the
  in-memory paths (and a resumed run) agree.
  """
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed={seed} and epoch={epoch} must be non-negative")
  return np.random.default_rng([seed, epoch]).permutation(n)


def num_batches(n: int, batch_size: int) -> int:
  """Batches per epoch over n examples, the last partial one included."""
  return -(-n // batch_size)


class _ReadExample:
  """Record index -> (uint8 image [S, S, 3], int32 label). A class, not a closure, so it pickles
  into grain's worker processes."""

  def __init__(
    self, source: Sequence[dict], image_key: str, label_key: str, label_map: np.ndarray | None, image_size: int | None
  ):
    self.source, self.image_key, self.label_key = source, image_key, label_key
    self.label_map, self.image_size = label_map, image_size

  def __call__(self, index: Any) -> tuple[np.ndarray, np.int32]:
    rec = self.source[int(index)]
    try:
      image = decode_image(rec[self.image_key], self.image_size)[0]
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot decode record {int(index)} of {self.source!r}: {e}") from e
    label = int(rec[self.label_key])
    if self.label_map is not None:
      label = int(self.label_map[label])
    return image, np.int32(label)


def stream_batches(
  data_source: Sequence[dict],
  indices: Sequence[int] | np.ndarray,
  batch_size: int,
  seed: int,
  epoch: int,
  image_size: int | None,
  start_batch: int = 0,
  *,
  num_workers: int = 0,
  num_threads: int = 8,
  image_key: str = "image",
  label_key: str = "label",
  label_map: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (images uint8 [B, S, S, 3], labels int32 [B]) for one epoch over `indices`.

  Args:
    data_source: any random-access sequence of records (dicts holding encoded
      image bytes or a decoded uint8 array, and an int label), e.g.
      `tfds.data_source(...)`.
    indices: the record indices this epoch covers (e.g. stage-1 train images).
    batch_size: B; the last batch holds the remainder (not dropped, not padded).
    seed, epoch: the epoch visits indices[epoch_permutation(seed, epoch, len(indices))].
    image_size: S; images of another size are resized (PIL bilinear, no crop).
      None keeps the stored size (all images must share it).
    start_batch: resume point: the first batch yielded is batch `start_batch`
      of the epoch's sequence (0 <= start_batch <= num_batches).
    num_workers: grain worker processes decoding in parallel (0: in this process).
    num_threads: reader threads per process (0: sequential).
    image_key, label_key, label_map: the record's keys; label_map maps a stored
      label to the index returned.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be positive")
  indices = np.asarray(indices, dtype=np.int64)
  if indices.ndim != 1:
    raise ValueError(f"indices must be 1-D, got shape {indices.shape}")
  n_records = len(data_source)
  if indices.size and (indices.min() < 0 or indices.max() >= n_records):
    raise ValueError(f"indices outside [0, {n_records}) of the data source")
  total = num_batches(len(indices), batch_size)
  if not 0 <= start_batch <= total:
    raise ValueError(f"start_batch={start_batch} outside [0, {total}] ({len(indices)} examples, batch {batch_size})")
  order = indices[epoch_permutation(seed, epoch, len(indices))][start_batch * batch_size :]
  return stream_order(
    data_source,
    order,
    batch_size,
    num_workers=num_workers,
    num_threads=num_threads,
    image_key=image_key,
    label_key=label_key,
    label_map=label_map,
    image_size=image_size,
  )


def stream_order(
  data_source: Sequence[dict],
  order: np.ndarray,
  batch_size: int,
  *,
  num_workers: int = 0,
  num_threads: int = 8,
  image_key: str = "image",
  label_key: str = "label",
  label_map: np.ndarray | None = None,
  image_size: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (images, labels) of the records `order` (indices into data_source, repeats allowed), in that
  order, batch_size at a time (the last batch holds the remainder); the arguments as stream_batches'."""
  if not len(order):
    return iter(())
  ds = (
    grain.MapDataset.source(np.asarray(order, np.int64))
    .map(_ReadExample(data_source, image_key, label_key, label_map, image_size))
    .batch(batch_size, drop_remainder=False)
  )
  # Threads decode ahead of the consumer: about two batches in flight.
  read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * batch_size if num_threads else 0)
  it = ds.to_iter_dataset(read_options)
  if num_workers > 0:
    # grain's workers read absl flags; outside an absl app (tests, notebooks)
    # nothing parsed them, so use their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return _closing(iter(it))


def _closing(it: Iterator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  # Worker processes are released as soon as the epoch ends or the consumer stops.
  try:
    for images, labels in it:
      yield images, labels
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()
