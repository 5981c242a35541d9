"""Folder, zip, download and synthetic sources of Tiny ImageNet, and their decoded cache.

The data are real JPEGs in the official layout (written by the synthetic
generator or by hand with PIL). Every expectation is computed from the files
with PIL and the layout's rules (classes = sorted wnids.txt; train ordered by
class then file name; val by file name, labelled by val_annotations.txt),
independently of the reader.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import socket
import sys
import threading
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jsim.data import download, sources, synthetic, tiny_imagenet
from jsim.data.dataset import ImageSet

NUM_CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 6, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
  """A small data set in the official layout, a quarter of it grayscale JPEGs."""
  root = tmp_path_factory.mktemp("data") / "tiny-imagenet-200"
  return synthetic.write_synthetic_tiny_imagenet(
    root, NUM_CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, seed=3, grayscale_fraction=0.25
  )


@pytest.fixture
def copy(dataset, tmp_path) -> Path:
  """A private copy of the data set, for tests that damage it."""
  return Path(shutil.copytree(dataset, tmp_path / "tiny-imagenet-200"))


def _load(root, cache_dir, **kw):
  kw.setdefault("num_workers", 1)
  return tiny_imagenet.load_folder(root, cache_dir=cache_dir, **kw)


def _pil_rgb(path: Path, size: int = 64) -> np.ndarray:
  with Image.open(path) as im:
    im = im.convert("RGB")
    if im.size != (size, size):
      im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im)


def _expected(root: Path):
  """{part: [(path, label, image_id)]} from the layout's rules."""
  wnids = sorted(w for w in (root / "wnids.txt").read_text().split())
  train = [
    (root / "train" / w / "images" / f, wnids.index(w), f)
    for w in wnids
    for f in sorted(p.name for p in (root / "train" / w / "images").iterdir())
  ]
  ann = dict(line.split("\t")[:2] for line in (root / "val" / "val_annotations.txt").read_text().splitlines())
  test = [(root / "val" / "images" / f, wnids.index(ann[f]), f) for f in sorted(ann)]
  return wnids, {"train": train, "test": test}


def _assert_same(a: dict[str, ImageSet], b: dict[str, ImageSet]):
  for part in ("train", "test"):
    assert a[part].class_ids == b[part].class_ids
    assert a[part].image_ids == b[part].image_ids
    np.testing.assert_array_equal(a[part].labels, b[part].labels)
    np.testing.assert_array_equal(a[part].images, b[part].images)


def _rewrite_image(path: Path, colour):
  Image.new("RGB", (64, 64), colour).save(path, format="JPEG", quality=90)
  st = path.stat()
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a visible change even on coarse clocks


# ---------------------------------------------------------------------------
# The folder reader


def test_folder_matches_layout_rules_and_pil(dataset, tmp_path):
  sets, report = _load(dataset, tmp_path / "cache")
  wnids, expected = _expected(dataset)
  assert set(sets) == {"train", "test"}
  gray = 0
  for part, items in expected.items():
    s = sets[part]
    assert s.class_ids == tuple(wnids)
    assert s.image_ids == tuple(i for _, _, i in items)
    np.testing.assert_array_equal(s.labels, [label for _, label, _ in items])
    assert s.images.shape == (len(items), 64, 64, 3) and s.images.dtype == np.uint8
    for k, (path, _, _) in enumerate(items):
      np.testing.assert_array_equal(s.images[k], _pil_rgb(path))
      with Image.open(path) as im:
        if im.mode == "L":
          gray += 1
          assert (s.images[k][..., 0] == s.images[k][..., 2]).all()
  assert len(sets["train"]) == NUM_CLASSES * TRAIN_PER_CLASS
  assert len(sets["test"]) == NUM_CLASSES * TEST_PER_CLASS
  # Train ids name their class folder: the label is never taken from elsewhere.
  s = sets["train"]
  assert all(i.split("_")[0] == s.class_ids[l] for i, l in zip(s.image_ids, s.labels))
  assert gray == round(0.25 * len(sets["train"])) + round(0.25 * len(sets["test"])) > 0
  assert report["converted_modes"] == {"L": gray}
  assert report["num_skipped"] == 0 and report["num_classes"] == NUM_CLASSES
  assert report["num_images"] == {"train": NUM_CLASSES * TRAIN_PER_CLASS, "test": NUM_CLASSES * TEST_PER_CLASS}


