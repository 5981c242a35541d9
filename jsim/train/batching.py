"""Batches for everything that evaluates or embeds images: fixed-size padded batches, a function
run over them with a progress bar, and the eval-mode forward pass.

Every evaluation (stage 1's validation and test), the embeddings stage, and predict go through
here: the last batch is padded and masked, never dropped, so one compiled shape serves them all.

    for out, n in batching.run(fn, indices, batch_size, desc="embedding"):   # fn(idx, mask) -> device arrays
      ...
    emb = batching.embed_images(model, variables, images, indices, mean=..., std=..., input_size=...,
                                batch_size=..., mesh=mesh)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jsim import parallel
from jsim.data import augment
from jsim.train.metrics_writer import progress_bar


def padded_batches(
  indices: np.ndarray, batch_size: int, *, bucket: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(int32 idx, bool mask) of batch_size over `indices`; the last is padded (index 0) and masked.

  bucket: the last batch is padded only to bucket_size (a few compiled shapes, and little work
  for a few images), not to batch_size.
  """
  n = len(indices)
  for start in range(0, n, batch_size):
    idx = indices[start : start + batch_size]
    size = bucket_size(len(idx), batch_size) if bucket else batch_size
    mask = np.ones(size, bool)
    if len(idx) < size:
      mask[len(idx) :] = False
      idx = np.concatenate([idx, np.zeros(size - len(idx), idx.dtype)])
    yield idx.astype(np.int32), mask


def bucket_size(n: int, cap: int) -> int:
  """The padded size of a batch of n <= cap: the next power of two, at most cap (a few compiled shapes)."""
  return min(cap, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def run(
  fn: Callable[[np.ndarray, np.ndarray], Any],
  indices: np.ndarray,
  batch_size: int,
  *,
  desc: str | None = None,
  unit: str = "img",
  bucket: bool = False,
) -> Iterator[tuple[Any, int]]:
  """Yields (fn(idx, mask), how many of the batch are real) for each padded batch of `indices`
  (padded_batches'; bucket as there).

  desc: show a progress bar with this title, counting `unit`s; it waits for each batch, so it
  shows what is done, not what is queued (without one, batches are dispatched ahead).
  """
  bar = progress_bar(len(indices), 0, desc, unit) if desc else None
  try:
    for idx, mask in padded_batches(indices, batch_size, bucket=bucket):
      out = fn(idx, mask)
      n = int(mask.sum())
      if bar is not None:
        jax.block_until_ready(out)
        bar.update(n)
      yield out, n
  finally:
    if bar is not None:
      bar.close()


def rows(outputs, width: int = 0) -> np.ndarray:
  """The real rows of (device array [B, ...], n) pairs from `run`, on the host, concatenated."""
  parts = [np.asarray(jax.device_get(out))[:n] for out, n in outputs]
  return np.concatenate(parts) if parts else np.zeros((0, width), np.float32)


def compute_dtype(model) -> Any:
  """A model's compute dtype (its first layer casts its input to it)."""
  return getattr(model, "dtype", jnp.float32)


def forward(
  variables, images, *, model, mean, std, input_size: int, inputs: str = "images"
) -> tuple[jax.Array, jax.Array]:
  """(logits, float32 embeddings) of uint8 images [B, S, S, 3] in eval mode: preprocess, then apply.

  The input is cast to the model's compute dtype here: the model would cast it anyway, and
  this way XLA writes the resized batch once, in that dtype. inputs='features': `images` are the
  frozen backbone's cached outputs [B, D] (jsim.train.feature_cache) and only the heads run.
  """
  if inputs == "features":
    logits, e = model.apply(variables, images, train=False, from_embedding=True)
  else:
    x = augment.preprocess(images, mean, std, input_size).astype(compute_dtype(model))
    logits, e = model.apply(variables, x, train=False)
  return logits, e.astype(jnp.float32)


def embed_step(variables, images, idx, *, model, mean, std, input_size: int, mesh, inputs: str = "images"):
  """float32 embeddings [len(idx), D] of device-resident uint8 images, or cached features (`forward`'s
  inputs), idx sharded over the mesh."""
  idx = jax.lax.with_sharding_constraint(idx, parallel.batch_sharded(mesh))
  return forward(variables, images[idx], model=model, mean=mean, std=std, input_size=input_size, inputs=inputs)[1]


def make_embed_fn(model, mean, std, input_size: int, mesh, inputs: str = "images"):
  """embed_step jitted: (variables, images, idx) -> embeddings, replicated so every process reads them all.

  idx is sharded over the mesh's 'data' axis (its length must divide by the device count).
  """
  rep = parallel.replicated(mesh)
  return jax.jit(
    functools.partial(embed_step, model=model, mean=mean, std=std, input_size=input_size, mesh=mesh, inputs=inputs),
    in_shardings=(rep, rep, parallel.batch_sharded(mesh)),
    out_shardings=rep,
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
  fn = lambda idx, mask: embed(variables, images, parallel.put_sharded_batch(idx, mesh))
  return rows(list(run(fn, indices, batch_size, desc=desc)))
