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

The modules: `images` (prepare_image), `similarity` (Similarity, OnnxSimilarity, Backbone), `gallery`
(Gallery, the search and its cache, mixed into Similarity), `cli` (the command line).
"""

from __future__ import annotations

from jsim.predict.gallery import CACHE_DIR, IMAGE_EXTENSIONS, Gallery, GallerySearch, Match, cache_root, list_images
from jsim.predict.images import ImageLike, prepare_image
from jsim.predict.similarity import BACKENDS, Backbone, OnnxSimilarity, Similarity

__all__ = [
  "BACKENDS",
  "CACHE_DIR",
  "IMAGE_EXTENSIONS",
  "Backbone",
  "Gallery",
  "GallerySearch",
  "ImageLike",
  "Match",
  "OnnxSimilarity",
  "Similarity",
  "cache_root",
  "list_images",
  "prepare_image",
]
