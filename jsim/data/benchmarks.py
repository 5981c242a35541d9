"""The metric-learning benchmarks by name: CUB-200-2011, Cars196, Stanford Online Products.

Each is read from its official archive layout, decoded once into the image cache
(the same decoder and cache as Tiny ImageNet), and split as the field does: the
first half of the classes are the seen (training) classes, the second half the
unseen ones (Reality Check, Musgrave et al. 2020; PML's datasets).

  cub200   CUB_200_2011.tgz -> CUB_200_2011/{images.txt, image_class_labels.txt, classes.txt,
           images/<class>/<file>.jpg}; 200 classes, 11,788 images; seen 1-100
  cars196  car_ims.tgz -> car_ims/<file>.jpg, with cars_annos.mat (struct 'annotations':
           relative_im_path, class; 'class_names'); 196 classes, 16,185 images; seen 1-98
  sop      Stanford_Online_Products.zip -> Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt
           ('image_id class_id super_class_id path'), <category>_final/<file>.JPG};
           22,634 classes, 120,053 images; seen: the 11,318 classes of Ebay_train.txt

data.benchmark_format='archive' (the default) reads the official files:
`data.root` is the unpacked folder, or a folder holding the official archive(s),
which are then unpacked once into the cache (`<cache>/extracted/`); with
data.root empty the archives are downloaded into `<cache>/downloads` and checked
against their md5. data.benchmark_format='tfds' reads TFDS's own builder of the
data set instead (caltech_birds2011, cars196, stanford_online_products), prepared
as array_record in data.tfds_data_dir: both of its splits, re-split by class as
below (classes in the ClassLabel's order, which is the official one; for SOP the
classes of TFDS's 'train' split are the seen ones).

The result has the two parts every stage reads: 'test' holds every image of the
unseen classes and a `data.seen_test_fraction` of each seen class (spread evenly
over its images, in file order), so that the five-case evaluation has seen test
images too; 'train' holds the other seen-class images (stage 1 splits them into
train and validation). Class ids are '<number>.<name>' with zero-padded numbers,
so sorted order is the official order and `data.seen_classes='first'` picks the
seen half.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import lzma
import tarfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
from absl import logging

from jsim.data import cache, download, tiny_imagenet
from jsim.data.dataset import ImageSet

FORMATS = ("archive", "tfds")  # data.benchmark_format: the official files, or TFDS's builder
# Bump when the index or the split of the parts changes.
_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Archive:
  filename: str
  url: str
  md5: str


@dataclasses.dataclass(frozen=True)
class Benchmark:
  name: str
  markers: tuple[str, ...]  # what identifies the unpacked layout, relative to its root
  archives: tuple[Archive, ...]
  read_index: Callable[[Path], list[tuple[str, str, bool]]]  # root -> [(relative image path, class id, seen)]
  tfds_name: str  # TFDS's builder of the same data set
  tfds_seen: str  # 'first_half' of the classes, or the classes of TFDS's 'train_split'

  def unpacked_at(self, root: Path) -> bool:
    return all((root / m).exists() for m in self.markers)


def _cub_index(root: Path) -> list[tuple[str, str, bool]]:
  base = root / "CUB_200_2011"
  names = dict(line.split(maxsplit=1) for line in _lines(base / "classes.txt"))
  paths = dict(line.split(maxsplit=1) for line in _lines(base / "images.txt"))
  out = []
  for line in _lines(base / "image_class_labels.txt"):
    image, number = line.split()
    if image not in paths or number not in names:
      raise ValueError(
        f"{base / 'image_class_labels.txt'}: image {image} or class {number} is not listed in images.txt / classes.txt"
      )
    k = int(number)
    out.append(
      (f"CUB_200_2011/images/{paths[image].strip()}", f"{k:03d}.{names[number].strip().split('.', 1)[-1]}", None)
    )
  return _first_half_seen(out)


def _cars_index(root: Path) -> list[tuple[str, str, bool]]:
  import scipy.io  # scipy ships with jax

  mat_path = root / "cars_annos.mat"
  try:
    mat = scipy.io.loadmat(mat_path, squeeze_me=True, struct_as_record=False)
    names = [str(n) for n in np.atleast_1d(mat["class_names"])]
    annotations = np.atleast_1d(mat["annotations"])
    out = []
    for a in annotations:
      k = int(a.__dict__["class"])
      out.append((str(a.relative_im_path), f"{k:03d}.{names[k - 1].replace('/', '-')}", None))
  except (OSError, KeyError, IndexError, ValueError, AttributeError, NotImplementedError) as e:
    raise ValueError(f"{mat_path}: not the Cars196 annotation file ({type(e).__name__}: {e})") from None
  return _first_half_seen(out)


def _sop_index(root: Path) -> list[tuple[str, str, bool]]:
  base = root / "Stanford_Online_Products"
  out = []
  for part, seen in (("train", True), ("test", False)):
    path = base / f"Ebay_{part}.txt"
    for n, line in enumerate(_lines(path)[1:], 2):  # a header line first
      fields = line.split()
      if len(fields) != 4:
        raise ValueError(f"{path} line {n}: expected 'image_id class_id super_class_id path', got {line[:80]!r}")
      out.append((f"Stanford_Online_Products/{fields[3]}", f"{int(fields[1]):05d}", seen))
  return out


def _lines(path: Path) -> list[str]:
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: not the official layout (see jsim.data.benchmarks)")
  return [line for line in path.read_text().splitlines() if line.strip()]


def _first_half_seen(index):
  classes = sorted({c for _, c, _ in index})
  seen = set(classes[: len(classes) // 2])
  return [(p, c, c in seen) for p, c, _ in index]


BENCHMARKS: dict[str, Benchmark] = {
  "cub200": Benchmark(
    "cub200",
    ("CUB_200_2011/images.txt",),
    (
      Archive(
        "CUB_200_2011.tgz",
        "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
        "97eceeb196236b17998738112f37df78",
      ),
    ),
    _cub_index,
    "caltech_birds2011",
    "first_half",
  ),
  "cars196": Benchmark(
    "cars196",
    ("cars_annos.mat", "car_ims"),
    (
      Archive("car_ims.tgz", "http://ai.stanford.edu/~jkrause/car196/car_ims.tgz", "d5c8f0aa497503f355e17dc7886c3f14"),
      Archive(
        "cars_annos.mat", "http://ai.stanford.edu/~jkrause/car196/cars_annos.mat", "b407c6086d669747186bd1d764ff9dbc"
      ),
    ),
    _cars_index,
    "cars196",
    "first_half",
  ),
  "sop": Benchmark(
    "sop",
    ("Stanford_Online_Products/Ebay_train.txt",),
    (
      Archive(
        "Stanford_Online_Products.zip",
        "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
        "7f73d41a2f44250d4779881525aea32e",
      ),
    ),
    _sop_index,
    "stanford_online_products",
    "train_split",
  ),
}


# ---------------------------------------------------------------------------
# Finding (unpacking, downloading) the layout.


def _unpack(archive: Path, dest: Path) -> None:
  if archive.suffix == ".mat":
    shutil.copy2(archive, dest / archive.name)
    return
  try:
    if zipfile.is_zipfile(archive):
      with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
          if name.startswith("/") or ".." in Path(name).parts:
            raise ValueError(f"{archive}: member {name!r} points outside the archive")
        zf.extractall(dest)
    else:
      with tarfile.open(archive) as tf:
        tf.extractall(dest, filter="data")  # refuses links and paths out of dest
  except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error, lzma.LZMAError) as e:
    # (EOFError: a cut .tgz/.tar.gz; zlib/lzma: damaged compressed data)
    hint = "; it is truncated or damaged: download it again" if isinstance(e, (EOFError, zlib.error)) else ""
    raise ValueError(f"{archive}: cannot unpack ({type(e).__name__}: {e}){hint}") from None


def locate(bench: Benchmark, data_config: Any) -> Path:
  """The folder holding the unpacked layout of `bench` (unpacking or downloading the archives once)."""
  root_cfg = _get(data_config, "root", "")
  cache_root = cache.resolve_cache_dir(_get(data_config, "cache_dir", ""))
  if root_cfg:
    root = Path(root_cfg).expanduser()
    if bench.unpacked_at(root):
      return root.resolve()
    if bench.unpacked_at(root.parent):  # root is the layout's top folder itself
      return root.parent.resolve()
    archives = [root / a.filename for a in bench.archives]
    missing = [a.name for a in archives if not a.is_file()]
    if missing:
      raise FileNotFoundError(
        f"data.root={root_cfg!r} holds neither the unpacked {bench.name} layout ({', '.join(bench.markers)}) "
        f"nor its archive(s) {', '.join(a.filename for a in bench.archives)} (missing: {', '.join(missing)})"
      )
  else:
    downloads = cache_root / "downloads"
    archives = []
    for a in bench.archives:
      try:
        archives.append(download.fetch(a.url, downloads / a.filename, md5=a.md5))
      except download.DownloadError:
        raise download.DownloadError(
          f"cannot download {a.url}: get {', '.join(x.filename for x in bench.archives)} another way and set "
          f"--config.data.root to the folder holding them (or copy them to {downloads})"
        ) from None
  stats = [[a.name, a.stat().st_size, a.stat().st_mtime_ns, str(a.resolve())] for a in archives]
  dest = cache_root / "extracted" / f"{bench.name}-{cache.digest([_VERSION, stats])[:16]}"
  if not bench.unpacked_at(dest):
    logging.info("Unpacking %s into %s (once)", ", ".join(str(a) for a in archives), dest)
    if dest.exists():
      shutil.rmtree(dest)
    with cache.atomic_dir(dest) as tmp:
      for a in archives:
        _unpack(a, tmp)
      if not bench.unpacked_at(tmp):
        raise ValueError(
          f"{', '.join(str(a) for a in archives)}: no {', '.join(bench.markers)} inside: not the "
          f"official {bench.name} archive"
        )
  return dest


def _get(obj: Any, name: str, default: Any) -> Any:
  """obj.name or obj[name] (ConfigDict or dict), else `default`."""
  return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


# ---------------------------------------------------------------------------
# Reading: index -> parts -> the shared decoder and cache.


class _Root:
  """An unpacked layout: what tiny_imagenet's decoder reads files from."""

  kind = "folder"

  def __init__(self, root: Path):
    self.root = root
    self.location = str(root)

  def describe(self, rel: str) -> str:
    return str(self.root / rel)

  def read(self, rel: str) -> bytes:
    return (self.root / rel).read_bytes()

  def open(self) -> Callable[[str], bytes]:
    return self.read


