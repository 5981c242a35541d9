"""TFDS builder for Tiny ImageNet, load_image_sets over tfds.data_source, and streaming batches.

The data are a few real JPEGs written with PIL in the official layout; every
expectation is computed from those files with PIL, independently of the code
under test.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

import tensorflow_datasets as tfds

from jsim.data import streaming
from jsim.data import tfds_source

# Deliberately not sorted in wnids.txt: labels must index the sorted list.
WNIDS = ["n03000000", "n01000000", "n02000000"]
TRAIN_PER_CLASS = 4
VAL = [
  ("val_0.JPEG", "n02000000"),
  ("val_1.JPEG", "n01000000"),
  ("val_2.JPEG", "n03000000"),
  ("val_3.JPEG", "n01000000"),
  ("val_4.JPEG", "n03000000"),
  ("val_5.JPEG", "n02000000"),
  ("val_10.JPEG", "n01000000"),
]
GRAY_TRAIN = "n02000000_1.JPEG"
GRAY_VAL = "val_3.JPEG"


def _jpeg(rng: np.random.Generator, gray: bool) -> bytes:
  # Smooth gradients plus noise: a JPEG whose decoding is not trivial.
  y, x = np.mgrid[0:64, 0:64]
  base = np.stack([x * 4, y * 4, (x + y) * 2], -1) + rng.integers(0, 60, (64, 64, 3))
  arr = np.clip(base, 0, 255).astype(np.uint8)
  im = Image.fromarray(arr[..., 0] if gray else arr, "L" if gray else "RGB")
  buf = io.BytesIO()
  im.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _write_layout(root: Path) -> Path:
  rng = np.random.default_rng(0)
  root.mkdir(parents=True)
  (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
  for w in WNIDS:
    d = root / "train" / w / "images"
    d.mkdir(parents=True)
    for k in range(TRAIN_PER_CLASS):
      name = f"{w}_{k}.JPEG"
      (d / name).write_bytes(_jpeg(rng, gray=name == GRAY_TRAIN))
    (root / "train" / w / f"{w}_boxes.txt").write_text("")  # Present in the real data; unused.
  (root / "val" / "images").mkdir(parents=True)
  lines = []
  for name, w in VAL:
    (root / "val" / "images" / name).write_bytes(_jpeg(rng, gray=name == GRAY_VAL))
    lines.append(f"{name}\t{w}\t0\t0\t63\t63")
  (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
  return root


def _pil_rgb(path: Path) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def _expected(root: Path):
  """(paths, labels, ids) per part, in the order the spec fixes: classes sorted, then file names sorted."""
  wnids = sorted(WNIDS)
  train = [
    (root / "train" / w / "images" / f, wnids.index(w), f)
    for w in wnids
    for f in sorted(p.name for p in (root / "train" / w / "images").iterdir())
  ]
  test = [(root / "val" / "images" / f, wnids.index(w), f) for f, w in sorted(VAL)]
  return {"train": train, "test": test}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  base = tmp_path_factory.mktemp("tfds")
  root = _write_layout(base / "tiny-imagenet-200")
  data_dir = base / "tfds_data"
  tfds_source.prepare_tiny_imagenet(root, data_dir)
  return root, data_dir


def _config(data_dir, **kw):
  cfg = dict(
    source="tfds",
    tfds_name="jsim_tiny_imagenet",
    tfds_data_dir=str(data_dir),
    tfds_train_split="train",
    tfds_test_split="test",
    image_size=64,
    on_bad_image="error",
    num_workers=2,
  )
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


def test_prepared_as_array_record_only(prepared):
  _, data_dir = prepared
  files = [p.name for p in (data_dir / "jsim_tiny_imagenet" / "1.0.0").iterdir()]
  assert any(".array_record-" in f for f in files), files
  assert not any("tfrecord" in f for f in files), files
  builder = tfds.builder("jsim_tiny_imagenet", data_dir=str(data_dir))
  assert builder.info.features["label"].names == sorted(WNIDS)
  assert builder.info.features["image"].shape == (64, 64, 3)
  assert builder.info.splits["train"].num_examples == len(WNIDS) * TRAIN_PER_CLASS
  assert builder.info.splits["test"].num_examples == len(VAL)


def test_load_image_sets_matches_pil(prepared):
  root, data_dir = prepared
  sets = tfds_source.load_image_sets(_config(data_dir))
  assert set(sets) == {"train", "test"}
  for part, items in _expected(root).items():
    s = sets[part]
    assert s.class_ids == tuple(sorted(WNIDS))
    assert s.image_ids == tuple(i for _, _, i in items)
    np.testing.assert_array_equal(s.labels, np.array([l for _, l, _ in items], np.int32))
    assert s.labels.dtype == np.int32
    np.testing.assert_array_equal(s.images, np.stack([_pil_rgb(p) for p, _, _ in items]))


def test_grayscale_becomes_rgb(prepared):
  root, data_dir = prepared
  sets = tfds_source.load_image_sets(_config(data_dir))
  for part, name, path in [
    ("train", GRAY_TRAIN, root / "train" / "n02000000" / "images" / GRAY_TRAIN),
    ("test", GRAY_VAL, root / "val" / "images" / GRAY_VAL),
  ]:
    with Image.open(path) as im:
      assert im.mode == "L"
      gray = np.asarray(im)
    img = sets[part].images[sets[part].image_ids.index(name)]
    assert img.shape == (64, 64, 3)
    for c in range(3):
      np.testing.assert_array_equal(img[..., c], gray)
  # TFDS's own (TF-free) decoding of the stored feature gives the same RGB pixels.
  ds = tfds.data_source("jsim_tiny_imagenet", split="test", data_dir=str(data_dir), download=False)
  ex = next(e for e in ds if e["image_id"] == GRAY_VAL.encode())
  np.testing.assert_array_equal(ex["image"], sets["test"].images[sets["test"].image_ids.index(GRAY_VAL)])


def test_zip_source_gives_the_same_data(prepared, tmp_path):
  root, data_dir = prepared
  zpath = tmp_path / "tiny-imagenet-200.zip"
  with zipfile.ZipFile(zpath, "w") as z:
    for p in sorted(root.rglob("*")):
      z.write(p, "tiny-imagenet-200/" + p.relative_to(root).as_posix())
  zip_dir = tmp_path / "tfds_zip"
  # The zip sits in the manual dir: no source argument needed.
  manual = zip_dir / "downloads" / "manual"
  manual.mkdir(parents=True)
  zpath.rename(manual / zpath.name)
  tfds_source.JsimTinyImagenet(data_dir=str(zip_dir)).download_and_prepare(file_format="array_record")
  # The command line, with the zip itself as the source.
  cli_dir = tmp_path / "tfds_cli"
  tfds_source.main(["--source", str(manual / zpath.name), "--data_dir", str(cli_dir)])
  a = tfds_source.load_image_sets(_config(data_dir))
  for other in (zip_dir, cli_dir):
    b = tfds_source.load_image_sets(_config(other))
    for part in a:
      assert a[part].image_ids == b[part].image_ids
      np.testing.assert_array_equal(a[part].labels, b[part].labels)
      np.testing.assert_array_equal(a[part].images, b[part].images)


def test_resize_is_pil_bilinear(prepared):
  root, data_dir = prepared
  sets = tfds_source.load_image_sets(_config(data_dir, image_size=32))
  (path, _, name) = _expected(root)["test"][2]
  with Image.open(path) as im:
    want = np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR))
  s = sets["test"]
  assert s.images.shape == (len(VAL), 32, 32, 3)
  np.testing.assert_array_equal(s.images[s.image_ids.index(name)], want)


def test_no_data_to_prepare(tmp_path):
  builder = tfds_source.JsimTinyImagenet(data_dir=str(tmp_path / "d"))
  with pytest.raises(FileNotFoundError, match="allow_download"):
    builder.download_and_prepare(file_format="array_record")


def test_bad_image_raises_or_is_skipped(tmp_path):
  root = _write_layout(tmp_path / "tiny-imagenet-200")
  bad = root / "train" / "n01000000" / "images" / "n01000000_2.JPEG"
  bad.write_bytes(bad.read_bytes()[:200])  # Truncated JPEG.
  with pytest.raises(ValueError, match="n01000000_2.JPEG"):
    tfds_source.prepare_tiny_imagenet(root, tmp_path / "raise")
  tfds_source.prepare_tiny_imagenet(root, tmp_path / "skip", on_bad_image="skip")
  sets = tfds_source.load_image_sets(_config(tmp_path / "skip"))
  assert len(sets["train"]) == len(WNIDS) * TRAIN_PER_CLASS - 1
  assert "n01000000_2.JPEG" not in sets["train"].image_ids


@pytest.mark.parametrize("name", ["jsim_tiny_imagenet", "no_such_dataset_jsim"])
def test_not_prepared_error(tmp_path, name):
  with pytest.raises(FileNotFoundError) as e:
    tfds_source.load_image_sets(_config(tmp_path / "empty", tfds_name=name))
  msg = str(e.value)
  assert "\n" not in msg
  assert name in msg and "array_record" in msg and "TensorFlow" in msg
  if name == "jsim_tiny_imagenet":
    assert "python -m jsim.data.tfds_source" in msg


def test_epoch_permutation():
  p = streaming.epoch_permutation(3, 5, 100)
  np.testing.assert_array_equal(np.sort(p), np.arange(100))
  np.testing.assert_array_equal(p, streaming.epoch_permutation(3, 5, 100))
  assert not np.array_equal(p, streaming.epoch_permutation(3, 6, 100))
  assert not np.array_equal(p, streaming.epoch_permutation(4, 5, 100))


def _collect(batches):
  batches = list(batches)
  for images, labels in batches:
    assert images.dtype == np.uint8 and labels.dtype == np.int32
  return batches


def test_stream_batches_one_epoch(prepared):
  _, data_dir = prepared
  ts = tfds_source.open_tfds_split("jsim_tiny_imagenet", "train", data_dir)
  ref = tfds_source.load_image_sets(_config(data_dir))["train"]
  indices = np.array([0, 2, 3, 5, 6, 7, 8, 9, 11])  # A subset, like stage-1 train images.
  batches = _collect(
    streaming.stream_batches(ts.source, indices, 4, seed=1, epoch=2, image_size=64, label_map=ts.label_map)
  )
  assert [len(l) for _, l in batches] == [4, 4, 1]  # Last partial batch kept.
  order = indices[np.random.default_rng([1, 2]).permutation(len(indices))]
  np.testing.assert_array_equal(np.concatenate([i for i, _ in batches]), ref.images[order])
  np.testing.assert_array_equal(np.concatenate([l for _, l in batches]), ref.labels[order])
  assert sorted(order.tolist()) == sorted(indices.tolist())  # Each index exactly once.
  # Same seed and epoch: same sequence; another epoch: another order.
  again = _collect(
    streaming.stream_batches(ts.source, indices, 4, seed=1, epoch=2, image_size=64, label_map=ts.label_map)
  )
  for (a, la), (b, lb) in zip(batches, again):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
  other = np.concatenate(
    [l for _, l in streaming.stream_batches(ts.source, indices, 9, 1, 3, 64, label_map=ts.label_map)]
  )
  assert sorted(other.tolist()) == sorted(ref.labels[indices].tolist())


def test_stream_batches_resume_and_resize(prepared):
  _, data_dir = prepared
  ts = tfds_source.open_tfds_split("jsim_tiny_imagenet", "test", data_dir)
  indices = np.arange(len(ts))
  full = _collect(
    streaming.stream_batches(ts.source, indices, 3, seed=0, epoch=0, image_size=48, label_map=ts.label_map)
  )
  assert full[0][0].shape == (3, 48, 48, 3)
  for start in (1, 2):
    tail = _collect(
      streaming.stream_batches(ts.source, indices, 3, 0, 0, 48, start_batch=start, label_map=ts.label_map)
    )
    assert len(tail) == len(full) - start
    for (a, la), (b, lb) in zip(full[start:], tail):
      np.testing.assert_array_equal(a, b)
      np.testing.assert_array_equal(la, lb)
  assert list(streaming.stream_batches(ts.source, indices, 3, 0, 0, 48, start_batch=len(full))) == []
  with pytest.raises(ValueError, match="start_batch"):
    streaming.stream_batches(ts.source, indices, 3, 0, 0, 48, start_batch=len(full) + 1)


# A registered TFDS data set of another shape: PNGs of varying sizes, class
# names not in sorted order, no id feature, a second (mask) image feature.
TOY_NAMES = ["zebra", "apple", "mango"]


def _png(arr: np.ndarray, mode: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr, mode).save(buf, format="PNG")
  return buf.getvalue()


def _toy_png(k: int) -> bytes:
  rng = np.random.default_rng(k)
  h, w = 20 + k % 3, 30 - k % 4
  mode = ("RGB", "L", "RGBA")[k % 3]
  return _png(rng.integers(0, 256, (h, w, len(mode)) if mode != "L" else (h, w), dtype=np.uint8), mode)


class JsimToyTfdsTest(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None  # See JsimTinyImagenet.code_path.

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(encoding_format="png"),
          "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
          "label": tfds.features.ClassLabel(names=TOY_NAMES),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 7), "test": self._generate_examples(7, 10)}

  def _generate_examples(self, lo, hi):
    for k in range(lo, hi):
      # Bytes, not arrays: TFDS encodes arrays with TensorFlow.
      yield k, {"image": _toy_png(k), "mask": _png(np.zeros((4, 4), np.uint8), "L"), "label": k % 3}


def test_another_tfds_data_set(tmp_path):
  JsimToyTfdsTest(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
  sets = tfds_source.load_image_sets(_config(tmp_path, tfds_name="jsim_toy_tfds_test", image_size=16))
  for part, (lo, hi) in {"train": (0, 7), "test": (7, 10)}.items():
    s = sets[part]
    assert s.class_ids == ("apple", "mango", "zebra")
    assert s.image_ids == tuple(f"{part}/{i}" for i in range(hi - lo))
    ds = tfds.data_source(
      "jsim_toy_tfds_test",
      split=part,
      data_dir=str(tmp_path),
      download=False,
      decoders={"image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()},
    )
    for i in range(hi - lo):
      ex = ds[i]
      with Image.open(io.BytesIO(ex["image"])) as im:
        want = np.asarray(im.convert("RGB").resize((16, 16), Image.BILINEAR))
      np.testing.assert_array_equal(s.images[i], want)
      assert s.class_ids[s.labels[i]] == TOY_NAMES[int(ex["label"])]
  # Streaming from a plain tfds.data_source (TFDS-decoded arrays) with the same label map.
  ts = tfds_source.open_tfds_split("jsim_toy_tfds_test", "train", tmp_path)
  plain = tfds.data_source("jsim_toy_tfds_test", split="train", data_dir=str(tmp_path), download=False)
  got = list(streaming.stream_batches(plain, np.arange(7), 4, 5, 0, 16, label_map=ts.label_map))
  order = np.random.default_rng([5, 0]).permutation(7)
  np.testing.assert_array_equal(np.concatenate([l for _, l in got]), sets["train"].labels[order])
  # TFDS decodes RGBA PNGs as 4 channels; decode_image drops alpha like PIL's convert('RGB').
  np.testing.assert_array_equal(np.concatenate([i for i, _ in got]), sets["train"].images[order])


def test_split_slices_and_unknown_split(prepared):
  _, data_dir = prepared
  ts = tfds_source.open_tfds_split("jsim_tiny_imagenet", "train[:5]", data_dir)
  assert len(ts) == 5
  with pytest.raises(ValueError, match="no split 'validation'"):
    tfds_source.open_tfds_split("jsim_tiny_imagenet", "validation", data_dir)


def test_builder_reads_the_layout_like_the_folder_source(tmp_path):
  # One reader: a val image without an annotation line is refused by the TFDS builder as by
  # the folder source (never dropped silently), and dropped with on_bad_image=skip.
  from jsim.data import tiny_imagenet

  root = _write_layout(tmp_path / "tiny-imagenet-200")
  (root / "val" / "images" / "val_99.JPEG").write_bytes((root / "val" / "images" / "val_0.JPEG").read_bytes())
  for load in (
    lambda: tfds_source.prepare_tiny_imagenet(root, tmp_path / "error"),
    lambda: tiny_imagenet.load_folder(root, num_workers=1, cache_dir=tmp_path / "cache"),
  ):
    with pytest.raises(ValueError, match="val_99.JPEG has no line in val/val_annotations.txt"):
      load()
  tfds_source.prepare_tiny_imagenet(root, tmp_path / "skip", on_bad_image="skip")
  sets = tfds_source.load_image_sets(_config(tmp_path / "skip"))
  folder, _ = tiny_imagenet.load_folder(root, on_bad_image="skip", num_workers=1, cache_dir=tmp_path / "cache")
  for part in ("train", "test"):
    assert sets[part].image_ids == folder[part].image_ids and "val_99.JPEG" not in sets[part].image_ids
    np.testing.assert_array_equal(sets[part].labels, folder[part].labels)
    np.testing.assert_array_equal(sets[part].images, folder[part].images)


def test_no_empty_temporary_folders_are_left(tmp_path, monkeypatch):
  # TFDS makes an empty temporary folder (tmp*tfds) for each builder of a data set not yet prepared, and keeps it.
  scratch = tmp_path / "tmp"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  tfds_source.prepare_tiny_imagenet(_write_layout(tmp_path / "tiny-imagenet-200"), tmp_path / "d")
  with pytest.raises(FileNotFoundError):
    tfds_source.load_image_sets(_config(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="allow_download"):
    tfds_source.JsimTinyImagenet(data_dir=str(tmp_path / "e")).download_and_prepare(file_format="array_record")
  assert list(scratch.iterdir()) == []
