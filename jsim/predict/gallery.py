"""A folder searched with a trained workdir: its images listed, embedded once and cached (W/predict_cache,
by content), ranked against a query."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jsim import workdir as wd
from jsim.predict.images import _PROG, ImageLike, _first_line, prepare_image

# What a gallery search picks up (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CACHE_DIR = "predict_cache"
_CACHE_VERSION = 2  # 2: content digests of the gallery files


class Match(NamedTuple):
  path: str
  probability: float


def list_images(folder: str | os.PathLike) -> list[tuple[str, int, int]]:
  """(relative posix path, size, mtime_ns) of every image file under `folder`, sorted.

  Recursive; extensions IMAGE_EXTENSIONS in any case; hidden files and folders are skipped.
  """
  root = Path(folder)
  if not root.exists():
    raise FileNotFoundError(f"--gallery {root}: no such folder")
  if not root.is_dir():
    raise NotADirectoryError(f"--gallery {root}: not a folder")
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in filenames:
      if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
        continue
      path = Path(dirpath) / name
      try:
        st = path.stat()
      except OSError:
        continue  # a dangling link
      out.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
  return sorted(out)


def _listing(folder: str | os.PathLike) -> list[tuple[str, int, int]]:
  listing = list_images(folder)
  if not listing:
    raise ValueError(f"--gallery {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it or below")
  return listing


@dataclasses.dataclass
class Gallery:
  """The embedded images of a folder."""

  root: Path
  files: list[str]  # relative posix paths, sorted
  embeddings: np.ndarray  # float32 [len(files), D]
  skipped: list[tuple[str, str]]  # (relative path, why) of files that could not be read
  reused: int  # embeddings taken from the cache
  embedded: int  # embeddings computed now
  cache_path: Path | None

  @property
  def paths(self) -> list[Path]:
    return [self.root / f for f in self.files]


class GallerySearch:
  """The gallery half of `Similarity` (mixed into it): embed a folder once, cached, and rank it against a query.

  Uses the class's `embed`, `embed_prepared`, `scores`, `backbones`, `dim`, `image_size`, `workdir` and `backend`.
  """

  def cache_path(self, gallery_dir: str | os.PathLike) -> Path:
    key = hashlib.sha1(str(Path(gallery_dir).resolve()).encode()).hexdigest()[:16]
    # One cache file per backend: their embeddings agree within 1e-4 (~1e-6), not bit for bit, and a
    # ranking should not depend on which backend embedded which file.
    return cache_root(self.workdir, CACHE_DIR) / (
      f"{key}.npz" if self.backend == "jax" else f"{key}.{self.backend}.npz"
    )

  def _gallery_batch(self) -> int:
    return max(b.batch_size for b in self.backbones)

  @property
  def stage1_steps(self) -> list[int]:
    return [b.stage1_step for b in self.backbones]

  def _model_key(self) -> str:
    return json.dumps(
      [
        [str(b.workdir.resolve()), b.model_name, b.stage1_step, b.checkpoint_stamp, b.image_size, b.input_size, b.dim]
        for b in self.backbones
      ]
      + [_CACHE_VERSION]
    )

  def gallery(self, gallery_dir: str | os.PathLike, *, use_cache: bool = True, progress: bool = False) -> Gallery:
    """Embeds the images of a folder (recursive), reusing the cache for unchanged files.

    Unreadable files are skipped and listed in `Gallery.skipped`. Raises ValueError if the
    folder holds no readable image.
    """
    root = Path(gallery_dir)
    listing = _listing(root)
    cache_path = self.cache_path(root) if use_cache else None
    cached = self._read_cache(cache_path) if cache_path else {}
    # Content decides, not size and time (a file replaced by another of the same size, its time restored).
    digests = {rel: _content_digest(root / rel) for rel, _, _ in listing} if cache_path else {}
    rows: dict[str, np.ndarray] = {}
    todo = []
    for rel, size, _ in listing:
      hit = cached.get(rel)
      if hit is not None and hit[0] == size and digests[rel] is not None and hit[2] == digests[rel]:
        rows[rel] = hit[3]
      else:
        todo.append(rel)
    skipped = []
    batch = self._gallery_batch()
    bar = None
    if progress and todo:
      from tqdm import tqdm

      bar = tqdm(total=len(todo), desc="embedding the gallery", unit="img", file=sys.stderr, disable=None)
    for start in range(0, len(todo), batch):
      names, arrays = [], []
      for rel in todo[start : start + batch]:
        try:
          arrays.append(prepare_image(root / rel, self.image_size))
          names.append(rel)
        except (ValueError, OSError) as e:
          skipped.append((rel, str(e)))
      if arrays:
        for rel, e in zip(names, self.embed_prepared(np.stack(arrays))):
          rows[rel] = e
      if bar is not None:
        bar.update(len(todo[start : start + batch]))
    if bar is not None:
      bar.close()
    stats = {rel: (size, mtime, digests.get(rel) or "") for rel, size, mtime in listing}
    files = [rel for rel, _, _ in listing if rel in rows]
    if not files:
      raise ValueError(
        f"--gallery {root}: none of its {len(listing)} image files could be read (first: {skipped[0][1]})"
      )
    emb = np.stack([rows[f] for f in files]).astype(np.float32)
    embedded = len(todo) - len(skipped)
    if cache_path is not None and (embedded or len(files) != len(cached) or set(files) != set(cached)):
      self._write_cache(cache_path, root, files, [stats[f] for f in files], emb)
    return Gallery(
      root=root,
      files=files,
      embeddings=emb,
      skipped=skipped,
      reused=len(files) - embedded,
      embedded=embedded,
      cache_path=cache_path,
    )

  def _read_cache(self, path: Path) -> dict[str, tuple[int, int, str, np.ndarray]]:
    if not path.exists():
      return {}
    try:
      with np.load(path, allow_pickle=False) as z:
        if str(z["model_key"]) != self._model_key() or z["embeddings"].shape[1:] != (self.dim,):
          return {}  # another checkpoint: embed everything again
        return {
          str(f): (int(s), int(m), str(d), e)
          for f, s, m, d, e in zip(z["files"], z["sizes"], z["mtimes_ns"], z["sha256"], z["embeddings"])
        }
    except Exception:  # a damaged cache is rebuilt, never fatal
      return {}

  def _write_cache(
    self, path: Path, root: Path, files: list[str], stats: list[tuple[int, int, str]], emb: np.ndarray
  ) -> None:
    def write(tmp):
      with open(tmp, "wb") as f:
        np.savez(
          f,
          files=np.asarray(files, dtype=str),
          sizes=np.asarray([s for s, _, _ in stats], np.int64),
          mtimes_ns=np.asarray([m for _, m, _ in stats], np.int64),
          sha256=np.asarray([d for _, _, d in stats], dtype=str),
          embeddings=emb,
          model_key=np.asarray(self._model_key()),
          gallery=np.asarray(str(root.resolve())),
          stage1_steps=np.asarray(self.stage1_steps, np.int64),
        )

    try:
      wd.write_file(path, write)
    except OSError as e:  # a full disk, a read-only cache folder: search still works, uncached
      print(f"{_PROG}: warning: cannot write the gallery cache ({_first_line(e)})", file=sys.stderr)

  def rank(
    self,
    query: ImageLike,
    gallery: Gallery,
    top: int | None = 10,
    *,
    exclude_query: bool = True,
    query_path: str | os.PathLike | None = None,
  ) -> list[Match]:
    """Gallery files ranked by P(same) with the query (best first, ties by path); top None or <= 0: all.

    With exclude_query, the query's own file (`query` if a path, else `query_path`) is left out.
    """
    q = self.embed([query])[0]
    p = self.scores(q, gallery.embeddings)
    if query_path is None and isinstance(query, (str, os.PathLike)):
      query_path = query
    qpath = Path(query_path).resolve() if query_path is not None else None
    order = sorted(range(len(p)), key=lambda i: (-p[i], gallery.files[i]))
    out = []
    for i in order:
      path = gallery.root / gallery.files[i]
      if exclude_query and qpath is not None and path.resolve() == qpath:
        continue
      out.append(Match(str(path), float(p[i])))
    return out[:top] if top and top > 0 else out

  def search(
    self,
    query: ImageLike,
    gallery_dir: str | os.PathLike,
    top: int | None = 10,
    *,
    use_cache: bool = True,
    exclude_query: bool = True,
  ) -> list[Match]:
    """The `top` images of a folder most likely to show the same kind of object as `query`:
    a list of (path, probability), best first. The query file itself is left out."""
    return self.rank(query, self.gallery(gallery_dir, use_cache=use_cache), top, exclude_query=exclude_query)


def _content_digest(path: Path) -> str | None:
  try:
    return wd.file_digest(path)
  except OSError:
    return None  # unreadable: embedded again (and skipped, saying why)


def cache_root(workdir: Path, name: str) -> Path:
  """W/<name>, or for a workdir that cannot be written the same cache in the user's cache folder
  ($JSIM_CACHE or ~/.cache/jsim, under a hash of W's path), said once in one line."""
  workdir = Path(workdir)
  if os.access(workdir, os.W_OK) or not workdir.is_dir():
    return workdir / name
  key = hashlib.sha1(str(workdir.resolve()).encode()).hexdigest()[:16]
  folder = wd.default_cache_dir() / "workdirs" / key / name
  if folder not in _said_read_only:
    _said_read_only.add(folder)
    print(f"{_PROG}: {workdir} is read-only: its {name} cache is kept in {folder} instead", file=sys.stderr)
  return folder


_said_read_only: set[Path] = set()
