"""The decoded-image cache: uint8 arrays on disk, keyed by a fingerprint of their source.

An entry is a folder `<cache_dir>/decoded/<source id>-<fingerprint>/` holding

  <part>_images.npy  uint8 [N, H, W, 3]     (part: 'train', 'test')
  <part>_labels.npy  int32 [N]
  index.json         class ids, image ids, the load report, format version

The source id names the source (its kind, path and decoding options); the
fingerprint adds the listing of its files (names, sizes, mtimes), so a changed,
added or removed file gives a new entry. Entries are written in a temporary
folder and renamed into place, so a reader never sees half an entry; when a new
entry of a source is committed, the older entries of the same source are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from absl import logging

from jsim.data.dataset import ImageSet
from jsim.workdir.io import default_cache_dir

# Bump when the decoding or the entry format changes: old entries stop matching.
FORMAT_VERSION = 1
_INDEX = "index.json"
_TMP_PREFIX = ".tmp-"
_ABANDONED_AFTER_S = 6 * 3600


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
  """The configured cache folder, or the default one when it is empty."""
  return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def digest(items: Iterable[Any]) -> str:
  """A sha256 hex digest of a sequence of JSON-serialisable items (order matters)."""
  # One dumps call for the whole list: listings hold ~10^5 items.
  return hashlib.sha256(json.dumps(list(items), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def free_bytes(folder: Path) -> int:
  """Free bytes on the disk that holds `folder` (or would: its nearest existing parent)."""
  folder = Path(folder).absolute()
  while not folder.exists():
    folder = folder.parent
  return shutil.disk_usage(folder).free


def check_free_space(folder: Path, needed: int, what: str) -> int:
  """ValueError in one line when `what` ({needed} bytes) does not fit on folder's disk; returns the free bytes."""
  free = free_bytes(folder)
  if needed > free:
    raise ValueError(
      f"{what} needs {needed / 1e9:.2f} GB in {folder}, but its disk has {free / 1e9:.2f} GB free; free some "
      f"space, or point $JSIM_CACHE (or --config.data.cache_dir) at a disk with room"
    )
  return free


def entry_dir(cache_dir: Path, source_id: str, fingerprint: str) -> Path:
  """Where the entry of (source, fingerprint) lives."""
  return cache_dir / "decoded" / f"{source_id[:16]}-{fingerprint[:24]}"


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
  """Yields a temporary folder beside `final`, renamed to `final` when the block succeeds.

  On an exception the temporary folder is removed and `final` is untouched. If
  another process committed `final` first, its copy is kept and ours dropped
  (both describe the same source).
  """
  final.parent.mkdir(parents=True, exist_ok=True)
  prefix = _TMP_PREFIX + final.name + "-"
  for old in final.parent.glob(prefix + "*"):  # left by a killed process (a live one is younger)
    if time.time() - old.stat().st_mtime > _ABANDONED_AFTER_S:
      shutil.rmtree(old, ignore_errors=True)
  tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
  try:
    yield tmp
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the committed folder private
    try:
      os.rename(tmp, final)
    except OSError:
      if not final.exists():  # only a commit creates `final`, so it exists complete or not at all
        raise
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_entry(tmp: Path, parts: dict[str, ImageSet], meta: dict[str, Any]) -> None:
  """Writes `parts` into the temporary entry folder `tmp` (see atomic_dir).

  Arrays already written there (e.g. `<part>_images.npy` decoded straight into
  a memory map) are kept when their shape matches.
  """
  index = {"format_version": FORMAT_VERSION, "meta": meta, "parts": {}}
  for name, part in parts.items():
    images_path = tmp / f"{name}_images.npy"
    if not (images_path.exists() and np.load(images_path, mmap_mode="r").shape == part.images.shape):
      np.save(images_path, part.images)
    np.save(tmp / f"{name}_labels.npy", part.labels.astype(np.int32))
    index["parts"][name] = {"class_ids": list(part.class_ids), "image_ids": list(part.image_ids)}
  (tmp / _INDEX).write_text(json.dumps(index))


def read_entry(path: Path) -> tuple[dict[str, ImageSet], dict[str, Any]] | None:
  """Reads an entry: (parts, meta), or None when it is missing or unreadable."""
  index_path = path / _INDEX
  if not index_path.exists():
    return None
  try:
    index = json.loads(index_path.read_text())
    if index.get("format_version") != FORMAT_VERSION:
      return None
    parts = {}
    for name, p in index["parts"].items():
      # Memory-mapped: pages are read as batches need them (data.pipeline='stream' never holds them all).
      images = np.load(path / f"{name}_images.npy", mmap_mode="r")
      parts[name] = ImageSet(images, np.load(path / f"{name}_labels.npy"), tuple(p["class_ids"]), tuple(p["image_ids"]))
    return parts, index["meta"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    # Entries are committed atomically, so this means outside damage: rebuild.
    logging.warning("Ignoring the unreadable data cache %s (%s); it will be rebuilt.", path, e)
    return None


def remove_stale(path: Path) -> list[Path]:
  """Removes the other entries of the same source (same id prefix) and returns them."""
  prefix = path.name.split("-", 1)[0] + "-"
  removed = []
  for other in path.parent.glob(prefix + "*"):
    if other != path and other.is_dir():
      shutil.rmtree(other, ignore_errors=True)
      removed.append(other)
  return removed