def test_folder_above_tiny_imagenet_200_is_accepted(dataset, tmp_path):
  a, _ = _load(dataset, tmp_path / "c1")
  b, _ = _load(dataset.parent, tmp_path / "c2")
  _assert_same(a, b)


def test_cmyk_palette_and_other_sizes_become_rgb_at_image_size(copy, tmp_path):
  rng = np.random.default_rng(0)
  w = sorted((copy / "wnids.txt").read_text().split())[0]
  img_dir = copy / "train" / w / "images"
  cmyk = img_dir / f"{w}_0.JPEG"
  Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), "CMYK").save(cmyk, format="JPEG")
  small = img_dir / f"{w}_1.JPEG"
  Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(small, format="JPEG")
  png = img_dir / f"{w}_2.JPEG"  # a PNG under a .JPEG name, palette mode: decoded by content
  Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).convert("P").save(png, format="PNG")
  sets, report = _load(copy, tmp_path / "cache")
  ids = sets["train"].image_ids
  for path in (cmyk, small, png):
    np.testing.assert_array_equal(sets["train"].images[ids.index(path.name)], _pil_rgb(path))
  assert report["converted_modes"]["CMYK"] == 1 and report["converted_modes"]["P"] == 1
  assert report["num_resized"] == 1

  sets32, report32 = _load(copy, tmp_path / "cache", image_size=32)
  assert sets32["test"].images.shape[1:] == (32, 32, 3)
  assert report32["num_resized"] == len(sets32["train"]) + len(sets32["test"])
  path = copy / "val" / "images" / sets32["test"].image_ids[0]
  np.testing.assert_array_equal(sets32["test"].images[0], _pil_rgb(path, 32))


def test_corrupt_images_error_names_the_file_or_are_skipped_and_counted(tmp_path):
  root = synthetic.write_synthetic_tiny_imagenet(tmp_path / "d", 3, 5, 2, seed=1, corrupt_files=2)
  corrupt = json.loads((root / synthetic.INFO_FILE).read_text())["corrupt_files"]
  assert len(corrupt) == 2
  with pytest.raises(ValueError, match="on_bad_image=skip") as e:
    _load(root, tmp_path / "cache")
  msg = str(e.value)
  assert str(root / sorted(corrupt)[0]) in msg and "\n" not in msg  # the first bad file in reading order
  assert not list((tmp_path / "cache" / "decoded").iterdir())  # nothing half-written left behind

  sets, report = _load(root, tmp_path / "cache", on_bad_image="skip")
  assert report["num_skipped"] == 2
  assert sorted(s["file"] for s in report["skipped"]) == sorted(corrupt)
  names = {Path(c).name for c in corrupt}
  assert len(sets["train"]) == 3 * 5 - 2 and not names & set(sets["train"].image_ids)
  for k, image_id in enumerate(sets["train"].image_ids):  # the rows stay aligned with ids and labels
    w = sets["train"].class_ids[sets["train"].labels[k]]
    np.testing.assert_array_equal(sets["train"].images[k], _pil_rgb(root / "train" / w / "images" / image_id))
  # The count survives a cache hit.
  _, again = _load(root, tmp_path / "cache", on_bad_image="skip")
  assert again["cache_hit"] and again["num_skipped"] == 2


def _drop_annotation(root: Path) -> str:
  lines = (root / "val" / "val_annotations.txt").read_text().splitlines(keepends=True)
  (root / "val" / "val_annotations.txt").write_text("".join(lines[1:]))
  return lines[0].split("\t")[0]


def test_val_image_without_annotation(copy, tmp_path):
  name = _drop_annotation(copy)
  with pytest.raises(ValueError, match=f"{name} has no line in val/val_annotations.txt"):
    _load(copy, tmp_path / "cache")
  sets, report = _load(copy, tmp_path / "cache", on_bad_image="skip")
  assert name not in sets["test"].image_ids and len(sets["test"]) == NUM_CLASSES * TEST_PER_CLASS - 1
  assert report["num_skipped"] == 1 and report["skipped"][0]["file"] == f"val/images/{name}"


