"""The model behind a trained workdir: its Mc (or an ensemble's) and Ms, by JAX from the checkpoints or by
onnxruntime from their export; embeddings, P(same) of pairs, scores of a query against many."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from jsim import workdir as wd
from jsim.predict.gallery import _CACHE_VERSION, GallerySearch, cache_root
from jsim.predict.images import _PROG, ImageLike, _first_line, prepare_image

_SCORE_CHUNK = 4096  # gallery embeddings scored per device call


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


BACKENDS = ("auto", "jax", "onnx")


class Similarity(GallerySearch):
  """A trained workdir's Mc (or ensemble of them) and Ms, ready to compare images; a folder is searched with
  `gallery`, `rank` and `search` (from GallerySearch, jsim.predict.gallery).

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
    from jsim.train import similarity

    mesh = parallel.make_mesh()
    backbones = [_load_backbone(rec, mesh) for rec in records.members]
    config = configs.config_from_dict({**records.members[0].config, "similarity": records.stage2["similarity"]})
    dim = sum(b.dim for b in backbones)
    # Ms's best checkpoint, or the calibrated distance (similarity.model=distance, step 0).
    prob_fn, params = similarity.restore_scorer(config, records.workdir, mesh, dim=dim)
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
