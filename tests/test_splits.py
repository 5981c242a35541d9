"""The protocol's splits at the real data set's sizes (images are 1x1 here: only ids and labels matter)."""

import numpy as np
import pytest

from jsim.data import splits
from jsim.data.dataset import ImageSet


def _image_set(num_classes, per_class, prefix):
  labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  ids = tuple(f"{prefix}{i}.JPEG" for i in range(len(labels)))
  return ImageSet(
    np.zeros((len(labels), 1, 1, 3), np.uint8), labels, tuple(f"n{c:08d}" for c in range(num_classes)), ids
  )


@pytest.fixture(scope="module")
def tiny_imagenet_sized():
  return _image_set(200, 500, "train_"), _image_set(200, 50, "val_")


def test_protocol_counts(tiny_imagenet_sized):
  train, test = tiny_imagenet_sized
  s = splits.make_split(train, test, num_seen=180, val_fraction=0.3, seed=0)
  assert (len(s.seen_classes), len(s.unseen_classes)) == (180, 20)
  assert (len(s.train_ids), len(s.val_ids), len(s.test_ids)) == (63_000, 27_000, 10_000)
  assert not set(s.seen_classes) & set(s.unseen_classes)
  assert not set(s.train_ids) & set(s.val_ids)
  # T180 is exactly the train images of the seen classes.
  seen = set(s.seen_classes)
  t180 = {i for i, l in zip(train.image_ids, train.labels) if train.class_ids[l] in seen}
  assert set(s.train_ids) | set(s.val_ids) == t180
  head = s.head_index(train.class_ids)
  assert sorted(head[head >= 0]) == list(range(180))
  assert (head >= 0).sum() == 180 and s.seen_mask(test.class_ids).sum() == 180


def test_seed_fixes_the_split(tiny_imagenet_sized, tmp_path):
  train, test = tiny_imagenet_sized
  a = splits.make_split(train, test, num_seen=180, val_fraction=0.3, seed=1)
  b = splits.make_split(train, test, num_seen=180, val_fraction=0.3, seed=1)
  c = splits.make_split(train, test, num_seen=180, val_fraction=0.3, seed=2)
  assert a == b and a.seen_classes != c.seen_classes
  splits.save_split(a, tmp_path)
  assert splits.load_split(tmp_path) == a
  assert splits.load_split(tmp_path / "missing") is None


def test_bad_values_and_foreign_ids(tiny_imagenet_sized, tmp_path):
  train, test = tiny_imagenet_sized
  with pytest.raises(ValueError, match="num_seen_classes=201"):
    splits.make_split(train, test, num_seen=201, val_fraction=0.3, seed=0)
  with pytest.raises(ValueError, match="val_fraction=1.5"):
    splits.make_split(train, test, num_seen=180, val_fraction=1.5, seed=0)
  with pytest.raises(ValueError, match="'nope.JPEG'"):
    splits.indices_of(train, ("train_0.JPEG", "nope.JPEG"), what="stage-1 train")
  (tmp_path / splits.SPLIT_FILE).write_text("{not json")
  with pytest.raises(ValueError, match="not a valid split file"):
    splits.load_split(tmp_path)


def test_a_workdir_split_of_another_config_is_one_line_naming_both(tiny_imagenet_sized, tmp_path):
  from ml_collections import ConfigDict

  from jsim.data import prepare

  train, test = tiny_imagenet_sized
  s = splits.make_split(train, test, num_seen=180, val_fraction=0.3, seed=0)
  prepare.check_split(s, ConfigDict({"seed": 0, "data": {"num_seen_classes": 180}}), tmp_path)  # the same: fine
  with pytest.raises(ValueError) as e:
    prepare.check_split(s, ConfigDict({"seed": 1, "data": {"num_seen_classes": 6}}), tmp_path)
  assert str(e.value) == (
    f"{tmp_path / 'split.json'} was drawn with seed 0 and 180 seen classes, the config asks for seed 1 and 6 seen "
    "classes; use another --workdir"
  )
