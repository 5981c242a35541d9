"""Use a trained workdir: P(same) of two images, and a folder ranked against a query.

Command line (also installed as `jsim-predict`):

  python -m jsim.predict --workdir=W a.jpg b.png
  python -m jsim.predict --workdir=W --query=q.jpg --gallery=DIR [--top=10] [--html=out.html] [--sheet=out.png]

Python (notebooks):

  sim = jsim.predict.Similarity.load("W")
  sim.probability("a.jpg", "b.png")         # paths, PIL images or uint8 arrays -> float
  sim.embed(["a.jpg", pil_image, array])    # float32 [N, D]
  sim.search("q.jpg", "photos/", top=10)    # [(path, probability), ...], best first

An image goes through exactly what the training images went through: PIL decode,
convert('RGB') (gray replicated, alpha dropped), a PIL bilinear resize to the
data's image size (W/preprocessing.json "image_size"; `tiny_imagenet.decode_image`,
the call the data layer uses), then on the device `augment.preprocess` with the
workdir's mean/std and classifier.input_size, and the embedding of the best stage-1
checkpoint (Mc without its head). Ms, from the best stage-2 checkpoint, turns two
embeddings into P(same). EXIF orientation is ignored, as in training.

A gallery is embedded once and cached in W/predict_cache/<hash of its path>.npz
(files, sizes, mtimes, embeddings, and the stage-1 checkpoints they came from);
a later search embeds only files that were added or changed, and everything
again when a stage-1 checkpoint changed.

Ensembles (similarity.ensemble_workdirs): the embedding is the concatenation of
this workdir's Mc and each member's Mc, each restored from its own workdir, in
the order stage 2 recorded.

Only numpy, PIL and JSON are imported up front: the checks of the workdir's
records run before JAX loads, so a bad command fails fast.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import html
import io
import json
import math
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
_CACHE_VERSION = 1
_SCORE_CHUNK = 4096      # gallery embeddings scored per device call
_PROG = "jsim-predict"

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


class Match(NamedTuple):
  path: str
  probability: float


# ----------------------------------------------------------------------------- images


def _pil_to_training_rgb(im: Image.Image, image_size: int) -> np.ndarray:
  # The same two steps as tiny_imagenet.decode_image (kept in step with it; a test compares them).
  if im.mode != "RGB":
    im = im.convert("RGB")
  if im.size != (image_size, image_size):
    im = im.resize((image_size, image_size), Image.BILINEAR)
  return np.asarray(im, dtype=np.uint8)


def prepare_image(image: ImageLike, image_size: int) -> np.ndarray:
  """uint8 RGB [image_size, image_size, 3] of a path, PIL image or uint8 array, decoded like training data.

  Arrays may be [H, W] (gray), [H, W, 1], [H, W, 3] (RGB) or [H, W, 4] (RGBA).
  Raises FileNotFoundError for a missing file and ValueError for anything that is not an image.
  """
  if isinstance(image, (str, os.PathLike)):
    path = Path(image)
    if not path.exists():
      raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
      raise ValueError(f"{path} is a directory, not an image")
    from jsim.data import tiny_imagenet
    try:
      return tiny_imagenet.decode_image(path.read_bytes(), image_size)[0]
    except UnidentifiedImageError:
      raise ValueError(f"{path}: not a readable image (PIL does not recognise its format)") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
      raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {_first_line(e)})") from None
  if isinstance(image, Image.Image):
    try:
      image.load()
      return _pil_to_training_rgb(image, image_size)
    except Exception as e:
      raise ValueError(f"PIL image {image!r} cannot be read ({type(e).__name__}: {_first_line(e)})") from None
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise ValueError(f"image arrays must be uint8, got {image.dtype}")
    arr = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))) or 0 in arr.shape:
      raise ValueError(f"image arrays must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {image.shape}")
    return _pil_to_training_rgb(Image.fromarray(np.ascontiguousarray(arr)), image_size)
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


def _read(path: Path, what: str) -> Any:
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: {what}")
  return wd.read_json(path)


@dataclasses.dataclass(frozen=True)
class _Records:
  """What one workdir recorded about its stage 1 and embeddings (JSON only, no JAX)."""
  workdir: Path
  config: dict            # W/config.json overlaid with stage1/config.json
  num_classes: int
  image_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  stage1_step: int
  embedding_dim: int

  @property
  def model_name(self) -> str:
    return self.config["model"]["name"]


def _stage1_records(workdir: Path) -> _Records:
  if not workdir.is_dir():
    raise FileNotFoundError(f"workdir {workdir}: no such directory")
  hint = "train the model first (python -m jsim.main --config=... --workdir=...)"
  pre = _read(workdir / "preprocessing.json", f"not a trained jsim workdir; {hint}")
  split = _read(workdir / "split.json", f"not a trained jsim workdir; {hint}")
  stage1 = _read(workdir / wd.STAGE1 / "config.json", f"stage 1 never ran here; {hint}")
  result = _read(workdir / wd.STAGE1 / wd.RESULT_FILE, f"stage 1 has not finished; {hint}")
  if not (workdir / wd.STAGE1 / "checkpoints").is_dir():
    raise FileNotFoundError(f"{workdir / wd.STAGE1}/checkpoints: no checkpoint; {hint}")
  meta = _read(workdir / wd.EMBEDDINGS / "meta.json", "no embeddings; run --config.stage=embed first")
  config = {}
  if (workdir / "config.json").exists():
    config = wd.read_json(workdir / "config.json")
  for key in ("seed", "data", "model", "classifier"):
    if key in stage1:
      config[key] = stage1[key]
  name = config["model"]["name"]
  if meta.get("model") != name:
    raise ValueError(f"{workdir / wd.EMBEDDINGS}/meta.json was made by model {meta.get('model')!r}, stage 1 "
                     f"is {name!r}; rerun --config.stage=embed")
  if meta.get("stage1_step") != result["best_step"]:
    raise ValueError(f"{workdir / wd.EMBEDDINGS} come from stage-1 step {meta.get('stage1_step')}, the best "
                     f"stage-1 checkpoint is step {result['best_step']}; rerun --config.stage=embed and similarity")
  mean, std = tuple(float(x) for x in pre["mean"]), tuple(float(x) for x in pre["std"])
  if len(mean) != 3 or len(std) != 3:
    raise ValueError(f"{workdir}/preprocessing.json: mean and std need 3 values each")
  image_size = int(pre.get("image_size") or config.get("data", {}).get("image_size", 64))
  return _Records(workdir=workdir, config=config, num_classes=len(split["seen_classes"]), image_size=image_size,
                  mean=mean, std=std, stage1_step=int(result["best_step"]), embedding_dim=int(meta["dim"]))


def _resolve_member(path: str, workdir: Path) -> Path:
  for candidate in (Path(path), workdir.parent / path, workdir / path):
    if candidate.is_dir():
      return candidate
  raise FileNotFoundError(f"{workdir / wd.STAGE2}/config.json names ensemble workdir {path!r}, which is not a "
                          f"directory (from here, nor beside {workdir})")


def _stage2_records(workdir: Path, own: _Records) -> tuple[dict, list[_Records]]:
  """stage2/config.json and the records of every embedding source it names (this workdir first)."""
  hint = "train stage 2 first (--config.stage=similarity)"
  stage2 = _read(workdir / wd.STAGE2 / "config.json", f"stage 2 never ran here; {hint}")
  result = _read(workdir / wd.STAGE2 / wd.RESULT_FILE, f"stage 2 has not finished; {hint}")
  if not (workdir / wd.STAGE2 / "checkpoints").is_dir():
    raise FileNotFoundError(f"{workdir / wd.STAGE2}/checkpoints: no checkpoint; {hint}")
  where = workdir / wd.STAGE2 / "config.json"
  if stage2.get("model") != own.model_name:
    raise ValueError(f"{where}: stage 2 was trained for model {stage2.get('model')!r}, stage 1 is "
                     f"{own.model_name!r}; retrain stage 2 (--config.stage=similarity --config.overwrite=True)")
  members = [own] + [_stage1_records(_resolve_member(p, workdir))
                     for p in stage2.get("similarity", {}).get("ensemble_workdirs", [])]
  sources = stage2.get("embeddings", [])
  if len(sources) != len(members):
    raise ValueError(f"{where} records {len(sources)} embedding sources for {len(members)} workdirs "
                     f"(this one + similarity.ensemble_workdirs)")
  for src, rec in zip(sources, members):
    got = {"model": rec.model_name, "stage1_step": rec.stage1_step, "dim": rec.embedding_dim}
    diffs = [f"{k} {src.get(k)!r} there, {v!r} in {rec.workdir}" for k, v in got.items() if src.get(k) != v]
    if diffs:
      raise ValueError(f"{where}: stage 2 does not match the stage-1 backbone ({'; '.join(diffs)}); rerun "
                       f"--config.stage=embed and --config.stage=similarity with --config.overwrite=True")
  if len({m.image_size for m in members}) > 1:
    raise ValueError(f"{where}: the ensemble's workdirs use different image sizes "
                     f"{[m.image_size for m in members]}; they must share the data")
  dim = sum(m.embedding_dim for m in members)
  if "embedding_dim" in result and int(result["embedding_dim"]) != dim:
    raise ValueError(f"{workdir / wd.STAGE2}/result.json: embedding_dim {result['embedding_dim']} differs from "
                     f"the {dim} of its embedding sources")
  return stage2, members


@dataclasses.dataclass(frozen=True)
class WorkdirRecords:
  """A trained workdir's records, checked against each other (JSON only: no JAX, no checkpoint read)."""
  workdir: Path
  stage2: dict                # stage2/config.json
  members: list[_Records]     # this workdir's stage 1, then each ensemble member's
  threshold: float | None     # report.json "val_threshold"

  @property
  def image_size(self) -> int:
    return self.members[0].image_size


