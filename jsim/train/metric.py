"""Stage 1 trained by a metric-learning loss (config.classifier.loss, see jsim.losses).

The same stage as the classifier's (its workdir, checkpoints, resume, halving rule,
NaN checks and devices; jsim.train.loop runs both), with three differences:

* the model is a `MetricModel`: the backbone, an optional embedding head
  (classifier.embedding_dim > 0: linear, L2-normalised), and the loss's proxies or
  class weights in the same parameter tree; one SGD whose rate is scaled per group
  (backbone / head / loss: classifier.head_learning_rate, loss_learning_rate);
* batches are m-per-class (classifier.sampler, sampler_m; jsim.data.samplers), drawn
  on the device from (seed, epoch), or a uniform permutation's full batches;
* each epoch is judged by MAP@R of the validation images among themselves
  (`val_accuracy` in metrics.jsonl is MAP@R, `val_precision_at_1` and `val_r_precision`
  are beside it), which selects the best epoch and drives the halving rule;
  `train_accuracy` is the batch's precision@1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jsim import knn_metrics, losses, parallel
from jsim.data import augment, samplers, streaming
from jsim.losses import base as loss_base
from jsim.models.metric_model import MetricModel, param_group
from jsim.train import loop, schedule

CROSS_ENTROPY = "cross_entropy"
SAMPLERS = ("auto", "uniform", "m_per_class")
# Config fields only a metric-learning stage 1 reads (left out of a cross-entropy run's identity).
METRIC_FIELDS = (
  "loss",
  "loss_hparams",
  "miner_hparams",
  "embedding_dim",
  "sampler",
  "sampler_m",
  "head_learning_rate",
  "loss_learning_rate",
  "retrieval_distance",
)


def is_metric(cfg) -> bool:
  """Whether stage 1 (config.classifier) trains by a metric-learning loss rather than cross-entropy."""
  return cfg.loss != CROSS_ENTROPY


def check_config(cfg) -> None:
  """ValueError naming the first impossible metric-learning value of config.classifier (before any data)."""
  if not is_metric(cfg):
    if cfg.sampler == "m_per_class":
      raise ValueError(
        "classifier.sampler='m_per_class' needs a metric-learning classifier.loss; cross_entropy "
        "keeps the protocol's uniform batches"
      )
    return
  build_loss(cfg)
  if cfg.sampler not in SAMPLERS:
    raise ValueError(f"classifier.sampler={cfg.sampler!r}: expected one of {', '.join(SAMPLERS)}")
  if cfg.sampler != "uniform" and (cfg.sampler_m < 1 or cfg.batch_size % cfg.sampler_m):
    raise ValueError(
      f"classifier.sampler_m={cfg.sampler_m}: must be >= 1 and divide classifier.batch_size={cfg.batch_size}"
    )
  if cfg.embedding_dim < 0:
    raise ValueError(f"classifier.embedding_dim={cfg.embedding_dim}: must be >= 0 (0: no embedding head)")
  if cfg.retrieval_distance not in ("auto", "l2", "cosine"):
    raise ValueError(f"classifier.retrieval_distance={cfg.retrieval_distance!r}: expected 'auto', 'l2' or 'cosine'")
  make_optimizer(cfg)  # the rates


def retrieval_distance(cfg) -> str:
  """How embeddings are ranked for P@1 / MAP@R: classifier.retrieval_distance, where 'auto' is cosine for
  the metric losses (they compare L2-normalised embeddings) and L2 for cross_entropy and pair_ms."""
  distance = cfg.retrieval_distance
  if distance == "auto":
    return "cosine" if is_metric(cfg) and cfg.loss != "pair_ms" else "l2"
  if distance not in ("l2", "cosine"):
    raise ValueError(f"classifier.retrieval_distance={distance!r}: expected 'auto', 'l2' or 'cosine'")
  return distance


def build_loss(cfg) -> loss_base.Loss:
  if cfg.loss not in losses.available():
    raise ValueError(
      f"classifier.loss={cfg.loss!r}: expected {CROSS_ENTROPY!r} or one of {', '.join(losses.available())}"
    )
  hparams = dict(cfg.loss_hparams[cfg.loss])
  miner = hparams.get("miner", losses.miners.NONE)
  miner_hparams = dict(cfg.miner_hparams[miner]) if miner in cfg.get("miner_hparams", {}) else None
  if miner_hparams is not None:
    try:
      losses.miners.build(miner, **miner_hparams)
    except ValueError as e:
      raise ValueError(f"classifier.miner_hparams.{miner}: {e}") from None
  try:
    return losses.build(cfg.loss, miner_hparams=miner_hparams, **hparams)
  except ValueError as e:
    raise ValueError(f"classifier.loss_hparams.{cfg.loss}: {e}") from None


def wrap_backbone(cfg, backbone, num_classes: int) -> MetricModel:
  if cfg.embedding_dim < 0:
    raise ValueError(f"classifier.embedding_dim={cfg.embedding_dim}: must be >= 0 (0: no embedding head)")
  return MetricModel(backbone=backbone, head_dim=cfg.embedding_dim, loss=build_loss(cfg), num_classes=num_classes)


def identity(classifier_dict: dict) -> dict:
  """Stage 1's config identity: a cross-entropy run's is what it was before metric learning existed."""
  if classifier_dict.get("loss", CROSS_ENTROPY) == CROSS_ENTROPY:
    return {k: v for k, v in classifier_dict.items() if k not in METRIC_FIELDS}
  return classifier_dict


def make_optimizer(cfg, frozen=None) -> optax.GradientTransformation:
  """The protocol's SGD over every parameter, each group's rate scaled (its rate / learning_rate);
  `frozen` (params -> bools): parameters that get zero updates."""

  def rate(name):
    value = cfg.get(name)
    if value is not None and not value > 0:
      raise ValueError(f"classifier.{name}={value!r} must be > 0 (or None: classifier.learning_rate)")
    return 1.0 if value is None else value / cfg.learning_rate

  groups = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: param_group(p), params)
  return schedule.optimizer_from(
    cfg,
    param_groups=groups,
    rate_multipliers={"backbone": 1.0, "head": rate("head_learning_rate"), "loss": rate("loss_learning_rate")},
    frozen=frozen,
  )


def initial_variables(model: MetricModel, backbone_variables: dict | None, input_size: int, seed: int) -> dict:
  """Random init of the whole model; the backbone's part replaced by `backbone_variables` if given."""
  x = jnp.zeros((1, input_size, input_size, 3), jnp.float32)
  key = jax.random.PRNGKey(seed)
  variables = jax.jit(functools.partial(model.init, train=False))({"params": key, "dropout": key}, x)
  variables = jax.tree.map(lambda a: a, dict(variables))  # plain dicts
  if backbone_variables is not None:
    for collection, tree in backbone_variables.items():
      variables[collection] = dict(variables.get(collection, {}), backbone=tree)
  return variables


