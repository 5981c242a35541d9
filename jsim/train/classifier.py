"""Stage 1: the classifier Mc (backbone + a head over the seen classes)."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jsim import configs, console, models, parallel, workdir as wd
from jsim.checkpoint import abstract_like, restore_best
from jsim import knn_metrics
from jsim.data import samplers, splits, streaming
from jsim.data.prepare import Prepared, prepare
from jsim.models import freeze as freezing
from jsim.models.metric_model import MetricModel
from jsim.train import batching, feature_cache, loop, metric, schedule, step
from jsim.train.metrics_writer import MetricsWriter
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


# ----------------------------------------------------------------------------- the plan loop.fit runs


def evaluate_accuracy(
  eval_fn, state, images, labels, indices: np.ndarray, batch_size: int, *, desc: str | None = None
) -> dict:
  """Loss and accuracy of a classifying loss's head over `indices` (eval_fn: step.jit_eval_step's)."""
  total = None
  for sums, _ in batching.run(
    lambda idx, mask: eval_fn(state, images, labels, idx, mask), indices, batch_size, desc=desc
  ):
    total = loop.add_eval_sums(total, sums)
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


class UniformBatches:
  """The protocol's batches: each epoch a seeded permutation of the n train images (a function of
  (seed, epoch): streaming.epoch_permutation), cut into batches.

  keep_remainder: the last, shorter batch is kept, trimmed to a multiple of the device count
  (985 updates a protocol epoch); otherwise only full batches (a pair or proxy loss on a few
  images says little).
  """

  def __init__(self, n: int, batch_size: int, *, keep_remainder: bool, num_devices: int = 1):
    self.n = n
    if keep_remainder:
      self.batch_sizes = loop.epoch_batch_sizes(n, batch_size, num_devices)
    else:
      self.batch_sizes = [batch_size] * (n // batch_size)
      if not self.batch_sizes:
        raise ValueError(f"{n} training images make no batch of {batch_size}")

  def epoch(self, seed: int, epoch: int) -> np.ndarray:
    """Positions (into the n images) of the epoch's batches, one after the other."""
    return streaming.epoch_permutation(seed, epoch, self.n)[: sum(self.batch_sizes)]


class MPerClassBatches:
  """m images of each of batch_size / m classes per batch (jsim.data.samplers), full batches only."""

  def __init__(self, labels: np.ndarray, *, m: int, batch_size: int):
    self.sampler = samplers.MPerClassSampler(labels, m=m, batch_size=batch_size)
    self.batch_sizes = [batch_size] * self.sampler.num_batches

  def epoch(self, seed: int, epoch: int) -> np.ndarray:
    return np.asarray(self.sampler.epoch(seed, epoch)).reshape(-1)


def batch_source(cfg, loss, labels: np.ndarray, num_devices: int):
  """config.classifier's batches over stage 1's train images (head `labels`): m-per-class for
  sampler 'm_per_class' ('auto': for a metric-learning loss), else uniform."""
  if cfg.sampler not in metric.SAMPLERS:
    raise ValueError(f"classifier.sampler={cfg.sampler!r}: expected one of {', '.join(metric.SAMPLERS)}")
  if cfg.sampler == "m_per_class" or (cfg.sampler == "auto" and not loss.classifies):
    return MPerClassBatches(labels, m=cfg.sampler_m, batch_size=cfg.batch_size)
  return UniformBatches(len(labels), cfg.batch_size, keep_remainder=loss.classifies, num_devices=num_devices)


