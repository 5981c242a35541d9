"""Use a trained workdir: P(same) of two images, and a folder ranked against a query.

Python (notebooks):

  sim = jsim.predict.Similarity.load("W")
  sim.probability("a.jpg", "b.png")         # paths, PIL images or uint8 arrays -> float
  sim.embed(["a.jpg", pil_image, array])    # float32 [N, D]
  sim.search("q.jpg", "photos/", top=10)    # [(path, probability), ...], best first

Command line (`jsim.predict.cli`, installed as `jsim-predict`):

  python -m jsim.predict --workdir=W a.jpg b.png
  python -m jsim.predict --workdir=W --query=q.jpg --gallery=DIR [--top=10] [--html=out.html] [--sheet=out.png]

An image goes through exactly what the training images went through: PIL decode,
convert('RGB') (gray replicated, alpha dropped), a PIL bilinear resize to the
data's image size (W/preprocessing.json "image_size"; `tiny_imagenet.decode_image`,
the data layer's one decoder), then on the device `augment.preprocess` with the
workdir's mean/std and classifier.input_size, and the embedding of the best stage-1
checkpoint (Mc without its head, `classifier.restore_classifier`). Ms, from the best
stage-2 checkpoint (`similarity.restore_similarity`), turns two embeddings into
P(same). EXIF orientation is ignored, as in training.

A gallery is embedded once and cached in W/predict_cache/<hash of its path>.npz
(files, sizes, mtimes, SHA-256 of their bytes, embeddings, and the content checksums
of the stage-1 checkpoints they came from); a later search embeds only files that were
added or whose content changed (a file replaced by another of the same size with its
time restored included), and everything again when a stage-1 checkpoint changed. A
read-only workdir keeps its caches (the gallery's, the ONNX export) in the user's
cache folder instead ($JSIM_CACHE or ~/.cache/jsim), said in one line.

Backends: `Similarity.load(W)` runs the checkpoints through JAX/XLA; `backend="onnx"`
runs their ONNX export (jsim.export, made in W/onnx on first use and again when a
checkpoint changes) through onnxruntime, several times faster on a CPU and with no JAX
loaded; `backend="auto"` (the command line's default) takes onnx on a CPU when
onnxruntime is installed. Their gallery caches are separate files.

Ensembles (similarity.ensemble_workdirs): the embedding is the concatenation of
this workdir's Mc and each member's Mc, each restored from its own workdir, in
the order stage 2 recorded.

Only numpy, PIL and JSON are imported up front: the checks of the workdir's
records (`workdir.read_records`) run before JAX loads, so a bad command fails fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from jsim import workdir as wd

# What a gallery search picks up (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CACHE_DIR = "predict_cache"
_CACHE_VERSION = 2  # 2: content digests of the gallery files
_SCORE_CHUNK = 4096  # gallery embeddings scored per device call
_PROG = "jsim-predict"

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


class Match(NamedTuple):
  path: str
  probability: float


# ----------------------------------------------------------------------------- images


def prepare_image(image: ImageLike, image_size: int) -> np.ndarray:
  """uint8 RGB [image_size, image_size, 3] of a path, PIL image or uint8 array, decoded like training data.

  Arrays may be [H, W] (gray), [H, W, 1], [H, W, 3] (RGB) or [H, W, 4] (RGBA).
  Raises FileNotFoundError for a missing file and ValueError for anything that is not an image.
  """
  from jsim.data import tiny_imagenet

  if isinstance(image, (str, os.PathLike)):
    path = Path(image)
    if not path.exists():
      raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
      raise ValueError(f"{path} is a directory, not an image")
    try:
      return tiny_imagenet.decode_image(path.read_bytes(), image_size)[0]
    except UnidentifiedImageError:
      raise ValueError(f"{path}: not a readable image (PIL does not recognise its format)") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
      raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {_first_line(e)})") from None
  if isinstance(image, Image.Image):
    try:
      image.load()
      return tiny_imagenet.to_rgb(image, image_size)
    except Exception as e:
      raise ValueError(f"PIL image {image!r} cannot be read ({type(e).__name__}: {_first_line(e)})") from None
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise ValueError(f"image arrays must be uint8, got {image.dtype}")
    arr = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))) or 0 in arr.shape:
      raise ValueError(f"image arrays must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {image.shape}")
    return tiny_imagenet.to_rgb(Image.fromarray(np.ascontiguousarray(arr)), image_size)
  raise ValueError(f"expected an image path, a PIL image or a uint8 array, got {type(image).__name__}")


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__


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


# ----------------------------------------------------------------------------- the workdir's records


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass
class Backbone:
  """One workdir's Mc without its head, restored from its best stage-1 checkpoint."""

  workdir: Path
  model_name: str
  stage1_step: int
  dim: int
  image_size: int
  input_size: int
  batch_size: int
  checkpoint_stamp: str  # the checkpoint's content checksum: a retrained step invalidates caches, a copy does not
  variables: Any
  _apply: Callable

  def embed_uint8(self, images: np.ndarray) -> np.ndarray:
    """float32 [N, dim] of uint8 [N, S, S, 3] images (S = image_size), in padded batches."""
    from jsim.train import batching

    fn = lambda idx, mask: self._apply(self.variables, images[idx])
    outputs = batching.run(fn, np.arange(images.shape[0]), self.batch_size, bucket=True)
    return batching.rows(outputs, width=self.dim)