def read_records(workdir: str | os.PathLike) -> WorkdirRecords:
  """Reads and cross-checks what a trained workdir recorded; the cheap part of `Similarity.load`."""
  workdir = Path(workdir)
  own = _stage1_records(workdir)
  stage2, members = _stage2_records(workdir, own)
  report = workdir / "report.json"
  threshold = wd.read_json(report).get("val_threshold") if report.exists() else None
  return WorkdirRecords(workdir, stage2, members, None if threshold is None else float(threshold))


def config_from_dict(recorded: dict):
  """A ConfigDict: base_config() overlaid with a recorded (JSON) config; lists become tuples where
  the base has tuples, keys the base lacks are ignored."""
  from jsim import configs
  c = configs.base_config()
  _overlay(c, recorded)
  return c


def _overlay(cfg, d: dict) -> None:
  import ml_collections
  for key, value in d.items():
    if key not in cfg:
      continue
    current = cfg[key]
    if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
      _overlay(current, value)
      continue
    if isinstance(current, tuple) and isinstance(value, list):
      value = tuple(value)
    with cfg.ignore_type():
      cfg[key] = value


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
  checkpoint_stamp: int       # mtime_ns of the checkpoint folder: a retrained step invalidates caches
  variables: Any
  _apply: Callable

  def embed_uint8(self, images: np.ndarray) -> np.ndarray:
    """float32 [N, dim] of uint8 [N, S, S, 3] images (S = image_size), in padded batches."""
    import jax
    n = images.shape[0]
    out = []
    for start in range(0, n, self.batch_size):
      chunk = images[start:start + self.batch_size]
      size = _bucket(len(chunk), self.batch_size)  # a few compiled shapes, not one per count
      if size > len(chunk):
        chunk = np.concatenate([chunk, np.zeros((size - len(chunk),) + chunk.shape[1:], np.uint8)])
      e = self._apply(self.variables, chunk)
      out.append(np.asarray(jax.device_get(e))[:min(self.batch_size, n - start)])
    return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def _bucket(n: int, cap: int) -> int:
  return min(cap, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _restore(stage_dir: Path, abstract, what: str):
  from jsim.train import loop
  try:
    return loop.restore_best(stage_dir, abstract)
  except FileNotFoundError:
    raise
  except Exception as e:  # orbax: shapes/structure that do not fit the recorded config
    raise ValueError(f"{stage_dir}/checkpoints: the {what} checkpoint does not fit the recorded config "
                     f"({type(e).__name__}: {_first_line(e)[:300]})") from None


def _load_backbone(rec: _Records, mesh) -> Backbone:
  import jax
  import jax.numpy as jnp
  from jsim.data import augment
  from jsim.train import classifier

  config = config_from_dict(rec.config)
  model = classifier.build_classifier(config, rec.num_classes)
  dim = getattr(model, "embedding_dim", rec.embedding_dim)
  if dim != rec.embedding_dim:
    raise ValueError(f"{rec.workdir / wd.EMBEDDINGS}/meta.json: dim {rec.embedding_dim}, but model "
                     f"{rec.model_name!r} embeds into {dim}")
  abstract = classifier.abstract_state(config, model, rec.num_classes, mesh)
  state, _ = _restore(rec.workdir / wd.STAGE1, abstract, "stage-1")
  step = int(state.step)
  if step != rec.stage1_step:
    raise ValueError(f"{rec.workdir / wd.STAGE1}: the best checkpoint is step {step}, its result.json and the "
                     f"embeddings say {rec.stage1_step}; rerun the stages")
  mean, std, input_size = rec.mean, rec.std, int(config.classifier.input_size)

  @jax.jit
  def apply(variables, images):
    # What the embeddings stage computes (jsim.evaluate.embed.embed_images).
    x = augment.preprocess(images, mean, std, input_size)
    _, e = model.apply(variables, x, train=False)
    return e.astype(jnp.float32)

  stamp = (rec.workdir / wd.STAGE1 / "checkpoints" / str(step)).stat().st_mtime_ns
  return Backbone(workdir=rec.workdir, model_name=rec.model_name, stage1_step=step, dim=dim,
                  image_size=rec.image_size, input_size=input_size, batch_size=max(1, int(config.embed.batch_size)),
                  checkpoint_stamp=stamp, variables=state.variables, _apply=apply)


# ----------------------------------------------------------------------------- the API


@dataclasses.dataclass
class Gallery:
  """The embedded images of a folder."""
  root: Path
  files: list[str]            # relative posix paths, sorted
  embeddings: np.ndarray      # float32 [len(files), D]
  skipped: list[tuple[str, str]]  # (relative path, why) of files that could not be read
  reused: int                 # embeddings taken from the cache
  embedded: int               # embeddings computed now
  cache_path: Path | None

  @property
  def paths(self) -> list[Path]:
    return [self.root / f for f in self.files]


class Similarity:
  """A trained workdir's Mc (or ensemble of them) and Ms, ready to compare images.

  Attributes:
    workdir: the workdir.
    threshold: the validation threshold of W/report.json ("val_threshold"), None without a report.
    image_size: side the images are resized to first (the data's image size).
    dim: embedding width Ms takes (the sum over the ensemble).
    backbones: the Mc of this workdir, then of each ensemble member.
  """

  def __init__(self, workdir: Path, backbones: list[Backbone], prob_fn: Callable, params: Any, stage2_step: int,
               threshold: float | None):
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
  def load(cls, workdir: str | os.PathLike) -> "Similarity":
    """Restores the best stage-1 and stage-2 checkpoints of a trained workdir.

    Raises FileNotFoundError for a workdir without trained stages, ValueError when its
    records disagree (e.g. stage 2 trained on another backbone's embeddings).
    """
    return cls.from_records(read_records(workdir))

  @classmethod
  def from_records(cls, records: "WorkdirRecords") -> "Similarity":
    """Like `load`, from records already read (and checked) by `read_records`."""
    from jsim import parallel
    from jsim.models.similarity import make_prob_fn
    from jsim.train import similarity

    mesh = parallel.make_mesh()
    backbones = [_load_backbone(rec, mesh) for rec in records.members]
    config = config_from_dict({**records.members[0].config, "similarity": records.stage2["similarity"]})
    dim = sum(b.dim for b in backbones)
    model = similarity.build_similarity(config, dim)
    state, _ = _restore(records.workdir / wd.STAGE2, similarity.abstract_state(config, model, dim, mesh), "stage-2")
    return cls(records.workdir, backbones, make_prob_fn(model), state.params, int(state.step), records.threshold)

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
    n = g.shape[0]
    chunk = _bucket(n, _SCORE_CHUNK)
    out = []
    for start in range(0, n, chunk):
      part = g[start:start + chunk]
      if len(part) < chunk:
        part = np.concatenate([part, np.zeros((chunk - len(part), self.dim), np.float32)])
      out.append(np.asarray(self._query_probs(self._params, q, part))[:min(chunk, n - start)])
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

  def is_same(self, probability: float, threshold: float | None = None) -> bool:
    """The evaluation's decision rule: same iff p > threshold (None: 0.5)."""
    return probability > (0.5 if threshold is None else threshold)

  # -- gallery search

  def cache_path(self, gallery_dir: str | os.PathLike) -> Path:
    key = hashlib.sha1(str(Path(gallery_dir).resolve()).encode()).hexdigest()[:16]
    return self.workdir / CACHE_DIR / f"{key}.npz"

  def _model_key(self) -> str:
    return json.dumps([[str(b.workdir.resolve()), b.model_name, b.stage1_step, b.checkpoint_stamp, b.image_size,
                        b.input_size, b.dim] for b in self.backbones] + [_CACHE_VERSION])

  def gallery(self, gallery_dir: str | os.PathLike, *, use_cache: bool = True,
              progress: bool = False) -> Gallery:
    """Embeds the images of a folder (recursive), reusing the cache for unchanged files.

    Unreadable files are skipped and listed in `Gallery.skipped`. Raises ValueError if the
    folder holds no readable image.
    """
    root = Path(gallery_dir)
    listing = _listing(root)
    cache_path = self.cache_path(root) if use_cache else None
    cached = self._read_cache(cache_path) if cache_path else {}
    rows: dict[str, np.ndarray] = {}
    todo = []
    for rel, size, mtime in listing:
      hit = cached.get(rel)
      if hit is not None and hit[0] == size and hit[1] == mtime:
        rows[rel] = hit[2]
      else:
        todo.append(rel)
    skipped = []
    batch = max(b.batch_size for b in self.backbones)
    bar = None
    if progress and todo:
      from tqdm import tqdm
      bar = tqdm(total=len(todo), desc="embedding the gallery", unit="img", file=sys.stderr, disable=None)
    for start in range(0, len(todo), batch):
      names, arrays = [], []
      for rel in todo[start:start + batch]:
        try:
          arrays.append(prepare_image(root / rel, self.image_size))
          names.append(rel)
        except (ValueError, OSError) as e:
          skipped.append((rel, str(e)))
      if arrays:
        for rel, e in zip(names, self.embed_prepared(np.stack(arrays))):
          rows[rel] = e
      if bar is not None:
        bar.update(len(todo[start:start + batch]))
    if bar is not None:
      bar.close()
    stats = {rel: (size, mtime) for rel, size, mtime in listing}
    files = [rel for rel, _, _ in listing if rel in rows]
    if not files:
      raise ValueError(f"--gallery {root}: none of its {len(listing)} image files could be read "
                       f"(first: {skipped[0][1]})")
    emb = np.stack([rows[f] for f in files]).astype(np.float32)
    embedded = len(todo) - len(skipped)
    if cache_path is not None and (embedded or len(files) != len(cached) or set(files) != set(cached)):
      self._write_cache(cache_path, root, files, [stats[f] for f in files], emb)
    return Gallery(root=root, files=files, embeddings=emb, skipped=skipped, reused=len(files) - embedded,
                   embedded=embedded, cache_path=cache_path)

  def _read_cache(self, path: Path) -> dict[str, tuple[int, int, np.ndarray]]:
    if not path.exists():
      return {}
    try:
      with np.load(path, allow_pickle=False) as z:
        if str(z["model_key"]) != self._model_key() or z["embeddings"].shape[1:] != (self.dim,):
          return {}  # another checkpoint: embed everything again
        return {str(f): (int(s), int(m), e) for f, s, m, e in
                zip(z["files"], z["sizes"], z["mtimes_ns"], z["embeddings"])}
    except Exception:  # a damaged cache is rebuilt, never fatal
      return {}

  def _write_cache(self, path: Path, root: Path, files: list[str], stats: list[tuple[int, int]],
                   emb: np.ndarray) -> None:
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_name(path.name + ".tmp")
      with open(tmp, "wb") as f:
        np.savez(f, files=np.asarray(files, dtype=str), sizes=np.asarray([s for s, _ in stats], np.int64),
                 mtimes_ns=np.asarray([m for _, m in stats], np.int64), embeddings=emb,
                 model_key=np.asarray(self._model_key()), gallery=np.asarray(str(root.resolve())),
                 stage1_steps=np.asarray([b.stage1_step for b in self.backbones], np.int64))
      tmp.replace(path)
    except OSError as e:  # a read-only workdir: search still works, uncached
      print(f"{_PROG}: warning: cannot write the gallery cache {path} ({e})", file=sys.stderr)

  def rank(self, query: ImageLike, gallery: Gallery, top: int | None = 10, *, exclude_query: bool = True,
           query_path: str | os.PathLike | None = None) -> list[Match]:
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

  def search(self, query: ImageLike, gallery_dir: str | os.PathLike, top: int | None = 10, *,
             use_cache: bool = True, exclude_query: bool = True) -> list[Match]:
    """The `top` images of a folder most likely to show the same kind of object as `query`:
    a list of (path, probability), best first. The query file itself is left out."""
    return self.rank(query, self.gallery(gallery_dir, use_cache=use_cache), top, exclude_query=exclude_query)


# ----------------------------------------------------------------------------- outputs


def _thumbnail(path: str | Path, side: int = 160) -> Image.Image:
  with Image.open(path) as im:
    im = im.convert("RGB")
    im.thumbnail((side, side), Image.BILINEAR)
    return im.copy()


def _data_uri(im: Image.Image) -> str:
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_html(out: str | Path, query: str | Path, matches: Sequence[Match], threshold: float | None) -> Path:
  """A self-contained page: the query and its matches as inlined thumbnails, with P(same)."""
  out = Path(out)
  t = 0.5 if threshold is None else threshold
  cards = []
  for rank, m in enumerate(matches, 1):
    same = m.probability > t
    cards.append(f'<figure class="{"same" if same else "diff"}"><img src="{_data_uri(_thumbnail(m.path))}">'
                 f'<figcaption>{rank}. p = {m.probability:.4f}<br>{html.escape(str(m.path))}</figcaption></figure>')
  thr = f"the validation threshold {t:.3f}" if threshold is not None else "0.5"
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>jsim search: {html.escape(Path(query).name)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
img {{ width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated; background: #eee; }}
figure {{ display: inline-block; margin: 6px; padding: 4px; border: 4px solid #ccc; width: 140px;
          vertical-align: top; font-size: 11px; word-break: break-all; }}
figure.query {{ border-color: #1e5adc; }}
figure.same {{ border-color: #14aa28; }}
figure.diff {{ border-color: #d21e1e; }}
</style></head><body>
<h1>Images most similar to the query</h1>
<p>P(same kind of object) by the similarity net; green: above {thr}, red: below.</p>
<figure class="query"><img src="{_data_uri(_thumbnail(query))}">
<figcaption>query<br>{html.escape(str(query))}</figcaption></figure>
<hr>
{chr(10).join(cards)}
</body></html>
"""
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(page)
  return out


def write_sheet(out: str | Path, query: str | Path, matches: Sequence[Match], threshold: float | None,
                columns: int = 6) -> Path:
  """A PNG sheet: the query (blue border) and its matches (green above the threshold, red below)."""
  from matplotlib.figure import Figure
  from jsim.evaluate import figures

  t = 0.5 if threshold is None else threshold
  cells = [(query, "query", (30, 90, 220))] + [
      (m.path, f"{i}: p={m.probability:.3f}\n{Path(m.path).name[:18]}",
       (20, 170, 40) if m.probability > t else (210, 30, 30)) for i, m in enumerate(matches, 1)]
  cols = min(columns, len(cells))
  rows = math.ceil(len(cells) / cols)
  fig = Figure(figsize=(1.6 * cols, 2.0 * rows))
  axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
  for ax, (path, title, color) in zip(axes, cells):
    img = np.asarray(_thumbnail(path, 128))
    width = max(2, max(img.shape[:2]) // 24)
    bordered = np.empty((img.shape[0] + 2 * width, img.shape[1] + 2 * width, 3), np.uint8)
    bordered[...] = color
    bordered[width:-width, width:-width] = img
    ax.imshow(bordered)
    ax.set_title(title, fontsize=7)
  for ax in axes:
    ax.axis("off")
  fig.tight_layout()
  return figures._save(fig, out)


# ----------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, not usage + error
    print(f"{_PROG}: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog=_PROG, description="Compare two images, or rank a folder against a query image, with a "
              "trained jsim workdir.",
              epilog="examples:\n  jsim-predict --workdir=W a.jpg b.png\n"
                     "  jsim-predict --workdir=W --query=q.jpg --gallery=photos/ --top=10 --html=out.html",
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("images", nargs="*", help="two images to compare")
  p.add_argument("--workdir", required=True, help="a workdir trained by python -m jsim.main")
  p.add_argument("--query", help="query image for a gallery search")
  p.add_argument("--gallery", help="folder of images to rank (recursive)")
  p.add_argument("--top", type=int, default=10, help="how many matches to show (0: all)")
  p.add_argument("--html", help="write an HTML page of the query and its matches")
  p.add_argument("--sheet", help="write a PNG sheet of the query and its matches")
  p.add_argument("--no_cache", "--no-cache", action="store_true", help="embed the gallery again, ignore the cache")
  p.add_argument("--json", action="store_true", help="print the result as JSON")
  p.add_argument("--verbose", action="store_true", help="keep library log messages")
  return p


def _quiet_libraries() -> None:
  import logging
  logging.getLogger().setLevel(logging.ERROR)
  for name in ("jax", "absl", "orbax"):
    logging.getLogger(name).setLevel(logging.ERROR)
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    pass


def _yes(b: bool) -> str:
  return "yes" if b else "no"


def _run_pair(sim: Similarity, names: Sequence[str], images: Sequence[np.ndarray], as_json: bool) -> None:
  a, b = names
  p = sim.probability(*images)
  t = sim.threshold
  if as_json:
    print(json.dumps({"a": a, "b": b, "probability": p, "same_at_0.5": sim.is_same(p), "val_threshold": t,
                      "same_at_val_threshold": None if t is None else sim.is_same(p, t)}))
    return
  print(f"P(same) = {p:.4f}   ({a} vs {b})")
  print(f"same kind of object at p > 0.5: {_yes(sim.is_same(p))}")
  if t is not None:
    print(f"same kind of object at p > {t:.3f} (validation threshold): {_yes(sim.is_same(p, t))}")


def _run_search(sim: Similarity, args, query: np.ndarray) -> None:
  gallery = sim.gallery(args.gallery, use_cache=not args.no_cache, progress=not args.json)
  where = f" (cache {gallery.cache_path})" if gallery.cache_path else " (no cache)"
  print(f"{_PROG}: gallery {args.gallery}: {len(gallery.files)} images, {gallery.reused} from the cache, "
        f"{gallery.embedded} embedded{where}", file=sys.stderr)
  if gallery.skipped:
    print(f"{_PROG}: warning: skipped {len(gallery.skipped)} unreadable file(s), first: {gallery.skipped[0][1]}",
          file=sys.stderr)
  matches = sim.rank(query, gallery, args.top, query_path=args.query)
  t = sim.threshold
  if args.html:
    write_html(args.html, args.query, matches, t)
  if args.sheet:
    write_sheet(args.sheet, args.query, matches, t)
  if args.json:
    print(json.dumps({"query": args.query, "gallery": args.gallery, "val_threshold": t,
                      "results": [{"rank": i, "probability": m.probability, "path": m.path}
                                  for i, m in enumerate(matches, 1)],
                      "cache": {"reused": gallery.reused, "embedded": gallery.embedded,
                                "skipped": [f for f, _ in gallery.skipped]}}))
    return
  thr = 0.5 if t is None else t
  print(f"query: {args.query}; P(same) with each of {len(gallery.files)} images in {args.gallery}"
        f"; 'same' at p > {thr:.3f}" + (" (validation threshold)" if t is not None else ""))
  print(f"{'rank':>4}  {'P(same)':>7}  same  file")
  for i, m in enumerate(matches, 1):
    print(f"{i:>4}  {m.probability:7.4f}  {_yes(sim.is_same(m.probability, thr)):<4}  {m.path}")
  for what, path in (("html", args.html), ("sheet", args.sheet)):
    if path:
      print(f"{what}: {path}")


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (0 ok, 1 bad input, 2 bad usage)."""
  parser = _parser()
  args = parser.parse_args(argv)
  search = args.query is not None or args.gallery is not None
  if search and (args.query is None or args.gallery is None):
    parser.error("a search needs both --query and --gallery")
  if search and args.images:
    parser.error(f"give either two images or --query/--gallery, not both (got {' '.join(args.images)})")
  if not search and len(args.images) != 2:
    parser.error(f"expected two images to compare (or --query and --gallery), got {len(args.images)}")
  if not search and (args.html or args.sheet):
    parser.error("--html and --sheet go with --query/--gallery")
  if not args.verbose:
    _quiet_libraries()
  try:
    # Cheap checks first (JSON records, the input images, the gallery listing): a bad
    # command fails before JAX and the checkpoints load.
    records = read_records(args.workdir)
    names = [args.query] if search else args.images
    images = [prepare_image(name, records.image_size) for name in names]
    if search:
      _listing(args.gallery)
    sim = Similarity.from_records(records)
    if search:
      _run_search(sim, args, images[0])
    else:
      _run_pair(sim, names, images, as_json=args.json)
  except (ValueError, OSError) as e:  # OSError: FileNotFound, NotADirectory, Permission, ...
    print(f"{_PROG}: {_first_line(e)}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"{_PROG}: interrupted", file=sys.stderr)
    return 130
  return 0


def entry_point() -> None:
  sys.exit(main())


if __name__ == "__main__":
  entry_point()
