"""Stage 1: the classifier Mc (backbone + a head over the seen classes)."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jsim import configs, console, models, parallel, workdir as wd
from jsim.checkpoint import abstract_like, restore_best
from jsim.data import augment, splits, streaming
from jsim.data.prepare import Prepared, prepare
from jsim.models import freeze as freezing
from jsim.models.metric_model import MetricModel
from jsim.train import loop, metric, schedule
from jsim.train.metrics_writer import MetricsWriter, progress_bar
from jsim.train.state import TrainState

# config.data.pipeline: 'device' holds the train images on every device and gathers each batch
# inside the jitted step; 'stream' leaves them on the host and sends each batch (grain reads it).
PIPELINES = ("device", "stream")


def build_classifier(config, num_classes: int):
  """The backbone; for a metric-learning loss, wrapped with its embedding head and loss parameters."""
  frozen = {"freeze": config.model.freeze} if config.model.freeze != "none" else {}
  backbone = models.build(
    config.model.name,
    num_classes=num_classes,
    dtype=models.compute_dtype(config.model.dtype),
    conv_impl=config.model.conv_impl,
    **frozen,
  )
  if metric.is_metric(config.classifier):
    return metric.wrap_backbone(config.classifier, backbone, num_classes)
  return backbone


def initial_variables(config, model, num_classes: int, input_size: int) -> dict:
  if isinstance(model, MetricModel):
    backbone = (
      initial_variables(config, model.backbone, num_classes, input_size) if config.model.init != "random" else None
    )
    return metric.initial_variables(model, backbone, input_size, config.seed)
  if config.model.init == "torchvision":
    logging.info("stage 1 starts from torchvision weights %s", config.model.weights)
    return models.from_torchvision(config.model.name, config.model.weights, num_classes=num_classes, seed=config.seed)
  if config.model.init == "pretrained":
    logging.info("stage 1 starts from the packaged ImageNet weights of %s", config.model.name)
    return models.from_pretrained(config.model.name, num_classes=num_classes, seed=config.seed)
  x = jnp.zeros((1, input_size, input_size, 3), jnp.float32)
  key = jax.random.PRNGKey(config.seed)
  return jax.jit(functools.partial(model.init, train=False))({"params": key, "dropout": key}, x)


def make_optimizer(cfg, model=None) -> optax.GradientTransformation:
  """Stage 1's optimizer for config.classifier: the protocol's SGD, per parameter group for a metric loss;
  zero updates for the parameters `model` freezes (config.model.freeze)."""
  frozen = freezing.frozen_fn(model) if model is not None else None
  return (
    metric.make_optimizer(cfg, frozen=frozen) if metric.is_metric(cfg) else schedule.optimizer_from(cfg, frozen=frozen)
  )


def _input_dtype(model):
  """The compute dtype of a backbone (its first layer casts its input to it)."""
  return getattr(model, "dtype", jnp.float32)


# ----------------------------------------------------------------------------- steps (jitted in the plan)


def train_step(
  state: TrainState, images, labels, sums: dict, *, model, tx, mean, std, input_size: int, augment_config, seed_key
):
  """One update on a batch of uint8 images [B, S, S, 3] and head labels [B]; adds to the epoch's sums."""
  key = jax.random.fold_in(seed_key, state.step)
  aug_key, dropout_key = jax.random.split(key)
  # Cast once here: the model would cast its input to the compute dtype anyway, and this
  # way the augmented 224x224 batch is written (and read by the stem) in bf16 on GPU.
  x = augment.augment(aug_key, images, mean, std, input_size, augment_config).astype(_input_dtype(model))

  def loss_fn(params):
    (logits, _), updates = model.apply(
      {"params": params, "batch_stats": state.batch_stats},
      x,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": dropout_key},
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return losses.mean(), (losses, logits, updates)

  grads, (losses, logits, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads, tx, updates)
  return new_state, loop.add_to_sums(sums, losses, jnp.argmax(logits, -1) == labels, state.step)


def gathered_train_step(
  state: TrainState, images, labels, perm, batch, sums: dict, *, size: int, batch_size: int, mesh, **step_args
):
  """train_step on batch `batch` of the epoch's permutation of device-resident images."""
  idx = jax.lax.dynamic_slice_in_dim(perm, batch * batch_size, size)
  idx = jax.lax.with_sharding_constraint(idx, parallel.batch_sharded(mesh))
  return train_step(state, images[idx], labels[idx], sums, **step_args)


def eval_sums(state: TrainState, images, labels, mask, *, model, mean, std, input_size: int) -> dict:
  """Loss, correct and count sums over one padded batch of uint8 images (mask: which are real)."""
  x = augment.preprocess(images, mean, std, input_size).astype(_input_dtype(model))
  logits, _ = model.apply(state.variables, x, train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  w = mask.astype(jnp.float32)
  return {
    "loss_sum": jnp.sum(losses * w),
    "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * w),
    "count": jnp.sum(w),
  }


def gathered_eval_sums(state: TrainState, images, labels, idx, mask, *, mesh, **eval_args) -> dict:
  idx = jax.lax.with_sharding_constraint(idx, parallel.batch_sharded(mesh))
  return eval_sums(state, images[idx], labels[idx], mask, **eval_args)


def make_eval_sums(model, mean, std, input_size: int, mesh):
  """(state, images, labels, idx, mask) -> sums over one padded batch (idx, mask: host arrays).

  One eval step, two feeders: images and labels already on the devices (jax.Array)
  are gathered inside jit; host arrays (numpy, a memmap) are gathered here and only
  the batch is sent, sharded.
  """
  args = dict(model=model, mean=mean, std=std, input_size=input_size)
  rep = parallel.replicated(mesh)
  gathered = jax.jit(functools.partial(gathered_eval_sums, mesh=mesh, **args), out_shardings=rep)
  on_batch = jax.jit(functools.partial(eval_sums, **args), out_shardings=rep)

  def feed(state, images, labels, idx, mask):
    put = lambda a: parallel.put_sharded_batch(a, mesh)
    if isinstance(images, jax.Array):
      return gathered(state, images, labels, put(idx), put(mask))
    return on_batch(state, put(np.asarray(images[idx])), put(np.asarray(labels[idx])), put(mask))

  return feed


def padded_batches(indices: np.ndarray, batch_size: int):
  """Fixed-size batches of `indices`; the last is padded and masked, never dropped."""
  n = len(indices)
  for start in range(0, n, batch_size):
    idx = indices[start : start + batch_size]
    mask = np.ones(batch_size, bool)
    if len(idx) < batch_size:
      mask[len(idx) :] = False
      idx = np.concatenate([idx, np.zeros(batch_size - len(idx), idx.dtype)])
    yield idx.astype(np.int32), mask


def evaluate_accuracy(
  eval_fn, state, images, labels, indices: np.ndarray, batch_size: int, *, desc: str | None = None
) -> dict:
  """Loss and accuracy over `indices`; images/labels on the devices or on the host (see make_eval_sums).

  desc: show a progress bar with this title.
  """
  total = None
  bar = progress_bar(len(indices), 0, desc, "img") if desc else None
  for idx, mask in padded_batches(indices, batch_size):
    s = eval_fn(state, images, labels, idx, mask)
    total = loop.add_eval_sums(total, s)
    if bar is not None:  # (waits for the batch: the bar shows what is done, not what is queued)
      bar.update(int(jax.block_until_ready(s)["count"]))
  if bar is not None:
    bar.close()
  return loop.eval_metrics(total)


class _Records:
  """Train images as grain records {'image', 'label'} (label: the head index). A class, so it pickles."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict:
    return {"image": np.asarray(self.images[i]), "label": int(self.labels[i])}


def place_images(pipeline: str, images: np.ndarray, labels: np.ndarray, mesh):
  """data.pipeline='device': images and labels replicated on every device; 'stream': left on the host."""
  if pipeline == "device":
    return parallel.put_replicated(images, mesh), parallel.put_replicated(labels, mesh)
  return images, labels


class ClassifierPlan:
  """Stage 1's epochs: a seeded permutation of the train images, augmented on the device.

  data.pipeline='device' gathers each batch inside the jitted step; 'stream' reads
  each batch on the host with grain (same order: streaming.epoch_permutation) and
  sends only the batch. Both run `train_step` with the same per-step key, so they
  train identically.
  """

  item_name = "img"

  def __init__(self, config, data: Prepared, model, tx, mesh):
    cfg = config.classifier
    self.cfg, self.mesh, self.seed = cfg, mesh, config.seed
    self.pipeline = config.data.pipeline
    self.batch_size = self.items_per_batch = cfg.batch_size
    parallel.check_divisible(cfg.batch_size, mesh, "classifier.batch_size")
    parallel.check_divisible(cfg.eval_batch_size, mesh, "classifier.eval_batch_size")
    self.train_idx, self.val_idx = data.train_idx, data.val_idx
    self.batch_sizes = loop.epoch_batch_sizes(len(self.train_idx), cfg.batch_size, mesh.devices.size)
    self.images, self.labels = place_images(self.pipeline, data.train_set.images, data.train_head_labels, mesh)
    self._records = _Records(data.train_set.images, data.train_head_labels)
    step_args = dict(
      model=model,
      tx=tx,
      mean=data.mean,
      std=data.std,
      input_size=cfg.input_size,
      augment_config=cfg.augment,
      seed_key=jax.random.PRNGKey(config.seed),
    )
    rep = parallel.replicated(mesh)
    self._gathered_step = jax.jit(
      functools.partial(gathered_train_step, batch_size=cfg.batch_size, mesh=mesh, **step_args),
      static_argnames="size",
      donate_argnums=(0, 5),
      out_shardings=rep,
    )
    self._batch_step = jax.jit(functools.partial(train_step, **step_args), donate_argnums=(0, 3), out_shardings=rep)
    self.eval_fn = make_eval_sums(model, data.mean, data.std, cfg.input_size, mesh)
    self._perm = None
    self._stream = self._stream_at = None  # the epoch's batch iterator; (epoch, next batch) it yields

  def num_batches(self, epoch: int) -> int:
    return len(self.batch_sizes)

  def begin_epoch(self, epoch: int) -> None:
    self._close_stream()
    if self.pipeline == "device":
      perm = self.train_idx[streaming.epoch_permutation(self.seed, epoch, len(self.train_idx))]
      self._perm = parallel.put_replicated(perm.astype(np.int32), self.mesh)

  def train_step(self, state, epoch: int, batch: int, sums: dict):
    sums = parallel.ensure_replicated(sums, self.mesh)  # fresh zero sums: no second compilation
    size = self.batch_sizes[batch]
    if self.pipeline == "device":
      return self._gathered_step(state, self.images, self.labels, self._perm, jnp.int32(batch), sums, size=size)
    images, labels = self._next_batch(epoch, batch)
    put = lambda a: parallel.put_sharded_batch(a[:size], self.mesh)  # the device-count trim, as above
    return self._batch_step(state, put(images), put(labels), sums)

  def _next_batch(self, epoch: int, batch: int):
    # Opened lazily, at the epoch's first step: a resumed epoch starts at its resume batch.
    if self._stream_at != (epoch, batch):
      self._close_stream()
      self._stream = streaming.stream_batches(
        self._records, self.train_idx, self.batch_size, self.seed, epoch, None, start_batch=batch
      )
    images, labels = next(self._stream)
    self._stream_at = (epoch, batch + 1)
    return images, labels

  def _close_stream(self) -> None:
    close = getattr(self._stream, "close", None)  # grain's workers go as soon as an epoch is left
    if close is not None:
      close()
    self._stream = self._stream_at = None

  def evaluate(self, state) -> dict:
    return evaluate_accuracy(
      self.eval_fn, state, self.images, self.labels, self.val_idx, self.cfg.eval_batch_size, desc="stage 1 validation"
    )


def stage_identity(config) -> dict:
  d = wd.config_to_dict(config)
  return {"seed": d["seed"], "data": d["data"], "model": d["model"], "classifier": metric.identity(d["classifier"])}


def default_identity(config) -> dict:
  """stage_identity of the base config with config's loss (a metric loss's identity has its fields):
  what a record made before a key existed means by it."""
  base = configs.base_config()
  base.classifier.loss = config.classifier.loss
  return stage_identity(base)


def abstract_state(config, model, mesh):
  """Shapes, dtypes and shardings of stage 1's state, for restoring without initialising."""
  size = config.classifier.input_size

  def create():
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    key = jax.random.PRNGKey(0)
    return TrainState.create(
      model.init({"params": key, "dropout": key}, x, train=False), make_optimizer(config.classifier, model)
    )

  return abstract_like(jax.eval_shape(create), parallel.replicated(mesh))


def restore_classifier(config, workdir: str | Path, mesh) -> tuple[object, TrainState]:
  """(model, state) of the best stage-1 checkpoint of workdir, replicated over mesh.

  The head's width is the number of seen classes of the workdir's split.json.
  """
  workdir = Path(workdir)
  split = splits.load_split(workdir)
  if split is None:
    raise FileNotFoundError(f"{workdir / splits.SPLIT_FILE} is missing: stage 1 never ran in this workdir")
  model = build_classifier(config, len(split.seen_classes))
  state, _ = restore_best(workdir / wd.STAGE1, abstract_state(config, model, mesh), "stage-1")
  return model, state


def train_classifier(config, workdir: str | Path) -> dict:
  """Trains (or resumes) stage 1 in workdir/stage1 and returns its result.json."""
  workdir = Path(workdir)
  identity, defaults = stage_identity(config), default_identity(config)
  finished = wd.check_stage(workdir, wd.STAGE1, identity, overwrite=config.overwrite, defaults=defaults)
  if finished:
    result = wd.stage_result(workdir, wd.STAGE1, required=("best_step", "epochs"))
    if result["epochs"] >= config.classifier.num_epochs:
      logging.info(
        "stage 1 already finished (%d epochs, %s): skipped", result["epochs"], console.stage1_test_text(result)
      )
      return result
    logging.info("stage 1 continues from epoch %d to %d", result["epochs"], config.classifier.num_epochs)
  mesh = parallel.make_mesh()
  data = prepare(config, workdir)
  num_classes = len(data.split.seen_classes)
  model = build_classifier(config, num_classes)
  tx = make_optimizer(config.classifier, model)
  variables = initial_variables(config, model, num_classes, config.classifier.input_size)
  state = parallel.put_replicated(TrainState.create(variables, tx), mesh)
  if isinstance(model, MetricModel):
    plan = metric.MetricPlan(config, data, model, tx, mesh, place_images=place_images, padded_batches=padded_batches)
  else:
    plan = ClassifierPlan(config, data, model, tx, mesh)
  # Claimed once the data, the split and the model have loaded: a refused run leaves no claim.
  identity["split_sha256"] = wd.split_digest(workdir)
  stage_dir, _ = wd.claim_stage(workdir, wd.STAGE1, identity, overwrite=config.overwrite, defaults=defaults)
  write_augmentation_figure(config, data, workdir, stage_dir)
  settings = loop.LoopSettings.from_config(config.classifier, "stage 1")
  with contextlib.closing(MetricsWriter(stage_dir)) as writer:  # (the test metrics go to fit's event file)
    state, meta = loop.fit(
      plan,
      state,
      stage_dir,
      settings,
      place_state=lambda s: parallel.put_replicated(s, mesh),
      config_dict=wd.config_to_dict(config),
      writer=writer,
    )
    best = meta["best"]
    best_state, _ = restore_best(stage_dir, abstract_like(state), "stage-1")
    test_images, test_labels = place_images(config.data.pipeline, data.test_set.images, data.test_head_labels, mesh)
    seen_test = data.test_idx[data.test_head_labels[data.test_idx] >= 0]
    if isinstance(plan, metric.MetricPlan):
      # No classifier head to score: the seen test images retrieved among themselves instead.
      mtest = plan.retrieval(best_state, test_images, data.test_head_labels, seen_test)
      writer.write_scalars(best["step"], {"test/map_at_r": mtest["map@r"], "test/precision_at_1": mtest["precision@1"]})
    else:
      test = evaluate_accuracy(
        plan.eval_fn,
        best_state,
        test_images,
        test_labels,
        seen_test,
        config.classifier.eval_batch_size,
        desc="stage 1 test",
      )
      writer.write_scalars(best["step"], {"test/accuracy": test["accuracy"], "test/loss": test["loss"]})
  if isinstance(plan, metric.MetricPlan):
    extra = {
      "loss": config.classifier.loss,
      "test_precision@1": mtest["precision@1"],
      "test_r_precision": mtest["r_precision"],
      "test_map@r": mtest["map@r"],
      "test_images": len(seen_test),
      "best_val_map@r": best["val_accuracy"],
    }
    result = loop.write_result(stage_dir, meta, extra, "stage1")
    logging.info(
      "stage 1 (%s) finished: MAP@R %.4f, P@1 %.4f on %d seen-class test images (best epoch %d)",
      config.classifier.loss,
      mtest["map@r"],
      mtest["precision@1"],
      len(seen_test),
      best["epoch"],
    )
    return result
  extra = {"test_accuracy": test["accuracy"], "test_loss": test["loss"], "test_images": test["count"]}
  result = loop.write_result(stage_dir, meta, extra, "stage1")
  logging.info(
    "stage 1 finished: test accuracy %.2f %% on %d seen-class test images (best epoch %d)",
    100 * test["accuracy"],
    test["count"],
    best["epoch"],
  )
  return result


AUGMENTATION_FIGURE = "figures/augmentations.png"  # (jsim.data.augment_figure)


def write_augmentation_figure(config, data, workdir: Path, stage_dir: Path) -> Path | None:
  """The source's Table 1 as a picture: evaluation.augmentation_examples stage-1 train images
  under each augmentation (W/figures/augmentations.png, and stage 1's TensorBoard Images).
  Written once per workdir, by the main process; 0 examples: not at all."""
  n = config.evaluation.augmentation_examples
  out = Path(workdir) / AUGMENTATION_FIGURE
  if n <= 0 or not parallel.is_main_process() or out.exists():
    return None
  from PIL import Image

  from jsim.data import augment_figure as figures
  from jsim.train.metrics_writer import MetricsWriter

  idx = np.sort(np.random.default_rng(config.seed).choice(data.train_idx, min(n, len(data.train_idx)), replace=False))
  examples, angles = figures.augmentation_examples(
    data.train_set.images[idx], config.classifier.augment, seed=config.seed
  )
  figures.plot_augmentations(
    examples,
    out,
    angles=angles,
    title=f"Stage-1 augmentations (order '{config.classifier.augment.order}'; "
    f"each fires with p = {config.classifier.augment.prob} in training)",
  )
  writer = MetricsWriter(stage_dir, filename_suffix=".augmentations")
  try:
    with Image.open(out) as im:
      writer.write_image("augmentations", np.asarray(im.convert("RGB")))
  finally:
    writer.close()
  return out
