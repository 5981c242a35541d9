"""The protocol's splits, drawn once from a seed and kept in the workdir as split.json.

seen / unseen classes; T180 (train-folder images of the seen classes) split into
stage-1 train and validation; test = the val folder (all classes).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from jsim.data.dataset import ImageSet
from jsim.workdir import write_json

SPLIT_FILE = "split.json"
# data.seen_classes: drawn from the seed (the protocol) | the first ones in sorted order (the benchmarks).
SEEN_CLASSES = ("random", "first")


@dataclasses.dataclass(frozen=True)
class Split:
  seen_classes: tuple[str, ...]  # sorted; position = stage-1 head index
  unseen_classes: tuple[str, ...]  # sorted
  train_ids: tuple[str, ...]  # stage-1 train (70% of T180)
  val_ids: tuple[str, ...]  # stage-1 validation (30% of T180)
  test_ids: tuple[str, ...]  # the test folder, all classes
  seed: int

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["counts"] = {
      "seen_classes": len(self.seen_classes),
      "unseen_classes": len(self.unseen_classes),
      "train": len(self.train_ids),
      "val": len(self.val_ids),
      "test": len(self.test_ids),
    }
    return d

  @classmethod
  def from_json(cls, d: dict) -> "Split":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields})

  def head_index(self, class_ids: tuple[str, ...]) -> np.ndarray:
    """Maps data-set class index -> stage-1 head index (-1 for unseen classes)."""
    pos = {c: i for i, c in enumerate(self.seen_classes)}
    return np.array([pos.get(c, -1) for c in class_ids], np.int32)

  def seen_mask(self, class_ids: tuple[str, ...]) -> np.ndarray:
    return self.head_index(class_ids) >= 0


def make_split(
  train: ImageSet, test: ImageSet, *, num_seen: int, val_fraction: float, seed: int, seen_classes: str = "random"
) -> Split:
  """Draws seen/unseen classes and the 70/30 split of T180 from `seed`.

  seen_classes='random': the seen classes are drawn from the seed (the protocol);
  'first': they are the first `num_seen` in sorted order (the benchmarks' first half).
  """
  if seen_classes not in SEEN_CLASSES:
    raise ValueError(f"data.seen_classes={seen_classes!r}: expected one of {', '.join(SEEN_CLASSES)}")
  num_classes = len(train.class_ids)
  if not 0 < num_seen <= num_classes:
    raise ValueError(
      f"data.num_seen_classes={num_seen} must be in [1, {num_classes}] (the data set has {num_classes} classes)"
    )
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"data.val_fraction={val_fraction} must be in (0, 1)")
  rng = np.random.default_rng(seed)
  drawn = rng.permutation(num_classes)  # drawn either way: the stream of the seed stays the same
  seen = np.arange(num_seen) if seen_classes == "first" else np.sort(drawn[:num_seen])
  seen_mask = np.zeros(num_classes, bool)
  seen_mask[seen] = True
  t_seen = np.flatnonzero(seen_mask[train.labels])
  order = rng.permutation(len(t_seen))
  num_val = int(round(val_fraction * len(t_seen)))
  val_idx, train_idx = np.sort(t_seen[order[:num_val]]), np.sort(t_seen[order[num_val:]])
  return Split(
    seen_classes=tuple(train.class_ids[i] for i in seen),
    unseen_classes=tuple(c for i, c in enumerate(train.class_ids) if not seen_mask[i]),
    train_ids=tuple(train.image_ids[i] for i in train_idx),
    val_ids=tuple(train.image_ids[i] for i in val_idx),
    test_ids=tuple(test.image_ids),
    seed=seed,
  )


def save_split(split: Split, workdir: str | Path) -> Path:
  path = Path(workdir) / SPLIT_FILE
  write_json(path, split.to_json())
  return path


def load_split(workdir: str | Path) -> Split | None:
  path = Path(workdir) / SPLIT_FILE
  if not path.exists():
    return None
  try:
    d = json.loads(path.read_text())
    if not isinstance(d, dict):
      raise TypeError(f"a JSON object expected, found {type(d).__name__}")
    return Split.from_json(d)
  except (json.JSONDecodeError, TypeError) as e:
    raise ValueError(f"{path}: not a valid split file ({e}); restore it, or use another --workdir") from None


def indices_of(image_set: ImageSet, ids: tuple[str, ...], *, what: str) -> np.ndarray:
  """Positions of `ids` in `image_set`; an id that is missing is an error naming it."""
  pos = {name: i for i, name in enumerate(image_set.image_ids)}
  missing = [i for i in ids if i not in pos]
  if missing:
    raise ValueError(
      f"split.json names {len(missing)} {what} images that the data set does not have "
      f"(first: {missing[0]!r}); the workdir was made from other data"
    )
  return np.fromiter((pos[i] for i in ids), np.int64, count=len(ids))