def _batch_precision_at_1(embeddings, labels):
  """Per image of the batch: whether its nearest other image (L2) is of its class."""
  d = loss_base.l2_distance_matrix(embeddings, embeddings)
  d = jnp.where(jnp.eye(d.shape[0], dtype=bool), jnp.inf, d)
  return labels[jnp.argmin(d, axis=1)] == labels


def metric_train_step(
  state, images, labels, sums: dict, *, model, loss, tx, mean, std, input_size: int, augment_config, seed_key
):
  """One update of backbone, head and loss parameters on a batch of uint8 images and head labels."""
  key = jax.random.fold_in(seed_key, state.step)
  aug_key, dropout_key, loss_key = jax.random.split(key, 3)
  x = augment.augment(aug_key, images, mean, std, input_size, augment_config).astype(model.dtype)

  def loss_fn(params):
    (_, emb), updates = model.apply(
      {"params": params, "batch_stats": state.batch_stats},
      x,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": dropout_key},
    )
    value = loss.apply(params.get("loss", {}), emb, labels, rng=loss_key if loss.uses_dropout else None)
    return value, (emb, updates)

  (value, (emb, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads, tx, updates)
  # The sums count images: the batch's loss once per image, so loss_sum / count is the mean batch loss.
  per_image = jnp.full(labels.shape, value, jnp.float32)
  return new_state, loop.add_to_sums(sums, per_image, _batch_precision_at_1(emb, labels), state.step)


def gathered_metric_train_step(state, images, labels, batches, batch, sums: dict, *, mesh, **step_args):
  """metric_train_step on row `batch` of the epoch's [num_batches, B] image indices (device-resident images)."""
  idx = jax.lax.with_sharding_constraint(batches[batch], parallel.batch_sharded(mesh))
  return metric_train_step(state, images[idx], labels[idx], sums, **step_args)


def embed_batch(variables, images, *, model, mean, std, input_size: int):
  x = augment.preprocess(images, mean, std, input_size).astype(model.dtype)
  return model.apply(variables, x, train=False)[1].astype(jnp.float32)


class MetricPlan:
  """Stage 1's epochs for a metric-learning loss (see the module doc); an EpochPlan for loop.fit."""

  item_name = "img"

  def __init__(self, config, data, model: MetricModel, tx, mesh, *, place_images, padded_batches):
    cfg = config.classifier
    self.cfg, self.mesh, self.seed = cfg, mesh, config.seed
    self.pipeline = config.data.pipeline
    self.batch_size = self.items_per_batch = cfg.batch_size
    parallel.check_divisible(cfg.batch_size, mesh, "classifier.batch_size")
    parallel.check_divisible(cfg.eval_batch_size, mesh, "classifier.eval_batch_size")
    self.train_idx, self.val_idx = data.train_idx, data.val_idx
    self._padded_batches = padded_batches
    sampler = cfg.sampler
    if sampler not in SAMPLERS:
      raise ValueError(f"classifier.sampler={sampler!r}: expected one of {', '.join(SAMPLERS)}")
    self.sampler = None
    if sampler in ("auto", "m_per_class"):
      self.sampler = samplers.MPerClassSampler(
        data.train_head_labels[self.train_idx], m=cfg.sampler_m, batch_size=cfg.batch_size
      )
      self._num_batches = self.sampler.num_batches
    else:
      self._num_batches = len(self.train_idx) // cfg.batch_size
      if self._num_batches < 1:
        raise ValueError(f"{len(self.train_idx)} training images make no batch of {cfg.batch_size}")
    self.images, self.labels = place_images(self.pipeline, data.train_set.images, data.train_head_labels, mesh)
    self._train_idx_dev = jnp.asarray(self.train_idx.astype(np.int32))
    loss = model.loss
    step_args = dict(
      model=model,
      loss=loss,
      tx=tx,
      mean=data.mean,
      std=data.std,
      input_size=cfg.input_size,
      augment_config=cfg.augment,
      seed_key=jax.random.PRNGKey(config.seed),
    )
    rep = parallel.replicated(mesh)
    self._gathered_step = jax.jit(
      functools.partial(gathered_metric_train_step, mesh=mesh, **step_args), donate_argnums=(0, 5), out_shardings=rep
    )
    self._batch_step = jax.jit(
      functools.partial(metric_train_step, **step_args), donate_argnums=(0, 3), out_shardings=rep
    )
    self._embed = jax.jit(
      functools.partial(embed_batch, model=model, mean=data.mean, std=data.std, input_size=cfg.input_size),
      out_shardings=rep,
    )
    self.distance = retrieval_distance(cfg)
    self._batches = None  # the epoch's [num_batches, B] image indices (on the device; on the host for 'stream')

  def num_batches(self, epoch: int) -> int:
    return self._num_batches

  def epoch_batches(self, epoch: int) -> jax.Array:
    """The image indices of every batch of `epoch`, [num_batches, B]: a function of (seed, epoch)."""
    if self.sampler is not None:
      positions = self.sampler.epoch(self.seed, epoch)
    else:
      perm = streaming.epoch_permutation(self.seed, epoch, len(self.train_idx))
      positions = jnp.asarray(perm[: self._num_batches * self.batch_size].reshape(self._num_batches, -1), jnp.int32)
    return self._train_idx_dev[positions]

  def begin_epoch(self, epoch: int) -> None:
    batches = self.epoch_batches(epoch)
    self._batches = (
      parallel.put_replicated(np.asarray(batches), self.mesh) if self.pipeline == "device" else np.asarray(batches)
    )

  def train_step(self, state, epoch: int, batch: int, sums: dict):
    sums = parallel.ensure_replicated(sums, self.mesh)
    if self.pipeline == "device":
      return self._gathered_step(state, self.images, self.labels, self._batches, jnp.int32(batch), sums)
    idx = self._batches[batch]
    put = lambda a: parallel.put_sharded_batch(np.asarray(a), self.mesh)
    return self._batch_step(state, put(self.images[idx]), put(self.labels[idx]), sums)

  def embed(self, state, images, indices: np.ndarray) -> np.ndarray:
    """Embeddings [len(indices), D] of `images` (on the devices or the host) in eval mode."""
    out = []
    for idx, mask in self._padded_batches(indices, self.cfg.eval_batch_size):
      batch = images[jnp.asarray(idx)] if isinstance(images, jax.Array) else np.asarray(images[idx])
      e = self._embed(state.variables, parallel.put_sharded_batch(np.asarray(batch), self.mesh))
      out.append(np.asarray(jax.device_get(e))[: int(mask.sum())])
    return np.concatenate(out)

  def retrieval(self, state, images, labels: np.ndarray, indices: np.ndarray) -> dict:
    """P@1, R-precision and MAP@R of the images `indices` among themselves."""
    emb = self.embed(state, images, indices)
    return knn_metrics.embedding_metrics(emb, np.asarray(labels)[indices], distance=self.distance)

  def evaluate(self, state) -> dict:
    m = self.retrieval(
      state,
      self.images,
      np.asarray(self.labels) if not isinstance(self.labels, jax.Array) else np.asarray(jax.device_get(self.labels)),
      self.val_idx,
    )
    return {
      "loss": None,
      "accuracy": m["map@r"],
      "count": m["num_queries"],
      "extra": {"val_precision_at_1": m["precision@1"], "val_r_precision": m["r_precision"]},
    }
