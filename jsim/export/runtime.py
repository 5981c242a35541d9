"""The exported graphs run by onnxruntime: what `predict.Similarity(backend="onnx")` calls.

    model = OnnxModel("W/onnx")
    e = model.embed_uint8(images)          # uint8 [N, S, S, 3] -> float32 [N, E]
    p = model.probabilities(e[:1], e[1:])  # P(same) [N]

No JAX: numpy and onnxruntime only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jsim import export

EMBED_BATCH = 64  # images per embed call (memory, not speed: onnxruntime takes any N)
SCORE_CHUNK = 65536  # gallery rows per similarity call


def require_onnxruntime():
  try:
    import onnxruntime
  except ImportError:
    raise export.MissingPackage(f"the ONNX backend needs onnxruntime; {export.INSTALL_HINT}") from None
  return onnxruntime


def available() -> bool:
  try:
    require_onnxruntime()
    return True
  except export.MissingPackage:
    return False


class OnnxModel:
  """embed.onnx and similarity.onnx of an export folder, in onnxruntime sessions."""

  def __init__(self, folder: str | os.PathLike, *, threads: int | None = None):
    ort = require_onnxruntime()
    self.folder = Path(folder)
    meta = export.read_meta(self.folder)
    if meta is None:
      raise export.ExportError(f"{self.folder} holds no jsim ONNX export")
    self.meta = meta
    self.image_size = int(meta["image_size"])
    self.dim = int(meta["embedding_dim"])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
      options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    self._embed = ort.InferenceSession(str(self.folder / export.EMBED_FILE), options, providers=providers)
    self._similarity = ort.InferenceSession(str(self.folder / export.SIMILARITY_FILE), options, providers=providers)

  def embed_uint8(self, images: np.ndarray) -> np.ndarray:
    """float32 [N, dim] of uint8 [N, image_size, image_size, 3] images."""
    images = np.ascontiguousarray(images, np.uint8)
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"embed needs uint8 [N, {self.image_size}, {self.image_size}, 3] images, got {images.shape}")
    out = [
      self._embed.run(None, {"images": images[i : i + EMBED_BATCH]})[0] for i in range(0, len(images), EMBED_BATCH)
    ]
    return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

  def probabilities(self, e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
    """P(same) [N] float32 of row-wise pairs [N, dim]."""
    e1 = np.ascontiguousarray(e1, np.float32)
    e2 = np.ascontiguousarray(e2, np.float32)
    out = [
      self._similarity.run(None, {"e1": e1[i : i + SCORE_CHUNK], "e2": e2[i : i + SCORE_CHUNK]})[0]
      for i in range(0, len(e1), SCORE_CHUNK)
    ]
    return np.concatenate(out) if out else np.zeros(0, np.float32)

  def scores(self, query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """P(same) [N] of one query [dim] against gallery rows [N, dim]."""
    q = np.asarray(query, np.float32).reshape(1, -1)
    return self.probabilities(np.broadcast_to(q, gallery.shape), gallery)