def test_annotation_with_unknown_class_or_missing_file(copy, tmp_path):
  ann = copy / "val" / "val_annotations.txt"
  lines = ann.read_text().splitlines(keepends=True)
  name = lines[0].split("\t")[0]
  ann.write_text(lines[0].replace("\tn9", "\tn8", 1) + "".join(lines[1:]))
  with pytest.raises(ValueError, match=f"line 1: {name} has class n8\\d+, which is not in wnids.txt"):
    _load(copy, tmp_path / "cache")
  sets, report = _load(copy, tmp_path / "cache", on_bad_image="skip")
  assert name not in sets["test"].image_ids and report["num_skipped"] == 1  # counted once, not twice

  ann.write_text("".join(lines) + "val_999.JPEG\tn90000000\t0\t0\t1\t1\n")
  with pytest.raises(ValueError, match="names val_999.JPEG, which is not in"):
    _load(copy, tmp_path / "cache")


def test_train_folder_not_in_wnids(copy, tmp_path):
  wnids = (copy / "wnids.txt").read_text().split()
  (copy / "wnids.txt").write_text("\n".join(wnids[1:]) + "\n")
  first = sorted((copy / "train" / wnids[0] / "images").iterdir())[0]
  with pytest.raises(ValueError, match=f"its class folder {wnids[0]} is not in wnids.txt") as e:
    _load(copy, tmp_path / "cache")
  assert str(copy / "train" / wnids[0] / "images") in str(e.value)
  # The val images of that class lose their class too: skip drops both, labels stay right.
  sets, report = _load(copy, tmp_path / "cache", on_bad_image="skip")
  assert sets["train"].class_ids == tuple(sorted(wnids[1:]))
  assert first.name not in sets["train"].image_ids
  assert report["num_skipped"] == TRAIN_PER_CLASS + TEST_PER_CLASS
  assert len(sets["train"]) == (NUM_CLASSES - 1) * TRAIN_PER_CLASS


def test_class_without_train_images_is_an_error(copy, tmp_path):
  (copy / "wnids.txt").write_text((copy / "wnids.txt").read_text() + "n99999999\n")
  with pytest.raises(ValueError, match="no images of 1 of the 5 classes .*n99999999"):
    _load(copy, tmp_path / "cache", on_bad_image="skip")


