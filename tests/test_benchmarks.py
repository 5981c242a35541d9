"""CUB-200-2011, Cars196 and SOP readers on small archives generated in the official layouts."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jsim import configs
from jsim.data import benchmarks, prepare, sources, tiny_imagenet

SIZES = [5, 4, 6, 3]  # images per class; classes 1-2 seen, 3-4 unseen


def _jpeg(seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  arr = rng.integers(0, 255, (30 + seed % 7, 40, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "JPEG")
  return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tf.addfile(info, io.BytesIO(data))


def make_cub(folder: Path) -> dict:
  files, n = {}, 0
  with tarfile.open(folder / "CUB_200_2011.tgz", "w:gz") as tf:
    classes, images, labels = [], [], []
    for c, size in enumerate(SIZES, 1):
      cname = f"{c:03d}.Bird_{c}"
      classes.append(f"{c} {cname}")
      for k in range(size):
        n += 1
        rel = f"{cname}/Bird_{c}_{k:04d}.jpg"
        data = _jpeg(n)
        _add(tf, f"CUB_200_2011/images/{rel}", data)
        images.append(f"{n} {rel}")
        labels.append(f"{n} {c}")
        files[f"CUB_200_2011/images/{rel}"] = (data, f"{c:03d}.Bird_{c}")
    for name, lines in (
      ("classes.txt", classes),
      ("images.txt", images),
      ("image_class_labels.txt", labels),
      ("train_test_split.txt", [f"{i} 1" for i in range(1, n + 1)]),
    ):
      _add(tf, f"CUB_200_2011/{name}", ("\n".join(lines) + "\n").encode())
  return files


def make_cars(folder: Path) -> dict:
  import scipy.io

  files, rows, n = {}, [], 0
  with tarfile.open(folder / "car_ims.tgz", "w:gz") as tf:
    for c, size in enumerate(SIZES, 1):
      for _ in range(size):
        n += 1
        rel = f"car_ims/{n:06d}.jpg"
        data = _jpeg(100 + n)
        _add(tf, rel, data)
        files[rel] = (data, f"{c:03d}.Make Model/{c}".replace("/", "-"))
        rows.append((rel, 1, 2, 30, 20, c, n % 2))
  dt = [
    ("relative_im_path", "O"),
    ("bbox_x1", "O"),
    ("bbox_y1", "O"),
    ("bbox_x2", "O"),
    ("bbox_y2", "O"),
    ("class", "O"),
    ("test", "O"),
  ]
  ann = np.array([tuple(r) for r in rows], dtype=dt)
  names = np.array([f"Make Model/{c}" for c in range(1, len(SIZES) + 1)], dtype=object)
  scipy.io.savemat(folder / "cars_annos.mat", {"annotations": ann[None, :], "class_names": names[None, :]})
  return files


def make_sop(folder: Path) -> dict:
  files, n = {}, 0
  lines = {"train": ["image_id class_id super_class_id path"], "test": ["image_id class_id super_class_id path"]}
  with zipfile.ZipFile(folder / "Stanford_Online_Products.zip", "w") as zf:
    for c, size in enumerate(SIZES, 1):
      part = "train" if c <= 2 else "test"
      for k in range(size):
        n += 1
        rel = f"bicycle_final/{c}_{k}.JPG"
        data = _jpeg(200 + n)
        zf.writestr(f"Stanford_Online_Products/{rel}", data)
        lines[part].append(f"{n} {c} 1 {rel}")
        files[f"Stanford_Online_Products/{rel}"] = (data, f"{c:05d}")
    for part in lines:
      zf.writestr(f"Stanford_Online_Products/Ebay_{part}.txt", "\n".join(lines[part]) + "\n")
  return files


MAKERS = {"cub200": make_cub, "cars196": make_cars, "sop": make_sop}


def _config(name, root, cache_dir, fraction=0.25):
  c = configs.base_config()
  c.data.source = name
  c.data.root = str(root)
  c.data.cache_dir = str(cache_dir)
  c.data.image_size = 16
  c.data.num_workers = 1
  c.data.seen_test_fraction = fraction
  c.data.seen_classes = "first"
  c.data.num_seen_classes = 2
  return c


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_reader_parts_labels_and_pixels(name, tmp_path):
  files = MAKERS[name](tmp_path)
  c = _config(name, tmp_path, tmp_path / "cache")
  sets = sources.load_image_sets(c.data)
  train, test = sets["train"], sets["test"]
  class_ids = sorted({cls for _, cls in files.values()})
  assert train.class_ids == test.class_ids == tuple(class_ids)
  # Seen classes 1-2 give 1 of every 4 images to test (5 -> 1, 4 -> 1); classes 3-4 go to test whole.
  assert np.bincount(train.labels, minlength=4).tolist() == [4, 3, 0, 0]
  assert np.bincount(test.labels, minlength=4).tolist() == [1, 1, 6, 3]
  for part in (train, test):
    for i in range(len(part)):
      data, cls = files[part.image_ids[i]]
      assert class_ids[part.labels[i]] == cls
      want, _, _ = tiny_imagenet.decode_image(data, 16)
      np.testing.assert_array_equal(part.images[i], want)
  # Read again: from the decoded cache, identical.
  again = sources.load_image_sets(c.data)
  np.testing.assert_array_equal(again["test"].images, test.images)


def test_split_takes_the_first_half_as_seen(tmp_path):
  make_cub(tmp_path)
  c = _config("cub200", tmp_path, tmp_path / "cache")
  data = prepare.prepare(c, tmp_path / "work")
  assert data.split.seen_classes == ("001.Bird_1", "002.Bird_2")
  assert data.split.unseen_classes == ("003.Bird_3", "004.Bird_4")
  assert len(data.train_idx) + len(data.val_idx) == 7
  seen_test = data.test_head_labels[data.test_idx] >= 0
  assert seen_test.sum() == 2 and (~seen_test).sum() == 9


def test_unpacked_folder_is_read_in_place(tmp_path):
  files = make_sop(tmp_path)
  with zipfile.ZipFile(tmp_path / "Stanford_Online_Products.zip") as zf:
    zf.extractall(tmp_path / "unpacked")
  for root in (tmp_path / "unpacked", tmp_path / "unpacked" / "Stanford_Online_Products"):
    c = _config("sop", root, tmp_path / "cache")
    assert benchmarks.locate(benchmarks.BENCHMARKS["sop"], c.data) == (tmp_path / "unpacked").resolve()
  sets = sources.load_image_sets(_config("sop", tmp_path / "unpacked", tmp_path / "cache").data)
  assert len(sets["train"]) + len(sets["test"]) == len(files)


def test_download_fetches_and_checks_the_archives(tmp_path, monkeypatch):
  src = tmp_path / "server"
  src.mkdir()
  make_cub(src)
  archive = src / "CUB_200_2011.tgz"
  md5 = hashlib.md5(archive.read_bytes()).hexdigest()
  bench = benchmarks.BENCHMARKS["cub200"]
  good = dataclasses.replace(bench, archives=(benchmarks.Archive(archive.name, archive.as_uri(), md5),))
  monkeypatch.setitem(benchmarks.BENCHMARKS, "cub200", good)
  c = _config("cub200", "", tmp_path / "cache")
  sets = sources.load_image_sets(c.data)
  assert len(sets["train"]) == 7
  assert (tmp_path / "cache" / "downloads" / archive.name).is_file()
  bad = dataclasses.replace(bench, archives=(benchmarks.Archive("other.tgz", archive.as_uri(), "0" * 32),))
  monkeypatch.setitem(benchmarks.BENCHMARKS, "cub200", bad)
  with pytest.raises(ValueError, match="has md5 .*expected 0000"):
    sources.load_image_sets(c.data)
  assert not (tmp_path / "cache" / "downloads" / "other.tgz").exists()


def test_clear_errors(tmp_path):
  c = _config("cars196", tmp_path, tmp_path / "cache")
  with pytest.raises(
    FileNotFoundError, match="neither the unpacked cars196 layout.*missing: car_ims.tgz, cars_annos.mat"
  ):
    sources.load_image_sets(c.data)
  make_cub(tmp_path)
  (tmp_path / "CUB_200_2011.tgz").write_bytes(b"not an archive")
  with pytest.raises(ValueError, match="CUB_200_2011.tgz: cannot unpack"):
    sources.load_image_sets(_config("cub200", tmp_path, tmp_path / "cache").data)
  with pytest.raises(ValueError, match="seen_test_fraction=1.0"):
    benchmarks.parts_of([("a", "x", True)], 1.0)


def make_tfds(name: str, files: dict, data_dir: Path) -> None:
  """Prepares TFDS's own builder of benchmark `name` (array_record) from the archive maker's images.

  The builder class is TFDS's (features, name, version), with only the example source
  replaced: TFDS's preparation downloads the archives. Every other image goes to 'test'
  (SOP: the unseen classes, as Ebay_test.txt), with ids numbered per split as TFDS's are.
  """
  import tensorflow_datasets as tfds

  tfds_name = benchmarks.BENCHMARKS[name].tfds_name
  real = tfds.builder_cls(tfds_name)
  rows = {"train": [], "test": []}
  for n, (path, (data, cls)) in enumerate(sorted(files.items())):
    label = int(cls.split(".")[0]) - 1
    split = ("train" if label < 2 else "test") if name == "sop" else ("test" if n % 2 else "train")
    k = len(rows[split])
    if name == "cub200":
      mask = io.BytesIO()
      Image.fromarray(np.zeros((4, 4), np.uint8)).save(mask, "PNG")
      bbox = tfds.features.BBox(0.0, 0.0, 1.0, 1.0)
      ex = {
        "image/filename": path,
        "label": label,
        "label_name": "bird",
        "bbox": bbox,
        "segmentation_mask": mask.getvalue(),
      }
    elif name == "cars196":
      ex = {"label": label, "bbox": tfds.features.BBox(0.0, 0.0, 1.0, 1.0), "id": f"{k + 1:05d}"}
    else:
      ex = {"class_id": label, "super_class_id/num": 0, "super_class_id": 0}
    rows[split].append((f"{split}{k}", dict(ex, image=data)))

  def split_generators(self, dl_manager):
    return {split: iter(examples) for split, examples in rows.items()}

  camel = "".join(w.title() for w in tfds_name.split("_"))
  fake = type(camel, (real,), {"name": tfds_name, "_split_generators": split_generators}, skip_registration=True)
  fake(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_tfds_builders_give_the_archives_split(name, tmp_path):
  """TFDS's builder, re-split by class, holds the archive's classes, seen half and images."""
  files = MAKERS[name](tmp_path)
  make_tfds(name, files, tmp_path / "tfds")
  archive = sources.load_image_sets(_config(name, tmp_path, tmp_path / "cache").data)
  c = _config(name, "", tmp_path / "cache")
  c.data.benchmark_format, c.data.tfds_data_dir = "tfds", str(tmp_path / "tfds")
  sets, report = sources.load_image_sets_and_report(c.data)
  assert report["num_seen_classes"] == 2 and report["num_skipped"] == 0
  number = lambda ids: [i.split(".")[0] for i in ids]  # TFDS names classes its own way (cub: unnamed)
  assert number(sets["train"].class_ids) == number(archive["train"].class_ids)
  assert len(sets["train"].class_ids) == 4
  for part in ("train", "test"):
    assert (
      np.bincount(sets[part].labels, minlength=4).tolist() == np.bincount(archive[part].labels, minlength=4).tolist()
    )
  # Per class, the same images (the held-out ones may differ: TFDS numbers cars196's files and shuffles SOP's).
  digest = lambda s, i: hashlib.sha1(np.ascontiguousarray(s.images[i])).hexdigest()
  for label in range(4):
    got = sorted(digest(s, i) for s in sets.values() for i in np.flatnonzero(s.labels == label))
    want = sorted(digest(s, i) for s in archive.values() for i in np.flatnonzero(s.labels == label))
    assert got == want and got
  if name == "cub200":  # its file names keep the archive's order: the same held-out images
    assert sorted(digest(sets["test"], i) for i in range(len(sets["test"]))) == sorted(
      digest(archive["test"], i) for i in range(len(archive["test"]))
    )


def test_a_truncated_benchmark_archive_is_one_line_naming_it(tmp_path):
  make_cub(tmp_path)
  archive = tmp_path / "CUB_200_2011.tgz"
  archive.write_bytes(archive.read_bytes()[: archive.stat().st_size * 2 // 3])
  with pytest.raises(ValueError, match=f"^{archive}: cannot unpack .*truncated or damaged: download it again$"):
    sources.load_image_sets(_config("cub200", tmp_path, tmp_path / "cache").data)
  assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and "extracted" in p.parts]