class Stage1Plan:
  """Stage 1's epochs for any loss (an EpochPlan for loop.fit): batches from a batch source,
  augmented on the device, jsim.train.step's step.

  data.pipeline='device' holds the train images on every device and gathers each batch
  inside the jitted step; 'stream' reads each batch on the host with grain (the same order)
  and sends only the batch. Both run the same step with the same per-step key, so they
  train identically.

  A loss that classifies (cross_entropy) is judged each epoch by its head's validation
  accuracy; any other by MAP@R of the validation images among themselves
  (`val_accuracy` is then MAP@R, `val_precision_at_1` and `val_r_precision` beside it).

  features: the frozen backbone's cached outputs (jsim.train.feature_cache: {'train': T180 rows,
  'test': test rows}): the steps then take those rows in place of the images (held on the
  devices, whatever data.pipeline says; far smaller than the images) and run only the head. The
  batches are the same images in the same order.
  """

  item_name = "img"

  def __init__(self, config, data: Prepared, model, tx, mesh, features: dict | None = None):
    cfg = config.classifier
    self.cfg, self.mesh, self.seed = cfg, mesh, config.seed
    self.loss = metric.build_loss(cfg)
    self.pipeline = config.data.pipeline
    self.batch_size = self.items_per_batch = cfg.batch_size
    parallel.check_divisible(cfg.batch_size, mesh, "classifier.batch_size")
    parallel.check_divisible(cfg.eval_batch_size, mesh, "classifier.eval_batch_size")
    self.train_idx, self.val_idx = data.train_idx, data.val_idx
    self.source = batch_source(cfg, self.loss, data.train_head_labels[self.train_idx], mesh.devices.size)
    self.batch_sizes = self.source.batch_sizes
    self.features = features
    if features is None:
      self.inputs = "images"
      self.images, self.labels = place_images(self.pipeline, data.train_set.images, data.train_head_labels, mesh)
      self._records = _Records(data.train_set.images, data.train_head_labels)
    else:  # positions into T180's rows, which hold the cached features
      self.inputs, self.pipeline = "features", "device"
      t180 = data.t180_idx
      self.train_idx, self.val_idx = np.searchsorted(t180, self.train_idx), np.searchsorted(t180, self.val_idx)
      self.images, self.labels = place_images("device", features["train"], data.train_head_labels[t180], mesh)
    self._gathered_step, self._batch_step = step.jit_train_steps(
      mesh,
      batch_size=cfg.batch_size,
      model=model,
      loss=self.loss,
      tx=tx,
      mean=data.mean,
      std=data.std,
      input_size=cfg.input_size,
      augment_config=cfg.augment,
      seed_key=jax.random.PRNGKey(config.seed),
    )
    self.eval_fn = step.jit_eval_step(
      mesh, inputs=self.inputs, model=model, loss=self.loss, mean=data.mean, std=data.std, input_size=cfg.input_size
    )
    self.distance = metric.retrieval_distance(cfg)
    self._order = None  # the epoch's image indices, batch after batch (on the devices for 'device')
    self._stream = self._stream_at = None  # the epoch's batch iterator; (epoch, next batch) it yields

  def num_batches(self, epoch: int) -> int:
    return len(self.batch_sizes)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The image indices of the epoch's batches, one batch after the other: a function of (seed, epoch)."""
    return self.train_idx[self.source.epoch(self.seed, epoch)].astype(np.int32)

  def begin_epoch(self, epoch: int) -> None:
    self._close_stream()
    order = self.epoch_order(epoch)
    self._order = parallel.put_replicated(order, self.mesh) if self.pipeline == "device" else order

  def train_step(self, state, epoch: int, batch: int, sums: dict):
    sums = parallel.ensure_replicated(sums, self.mesh)  # fresh zero sums: no second compilation
    size = self.batch_sizes[batch]
    if self.pipeline == "device":
      data = {self.inputs: self.images, "labels": self.labels}
      return self._gathered_step(state, data, self._order, jnp.int32(batch), sums, size)
    images, labels = self._next_batch(epoch, batch)
    put = lambda a: parallel.put_sharded_batch(a[:size], self.mesh)  # the device-count trim, as above
    return self._batch_step(state, {"images": put(images), "labels": put(labels)}, sums)

  def _next_batch(self, epoch: int, batch: int):
    # Opened lazily, at the epoch's first step: a resumed epoch starts at its resume batch.
    if self._stream_at != (epoch, batch):
      self._close_stream()
      self._stream = streaming.stream_order(self._records, self._order[batch * self.batch_size :], self.batch_size)
    images, labels = next(self._stream)
    self._stream_at = (epoch, batch + 1)
    return images, labels

  def _close_stream(self) -> None:
    close = getattr(self._stream, "close", None)  # grain's workers go as soon as an epoch is left
    if close is not None:
      close()
    self._stream = self._stream_at = None

  def embed(self, state, images, indices: np.ndarray) -> np.ndarray:
    """Embeddings [len(indices), D] of `images` (on the devices or the host) in eval mode (a loss that
    does not classify)."""
    fn = lambda idx, mask: self.eval_fn(state, images, None, idx, mask)["embeddings"]
    return batching.rows(list(batching.run(fn, indices, self.cfg.eval_batch_size)))

  def score(self, state, images, labels, indices: np.ndarray, desc: str | None = None) -> dict:
    """The epoch's validation figures over `indices` of (images, head labels):
    {'loss', 'accuracy' (what selects the best epoch), 'count', 'extra'}."""
    if self.loss.classifies:
      return evaluate_accuracy(self.eval_fn, state, images, labels, indices, self.cfg.eval_batch_size, desc=desc)
    m = self.retrieval(state, images, labels, indices)
    return {
      "loss": None,
      "accuracy": m["map@r"],
      "count": m["num_queries"],
      "extra": {"val_precision_at_1": m["precision@1"], "val_r_precision": m["r_precision"]},
    }

  def retrieval(self, state, images, labels, indices: np.ndarray) -> dict:
    """P@1, R-precision and MAP@R of the images `indices` among themselves."""
    labels = np.asarray(jax.device_get(labels))
    return knn_metrics.embedding_metrics(self.embed(state, images, indices), labels[indices], distance=self.distance)

  def evaluate(self, state) -> dict:
    return self.score(state, self.images, self.labels, self.val_idx, desc="stage 1 validation")

  def test_inputs(self, data: Prepared) -> tuple:
    """(inputs, head labels, positions of the seen-class test images) for `score`: the test images,
    or their cached features (the same images, in the same order)."""
    if self.features is None:
      images, labels = place_images(self.pipeline, data.test_set.images, data.test_head_labels, self.mesh)
      return images, labels, data.test_idx[data.test_head_labels[data.test_idx] >= 0]
    labels = data.test_head_labels[data.test_idx]
    inputs, placed_labels = place_images("device", self.features["test"], labels, self.mesh)
    return inputs, placed_labels, np.flatnonzero(labels >= 0)


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


