"""Embeddings: the input of Mc's last layer, for T180 and the test images.

Computed once from the best stage-1 checkpoint and kept in W/embeddings, tied
to that checkpoint's step: a retrained stage 1 makes them stale and they are
recomputed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jsim import parallel, workdir as wd
from jsim.data import augment
from jsim.data.prepare import prepare
from jsim.train import classifier
from jsim.train.metrics_writer import progress_bar

META_FILE = "meta.json"


def embed_step(variables, images, idx, *, model, mean, std, input_size: int, mesh):
  """float32 embeddings [len(idx), D] of device-resident uint8 images (idx sharded over the mesh)."""
  idx = jax.lax.with_sharding_constraint(idx, parallel.batch_sharded(mesh))
  # The model casts its input to its compute dtype anyway; casting here lets XLA write
  # the resized batch once, in that dtype.
  x = augment.preprocess(images[idx], mean, std, input_size).astype(getattr(model, "dtype", jnp.float32))
  _, e = model.apply(variables, x, train=False)
  return e.astype(jnp.float32)


def make_embed_fn(model, mean, std, input_size: int, mesh):
  """embed_step jitted: (variables, images, idx) -> embeddings, replicated so every process reads them all.

  idx is sharded over the mesh's 'data' axis (its length must divide by the device count).
  """
  return jax.jit(
    functools.partial(embed_step, model=model, mean=mean, std=std, input_size=input_size, mesh=mesh),
    out_shardings=parallel.replicated(mesh),
  )


def embed_images(
  model,
  variables,
  images,
  indices: np.ndarray,
  *,
  mean,
  std,
  input_size: int,
  batch_size: int,
  mesh,
  embed_fn=None,
  desc: str | None = None,
) -> np.ndarray:
  """Embeddings [len(indices), D] float32 of device-resident uint8 `images`, batched and jitted.

  The last batch is padded, and its padding dropped from the result. Pass `embed_fn`
  (from make_embed_fn) to reuse one compiled function across calls.
  """
  parallel.check_divisible(batch_size, mesh, "embed.batch_size")
  embed = embed_fn or make_embed_fn(model, mean, std, input_size, mesh)
  out = []
  bar = progress_bar(len(indices), 0, desc, "img") if desc else None
  for idx, mask in classifier.padded_batches(indices, batch_size):
    e = embed(variables, images, parallel.put_sharded_batch(idx, mesh))
    out.append((e, int(mask.sum())))
    if bar is not None:  # (waits for the batch: the bar shows what is done, not what is queued)
      e.block_until_ready()
      bar.update(int(mask.sum()))
  if bar is not None:
    bar.close()
  return np.concatenate([np.asarray(jax.device_get(e))[:n] for e, n in out]) if out else np.zeros((0, 0), np.float32)


def compute_embeddings(config, workdir: str | Path) -> dict:
  """Embeds T180 and the test images with the best stage-1 checkpoint (skipped if current)."""
  workdir = Path(workdir)
  stage1 = wd.stage_result(workdir, wd.STAGE1)
  if stage1 is None:
    raise FileNotFoundError(f"{workdir / wd.STAGE1}: stage 1 has not finished; run --config.stage=classifier first")
  out_dir = workdir / wd.EMBEDDINGS
  meta_path = out_dir / META_FILE
  if meta_path.exists() and not wd.replaces(workdir, wd.EMBEDDINGS, config.overwrite):
    meta = wd.read_json(meta_path)
    if meta["stage1_step"] == stage1["best_step"] and meta.get("stage1_run_id") == stage1.get("run_id"):
      logging.info("embeddings are current (best stage-1 checkpoint, step %d): skipped", meta["stage1_step"])
      return meta
  mesh = parallel.make_mesh()
  data = prepare(config, workdir)
  model, state = classifier.restore_classifier(config, workdir, mesh)
  kw = dict(
    mean=data.mean, std=data.std, input_size=config.classifier.input_size, batch_size=config.embed.batch_size, mesh=mesh
  )
  kw["embed_fn"] = make_embed_fn(model, data.mean, data.std, config.classifier.input_size, mesh)
  t180 = data.t180_idx
  train_emb = embed_images(
    model,
    state.variables,
    parallel.put_replicated(data.train_set.images, mesh),
    t180,
    desc="embedding the seen classes' train images",
    **kw,
  )
  test_emb = embed_images(
    model,
    state.variables,
    parallel.put_replicated(data.test_set.images, mesh),
    data.test_idx,
    desc="embedding the test images",
    **kw,
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
      wd.write_file(out_dir / f"{name}.npy", lambda tmp, arr=arr: _save_array(tmp, arr))
    wd.write_json(meta_path, meta)
  parallel.sync_processes("embeddings written")
  if config.overwrite:
    wd.mark_replaced(workdir, [wd.EMBEDDINGS])
  logging.info(
    "embedded %d train images of the seen classes (T180: stage 2's images) and %d test images (%d-d) "
    "with stage-1 step %d",
    len(t180),
    len(data.test_idx),
    meta["dim"],
    meta["stage1_step"],
  )
  return meta


def _save_array(path: Path, arr: np.ndarray) -> None:
  with open(path, "wb") as f:  # (a file object: np.save would append .npy to the temporary name)
    np.save(f, arr)


def load_embeddings(workdir: str | Path) -> dict:
  """The arrays written by compute_embeddings, with their meta under 'meta'."""
  out_dir = Path(workdir) / wd.EMBEDDINGS
  if not (out_dir / META_FILE).exists():
    raise FileNotFoundError(f"{out_dir}: no embeddings; run --config.stage=embed first")
  out = {
    name: np.load(out_dir / f"{name}.npy")
    for name in ("train", "train_labels", "train_index", "test", "test_labels", "test_index")
  }
  out["meta"] = wd.read_json(out_dir / META_FILE)
  return out
