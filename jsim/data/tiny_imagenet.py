"""Reads Tiny ImageNet (tiny-imagenet-200) from its folder or its zip, decoded once into a cache.

The official layout (the zip holds the same under `tiny-imagenet-200/`):

  wnids.txt                                   the 200 class ids (WordNet ids)
  train/<wnid>/images/<wnid>_<k>.JPEG         500 per class
  val/images/val_<k>.JPEG                     10,000, labelled by
  val/val_annotations.txt                     file <TAB> wnid <TAB> x0 y0 x1 y1
  test/                                       unlabelled: ignored

The result has two parts: 'train' (the train folder) and 'test' (the val
folder, the protocol's test data). Class ids are the sorted wnids of wnids.txt;
train images are ordered by (class, file name), test images by file name; image
ids are the file names. Both sources give identical arrays.

Images are decoded in parallel processes straight into the cache's memory-mapped
arrays, so decoding happens once per source; grayscale, CMYK and other modes are
converted to RGB and other sizes resized (PIL bilinear). Problems (an image that
does not decode, a train folder or annotation whose class is not in wnids.txt,
a val image without annotation, an annotation of a missing file) either raise
a one-line error naming the file (on_bad_image='error') or drop the file and
count it in the load report (on_bad_image='skip'); a label is never guessed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import multiprocessing
import os
import shutil
import time
import zipfile
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import PIL
from absl import logging
from PIL import Image, UnidentifiedImageError

from jsim import progress
from jsim.data import cache
from jsim.data.dataset import ImageSet

PARTS = ("train", "test")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp")
ON_BAD_IMAGE = ("error", "skip")
_FOLDER_NAME = "tiny-imagenet-200"
_SKIP_HINT = "set --config.data.on_bad_image=skip to drop such files"


# ---------------------------------------------------------------------------
# Decoding


def to_rgb(im: Image.Image, image_size: int | None) -> np.ndarray:
  """uint8 RGB [image_size, image_size, 3] of a PIL image: what every image goes through.

  convert('RGB') (gray replicated, alpha dropped, 'CMYK', 'P', ... converted), then a PIL
  bilinear resize (antialiased when shrinking, no crop) when the size differs;
  image_size None keeps the size.
  """
  if im.mode != "RGB":
    im = im.convert("RGB")
  if image_size is not None and im.size != (image_size, image_size):
    im = im.resize((image_size, image_size), Image.BILINEAR)
  return np.asarray(im, dtype=np.uint8)


def decode_image(data: bytes | np.ndarray, image_size: int | None = 64) -> tuple[np.ndarray, str, bool]:
  """Decodes encoded image bytes (or takes a decoded uint8 array) to uint8 RGB [image_size, image_size, 3].

  The one decoder of jsim (folder, zip, TFDS and streamed records, predict): see to_rgb.
  Returns (image, the original PIL mode, whether it was resized). Raises whatever PIL
  raises for data that is not a complete image (PIL refuses truncated files by default).
  """
  if isinstance(data, np.ndarray):
    if data.dtype != np.uint8:
      raise ValueError(f"expected a uint8 image, got {data.dtype}")
    data = data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data
    im = Image.fromarray(data)
  else:
    im = Image.open(io.BytesIO(bytes(data)))
  with im:
    im.load()
    resized = image_size is not None and im.size != (image_size, image_size)
    return to_rgb(im, image_size), im.mode, resized


# ---------------------------------------------------------------------------
# Sources: a listing of the relevant files and a way to read them.


def open_layout(path: str | os.PathLike) -> "Folder | Zip":
  """The tiny-imagenet-200 layout at `path`: its folder (or one holding it), its zip, or a folder holding the zip."""
  path = Path(path).expanduser()
  if path.is_file():
    return Zip(path)
  if path.is_dir() and not any((p / "wnids.txt").is_file() for p in (path, path / _FOLDER_NAME)):
    zips = [z for z in [path / f"{_FOLDER_NAME}.zip"] + sorted(path.glob("*.zip")) if z.is_file()]
    if zips:
      return Zip(zips[0])
  return Folder(path)


class Folder:
  """An unpacked tiny-imagenet-200 folder."""

  kind = "folder"

  def __init__(self, root: str | os.PathLike):
    given, root = root, Path(root).expanduser()
    if not (root / "wnids.txt").is_file() and (root / _FOLDER_NAME / "wnids.txt").is_file():
      root = root / _FOLDER_NAME  # the folder that holds tiny-imagenet-200/ is fine too
    if not (root / "wnids.txt").is_file():
      raise FileNotFoundError(
        f"data.root={str(given)!r} is not a tiny-imagenet-200 folder (no wnids.txt there): set "
        "--config.data.root=/path/to/tiny-imagenet-200, or use --config.data.source=zip with "
        "--config.data.zip_path=..., source=download, or source=synthetic for a demo"
      )
    self.root = root.resolve()
    self.location = str(self.root)

  def listing(self) -> dict[str, tuple[int, ...]]:
    """Relative path -> (size, mtime_ns) of every file the reader may use."""
    out = {}

    def add(rel: str, path: Path):
      st = path.stat()
      out[rel] = (st.st_size, st.st_mtime_ns)

    def add_dir(rel_dir: str, path: Path):
      with os.scandir(path) as it:
        for e in it:
          if e.is_file() and not e.name.startswith("."):
            st = e.stat()
            out[f"{rel_dir}/{e.name}"] = (st.st_size, st.st_mtime_ns)

    add("wnids.txt", self.root / "wnids.txt")
    ann = self.root / "val" / "val_annotations.txt"
    if ann.is_file():
      add("val/val_annotations.txt", ann)
    if (self.root / "val" / "images").is_dir():
      add_dir("val/images", self.root / "val" / "images")
    if (self.root / "train").is_dir():
      with os.scandir(self.root / "train") as it:
        for e in it:
          if e.is_dir() and (Path(e.path) / "images").is_dir():
            add_dir(f"train/{e.name}/images", Path(e.path) / "images")
    return out

  def describe(self, rel: str) -> str:
    return str(self.root / rel)

  def read(self, rel: str) -> bytes:
    return (self.root / rel).read_bytes()

  def open(self) -> Callable[[str], bytes]:
    return self.read


class Zip:
  """tiny-imagenet-200.zip, read in place (never unpacked)."""

  kind = "zip"

  def __init__(self, zip_path: str | os.PathLike):
    path = Path(zip_path).expanduser()
    if not path.is_file():
      raise FileNotFoundError(
        f"data.zip_path={str(zip_path)!r} is not a file: set --config.data.zip_path=/path/to/"
        "tiny-imagenet-200.zip, or use --config.data.source=folder with --config.data.root=..."
      )
    self.path = path.resolve()
    self.location = str(self.path)
    try:
      with zipfile.ZipFile(self.path) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
    except zipfile.BadZipFile as e:
      raise ValueError(f"{self.path} is not a readable zip file ({e})") from None
    # The archive's root: the folder of the shallowest wnids.txt ('tiny-imagenet-200/').
    roots = sorted(
      (
        i.filename[: -len("wnids.txt")]
        for i in infos
        if i.filename.endswith("wnids.txt")
        and i.filename.count("/") <= 1
        and i.filename.rsplit("/", 1)[-1] == "wnids.txt"
      ),
      key=len,
    )
    if not roots:
      raise ValueError(f"{self.path} holds no wnids.txt (at its top or in one folder): not a tiny-imagenet-200 archive")
    self.prefix = roots[0]
    self._infos = {i.filename[len(self.prefix) :]: i for i in infos if i.filename.startswith(self.prefix)}

  def listing(self) -> dict[str, tuple[int, ...]]:
    return {
      rel: (i.file_size, i.CRC)
      for rel, i in self._infos.items()
      if rel == "wnids.txt" or rel == "val/val_annotations.txt" or _is_image_path(rel)
    }

  def __getstate__(self):  # workers only read members: don't ship the member table
    return {k: v for k, v in self.__dict__.items() if k != "_infos"}

  def stat_key(self) -> tuple[int, int]:
    st = self.path.stat()
    return st.st_size, st.st_mtime_ns

  def describe(self, rel: str) -> str:
    return f"{self.path}:{self.prefix}{rel}"

  def read(self, rel: str) -> bytes:
    with zipfile.ZipFile(self.path) as zf:
      return zf.read(self.prefix + rel)

  def open(self) -> Callable[[str], bytes]:
    zf = zipfile.ZipFile(self.path)  # one handle per process, kept open while it decodes
    return lambda rel: zf.read(self.prefix + rel)


def _is_image_path(rel: str) -> bool:
  """Whether `rel` sits where the layout keeps images (hidden files, e.g. macOS '._x', excluded)."""
  parts = rel.split("/")
  return not parts[-1].startswith(".") and (
    (len(parts) == 4 and parts[0] == "train" and parts[2] == "images")
    or (len(parts) == 3 and parts[:2] == ["val", "images"])
  )


# ---------------------------------------------------------------------------
# The index: which file is which image of which class.


@dataclasses.dataclass
class Index:
  class_ids: tuple[str, ...]
  files: dict[str, list[str]]  # part -> relative paths, in output order
  labels: dict[str, list[int]]
  image_ids: dict[str, list[str]]
  skipped: list[dict[str, str]]  # {'file', 'reason'} of dropped files (on_bad_image='skip')
  ignored: int  # files in image folders without an image extension


def build_index(src: Folder | Zip, on_bad_image: str) -> Index:
  """Which file is which image of which class, checked (see the module doc); the one reader of the layout."""
  return _build_index(src, src.listing(), on_bad_image)


def _build_index(src: Folder | Zip, listing: dict[str, Any], on_bad_image: str) -> Index:
  skipped: list[dict[str, str]] = []

  def bad(rel: str, message: str):
    if on_bad_image == "error":
      raise ValueError(f"{message}; {_SKIP_HINT}")
    skipped.append({"file": rel, "reason": message})

  wnids = [w.strip() for w in src.read("wnids.txt").decode().splitlines() if w.strip()]
  dup = sorted(w for w, c in collections.Counter(wnids).items() if c > 1)
  if dup:
    raise ValueError(f"{src.describe('wnids.txt')} lists {dup[0]} more than once")
  if not wnids:
    raise ValueError(f"{src.describe('wnids.txt')} lists no class")
  class_ids = tuple(sorted(wnids))
  label_of = {w: i for i, w in enumerate(class_ids)}

  ignored = 0
  train, val_files = [], set()
  for rel in listing:
    if not _is_image_path(rel):
      continue
    if not rel.lower().endswith(IMAGE_EXTENSIONS):
      ignored += 1
      continue
    parts = rel.split("/")
    if parts[0] == "val":
      val_files.add(parts[2])
    elif parts[1] in label_of:
      train.append((parts[1], parts[3], rel))
    else:
      bad(rel, f"{src.describe(rel)}: its class folder {parts[1]} is not in wnids.txt")
  train.sort()
  names = collections.Counter(name for _, name, _ in train)
  clash = sorted(n for n, c in names.items() if c > 1)
  if clash:
    raise ValueError(
      f"{src.describe('train')}: two train images are named {clash[0]}; image ids (file names) must be unique"
    )
  empty = sorted(set(class_ids) - {w for w, _, _ in train})
  if empty:
    raise ValueError(
      f"{src.describe('train')} has no images of {len(empty)} of the {len(class_ids)} classes in "
      f"wnids.txt (first: {empty[0]}): incomplete data? (all train parts must be unpacked)"
    )

  ann_rel = "val/val_annotations.txt"
  if ann_rel not in listing:
    raise FileNotFoundError(f"{src.describe(ann_rel)} is missing: the val images have no labels")
  val_label: dict[str, int] = {}
  bad_names: set[str] = set()
  for n, line in enumerate(src.read(ann_rel).decode().splitlines(), 1):
    if not line.strip():
      continue
    fields = line.split("\t")
    where = f"{src.describe(ann_rel)} line {n}"
    if len(fields) < 2:
      bad(ann_rel, f"{where}: not 'file<TAB>wnid<TAB>...': {line[:80]!r}")
      continue
    name, wnid = fields[0].strip(), fields[1].strip()
    if name in val_label or name in bad_names:
      bad_names.add(name)
      val_label.pop(name, None)
      bad(f"val/images/{name}", f"{where}: {name} is annotated a second time")
    elif wnid not in label_of:
      bad_names.add(name)
      bad(f"val/images/{name}", f"{where}: {name} has class {wnid}, which is not in wnids.txt")
    elif name not in val_files:
      bad(f"val/images/{name}", f"{where}: names {name}, which is not in {src.describe('val/images')}")
    else:
      val_label[name] = label_of[wnid]
  for name in sorted(val_files - set(val_label) - bad_names):
    rel = f"val/images/{name}"
    bad(rel, f"{src.describe(rel)} has no line in val/val_annotations.txt")
  val = sorted(val_label)

  return Index(
    class_ids=class_ids,
    files={"train": [rel for _, _, rel in train], "test": [f"val/images/{n}" for n in val]},
    labels={"train": [label_of[w] for w, _, _ in train], "test": [val_label[n] for n in val]},
    image_ids={"train": [name for _, name, _ in train], "test": val},
    skipped=skipped,
    ignored=ignored,
  )


# ---------------------------------------------------------------------------
# Parallel decoding into memory-mapped .npy files.

_WORKER: dict[str, Any] = {}


def _init_worker(src: Folder | Zip, out_files: dict[str, str], image_size: int) -> None:
  _WORKER.clear()
  _WORKER.update(read=src.open(), out_files=out_files, image_size=image_size, maps={})


def _decode_chunk(task: tuple[str, int, Sequence[str]]) -> list[tuple[bool, str, bool]]:
  """Decodes files [start, start + len) of a part into its array: per file (ok, mode or error, resized)."""
  part, start, rels = task
  maps = _WORKER["maps"]
  if part not in maps:
    maps[part] = np.load(_WORKER["out_files"][part], mmap_mode="r+")
  out, results = maps[part], []
  for j, rel in enumerate(rels):
    try:
      img, mode, resized = decode_image(_WORKER["read"](rel), _WORKER["image_size"])
    except UnidentifiedImageError:
      results.append((False, "not an image format PIL knows", False))
      continue
    except Exception as e:  # any failure to read or decode is this file's problem
      results.append((False, f"{type(e).__name__}: {e}", False))
      continue
    out[start + j] = img
    results.append((True, mode, resized))
  return results


def decode_all(
  src: Folder | Zip,
  index: Index,
  tmp: Path,
  *,
  image_size: int,
  on_bad_image: str,
  num_workers: int,
  chunk_size: int,
) -> dict[str, Any]:
  """Decodes every indexed file into tmp/<part>_images.npy; returns decode statistics."""
  out_files = {}
  for part in PARTS:
    path = tmp / f"{part}_images.npy"
    np.lib.format.open_memmap(
      path, mode="w+", dtype=np.uint8, shape=(len(index.files[part]), image_size, image_size, 3)
    ).flush()
    out_files[part] = str(path)
  tasks = [
    (part, s, index.files[part][s : s + chunk_size])
    for part in PARTS
    for s in range(0, len(index.files[part]), chunk_size)
  ]
  total = sum(len(index.files[p]) for p in PARTS)
  workers = max(1, min(num_workers, len(tasks)))

  failed = {p: [] for p in PARTS}
  modes: collections.Counter[str] = collections.Counter()
  resized = 0
  t0 = time.perf_counter()
  pool = None
  try:
    if workers > 1:
      # spawn, not fork: the caller may already run JAX's threads. An executor,
      # not multiprocessing.Pool: a worker that dies raises instead of hanging.
      pool = concurrent.futures.ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(src, out_files, image_size),
      )
      results = pool.map(_decode_chunk, tasks)  # in order: the first bad file reported is the first in order
    else:
      _init_worker(src, out_files, image_size)
      results = map(_decode_chunk, tasks)
    with progress.progress(total, f"decoding {Path(src.location).name}", "img") as bar:
      for (part, start, rels), res in zip(tasks, results):
        for j, (ok, info, was_resized) in enumerate(res):
          if ok:
            modes[info] += 1
            resized += was_resized
            continue
          rel = rels[j]
          if on_bad_image == "error":
            raise ValueError(f"{src.describe(rel)}: cannot decode this image ({info}); {_SKIP_HINT}")
          failed[part].append(start + j)
          index.skipped.append({"file": rel, "reason": f"cannot decode: {info}"})
        bar.update(len(rels))
  except BrokenProcessPool:
    raise RuntimeError(
      "A decoding process died (out of memory? or a main script without `if __name__ == '__main__':`, "
      "which spawned processes need); --config.data.num_workers=1 decodes in this process"
    ) from None
  finally:
    if pool is not None:
      pool.shutdown(wait=True, cancel_futures=True)
    _WORKER.clear()

  for part in PARTS:  # drop the rows of files that failed (on_bad_image='skip')
    if failed[part]:
      keep = np.setdiff1d(np.arange(len(index.files[part])), failed[part])
      old = np.load(out_files[part], mmap_mode="r")
      new_path = tmp / f"{part}_images.kept.npy"
      new = np.lib.format.open_memmap(new_path, mode="w+", dtype=np.uint8, shape=(len(keep),) + old.shape[1:])
      for s in range(0, len(keep), 4096):
        new[s : s + 4096] = old[keep[s : s + 4096]]
      new.flush()
      del old, new
      os.replace(new_path, out_files[part])
      for key in ("files", "labels", "image_ids"):
        values = getattr(index, key)[part]
        getattr(index, key)[part] = [values[i] for i in keep]
  return {
    "converted_modes": {m: c for m, c in sorted(modes.items()) if m != "RGB"},
    "num_resized": resized,
    "decode_seconds": round(time.perf_counter() - t0, 3),
    "workers": workers,
  }


# ---------------------------------------------------------------------------
# Loading with the cache.


def _load(
  src: Folder | Zip,
  *,
  image_size: int,
  on_bad_image: str,
  num_workers: int | None,
  cache_dir: str | os.PathLike | None,
  chunk_size: int,
) -> tuple[dict[str, ImageSet], dict[str, Any]]:
  if on_bad_image not in ON_BAD_IMAGE:
    raise ValueError(f"data.on_bad_image={on_bad_image!r} must be one of {ON_BAD_IMAGE}")
  if not (isinstance(image_size, int) and image_size > 0):
    raise ValueError(f"data.image_size={image_size!r} must be a positive integer")
  num_workers = num_workers or os.cpu_count() or 1
  cache_root = cache.resolve_cache_dir(cache_dir)

  t0 = time.perf_counter()
  listing = src.listing()
  path, fingerprint = _entry(src, listing, image_size, on_bad_image, cache_root)
  hit = cache.read_entry(path)
  if hit is not None:
    parts, meta = hit
    meta = dict(meta, cache_hit=True, cache_path=str(path), load_seconds=round(time.perf_counter() - t0, 3))
    _log_report(meta)
    return parts, meta

  if path.exists():  # unreadable (damaged from outside): make room for a fresh entry
    shutil.rmtree(path)
  index = _build_index(src, listing, on_bad_image)
  cache.check_free_space(cache_root, _entry_bytes(index, image_size), f"decoding {src.location} into the cache")
  with cache.atomic_dir(path) as tmp:
    stats = decode_all(
      src, index, tmp, image_size=image_size, on_bad_image=on_bad_image, num_workers=num_workers, chunk_size=chunk_size
    )
    parts = {}
    for part in PARTS:
      images = np.load(tmp / f"{part}_images.npy", mmap_mode="r")
      parts[part] = ImageSet(
        images, np.asarray(index.labels[part], np.int32), index.class_ids, tuple(index.image_ids[part])
      )
    meta = {
      "source": src.kind,
      "location": src.location,
      "fingerprint": fingerprint,
      "image_size": image_size,
      "on_bad_image": on_bad_image,
      "pil_version": PIL.__version__,
      "num_classes": len(index.class_ids),
      "num_images": {p: len(parts[p]) for p in PARTS},
      "num_skipped": len(index.skipped),
      "skipped": index.skipped,
      "ignored_files": index.ignored,
      **stats,
    }
    cache.write_entry(tmp, parts, meta)
    del parts, images  # drop the memory maps before the rename
  removed = cache.remove_stale(path)
  if removed:
    logging.info(
      "Removed %d outdated data cache(s) of %s: %s", len(removed), src.location, ", ".join(str(r) for r in removed)
    )
  parts, meta = cache.read_entry(path)
  meta = dict(meta, cache_hit=False, cache_path=str(path), load_seconds=round(time.perf_counter() - t0, 3))
  _log_report(meta)
  return parts, meta


def _entry(src: Folder | Zip, listing: dict, image_size: int, on_bad_image: str, cache_root: Path) -> tuple[Path, str]:
  """(the cache entry's folder, the fingerprint) of a source as listed now."""
  source_id = cache.digest([cache.FORMAT_VERSION, src.kind, src.location, image_size, on_bad_image])
  stat = [src.stat_key()] if isinstance(src, Zip) else []
  fingerprint = cache.digest([source_id, PIL.__version__, *stat, *sorted(listing.items())])
  return cache.entry_dir(cache_root, source_id, fingerprint), fingerprint


def _entry_bytes(index: Index, image_size: int) -> int:
  """The size of a cache entry of `index`: uint8 images and int32 labels (the index JSON aside)."""
  n = sum(len(index.files[part]) for part in PARTS)
  return n * (image_size * image_size * 3 + 4)


def probe(
  src: Folder | Zip, *, image_size: int, on_bad_image: str, cache_dir: str | os.PathLike | None
) -> tuple[dict[str, Any], dict[str, Any]]:
  """What loading `src` would give and write, reading the layout and a few images only (for --dry_run).

  Returns ({'train', 'test'}: the cached ImageSets, or LabelSets when nothing is cached yet; report)
  where the report says whether the cache holds the data ('cached'), its folder, the bytes decoding
  would write and the images decoded as a sample ('sampled': the first image of every class and the
  first of the test images). Writes nothing; raises what loading would raise for a bad layout or a
  sampled image that does not decode (on_bad_image='error'), and for a cache that would not fit.
  """
  from jsim.data.dataset import LabelSet

  cache_root = cache.resolve_cache_dir(cache_dir)
  listing = src.listing()
  path, _ = _entry(src, listing, image_size, on_bad_image, cache_root)
  hit = cache.read_entry(path)
  if hit is not None:
    return hit[0], {"cached": True, "cache_path": str(path), "bytes": 0, "sampled": 0}
  index = _build_index(src, listing, on_bad_image)
  needed = _entry_bytes(index, image_size)
  free = cache.check_free_space(cache_root, needed, f"decoding {src.location} into the cache")
  first_of_class = {}
  for rel, label in zip(index.files["train"], index.labels["train"]):
    first_of_class.setdefault(label, rel)
  sample = list(first_of_class.values()) + index.files["test"][:10]
  for rel in sample:
    try:
      decode_image(src.read(rel), image_size)
    except Exception as e:  # noqa: BLE001 - as the decoder: any failure is this file's problem
      info = "not an image format PIL knows" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
      if on_bad_image == "error":
        raise ValueError(f"{src.describe(rel)}: cannot decode this image ({info}); {_SKIP_HINT}") from None
  sets = {
    part: LabelSet(np.asarray(index.labels[part], np.int32), index.class_ids, tuple(index.image_ids[part]))
    for part in PARTS
  }
  report = {"cached": False, "cache_path": str(path), "bytes": needed, "free": free, "sampled": len(sample)}
  return sets, report


def _log_report(meta: dict[str, Any]) -> None:
  n = meta["num_images"]
  logging.info(
    "Tiny ImageNet from %s %s: %d train + %d test images, %d classes, %s in %.1f s (cache %s)",
    meta["source"],
    meta["location"],
    n["train"],
    n["test"],
    meta["num_classes"],
    "read from the cache" if meta["cache_hit"] else "decoded",
    meta["load_seconds"],
    meta["cache_path"],
  )
  if meta["converted_modes"]:
    logging.info(
      "Converted to RGB: %s", ", ".join(_mode_text(m, c) for m, c in sorted(meta["converted_modes"].items()))
    )
  if meta["ignored_files"]:
    logging.info(
      "Ignored %d files without an image extension %s in the image folders", meta["ignored_files"], IMAGE_EXTENSIONS
    )
  if meta["num_resized"]:
    logging.info("Resized %d images to %dx%d", meta["num_resized"], meta["image_size"], meta["image_size"])
  if meta["num_skipped"]:
    first = meta["skipped"][0]
    logging.warning(
      "Skipped %d bad files (on_bad_image=skip); first: %s (%s)", meta["num_skipped"], first["file"], first["reason"]
    )


# PIL's image modes, in words.
_MODE_NAMES = {
  "1": "black-and-white",
  "L": "grayscale",
  "LA": "grayscale with alpha",
  "I": "32-bit grayscale",
  "I;16": "16-bit grayscale",
  "F": "floating-point grayscale",
  "P": "palette",
  "PA": "palette with alpha",
  "RGBA": "RGBA (alpha dropped)",
  "CMYK": "CMYK",
  "YCbCr": "YCbCr",
  "LAB": "Lab",
  "HSV": "HSV",
}


def _mode_text(mode: str, count: int) -> str:
  """'64 grayscale images' for PIL mode 'L' (the mode itself where it has no name here)."""
  return f"{count} {_MODE_NAMES.get(mode, f'mode-{mode}')} image{'s' if count != 1 else ''}"


def load_folder(
  root: str | os.PathLike,
  *,
  image_size: int = 64,
  on_bad_image: str = "error",
  num_workers: int | None = None,
  cache_dir: str | os.PathLike | None = None,
  chunk_size: int = 512,
) -> tuple[dict[str, ImageSet], dict[str, Any]]:
  """Loads an unpacked tiny-imagenet-200 folder (or a folder holding one).

  Returns ({'train': ImageSet, 'test': ImageSet}, report). The report (also
  stored in the cache) holds the counts, the skipped files with their reasons,
  the modes converted to RGB, the number of resized images, and whether the
  cache was hit. num_workers=None (or 0) uses every CPU, 1 decodes in this
  process; cache_dir=None (or '') is the default cache folder ($JSIM_CACHE or
  ~/.cache/jsim). A script that calls this with several workers needs an
  `if __name__ == '__main__':` guard (the workers are spawned).
  """
  return _load(
    Folder(root),
    image_size=image_size,
    on_bad_image=on_bad_image,
    num_workers=num_workers,
    cache_dir=cache_dir,
    chunk_size=chunk_size,
  )


def load_zip(
  zip_path: str | os.PathLike,
  *,
  image_size: int = 64,
  on_bad_image: str = "error",
  num_workers: int | None = None,
  cache_dir: str | os.PathLike | None = None,
  chunk_size: int = 512,
) -> tuple[dict[str, ImageSet], dict[str, Any]]:
  """Loads tiny-imagenet-200.zip without unpacking it; same result and report as load_folder."""
  return _load(
    Zip(zip_path),
    image_size=image_size,
    on_bad_image=on_bad_image,
    num_workers=num_workers,
    cache_dir=cache_dir,
    chunk_size=chunk_size,
  )