def parts_of(index: list[tuple[str, str, bool]], seen_test_fraction: float) -> dict[str, list[tuple[str, str]]]:
  """{'train': [(path, class)], 'test': [...]}: unseen classes to test, and a fraction of each seen class."""
  if not 0.0 <= seen_test_fraction < 1.0:
    raise ValueError(f"data.seen_test_fraction={seen_test_fraction!r} must be in [0, 1)")
  by_class: dict[str, list[str]] = {}
  seen_of: dict[str, bool] = {}
  for path, cls, seen in index:
    by_class.setdefault(cls, []).append(path)
    seen_of[cls] = seen
  parts = {"train": [], "test": []}
  for cls in sorted(by_class):
    files = sorted(by_class[cls])
    for k, path in enumerate(files):
      held_out = int((k + 1) * seen_test_fraction) > int(k * seen_test_fraction)
      parts["test" if (not seen_of[cls] or held_out) else "train"].append((path, cls))
  return parts


def load(name: str, data_config: Any) -> tuple[dict[str, ImageSet], dict[str, Any]]:
  """({'train': ImageSet, 'test': ImageSet}, report) of benchmark `name` (see the module doc)."""
  bench = BENCHMARKS[name]
  image_size = _get(data_config, "image_size", 224)
  on_bad_image = _get(data_config, "on_bad_image", "error")
  fraction = float(_get(data_config, "seen_test_fraction", 0.2))
  benchmark_format = _get(data_config, "benchmark_format", "archive")
  if benchmark_format not in FORMATS:
    raise ValueError(f"data.benchmark_format={benchmark_format!r}: expected one of {', '.join(FORMATS)}")
  if benchmark_format == "tfds":
    return _load_tfds(bench, data_config, image_size, on_bad_image, fraction)
  root = locate(bench, data_config)
  index = bench.read_index(root)
  if not index:
    raise ValueError(f"{root}: the {bench.name} annotations list no image")
  missing = [p for p, _, _ in index if not (root / p).is_file()]
  if missing and on_bad_image == "error":
    raise FileNotFoundError(
      f"{root / missing[0]} is listed in the annotations but missing ({len(missing)} "
      "missing in all); set --config.data.on_bad_image=skip to drop such files"
    )
  index = [row for row in index if (root / row[0]).is_file()]
  class_ids = tuple(sorted({c for _, c, _ in index}))
  parts = parts_of(index, fraction)
  listing = sorted((p, os.stat(root / p).st_size) for p, _, _ in index)
  source_id = cache.digest([cache.FORMAT_VERSION, _VERSION, bench.name, str(root), image_size, on_bad_image, fraction])
  path = cache.entry_dir(
    cache.resolve_cache_dir(_get(data_config, "cache_dir", "")), source_id, cache.digest([source_id, listing])
  )
  hit = cache.read_entry(path)
  if hit is not None:
    sets, meta = hit
    return sets, dict(meta, cache_hit=True, cache_path=str(path))
  label_of = {c: i for i, c in enumerate(class_ids)}
  idx = tiny_imagenet.Index(
    class_ids=class_ids,
    files={p: [f for f, _ in parts[p]] for p in tiny_imagenet.PARTS},
    labels={p: [label_of[c] for _, c in parts[p]] for p in tiny_imagenet.PARTS},
    image_ids={p: [f for f, _ in parts[p]] for p in tiny_imagenet.PARTS},
    skipped=[{"file": m, "reason": "listed but missing"} for m in missing],
    ignored=0,
  )
  if path.exists():
    shutil.rmtree(path)
  with cache.atomic_dir(path) as tmp:
    stats = tiny_imagenet.decode_all(
      _Root(root),
      idx,
      tmp,
      image_size=image_size,
      on_bad_image=on_bad_image,
      num_workers=_get(data_config, "num_workers", None) or os.cpu_count() or 1,
      chunk_size=256,
    )
    sets = {
      p: ImageSet(
        np.load(tmp / f"{p}_images.npy", mmap_mode="r"),
        np.asarray(idx.labels[p], np.int32),
        class_ids,
        tuple(idx.image_ids[p]),
      )
      for p in tiny_imagenet.PARTS
    }
    seen_classes = sorted({c for _, c, s in index if s})
    meta = {
      "source": bench.name,
      "location": str(root),
      "image_size": image_size,
      "num_classes": len(class_ids),
      "num_seen_classes": len(seen_classes),
      "num_images": {p: len(sets[p]) for p in sets},
      "seen_test_fraction": fraction,
      "num_skipped": len(idx.skipped),
      "skipped": idx.skipped,
      **stats,
    }
    cache.write_entry(tmp, sets, meta)
    del sets
  cache.remove_stale(path)
  sets, meta = cache.read_entry(path)
  logging.info(
    "%s from %s: %d train + %d test images, %d classes (%d seen)",
    bench.name,
    root,
    meta["num_images"]["train"],
    meta["num_images"]["test"],
    len(class_ids),
    meta["num_seen_classes"],
  )
  return sets, dict(meta, cache_hit=False, cache_path=str(path))


