"""The in-memory form every data source produces, and every stage consumes."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ImageSet:
  """Decoded images of one part of a data set (e.g. Tiny ImageNet's train or val folder).

  Attributes:
    images: uint8 array [N, H, W, 3] (RGB; grayscale sources are converted).
    labels: int32 array [N], the index of each image's class in `class_ids`.
    class_ids: the class names of the whole data set, sorted (WordNet ids for
      Tiny ImageNet). Train and test parts of one data set share this tuple.
    image_ids: a unique, stable name per image (its file name for folder
      sources), used by split.json to name images independently of order.
  """

  images: np.ndarray
  labels: np.ndarray
  class_ids: tuple[str, ...]
  image_ids: tuple[str, ...]

  def __post_init__(self):
    n = len(self.image_ids)
    if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
      raise ValueError(f"ImageSet.images must be uint8 [N, H, W, 3], got {self.images.dtype} {self.images.shape}")
    if self.images.shape[0] != n or self.labels.shape != (n,):
      raise ValueError(f"ImageSet sizes disagree: {self.images.shape[0]} images, {self.labels.shape} labels, {n} ids")
    if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_ids)):
      raise ValueError(f"ImageSet labels outside [0, {len(self.class_ids)})")

  def __len__(self) -> int:
    return len(self.image_ids)

  def subset(self, indices: np.ndarray) -> "ImageSet":
    indices = np.asarray(indices)
    return ImageSet(
      self.images[indices], self.labels[indices], self.class_ids, tuple(self.image_ids[i] for i in indices)
    )


@dataclasses.dataclass(frozen=True)
class LabelSet:
  """An ImageSet without its images (labels, class ids, image ids): what `--dry_run` reads, decoding nothing."""

  labels: np.ndarray
  class_ids: tuple[str, ...]
  image_ids: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.image_ids)
