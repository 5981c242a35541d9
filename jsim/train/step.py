"""Stage 1's steps, one for every loss of jsim.losses (cross_entropy and the metric-learning ones).

Module-level pure functions over explicit pytrees; `jit_train_steps` and `jit_eval_step` jit them
once with shardings and donation (jsim.train.classifier.Stage1Plan holds them). A batch is
{"images": uint8 [B, S, S, 3], "labels": int32 [B]} (head labels), or, behind a frozen backbone whose
outputs are cached (jsim.train.feature_cache), {"features": float32 [B, D], "labels"}: then only the
head runs (the model's `from_embedding`). The running sums are jsim.train.loop's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jsim import parallel
from jsim.data import augment
from jsim.train import batching, loop
from jsim.train.state import TrainState


def train_step(
  state: TrainState, batch: dict, sums: dict, *, model, loss, tx, mean, std, input_size: int, augment_config, seed_key
):
  """One update of every parameter (backbone, heads, the loss's own) on `batch`; adds to the epoch's sums."""
  key = jax.random.fold_in(seed_key, state.step)
  # Three keys for every loss: with jax's partitionable threefry (the default) the first two do not
  # depend on how many are split off, so a loss without dropout draws what it always drew.
  aug_key, dropout_key, loss_key = jax.random.split(key, 3)
  labels = batch["labels"]
  if "features" in batch:  # the frozen backbone's cached outputs: the same keys, only the head runs
    x, head_only = batch["features"], {"from_embedding": True}
  else:
    # Cast once here: the model would cast its input to the compute dtype anyway, and this
    # way the augmented 224x224 batch is written (and read by the stem) in bf16 on GPU.
    x = augment.augment(aug_key, batch["images"], mean, std, input_size, augment_config)
    x, head_only = x.astype(batching.compute_dtype(model)), {}

  def loss_fn(params):
    (logits, emb), updates = model.apply(
      {"params": params, "batch_stats": state.batch_stats},
      x,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": dropout_key},
      **head_only,
    )
    value, per_image = loss.batch_losses(loss.params_in(params), logits, emb, labels, rng=loss_key)
    return value, (per_image, logits, emb, updates)

  (_, (per_image, logits, emb, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads, tx, updates)
  return new_state, loop.add_to_sums(sums, per_image, loss.batch_correct(logits, emb, labels), state.step)


def gathered_train_step(
  state: TrainState, data: dict, order, index, sums: dict, size: int, *, batch_size: int, mesh, **step_args
):
  """train_step on batch `index` of an epoch's image order, over device-resident `data` (images, labels):
  the batch is order[index * batch_size:][:size], gathered inside the step."""
  idx = jax.lax.dynamic_slice_in_dim(order, index * batch_size, size)
  idx = jax.lax.with_sharding_constraint(idx, parallel.batch_sharded(mesh))
  return train_step(state, {k: v[idx] for k, v in data.items()}, sums, **step_args)


def eval_step(state: TrainState, batch: dict, mask, *, model, loss, mean, std, input_size: int) -> dict:
  """One padded batch in eval mode (mask: which images are real).

  A loss that classifies (cross_entropy): {'loss_sum', 'correct', 'count'} of its head; any other:
  {'embeddings': float32 [B, D]}, for retrieval among the images.
  """
  inputs = "features" if "features" in batch else "images"
  logits, emb = batching.forward(
    state.variables, batch[inputs], model=model, mean=mean, std=std, input_size=input_size, inputs=inputs
  )
  if not loss.classifies:
    return {"embeddings": emb}
  labels = batch["labels"]
  _, losses = loss.batch_losses(None, logits, emb, labels)
  w = mask.astype(jnp.float32)
  return {
    "loss_sum": jnp.sum(losses * w),
    "correct": jnp.sum(loss.batch_correct(logits, emb, labels) * w),
    "count": jnp.sum(w),
  }


def gathered_eval_step(state: TrainState, data: dict, idx, mask, *, mesh, **eval_args) -> dict:
  idx = jax.lax.with_sharding_constraint(idx, parallel.batch_sharded(mesh))
  return eval_step(state, {k: v[idx] for k, v in data.items()}, mask, **eval_args)


def jit_train_steps(mesh, *, batch_size: int, **step_args):
  """(gathered, on_batch): train_step jitted for device-resident data and for a sent batch.

  gathered(state, data, order, index, sums, size) takes the replicated images, labels and
  epoch order; on_batch(state, batch, sums) a batch sharded over the mesh. State and sums are
  donated and come back replicated.
  """
  rep, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  gathered = jax.jit(
    functools.partial(gathered_train_step, batch_size=batch_size, mesh=mesh, **step_args),
    static_argnums=5,  # size: the epoch's last batch may be shorter
    in_shardings=(rep, rep, rep, rep, rep),
    out_shardings=rep,
    donate_argnums=(0, 4),
  )
  on_batch = jax.jit(
    functools.partial(train_step, **step_args),
    in_shardings=(rep, sharded, rep),
    out_shardings=rep,
    donate_argnums=(0, 2),
  )
  return gathered, on_batch


def jit_eval_step(mesh, *, inputs: str = "images", **eval_args):
  """(state, images, labels, idx, mask) -> eval_step's output over one padded batch (idx, mask: host arrays;
  labels None for a loss that does not classify). inputs='features': `images` are the cached outputs of
  the frozen backbone (eval_step's "features").

  One eval step, two feeders: images and labels already on the devices (jax.Array) are
  gathered inside jit; host arrays (numpy, a memmap) are gathered here and only the batch is
  sent, sharded.
  """
  rep, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  gathered = jax.jit(
    functools.partial(gathered_eval_step, mesh=mesh, **eval_args),
    in_shardings=(rep, rep, sharded, sharded),
    out_shardings=rep,
  )
  on_batch = jax.jit(functools.partial(eval_step, **eval_args), in_shardings=(rep, sharded, sharded), out_shardings=rep)

  def feed(state, images, labels, idx, mask):
    put = lambda a: parallel.put_sharded_batch(a, mesh)
    arrays = {inputs: images} if labels is None else {inputs: images, "labels": labels}
    if isinstance(images, jax.Array):
      return gathered(state, arrays, put(idx), put(mask))
    return on_batch(state, {k: put(np.asarray(v[idx])) for k, v in arrays.items()}, put(mask))

  return feed
