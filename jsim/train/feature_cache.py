"""The frozen backbone's outputs, computed once: stage 1 trains the head on them, the embeddings reuse them.

With model.freeze=backbone and stage-1 augmentation off (`applies`: classifier.augment.prob 0 or
nothing enabled), for any stage-1 loss, every image reaches the frozen
backbone as the eval path's preprocess() makes it, and the backbone runs in inference mode: its
pooled features are a function of the frozen weights, the model, the input size, the
normalisation and the image alone. They are computed once, for T180 (stage 1's train and
validation images) and the test images, with the embeddings stage's own function and batch size
(batching.embed_images, config.embed.batch_size), and kept in

    W/feature_cache/  train.npy  float32 [len(T180), D], in data.t180_idx order
                      test.npy   float32 [len(test), D], in data.test_idx order
                      meta.json  the key (below), the counts, each array file's SHA-256 (a file changed
                                 since it was written is not read: computed again)

and a copy in <data.cache_dir>/features/<digest of the key>/ (`shared_dir`), the same three files, from which
any other workdir with the same key (another loss, learning rate or optimizer on the same backbone and split)
takes its W/feature_cache instead of computing it.

Stage 1 then runs only the heads on them (the classifier head, or a metric loss's embedding head
and parameters; dropout included, with the same random draws: jsim.train.step's "features"
batches), which is the same math as through the frozen backbone (tests/test_feature_cache.py).
The embeddings stage reads them instead of running the backbone again when the best checkpoint's
frozen weights give the same key (`lookup`; stage 1 leaves the frozen weights bitwise unchanged)
and runs only the heads on them: for cross_entropy the embeddings are these very features, for a
metric loss its trained embedding head's projection of them.

The key is everything the features depend on: a SHA-256 of the frozen variables (parameters and
BatchNorm statistics, by content: other weights, another init, a corrupted checkpoint all
differ), the model name, dtype and conv lowering, the input size, the normalisation (its name
and values), a SHA-256 of the images' bytes in cache order (another split, another data set or
an edited image differ), and what sets their rounding: the platform, the batch size and the
device count. XLA:CPU's results for one image depend, in the last bits, on the shape of the
batch it is computed in (measured: a few float32 ULPs between batches of 6 and 16), so the
cache is computed with the embeddings stage's batch size, which makes the embeddings, and so
stage 2 and the evaluation, bitwise those of a run without the cache; the head trained on them
equals the head trained through the backbone bitwise when classifier.batch_size is that batch
size too, and to those last bits otherwise. A cache with another key is never read: it
is computed again and replaced. The arrays are written first and meta.json last, each atomically
(jsim.workdir.write_file / write_json), after an existing meta.json was removed, so a run killed
while caching leaves nothing that reads as a complete cache. meta.json also marks the folder as
work that a failed or interrupted later stage must not remove (jsim.workdir.drop_unused).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import numpy as np
from absl import logging

from jsim import parallel, workdir as wd
from jsim.data import augment, cache
from jsim.models import freeze as freezing
from jsim.train import batching, loop

CACHE_DIR = "feature_cache"
META_FILE = "meta.json"
ARRAYS = ("train", "test")
_HASH_CHUNK = 4096  # images hashed at a time (a copy of at most this many)


def applies(config) -> bool:
  """Whether stage 1 trains the heads on cached features: freeze=backbone and no augmentation."""
  return config.model.freeze == freezing.BACKBONE and augment.is_off(config.classifier.augment)


def frozen_digest(model, variables: dict) -> str:
  """SHA-256 of the frozen variables (params and batch_stats under the model's frozen submodules), by content."""
  mask_fn = freezing.frozen_fn(model)
  h = hashlib.sha256()
  for collection in ("params", "batch_stats"):
    tree = variables.get(collection) or {}
    if not tree:
      continue
    mask = dict(jax.tree_util.tree_flatten_with_path(mask_fn(tree))[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if not mask[path]:
        continue
      a = np.ascontiguousarray(jax.device_get(leaf))
      h.update(f"{collection}{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}".encode())
      h.update(a.tobytes())
  return h.hexdigest()


def images_digest(data) -> str:
  """SHA-256 of the cached images' bytes in cache order: T180 of the train set, then the test images."""
  h = hashlib.sha256()
  for images, idx in ((data.train_set.images, data.t180_idx), (data.test_set.images, data.test_idx)):
    h.update(f"{len(idx)}:{images.shape[1:]}".encode())
    for start in range(0, len(idx), _HASH_CHUNK):
      h.update(np.ascontiguousarray(images[idx[start : start + _HASH_CHUNK]]).tobytes())
  return h.hexdigest()


def cache_key(config, data, model, variables: dict, images_sha256: str | None = None) -> dict:
  """What the cached features are a function of (module docstring); JSON."""
  return {
    "model": config.model.name,
    "dtype": config.model.dtype,
    "conv_impl": config.model.conv_impl,
    "platform": jax.default_backend(),
    "batch_size": int(config.embed.batch_size),
    "devices": jax.device_count(),
    # The backbone's alone: the same features whatever loss and heads train on them.
    "frozen_sha256": frozen_digest(*backbone_of(model, variables)),
    "input_size": int(config.classifier.input_size),
    "normalization": config.data.normalization,
    "mean": [float(m) for m in data.mean],
    "std": [float(s) for s in data.std],
    "images_sha256": images_sha256 or images_digest(data),
    "train_count": len(data.t180_idx),
    "test_count": len(data.test_idx),
  }


def load(workdir: str | Path, key: dict) -> dict | None:
  """{'train', 'test'} of W/feature_cache when it is complete and made with `key`; None otherwise."""
  return _read(Path(workdir) / CACHE_DIR, key)


def _read(out_dir: Path, key: dict) -> dict | None:
  meta_path = out_dir / META_FILE
  if not meta_path.exists():
    return None
  try:
    meta = wd.read_json(meta_path)
  except ValueError:
    return None  # unreadable: computed again
  recorded = meta.get("key") if isinstance(meta, dict) else None
  if recorded != json.loads(json.dumps(key)):
    if isinstance(recorded, dict):
      changed = sorted(k for k in set(recorded) | set(key) if recorded.get(k) != key.get(k))
      logging.info("%s was computed from other inputs (%s): not used", out_dir, ", ".join(changed))
    return None
  changed = wd.changed_file(out_dir, meta.get("sha256"), meta_path)
  if changed is not None:
    logging.warning("%s: not used, the features are computed again", changed)
    return None
  arrays = {}
  for name in ARRAYS:
    try:
      a = np.load(out_dir / f"{name}.npy")
    except (OSError, ValueError):
      return None
    if a.ndim != 2 or a.shape[0] != key[f"{name}_count"] or a.dtype != np.float32:
      return None
    arrays[name] = a
  return arrays


def backbone_of(model, variables: dict) -> tuple:
  """(backbone, its variables): a MetricModel's backbone (its variables under 'backbone'), or the model itself."""
  backbone = getattr(model, "backbone", None)
  if backbone is None:
    return model, variables
  return backbone, {collection: tree["backbone"] for collection, tree in variables.items() if "backbone" in tree}


def compute(config, data, model, variables: dict, mesh) -> dict:
  """{'train', 'test'}: the backbone's outputs (the embeddings stage's embeddings for cross_entropy) of T180
  and the test images with `variables`.

  Polls the stage's preemption guard between batches: a SIGTERM/SIGINT stops it with Preempted
  (nothing written)."""
  input_size = config.classifier.input_size
  model, variables = backbone_of(model, variables)
  embed = batching.make_embed_fn(model, data.mean, data.std, input_size, mesh)
  batch_size = config.embed.batch_size
  parallel.check_divisible(batch_size, mesh, "embed.batch_size")
  out = {}
  with loop.preemption_guard() as guard:
    parts = (("train", data.train_set.images, data.t180_idx), ("test", data.test_set.images, data.test_idx))
    for name, images, idx in parts:
      on_devices = parallel.put_replicated(images, mesh)
      count = [0]

      def fn(batch_idx, mask, on_devices=on_devices, name=name, idx=idx, count=count):
        if guard.stop_requested(agree=count[0] % loop.AGREE_EVERY_STEPS == 0):
          raise loop.Preempted(
            f"{guard.signal_name} while caching the frozen backbone's features ({name}: {count[0] * batch_size}/"
            f"{len(idx)} images): nothing of the cache was kept; rerun the same command to compute it again"
          )
        count[0] += 1
        return embed(variables, on_devices, parallel.put_sharded_batch(batch_idx, mesh))

      desc = f"caching the frozen backbone's features of the {'T180' if name == 'train' else 'test'} images"
      out[name] = batching.rows(list(batching.run(fn, idx, batch_size, desc=desc)))
      del on_devices
  return out


def write(workdir: str | Path, key: dict, arrays: dict) -> None:
  """W/feature_cache: the arrays, then meta.json (the old meta.json removed first); process 0 writes."""
  if parallel.is_main_process():
    _write(Path(workdir) / CACHE_DIR, key, arrays)
  parallel.sync_processes("feature cache written")


def _write(out_dir: Path, key: dict, arrays: dict) -> None:
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / META_FILE).unlink(missing_ok=True)  # incomplete until the new arrays are
  for name in ARRAYS:
    wd.write_npy(out_dir / f"{name}.npy", arrays[name])
  digests = wd.file_digests(out_dir, [f"{name}.npy" for name in ARRAYS])  # (checked by `_read`)
  wd.write_json(out_dir / META_FILE, {"key": key, "dim": int(arrays["train"].shape[1]), "sha256": digests})


def shared_dir(config, key: dict) -> Path:
  """Where a copy of the cache with `key` is kept for other workdirs: <data.cache_dir>/features/<digest of key>.

  A sweep over losses, rates or seeds of the split on one frozen backbone computes its features once: every
  workdir whose key is the same reads this copy (into its own W/feature_cache) instead of running the backbone.
  """
  return cache.resolve_cache_dir(config.data.cache_dir) / "features" / cache.digest([key])[:24]


def _share(config, key: dict, arrays: dict) -> None:
  """Writes the shared copy (process 0); a full or read-only disk costs only the reuse, said in one line."""
  if not parallel.is_main_process():
    return
  out_dir = shared_dir(config, key)
  try:
    _write(out_dir, key, arrays)
  except OSError as e:
    logging.warning("the frozen backbone's features were not kept for other workdirs (%s): %s", out_dir, e)


def stage1_features(config, workdir: str | Path, data, model, variables: dict, mesh) -> dict | None:
  """Stage 1's cached features ({'train', 'test'}, read or computed and written), or None when
  `applies` says stage 1 runs through the backbone."""
  if not applies(config):
    return None
  key = cache_key(config, data, model, variables)
  arrays = load(workdir, key)
  if arrays is not None:
    logging.info("stage 1 trains the head on the cached features of the frozen backbone (%s)", CACHE_DIR)
    return arrays
  shared = shared_dir(config, key)
  arrays = _read(shared, key)
  if arrays is not None:
    logging.info("stage 1 trains the head on the frozen backbone's features computed by another run (%s)", shared)
    write(workdir, key, arrays)
    return arrays
  logging.info(
    "stage 1: the backbone is frozen and sees no augmentation: its features of %d + %d images are computed "
    "once (W/%s), the head trains on them",
    key["train_count"],
    key["test_count"],
    CACHE_DIR,
  )
  arrays = compute(config, data, model, variables, mesh)
  write(workdir, key, arrays)
  _share(config, key, arrays)
  return arrays


def lookup(config, workdir: str | Path, data, model, variables: dict) -> dict | None:
  """The cached features when they are the frozen backbone's outputs under `variables` (freeze=backbone,
  the same key); None otherwise."""
  if config.model.freeze != freezing.BACKBONE:
    return None
  if not (Path(workdir) / CACHE_DIR / META_FILE).exists():
    return None
  return load(workdir, cache_key(config, data, model, variables))