def test_missing_folder_says_which_key_to_set(tmp_path):
  with pytest.raises(FileNotFoundError, match="--config.data.root="):
    _load(tmp_path / "nowhere", tmp_path / "cache")
  with pytest.raises(FileNotFoundError, match="--config.data.zip_path="):
    tiny_imagenet.load_zip(tmp_path / "nowhere.zip", cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------
# The zip reader


def _zip_folder(root: Path, zip_path: Path, prefix: str = "tiny-imagenet-200/") -> Path:
  with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
    for p in sorted(root.rglob("*")):
      zf.write(p, prefix + p.relative_to(root).as_posix())
  return zip_path


@pytest.mark.parametrize("prefix", ["tiny-imagenet-200/", ""])
def test_zip_equals_folder(dataset, tmp_path, prefix):
  zip_path = _zip_folder(dataset, tmp_path / "tiny-imagenet-200.zip", prefix)
  folder, _ = _load(dataset, tmp_path / "c1")
  # Several processes with small chunks, so the parallel path is the one compared.
  zipped, report = tiny_imagenet.load_zip(zip_path, cache_dir=tmp_path / "c2", num_workers=2, chunk_size=5)
  assert report["workers"] == 2 and report["source"] == "zip"
  _assert_same(folder, zipped)


def test_stray_and_hidden_files_are_left_out_alike(copy, tmp_path):
  w = sorted((copy / "wnids.txt").read_text().split())[0]
  (copy / "train" / w / "images" / "notes.txt").write_text("not an image")
  (copy / "train" / w / "images" / f"._{w}_0.JPEG").write_bytes(b"macOS resource fork")
  (copy / "val" / "images" / ".DS_Store").write_bytes(b"\0")
  (copy / "test" / "images").mkdir(parents=True)  # the unlabelled test folder is not read
  (copy / "test" / "images" / "test_0.JPEG").write_bytes(b"broken")
  folder, report = _load(copy, tmp_path / "c1")
  assert report["ignored_files"] == 1 and report["num_skipped"] == 0
  assert len(folder["train"]) == NUM_CLASSES * TRAIN_PER_CLASS
  zipped, report = tiny_imagenet.load_zip(
    _zip_folder(copy, tmp_path / "t.zip"), cache_dir=tmp_path / "c2", num_workers=1
  )
  assert report["ignored_files"] == 1
  _assert_same(folder, zipped)


def test_parallel_decoding_equals_serial(dataset, tmp_path):
  a, _ = _load(dataset, tmp_path / "c1")
  b, report = _load(dataset, tmp_path / "c2", num_workers=2, chunk_size=4)
  assert report["workers"] == 2
  _assert_same(a, b)


# ---------------------------------------------------------------------------
# The cache


def test_cache_hit_reads_without_decoding(copy, tmp_path, monkeypatch):
  first, r1 = _load(copy, tmp_path / "cache")
  assert not r1["cache_hit"]

  def no_decoding(*args, **kwargs):
    raise AssertionError("decoded again despite the cache")

  monkeypatch.setattr(tiny_imagenet, "decode_image", no_decoding)
  second, r2 = _load(copy, tmp_path / "cache")
  assert r2["cache_hit"] and r2["cache_path"] == r1["cache_path"]
  _assert_same(first, second)


def test_changed_added_or_removed_file_invalidates_the_cache(copy, tmp_path):
  cache_dir = tmp_path / "cache"
  first, r1 = _load(copy, cache_dir)
  image_id = first["test"].image_ids[2]
  _rewrite_image(copy / "val" / "images" / image_id, (255, 0, 0))
  second, r2 = _load(copy, cache_dir)
  assert not r2["cache_hit"] and r2["cache_path"] != r1["cache_path"]
  np.testing.assert_array_equal(second["test"].images[2], _pil_rgb(copy / "val" / "images" / image_id))
  assert not np.array_equal(second["test"].images[2], first["test"].images[2])
  # The outdated entry of the same source is removed; the new one is what is read.
  entries = list((cache_dir / "decoded").iterdir())
  assert [e.name for e in entries] == [Path(r2["cache_path"]).name]

  w = second["train"].class_ids[0]
  shutil.copy(copy / "train" / w / "images" / f"{w}_0.JPEG", copy / "train" / w / "images" / f"{w}_99.JPEG")
  third, r3 = _load(copy, cache_dir)
  assert not r3["cache_hit"] and len(third["train"]) == len(second["train"]) + 1
  (copy / "train" / w / "images" / f"{w}_99.JPEG").unlink()
  fourth, r4 = _load(copy, cache_dir)
  assert not r4["cache_hit"] and len(fourth["train"]) == len(second["train"])


def test_decoding_options_have_their_own_entries(dataset, tmp_path):
  cache_dir = tmp_path / "cache"
  _load(dataset, cache_dir)
  _, r = _load(dataset, cache_dir, image_size=32)
  assert not r["cache_hit"]
  _, r = _load(dataset, cache_dir, on_bad_image="skip")
  assert not r["cache_hit"]
  assert len(list((cache_dir / "decoded").iterdir())) == 3
  _, r = _load(dataset, cache_dir)
  assert r["cache_hit"]


def test_damaged_cache_entry_is_rebuilt(dataset, tmp_path):
  first, r1 = _load(dataset, tmp_path / "cache")
  (Path(r1["cache_path"]) / "train_labels.npy").write_bytes(b"garbage")
  second, r2 = _load(dataset, tmp_path / "cache")
  assert not r2["cache_hit"]
  _assert_same(first, second)


def test_bad_options(dataset, tmp_path):
  with pytest.raises(ValueError, match="on_bad_image='ignore'"):
    _load(dataset, tmp_path, on_bad_image="ignore")
  with pytest.raises(ValueError, match="image_size=0"):
    _load(dataset, tmp_path, image_size=0)


# ---------------------------------------------------------------------------
# Download


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


@pytest.fixture
def http_dir(tmp_path):
  """(folder served over HTTP on 127.0.0.1, base URL)."""
  served = tmp_path / "served"
  served.mkdir()
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
  thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
  thread.start()
  yield served, f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_download_verifies_checksums_and_shows_progress(dataset, http_dir, tmp_path, capsys):
  served, url = http_dir
  zip_path = _zip_folder(dataset, served / "tiny-imagenet-200.zip")
  data = zip_path.read_bytes()
  md5, sha = hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()
  dest = tmp_path / "dl" / "tiny-imagenet-200.zip"
  assert download.fetch(f"{url}/tiny-imagenet-200.zip", dest, md5=md5, sha256=sha) == dest
  assert dest.read_bytes() == data and not dest.with_name(dest.name + ".part").exists()
  err = capsys.readouterr().err
  assert "Downloading tiny-imagenet-200.zip" in err and "100%" in err
  # A verified file in place is used again without a download.
  zip_path.unlink()
  assert download.fetch(f"{url}/tiny-imagenet-200.zip", dest, md5=md5) == dest


def test_download_with_wrong_checksum_leaves_nothing(dataset, http_dir, tmp_path):
  served, url = http_dir
  _zip_folder(dataset, served / "tiny-imagenet-200.zip")
  dest = tmp_path / "dl" / "tiny-imagenet-200.zip"
  with pytest.raises(ValueError, match=f"has md5 [0-9a-f]{{32}}, expected {'0' * 32} .*removed"):
    download.fetch(f"{url}/tiny-imagenet-200.zip", dest, md5="0" * 32)
  assert not dest.exists() and list(dest.parent.iterdir()) == []
  with pytest.raises(ValueError, match="sha256"):
    download.fetch(f"{url}/tiny-imagenet-200.zip", dest, sha256="f" * 64)
  assert list(dest.parent.iterdir()) == []
  # A file already at the destination is checked too, and not silently replaced.
  dest.write_bytes(b"not the archive")
  with pytest.raises(ValueError, match=f"{dest} has md5"):
    download.fetch(f"{url}/tiny-imagenet-200.zip", dest, md5="0" * 32)


def test_download_without_checksum_checks_the_zip(dataset, http_dir, tmp_path):
  served, url = http_dir
  _zip_folder(dataset, served / "good.zip")
  (served / "bad.zip").write_bytes(b"<html>a captive portal page</html>")
  assert download.fetch(f"{url}/good.zip", tmp_path / "good.zip").exists()
  with pytest.raises(ValueError, match="not a zip file"):
    download.fetch(f"{url}/bad.zip", tmp_path / "bad.zip")
  assert not (tmp_path / "bad.zip").exists()


def test_no_network_gives_one_clear_message(tmp_path):
  url = f"http://127.0.0.1:{_closed_port()}/tiny-imagenet-200.zip"
  cfg = sources.default_data_config()
  cfg.source, cfg.download_url, cfg.cache_dir = "download", url, str(tmp_path / "cache")
  with pytest.raises(download.DownloadError) as e:
    sources.load_image_sets(cfg)
  msg = str(e.value)
  assert "\n" not in msg and url in msg
  for key in (
    "--config.data.source=folder",
    "--config.data.root=",
    "--config.data.zip_path=",
    str(tmp_path / "cache" / "downloads" / "tiny-imagenet-200.zip"),
  ):
    assert key in msg
  assert e.value.__cause__ is None and e.value.__suppress_context__
  assert not (tmp_path / "cache" / "downloads" / "tiny-imagenet-200.zip").exists()


def test_download_source_equals_folder(dataset, http_dir, tmp_path):
  served, url = http_dir
  data = _zip_folder(dataset, served / "tiny-imagenet-200.zip").read_bytes()
  cfg = sources.default_data_config()
  cfg.source, cfg.download_url = "download", f"{url}/tiny-imagenet-200.zip"
  cfg.download_md5, cfg.cache_dir, cfg.num_workers = hashlib.md5(data).hexdigest(), str(tmp_path / "c"), 1
  folder, _ = _load(dataset, tmp_path / "c1")
  _assert_same(folder, sources.load_image_sets(cfg))
  assert (tmp_path / "c" / "downloads" / "tiny-imagenet-200.zip").read_bytes() == data


# ---------------------------------------------------------------------------
# sources: the config and dispatch


def test_default_config_fields():
  cfg = sources.default_data_config()
  assert cfg.source == "folder" and cfg.on_bad_image == "error" and cfg.image_size == 64
  assert cfg.download_url == "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
  assert cfg.download_md5 == "90528d7ca1a48142e341f4ef8d21d0de"
  assert cfg.num_workers is None and cfg.cache_dir == ""
  assert (cfg.tfds_train_split, cfg.tfds_test_split) == ("train", "test")
  assert set(cfg.synthetic.keys()) == {
    "num_classes",
    "train_per_class",
    "test_per_class",
    "image_size",
    "seed",
    "grayscale_fraction",
  }
  with pytest.raises(ValueError, match="data.source='nope'"):
    cfg.source = "nope"
    sources.load_image_sets(cfg)


def test_folder_and_zip_sources(dataset, tmp_path):
  cfg = sources.default_data_config()
  cfg.root, cfg.cache_dir, cfg.num_workers = str(dataset), str(tmp_path / "c"), 1
  folder = sources.load_image_sets(cfg)
  cfg.source, cfg.zip_path = "zip", str(_zip_folder(dataset, tmp_path / "t.zip"))
  _assert_same(folder, sources.load_image_sets(cfg))
  # data.source='auto' picks the folder (root set) or the zip (only zip_path set).
  cfg.source = "auto"
  _assert_same(folder, sources.load_image_sets(cfg))
  cfg.root = ""
  _assert_same(folder, sources.load_image_sets(cfg))


def test_cache_dir_defaults_to_env(dataset, tmp_path, monkeypatch):
  monkeypatch.setenv("JSIM_CACHE", str(tmp_path / "env-cache"))
  cfg = sources.default_data_config()
  cfg.root, cfg.num_workers = str(dataset), 1
  _, report = sources.load_image_sets_and_report(cfg)
  assert report["cache_path"].startswith(str(tmp_path / "env-cache" / "decoded"))


def test_synthetic_source_generates_once_and_reads_through_the_folder_reader(tmp_path, monkeypatch):
  cfg = sources.default_data_config()
  cfg.source, cfg.cache_dir, cfg.num_workers = "synthetic", str(tmp_path / "c"), 1
  cfg.synthetic.update(num_classes=3, train_per_class=4, test_per_class=2, seed=5, grayscale_fraction=0.5)
  sets, report = sources.load_image_sets_and_report(cfg)
  root = sources.synthetic_root(cfg)
  assert root.parent == tmp_path / "c" and root.name.startswith("synthetic-")
  assert report["source"] == "folder" and report["location"] == str(root.resolve())
  assert [len(sets["train"]), len(sets["test"])] == [12, 6] and report["converted_modes"] == {"L": 9}
  expected = synthetic.write_synthetic_tiny_imagenet(tmp_path / "ref", 3, 4, 2, seed=5, grayscale_fraction=0.5)
  _assert_same(sets, _load(expected, tmp_path / "c2")[0])
  # Second time: no generation, no decoding.
  monkeypatch.setattr(synthetic, "write_synthetic_tiny_imagenet", None)
  again, report = sources.load_image_sets_and_report(cfg)
  assert report["cache_hit"]
  # Other parameters, other folder.
  cfg.synthetic.seed = 6
  assert sources.synthetic_root(cfg) != root


def test_tfds_source_is_delegated(monkeypatch):
  calls = []
  fake = types.ModuleType("jsim.data.tfds_source")
  sets = {
    p: ImageSet(np.zeros((1, 64, 64, 3), np.uint8), np.zeros(1, np.int32), ("a",), ("x",)) for p in ("train", "test")
  }
  fake.load_image_sets = lambda c: calls.append(c) or sets
  monkeypatch.setitem(sys.modules, "jsim.data.tfds_source", fake)
  import jsim.data

  monkeypatch.setattr(jsim.data, "tfds_source", fake, raising=False)
  cfg = sources.default_data_config()
  cfg.source = "tfds"
  assert sources.load_image_sets(cfg) is sets and calls == [cfg]