def _load_tfds(bench: Benchmark, data_config: Any, image_size: int, on_bad_image: str, fraction: float):
  """load() from TFDS's builder of `bench` (array_record): both splits, re-split by class as the archives are."""
  from jsim.data import tfds_source  # lazy: TFDS is heavy

  data_dir = _get(data_config, "tfds_data_dir", "") or None
  threads = _get(data_config, "num_workers", None) or os.cpu_count() or 1
  decoded, index, total = {}, [], 0
  for split in ("train", "test"):
    ts = tfds_source.open_tfds_split(bench.tfds_name, split, data_dir)
    total += len(ts)
    part = decoded[split] = tfds_source.read_image_set(ts, image_size, on_bad_image=on_bad_image, num_threads=threads)
    official = np.argsort(ts.label_map)  # position in the sorted names -> TFDS label, the official order
    width = max(3, len(str(len(official))))
    for i, (image_id, label) in enumerate(zip(part.image_ids, part.labels)):
      name = part.class_ids[label]
      number = int(official[label])
      cls = f"{number + 1:0{width}d}" + ("" if name == str(number) else "." + name.replace("/", "-"))
      index.append([image_id, cls, split == "train" if bench.tfds_seen == "train_split" else None, split, i])
  ids = [row[0] for row in index]
  if len(set(ids)) < len(ids):  # cars196's splits number their images alike
    for row in index:
      row[0] = f"{row[3]}/{row[0]}"
  where = {row[0]: (row[3], row[4]) for row in index}
  index = [tuple(row[:3]) for row in index]
  if bench.tfds_seen == "first_half":
    index = _first_half_seen(index)
  if not index:
    raise ValueError(f"TFDS data set {bench.tfds_name!r} in {data_dir or 'the default data dir'} holds no image")
  class_ids = tuple(sorted({c for _, c, _ in index}))
  label_of = {c: i for i, c in enumerate(class_ids)}
  sets = {}
  for p, rows in parts_of(index, fraction).items():
    images = np.empty((len(rows), image_size, image_size, 3), np.uint8)
    for j, (key, _) in enumerate(rows):
      split, i = where[key]
      images[j] = decoded[split].images[i]
    labels = np.asarray([label_of[c] for _, c in rows], np.int32)
    sets[p] = ImageSet(images, labels, class_ids, tuple(k for k, _ in rows))
  meta = {
    "source": bench.name,
    "location": f"tfds:{bench.tfds_name} in {data_dir or 'the default TFDS data dir'}",
    "image_size": image_size,
    "num_classes": len(class_ids),
    "num_seen_classes": len({c for _, c, s in index if s}),
    "num_images": {p: len(sets[p]) for p in sets},
    "seen_test_fraction": fraction,
    "num_skipped": total - len(index),
    "cache_hit": False,
  }
  logging.info(
    "%s from %s: %d train + %d test images", bench.name, meta["location"], len(sets["train"]), len(sets["test"])
  )
  return sets, meta