def _load_backbone(rec: wd.StageRecords, mesh) -> Backbone:
  import jax
  from jsim import configs
  from jsim.train import batching, classifier

  config = configs.config_from_dict(rec.config)
  model, state = classifier.restore_classifier(config, rec.workdir, mesh)
  dim = getattr(model, "embedding_dim", rec.embedding_dim)
  if dim != rec.embedding_dim:
    raise ValueError(
      f"{rec.workdir / wd.EMBEDDINGS}/meta.json: dim {rec.embedding_dim}, but model "
      f"{rec.model_name!r} embeds into {dim}"
    )
  step = int(state.step)
  if step != rec.stage1_step:
    raise ValueError(
      f"{rec.workdir / wd.STAGE1}: the best checkpoint is step {step}, its result.json and the "
      f"embeddings say {rec.stage1_step}; rerun the stages"
    )
  mean, std, input_size = rec.mean, rec.std, int(config.classifier.input_size)

  @jax.jit
  def apply(variables, images):  # what the embeddings stage computes, on one batch
    return batching.forward(variables, images, model=model, mean=mean, std=std, input_size=input_size)[1]

  stamp = wd.checkpoint_identity(rec.workdir / wd.STAGE1, step) or str(
    (rec.workdir / wd.STAGE1 / "checkpoints" / str(step)).stat().st_mtime_ns  # (a checkpoint without a checksum)
  )
  return Backbone(
    workdir=rec.workdir,
    model_name=rec.model_name,
    stage1_step=step,
    dim=dim,
    image_size=rec.image_size,
    input_size=input_size,
    batch_size=max(1, int(config.embed.batch_size)),
    checkpoint_stamp=stamp,
    variables=state.variables,
    _apply=apply,
  )


# ----------------------------------------------------------------------------- the API


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


BACKENDS = ("auto", "jax", "onnx")