def train_classifier(config, workdir: str | Path, data: Callable[[], Prepared] | None = None) -> dict:
  """Trains (or resumes) stage 1 in workdir/stage1 and returns its result.json.

  data: the run's data, prepared on its first call (jsim.run hands every stage the same one);
  None: prepared here.
  """
  workdir = Path(workdir)
  identity, defaults = stage_identity(config), default_identity(config)
  finished = wd.check_stage(workdir, wd.STAGE1, identity, overwrite=config.overwrite, defaults=defaults)
  if finished:
    result = wd.stage_result(workdir, wd.STAGE1, required=("best_step", "epochs"))
    if result["epochs"] >= config.classifier.num_epochs:
      logging.info(
        "stage 1 already finished (%d epochs, %s): skipped%s",
        result["epochs"],
        console.stage1_test_text(result),
        wd.not_applied_text(workdir, wd.STAGE1, config),
      )
      return result
    logging.info("stage 1 continues from epoch %d to %d", result["epochs"], config.classifier.num_epochs)
  mesh = parallel.make_mesh()
  data = data() if data is not None else prepare(config, workdir)
  num_classes = len(data.split.seen_classes)
  model = build_classifier(config, num_classes)
  tx = make_optimizer(config.classifier, model)
  variables = initial_variables(config, model, num_classes, config.classifier.input_size)
  state = parallel.put_replicated(TrainState.create(variables, tx), mesh)
  features = feature_cache.stage1_features(config, workdir, data, model, variables, mesh)
  plan = Stage1Plan(config, data, model, tx, mesh, features)
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
    test_images, test_labels, seen_test = plan.test_inputs(data)
    # A loss without a classifier head has nothing to score: the seen test images are retrieved among themselves.
    test = plan.score(best_state, test_images, test_labels, seen_test, desc="stage 1 test")
    scalars, extra = _test_figures(config, plan.loss, test, best, len(seen_test))
    writer.write_scalars(best["step"], scalars)
  result = loop.write_result(stage_dir, meta, extra, "stage1")
  if plan.loss.classifies:
    logging.info(
      "stage 1 finished: test accuracy %.2f %% on %d seen-class test images (best epoch %d)",
      100 * test["accuracy"],
      test["count"],
      best["epoch"],
    )
  else:
    logging.info(
      "stage 1 (%s) finished: MAP@R %.4f, P@1 %.4f on %d seen-class test images (best epoch %d)",
      config.classifier.loss,
      extra["test_map@r"],
      extra["test_precision@1"],
      len(seen_test),
      best["epoch"],
    )
  return result


def _test_figures(config, loss, test: dict, best: dict, num_images: int) -> tuple[dict, dict]:
  """(TensorBoard scalars, result.json fields) of stage 1's test figures (Stage1Plan.score's)."""
  if loss.classifies:
    return (
      {"test/accuracy": test["accuracy"], "test/loss": test["loss"]},
      {"test_accuracy": test["accuracy"], "test_loss": test["loss"], "test_images": test["count"]},
    )
  p1 = test["extra"]["val_precision_at_1"]
  scalars = {"test/map_at_r": test["accuracy"], "test/precision_at_1": p1}
  extra = {
    "loss": config.classifier.loss,
    "test_precision@1": p1,
    "test_r_precision": test["extra"]["val_r_precision"],
    "test_map@r": test["accuracy"],
    "test_images": num_images,
    "best_val_map@r": best["val_accuracy"],
  }
  return scalars, extra


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
