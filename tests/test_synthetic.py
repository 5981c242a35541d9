"""The synthetic Tiny ImageNet: layout, determinism, grayscale and corrupt files, learnability."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jsim.data import synthetic, tiny_imagenet


def _tree(root: Path) -> dict[str, str]:
  return {
    p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(root.rglob("*"))
    if p.is_file()
  }


def test_official_layout(tmp_path):
  root = synthetic.write_synthetic_tiny_imagenet(
    tmp_path / "d", num_classes=3, train_per_class=4, test_per_class=2, image_size=48
  )
  wnids = (root / "wnids.txt").read_text().split()
  assert wnids == ["n90000000", "n90000001", "n90000002"]
  words = dict(line.split("\t") for line in (root / "words.txt").read_text().splitlines())
  assert set(words) == set(wnids)
  for w in wnids:
    names = sorted(p.name for p in (root / "train" / w / "images").iterdir())
    assert names == sorted(f"{w}_{k}.JPEG" for k in range(4))
    boxes = (root / "train" / w / f"{w}_boxes.txt").read_text().splitlines()
    assert sorted(b.split("\t")[0] for b in boxes) == names
  ann = [line.split("\t") for line in (root / "val" / "val_annotations.txt").read_text().splitlines()]
  assert sorted(a[0] for a in ann) == sorted(f"val_{j}.JPEG" for j in range(6))
  assert sorted(p.name for p in (root / "val" / "images").iterdir()) == sorted(a[0] for a in ann)
  assert sorted(a[1] for a in ann) == sorted(wnids * 2)
  for a in ann:
    x0, y0, x1, y1 = map(int, a[2:])
    assert 0 <= x0 <= x1 < 48 and 0 <= y0 <= y1 < 48
    with Image.open(root / "val" / "images" / a[0]) as im:
      assert im.format == "JPEG" and im.size == (48, 48) and im.mode == "RGB"


def test_deterministic_from_the_seed_and_independent_of_workers(tmp_path):
  kw = dict(num_classes=4, train_per_class=3, test_per_class=2, grayscale_fraction=0.3, corrupt_files=1)
  a = _tree(synthetic.write_synthetic_tiny_imagenet(tmp_path / "a", seed=7, **kw))
  b = _tree(synthetic.write_synthetic_tiny_imagenet(tmp_path / "b", seed=7, num_workers=2, **kw))
  c = _tree(synthetic.write_synthetic_tiny_imagenet(tmp_path / "c", seed=8, **kw))
  assert a == b
  assert a.keys() == c.keys()
  jpegs = [k for k in a if k.endswith(".JPEG")]
  assert all(a[k] != c[k] for k in jpegs)


def test_grayscale_and_corrupt_files(tmp_path):
  root = synthetic.write_synthetic_tiny_imagenet(
    tmp_path / "d", num_classes=5, train_per_class=8, test_per_class=4, grayscale_fraction=0.25, corrupt_files=3
  )
  corrupt = set(json.loads((root / synthetic.INFO_FILE).read_text())["corrupt_files"])
  assert len(corrupt) == 3
  modes = {"train": [], "val": []}
  for p in sorted(root.rglob("*.JPEG")):
    rel = p.relative_to(root).as_posix()
    if rel in corrupt:
      with pytest.raises(Exception):
        with Image.open(p) as im:
          im.load()
      continue
    with Image.open(p) as im:
      modes[rel.split("/")[0]].append(im.mode)
  # 25% of each split, chosen before damage: a corrupt file may have been a grayscale one.
  assert 10 - 3 <= modes["train"].count("L") <= 10 and modes["val"].count("L") == 5
  assert set(modes["train"]) | set(modes["val"]) == {"RGB", "L"}


def test_class_factors_are_distinct_combinations():
  combos = [synthetic.class_factors(k) for k in range(synthetic.MAX_CLASSES)]
  assert len(set(combos)) == synthetic.MAX_CLASSES
  # The first ten classes already differ in shape and in hue; every factor value recurs
  # among the first 100 classes, so held-out classes combine factors seen in training.
  assert len({c[0] for c in combos[:10]}) == 10 and len({c[1] for c in combos[:10]}) == 10
  assert {c[:2] for c in combos[:100]} == {(s, h) for s in synthetic.SHAPES for h in range(10)}
  with pytest.raises(ValueError):
    synthetic.class_factors(synthetic.MAX_CLASSES)


def test_hue_names_are_the_colour_wheels_names_of_their_hues(tmp_path):
  """Each class's colour is named by the 30-degree sector of the 12-colour RGB wheel that holds its hue (216
  degrees is azure, not cyan at 180); words.txt names the classes so."""
  wheel = {  # name -> the hue at the sector's centre, in degrees
    "red": 0, "orange": 30, "yellow": 60, "chartreuse": 90, "green": 120, "spring green": 150, "cyan": 180,
    "azure": 210, "blue": 240, "violet": 270, "magenta": 300, "rose": 330,
  }  # fmt: skip
  assert len(synthetic.HUE_NAMES) == len(synthetic.HUES)
  for hue, name in zip(synthetic.HUES, synthetic.HUE_NAMES):
    assert name in wheel, name
    off = (hue * 360 - wheel[name] + 180) % 360 - 180
    assert abs(off) <= 15, f"hue {hue * 360:.0f} degrees named {name!r} ({wheel[name]} degrees)"
  root = synthetic.write_synthetic_tiny_imagenet(tmp_path / "d", num_classes=10, train_per_class=1, test_per_class=0)
  words = dict(line.split("\t") for line in (root / "words.txt").read_text().splitlines())
  for k in range(10):
    shape, h, texture = synthetic.class_factors(k)
    assert words[synthetic.synthetic_wnid(k)] == f"{synthetic.HUE_NAMES[h]} {texture} {shape}"


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="num_classes"):
    synthetic.write_synthetic_tiny_imagenet(tmp_path, num_classes=0)
  with pytest.raises(ValueError, match="corrupt_files"):
    synthetic.write_synthetic_tiny_imagenet(tmp_path, num_classes=2, train_per_class=2, corrupt_files=5)


@pytest.mark.slow
def test_a_tiny_cnn_learns_it_and_its_features_transfer_to_held_out_classes(tmp_path):
  """10 classes to train on, 5 held out; the held-out ones are new combinations of the same factors."""
  import jax
  import flax.linen as nn
  import optax

  root = synthetic.write_synthetic_tiny_imagenet(
    tmp_path / "d", num_classes=15, train_per_class=40, test_per_class=20, image_size=32, seed=0
  )
  sets, _ = tiny_imagenet.load_folder(root, image_size=32, num_workers=1, cache_dir=tmp_path / "c")
  train, test = sets["train"], sets["test"]

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, embed=False):
      for features in (8, 16, 32):
        x = nn.max_pool(nn.relu(nn.Conv(features, (3, 3))(x)), (2, 2), (2, 2))
      x = x.mean((1, 2))
      return x if embed else nn.Dense(10)(x)

  def prep(images):
    return (images.astype(np.float32) / 255 - 0.5) / 0.25

  seen = train.labels < 10
  x, y = prep(train.images[seen]), train.labels[seen]
  model, opt = CNN(), optax.adam(3e-3)
  init = jax.jit(model.init)  # jitted: few compilations keep the test fast
  params = init(jax.random.PRNGKey(0), x[:1])
  state = opt.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean()
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(0)
  for _ in range(150):
    idx = rng.integers(0, len(x), 64)
    params, state = step(params, state, x[idx], y[idx])

  test_seen = test.labels < 10
  logits = jax.jit(model.apply)(params, prep(test.images[test_seen]))
  assert (np.asarray(logits).argmax(-1) == test.labels[test_seen]).mean() >= 0.75  # chance: 0.1

  everything = prep(np.concatenate([train.images, test.images]))
  embed = jax.jit(lambda p: model.apply(p, everything, embed=True))

  def held_out_accuracy(p):  # nearest class mean of the embeddings, 5 held-out classes
    e = np.asarray(embed(p))
    e = e / (np.linalg.norm(e, axis=1, keepdims=True) + 1e-6)
    e_train, e_test = e[: len(train)], e[len(train) :]
    classes = np.arange(10, 15)
    means = np.stack([e_train[train.labels == c].mean(0) for c in classes])
    held = test.labels >= 10
    return (classes[(e_test[held] @ means.T).argmax(1)] == test.labels[held]).mean()

  trained, untrained = held_out_accuracy(params), held_out_accuracy(init(jax.random.PRNGKey(0), x[:1]))
  assert trained >= 0.7 and trained > untrained + 0.2  # chance: 0.2


def test_refuses_a_non_empty_folder(tmp_path):
  (tmp_path / "old.txt").write_text("x")
  with pytest.raises(FileExistsError, match="not empty"):
    synthetic.write_synthetic_tiny_imagenet(tmp_path, num_classes=2, train_per_class=1, test_per_class=1)
