"""m-per-class batches for metric learning, drawn on the device from (seed, epoch).

Pair and proxy losses need several images of a class in a batch: each batch holds
P = batch_size / m classes, drawn without replacement, and m images of each,
drawn without replacement when the class has at least m images (else every image
of the class, repeated in turn), as PML's MPerClassSampler does. An epoch is
len(images) // batch_size such batches, all full. Everything is jax.random with
static shapes from (seed, epoch), so a resumed epoch draws the same batches; the
protocol's uniform batches (streaming.epoch_permutation) stay for cross-entropy.

    sampler = MPerClassSampler(labels, m=4, batch_size=64)
    batches = sampler.epoch(seed, epoch)   # int32 [num_batches, 64] positions into labels
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jsim.data import pairs

# A stream of the seed of its own, apart from augmentation's and the pairs'.
_SAMPLER_STREAM = 11


@functools.partial(jax.jit, static_argnames=("m", "classes_per_batch", "num_batches", "max_count"))
def draw_m_per_class(
  key: jax.Array, class_index: pairs.ClassIndex, *, m: int, classes_per_batch: int, num_batches: int, max_count: int
) -> jax.Array:
  """int32 [num_batches, classes_per_batch * m]: per batch, m positions of each of P distinct classes."""
  num_classes = class_index.num_classes
  eligible = class_index.count > 0

  def one_batch(k):
    k_cls, k_img = jax.random.split(k)
    # Classes without images sort last, so they are never drawn (P <= classes with images).
    u = jnp.where(eligible, jax.random.uniform(k_cls, (num_classes,)), 2.0)
    classes = jnp.argsort(u)[:classes_per_batch]
    count = class_index.count[classes]  # [P]
    slot = jnp.arange(max_count)
    r = jnp.where(slot[None, :] < count[:, None], jax.random.uniform(k_img, (classes_per_batch, max_count)), 2.0)
    perm = jnp.argsort(r, axis=1)  # a random order of [0, count) first
    offsets = jnp.take_along_axis(perm, jnp.arange(m)[None, :] % count[:, None], axis=1)
    return class_index.order[class_index.start[classes][:, None] + offsets].reshape(-1)

  return jax.vmap(one_batch)(jax.random.split(key, num_batches)).astype(jnp.int32)


class MPerClassSampler:
  """Epochs of m-per-class batches over images with `labels` (int [N], e.g. the head labels)."""

  def __init__(self, labels, *, m: int, batch_size: int):
    labels = np.asarray(labels)
    if m < 1 or batch_size % m:
      raise ValueError(f"classifier.sampler_m={m}: must be >= 1 and divide the batch size {batch_size}")
    self.class_index = pairs.build_class_index(labels)
    counts = np.asarray(self.class_index.count)
    self.m, self.batch_size = m, batch_size
    self.classes_per_batch = batch_size // m
    with_images = int(np.sum(counts > 0))
    if self.classes_per_batch > with_images:
      raise ValueError(
        f"a batch of {batch_size} with m={m} needs {self.classes_per_batch} classes, but only "
        f"{with_images} have training images: raise classifier.sampler_m or lower the batch size"
      )
    self.max_count = int(counts.max())
    self.num_batches = len(labels) // batch_size
    if self.num_batches < 1:
      raise ValueError(f"{len(labels)} training images make no batch of {batch_size}")

  def epoch(self, seed: int, epoch: int) -> jax.Array:
    """The epoch's batches, int32 [num_batches, batch_size], a function of (seed, epoch) only."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _SAMPLER_STREAM), epoch)
    return draw_m_per_class(
      key,
      self.class_index,
      m=self.m,
      classes_per_batch=self.classes_per_batch,
      num_batches=self.num_batches,
      max_count=self.max_count,
    )
