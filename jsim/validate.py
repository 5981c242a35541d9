"""Checks a config before anything is loaded or compiled: one clear line per problem.

Unknown keys and wrong types are refused by ml_collections itself (the config is
locked and typed); this catches values that are well-typed but impossible.
"""

from __future__ import annotations

from pathlib import Path

import jax

from jsim import configs


def _choice(key: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"{key}={value!r}: expected one of {', '.join(map(repr, allowed))}")


def _positive(key: str, value, *, allow_zero: bool = False) -> None:
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


def check_config(config) -> None:
  """Raises ValueError naming the first impossible value."""
  from jsim import models
  from jsim.data import augment
  from jsim.models import similarity
  devices = jax.device_count()
  _choice("stage", config.stage, configs.STAGES)
  d = config.data
  _choice("data.source", d.source, ("auto", "folder", "zip", "download", "synthetic", "tfds"))
  _choice("data.on_bad_image", d.on_bad_image, ("error", "skip"))
  _choice("data.normalization", d.normalization, ("train", "imagenet"))
  _positive("data.image_size", d.image_size)
  if d.num_workers is not None:
    _positive("data.num_workers", d.num_workers)
  _positive("data.num_seen_classes", d.num_seen_classes)
  if d.source == "synthetic" and d.num_seen_classes > d.synthetic.num_classes:
    raise ValueError(f"data.num_seen_classes={d.num_seen_classes} is more than the "
                     f"{d.synthetic.num_classes} classes of data.synthetic.num_classes")
  if not 0.0 < d.val_fraction < 1.0:
    raise ValueError(f"data.val_fraction={d.val_fraction!r}: must be in (0, 1)")
  if d.source == "folder" and not d.root:
    raise ValueError("data.source='folder' needs data.root (the tiny-imagenet-200 folder)")
  if d.source == "zip" and not d.zip_path:
    raise ValueError("data.source='zip' needs data.zip_path (tiny-imagenet-200.zip)")
  if d.source == "tfds" and not d.tfds_name:
    raise ValueError("data.source='tfds' needs data.tfds_name")

  m = config.model
  _choice("model.name", m.name, models.available())
  _choice("model.init", m.init, ("torchvision", "random"))
  _choice("model.dtype", m.dtype, ("auto", "float32", "bfloat16"))

  c = config.classifier
  _training("classifier", c, devices)
  _positive("classifier.eval_batch_size", c.eval_batch_size)
  _divisible("classifier.eval_batch_size", c.eval_batch_size, devices)
  _positive("classifier.input_size", c.input_size)
  if not 0.0 <= c.augment.prob <= 1.0:
    raise ValueError(f"classifier.augment.prob={c.augment.prob!r}: must be in [0, 1]")
  augment.check_config(c.augment, (d.image_size, d.image_size))
  _positive("embed.batch_size", config.embed.batch_size)
  _divisible("embed.batch_size", config.embed.batch_size, devices)

  s = config.similarity
  _training("similarity", s, devices)
  similarity.parse_feature_kind(s.feature)
  for f in config.sweep.features:
    similarity.parse_feature_kind(f)
  if not 0.0 <= s.dropout < 1.0:
    raise ValueError(f"similarity.dropout={s.dropout!r}: must be in [0, 1)")
  for h in s.hidden:
    _positive("similarity.hidden", h)
  for key in ("train_per_ordered_class_pair", "train_similar_per_class", "val_per_ordered_class_pair",
              "val_similar_per_class"):
    _positive(f"similarity.{key}", s[key])
  for other in s.ensemble_workdirs:
    if not Path(other).is_dir():
      raise ValueError(f"similarity.ensemble_workdirs: {other} is not a directory")

  e = config.evaluation
  _choice("evaluation.mode", e.mode, ("sampled", "exhaustive"))
  _positive("evaluation.test_per_ordered_class_pair", e.test_per_ordered_class_pair)
  _positive("evaluation.test_similar_per_class", e.test_similar_per_class)
  _positive("evaluation.chunk_size", e.chunk_size)
  _divisible("evaluation.chunk_size", e.chunk_size, devices)
  _positive("evaluation.num_bins", e.num_bins)
