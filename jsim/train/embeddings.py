"""Embeddings: the input of Mc's last layer, for T180 and the test images.

Computed once from the best stage-1 checkpoint and kept in W/embeddings, tied
to that checkpoint's step: a retrained stage 1 makes them stale and they are
recomputed. Behind a frozen backbone (model.freeze=backbone), when stage 1 cached its
outputs (jsim.train.feature_cache) and the checkpoint's frozen weights give the same cache
key, only the heads run, on the cached outputs (computed with the same function, batch size
and images as here): for cross_entropy the embeddings are those outputs themselves, for a
metric loss its embedding head's projection of them.
meta.json records each array file's SHA-256: a file changed, truncated or removed
since it was written is computed again here (said in one line) and refused, naming
it, by every reader (load_embeddings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from absl import logging

from jsim import parallel, workdir as wd
from jsim.data.prepare import Prepared, prepare
from jsim.train import batching, classifier, feature_cache

META_FILE = "meta.json"
ARRAYS = ("train", "train_labels", "train_index", "test", "test_labels", "test_index")  # W/embeddings/<name>.npy
_REDO = "rerun with --config.stage=embed --config.overwrite=True to compute the embeddings again"


def compute_embeddings(config, workdir: str | Path, data: Callable[[], Prepared] | None = None) -> dict:
  """Embeds T180 and the test images with the best stage-1 checkpoint (skipped if current).

  data: the run's data, prepared on its first call (as for jsim.train.classifier.train_classifier).
  """
  workdir = Path(workdir)
  stage1 = wd.stage_result(workdir, wd.STAGE1)
  if stage1 is None:
    raise FileNotFoundError(f"{workdir / wd.STAGE1}: stage 1 has not finished; run --config.stage=classifier first")
  out_dir = workdir / wd.EMBEDDINGS
  meta_path = out_dir / META_FILE
  if meta_path.exists() and not wd.replaces(workdir, wd.EMBEDDINGS, config.overwrite):
    meta = wd.read_json(meta_path)
    if meta["stage1_step"] == stage1["best_step"] and meta.get("stage1_run_id") == stage1.get("run_id"):
      changed = wd.changed_file(out_dir, meta.get("sha256"), meta_path)
      if changed is None:
        logging.info("embeddings are current (best stage-1 checkpoint, step %d): skipped", meta["stage1_step"])
        return meta
      logging.warning("%s: the embeddings are computed again from the stage-1 checkpoint", changed)
  mesh = parallel.make_mesh()
  data = data() if data is not None else prepare(config, workdir)
  model, state = classifier.restore_classifier(config, workdir, mesh)
  t180 = data.t180_idx
  cached = feature_cache.lookup(config, workdir, data, model, state.variables)
  kw = dict(mean=data.mean, std=data.std, input_size=config.classifier.input_size)
  if cached is not None:
    logging.info("the embeddings come from the frozen backbone's cached features (W/%s)", feature_cache.CACHE_DIR)
    # Positions into the cache's rows, which are T180 and the test images in order.
    inputs = {"train": (cached["train"], np.arange(len(t180))), "test": (cached["test"], np.arange(len(data.test_idx)))}
  else:
    inputs = {"train": (data.train_set.images, t180), "test": (data.test_set.images, data.test_idx)}
  embed_fn = batching.make_embed_fn(model, mesh=mesh, inputs="images" if cached is None else "features", **kw)
  train_emb, test_emb = (
    batching.embed_images(
      model,
      state.variables,
      parallel.put_replicated(inputs[name][0], mesh),
      inputs[name][1],
      batch_size=config.embed.batch_size,
      mesh=mesh,
      embed_fn=embed_fn,
      desc=desc if cached is None else None,
      **kw,
    )
    for name, desc in (("train", "embedding the seen classes' train images"), ("test", "embedding the test images"))
  )
  meta = {
    "stage1_step": stage1["best_step"],
    "stage1_run_id": stage1.get("run_id"),
    "model": config.model.name,
    "dim": int(train_emb.shape[1]),
    "train_count": len(t180),
    "test_count": len(data.test_idx),
    "class_ids": list(data.train_set.class_ids),
    "seen_classes": list(data.split.seen_classes),
    "split_sha256": wd.split_digest(workdir),
    "from_feature_cache": cached is not None,
  }
  if parallel.is_main_process():
    out_dir.mkdir(parents=True, exist_ok=True)
    if meta_path.exists():
      meta_path.unlink()  # stale until the new arrays are complete
    arrays = {
      "train": train_emb,
      "train_labels": data.train_set.labels[t180].astype(np.int32),
      "train_index": t180.astype(np.int64),
      "test": test_emb,
      "test_labels": data.test_set.labels[data.test_idx].astype(np.int32),
      "test_index": data.test_idx.astype(np.int64),
    }
    for name, arr in arrays.items():  # (a full disk: NoSpace naming the file, no temporary file left)
      wd.write_npy(out_dir / f"{name}.npy", arr)
    meta["sha256"] = wd.file_digests(out_dir, [f"{name}.npy" for name in arrays])  # (what readers check)
    wd.write_json(meta_path, meta)
  parallel.sync_processes("embeddings written")
  if config.overwrite:
    wd.mark_replaced(workdir, [wd.EMBEDDINGS])
  logging.info(
    "embedded %d train images of the %d seen classes (stage 2's pairs are drawn from them) and %d test "
    "images (%d-d) with stage-1 step %d",
    len(t180),
    len(data.split.seen_classes),
    len(data.test_idx),
    meta["dim"],
    meta["stage1_step"],
  )
  return meta


def load_embeddings(workdir: str | Path, names: tuple[str, ...] = ARRAYS) -> dict:
  """The arrays `names` written by compute_embeddings, with their meta under 'meta'.

  Each is checked against the SHA-256 that meta.json recorded when it was written: a file changed, truncated
  or missing since is one line naming it (it is never read as the embeddings of the stage-1 checkpoint).
  """
  out_dir = Path(workdir) / wd.EMBEDDINGS
  meta_path = out_dir / META_FILE
  if not meta_path.exists():
    raise FileNotFoundError(f"{out_dir}: no embeddings; run --config.stage=embed first")
  meta = wd.read_json(meta_path)
  if not isinstance(meta, dict):
    raise ValueError(f"{meta_path}: not a jsim embeddings record (a JSON object expected); {_REDO}")
  changed = wd.changed_file(out_dir, meta.get("sha256"), meta_path, names=[f"{n}.npy" for n in names])
  if changed is not None:
    raise ValueError(f"{changed}; {_REDO}")
  out = {}
  for name in names:
    path = out_dir / f"{name}.npy"
    try:
      out[name] = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as e:  # (a record made before the digests: the file itself says it)
      text = (str(e).strip().splitlines() or [""])[0][:160]
      raise ValueError(f"{path}: damaged or truncated ({type(e).__name__}: {text}); {_REDO}") from None
  out["meta"] = meta
  return out