class Similarity:
  """A trained workdir's Mc (or ensemble of them) and Ms, ready to compare images.

  Attributes:
    workdir: the workdir.
    threshold: the validation threshold of W/report.json ("val_threshold"), None without a report.
    image_size: side the images are resized to first (the data's image size).
    dim: embedding width Ms takes (the sum over the ensemble).
    backbones: the Mc of this workdir, then of each ensemble member.
    backend: "jax" (the checkpoints, run by XLA) or "onnx" (their export, run by onnxruntime).
  """

  backend = "jax"

  def __init__(
    self,
    workdir: Path,
    backbones: list[Backbone],
    prob_fn: Callable,
    params: Any,
    stage2_step: int,
    threshold: float | None,
  ):
    self.workdir = workdir
    self.backbones = backbones
    self.image_size = backbones[0].image_size
    self.dim = sum(b.dim for b in backbones)
    self.stage2_step = stage2_step
    self.threshold = threshold
    self._params = params
    import jax

    @jax.jit
    def pair_probs(params, e1, e2):
      return prob_fn(params, e1, e2)

    @jax.jit
    def query_probs(params, q, g):
      return prob_fn(params, jax.numpy.broadcast_to(q, g.shape), g)

    self._pair_probs, self._query_probs = pair_probs, query_probs

  @classmethod
  def load(
    cls, workdir: str | os.PathLike, backend: str = "jax", onnx_dir: str | os.PathLike | None = None
  ) -> "Similarity":
    """Restores the best stage-1 and stage-2 checkpoints of a trained workdir.

    backend: "jax", "onnx" (the ONNX export in `onnx_dir`, by default W/onnx, which is
    exported there first if missing or stale; an explicit `onnx_dir` must be current) or
    "auto" (onnx when JAX runs on a CPU and onnxruntime is installed, else jax).
    Raises FileNotFoundError for a workdir without trained stages, ValueError when its
    records disagree (e.g. stage 2 trained on another backbone's embeddings).
    """
    return cls.from_records(wd.read_records(workdir), backend=backend, onnx_dir=onnx_dir)

  @classmethod
  def from_records(
    cls, records: wd.WorkdirRecords, backend: str = "jax", onnx_dir: str | os.PathLike | None = None
  ) -> "Similarity":
    """Like `load`, from records already read (and checked) by `workdir.read_records`."""
    if backend not in BACKENDS:
      raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "onnx" or (backend == "auto" and onnx_dir is not None):
      return OnnxSimilarity.from_export(records, onnx_dir)
    if backend == "auto" and _onnx_is_the_fast_path():
      from jsim import export

      try:
        return OnnxSimilarity.from_export(records)
      except (export.MissingPackage, OSError) as e:  # no onnx package to export with, a read-only workdir
        print(
          f"{_PROG}: warning: using the JAX backend, the ONNX one is unavailable ({_first_line(e)})", file=sys.stderr
        )
    from jsim import configs, parallel
    from jsim.train import calibration

    mesh = parallel.make_mesh()
    backbones = [_load_backbone(rec, mesh) for rec in records.members]
    config = configs.config_from_dict({**records.members[0].config, "similarity": records.stage2["similarity"]})
    dim = sum(b.dim for b in backbones)
    # Ms's best checkpoint, or the calibrated distance (similarity.model=distance, step 0).
    prob_fn, params = calibration.restore_scorer(config, records.workdir, mesh, dim=dim)
    step = int(wd.stage_result(records.workdir, wd.STAGE2).get("best_step", 0))
    return cls(records.workdir, backbones, prob_fn, params, step, records.threshold)

  # -- embeddings

  def embed(self, images: Sequence[ImageLike]) -> np.ndarray:
    """float32 [N, dim] embeddings of images (paths, PIL images or uint8 arrays)."""
    if isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim < 4):
      images = [images]
    arrays = [prepare_image(im, self.image_size) for im in images]
    if not arrays:
      return np.zeros((0, self.dim), np.float32)
    return self.embed_prepared(np.stack(arrays))

  def embed_prepared(self, images: np.ndarray) -> np.ndarray:
    """Embeddings of uint8 [N, image_size, image_size, 3] images already through `prepare_image`."""
    return np.concatenate([b.embed_uint8(images) for b in self.backbones], axis=1)

  # -- scores

  def probabilities(self, emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
    """P(same) [N] of row-wise pairs of embeddings [N, dim]."""
    emb_a, emb_b = np.asarray(emb_a, np.float32), np.asarray(emb_b, np.float32)
    if emb_a.shape != emb_b.shape or emb_a.ndim != 2 or emb_a.shape[1] != self.dim:
      raise ValueError(f"probabilities needs two [N, {self.dim}] arrays, got {emb_a.shape} and {emb_b.shape}")
    return np.asarray(self._pair_probs(self._params, emb_a, emb_b), np.float64)

  def probability(self, a: ImageLike, b: ImageLike) -> float:
    """P(a and b show the same kind of object)."""
    e = self.embed([a, b])
    return float(self.probabilities(e[:1], e[1:])[0])

  def scores(self, query_embedding: np.ndarray, gallery_embeddings: np.ndarray) -> np.ndarray:
    """P(same) [N] of one query embedding [dim] against gallery embeddings [N, dim], on the device in chunks."""
    q = np.asarray(query_embedding, np.float32).reshape(-1)
    g = np.asarray(gallery_embeddings, np.float32)
    if q.shape != (self.dim,) or g.ndim != 2 or g.shape[1] != self.dim:
      raise ValueError(f"scores needs a [{self.dim}] query and [N, {self.dim}] gallery, got {q.shape}, {g.shape}")
    from jsim.train.batching import bucket_size

    n = g.shape[0]
    chunk = bucket_size(n, _SCORE_CHUNK)
    out = []
    for start in range(0, n, chunk):
      part = g[start : start + chunk]
      if len(part) < chunk:
        part = np.concatenate([part, np.zeros((chunk - len(part), self.dim), np.float32)])
      out.append(np.asarray(self._query_probs(self._params, q, part))[: min(chunk, n - start)])
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

  def is_same(self, probability: float, threshold: float | None = None) -> bool:
    """The evaluation's decision rule: same iff p > threshold (None: 0.5)."""
    return probability > (0.5 if threshold is None else threshold)

  # -- gallery search

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
  from jsim.data import cache

  key = hashlib.sha1(str(workdir.resolve()).encode()).hexdigest()[:16]
  folder = cache.default_cache_dir() / "workdirs" / key / name
  if folder not in _said_read_only:
    _said_read_only.add(folder)
    print(f"{_PROG}: {workdir} is read-only: its {name} cache is kept in {folder} instead", file=sys.stderr)
  return folder


_said_read_only: set[Path] = set()


def entry_point() -> None:
  """The `jsim-predict` command (jsim.predict.cli)."""
  from jsim.predict import cli

  cli.entry_point()


def _onnx_is_the_fast_path() -> bool:
  """True when onnxruntime is installed and JAX would run on a CPU (checked without importing JAX
  where possible: no JAX_PLATFORMS and no accelerator plugin installed means CPU)."""
  from jsim.export import runtime

  if not runtime.available():
    return False
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  import importlib.metadata
  import importlib.util

  if not importlib.metadata.entry_points(group="jax_plugins") and importlib.util.find_spec("libtpu") is None:
    return True
  import jax

  return jax.default_backend() == "cpu"


class OnnxSimilarity(Similarity):
  """The same API run by onnxruntime on the workdir's ONNX export (see jsim.export); no JAX."""

  backend = "onnx"

  def __init__(self, records: wd.WorkdirRecords, model, exported_now: bool):
    self.workdir = records.workdir
    self.backbones = []
    self.image_size = model.image_size
    self.dim = model.dim
    self.stage2_step = model.meta["stage_ids"][wd.STAGE2]["best_step"]
    self.threshold = records.threshold
    self.onnx = model
    self.exported_now = exported_now  # True when this load wrote the export (first use, or it was stale)
    self._stage1_steps = [m.stage1_step for m in records.members]

  @classmethod
  def from_export(cls, records: wd.WorkdirRecords, onnx_dir: str | os.PathLike | None = None) -> "OnnxSimilarity":
    from jsim import export
    from jsim.export import runtime

    runtime.require_onnxruntime()
    own = records.workdir / export.DEFAULT_DIR
    if onnx_dir is None and not os.access(records.workdir, os.W_OK) and export.problem(own, records) is None:
      return cls(records, runtime.OnnxModel(own), exported_now=False)  # a read-only workdir's current export
    folder = Path(onnx_dir) if onnx_dir is not None else cache_root(records.workdir, export.DEFAULT_DIR)
    if onnx_dir is not None:  # the user's export: used as it is, or refused
      why = export.problem(folder, records)
      if why is not None:
        raise export.ExportError(
          f"--onnx_dir {why}; export it again: python -m jsim.export --workdir={records.workdir} --out={folder}"
        )
      return cls(records, runtime.OnnxModel(folder), exported_now=False)
    with export.locked(folder):  # W/onnx is this workdir's cache: (re)exported when missing or stale
      why = export.problem(folder, records)
      if why is not None:
        export.require_onnx()
        export.export_records(records, folder, cache=True)
      return cls(records, runtime.OnnxModel(folder), exported_now=why is not None)

  @property
  def stage1_steps(self) -> list[int]:
    return self._stage1_steps

  def _gallery_batch(self) -> int:
    from jsim.export import runtime

    return runtime.EMBED_BATCH

  def _model_key(self) -> str:
    return json.dumps(["onnx", self.onnx.meta["export_id"], self.onnx.meta["fingerprint"], _CACHE_VERSION])

  def embed_prepared(self, images: np.ndarray) -> np.ndarray:
    return self.onnx.embed_uint8(images)

  def probabilities(self, emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
    emb_a, emb_b = np.asarray(emb_a, np.float32), np.asarray(emb_b, np.float32)
    if emb_a.shape != emb_b.shape or emb_a.ndim != 2 or emb_a.shape[1] != self.dim:
      raise ValueError(f"probabilities needs two [N, {self.dim}] arrays, got {emb_a.shape} and {emb_b.shape}")
    return self.onnx.probabilities(emb_a, emb_b).astype(np.float64)

  def scores(self, query_embedding: np.ndarray, gallery_embeddings: np.ndarray) -> np.ndarray:
    q = np.asarray(query_embedding, np.float32).reshape(-1)
    g = np.asarray(gallery_embeddings, np.float32)
    if q.shape != (self.dim,) or g.ndim != 2 or g.shape[1] != self.dim:
      raise ValueError(f"scores needs a [{self.dim}] query and [N, {self.dim}] gallery, got {q.shape}, {g.shape}")
    return self.onnx.scores(q, g).astype(np.float64)
