"""The shared base of every experiment config (configs/*.py override a few fields).

Every key is listed here with its default, so that `--config.x.y=...` overrides
are type-checked by ml_collections and an unknown key is refused.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from jsim.data import augment, sources

# config.stage: one stage, or 'all' / 'sweep', which run the stages they need (jsim.run); 'prepare' the data only.
STAGES = ("prepare", "classifier", "embed", "similarity", "evaluate", "all", "sweep")


def add_metric_learning_fields(cl: ml_collections.ConfigDict) -> None:
  """Stage 1's loss by name (jsim.losses), and what metric learning adds; cross_entropy ignores them."""
  from jsim import losses

  cl.loss = "cross_entropy"  # cross_entropy (the protocol's head) | one of jsim.losses.available()
  # Each loss's hyperparameters, with PML's defaults: --config.classifier.loss_hparams.triplet.margin=0.1;
  # contrastive, triplet and multi_similarity take a miner: --config.classifier.loss_hparams.triplet.miner=batch_hard
  cl.loss_hparams = ml_collections.ConfigDict(
    {name: losses.build(name).hyperparameters() for name in losses.available()}
  )
  # Each miner's hyperparameters (jsim.losses.miners), PML's defaults, read for the loss's miner only.
  cl.miner_hparams = ml_collections.ConfigDict(
    {name: losses.miners.build(name).hyperparameters() for name in losses.miners.available()}
  )
  cl.embedding_dim = 0  # > 0: a linear embedding head to this width, L2-normalised
  cl.sampler = "auto"  # auto (uniform for cross_entropy, m_per_class otherwise) | uniform | m_per_class
  cl.sampler_m = 4  # m_per_class: images per class in a batch
  cl.head_learning_rate = config_dict.placeholder(float)  # the embedding head's rate; None: learning_rate
  cl.loss_learning_rate = config_dict.placeholder(float)  # proxies / class weights / Ms; None: learning_rate
  cl.retrieval_distance = "auto"  # validation MAP@R by: auto (cosine, l2 for pair_ms) | l2 | cosine


# Rates of the loss's own parameters relative to the backbone's: proxies and class weights learn
# faster (Proxy-Anchor uses 100x with AdamW; 10x with SGD here, untuned); Ms as the protocol's stage 2 (0.5x).
# use_metric_loss sets classifier.loss_learning_rate to this factor times a reference to
# classifier.learning_rate, so that an override of learning_rate (a sweep's) moves both.
LOSS_RATE_FACTOR = {"proxy_anchor": 10.0, "normalized_softmax": 10.0, "arcface": 10.0, "pair_ms": 0.5}


def parse_args(arg: str | None, defaults: dict[str, str], where: str) -> dict[str, str]:
  """'loss=triplet,size=cpu' -> {'loss': 'triplet', 'size': 'cpu'} over `defaults`; one-line errors."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in out:
      raise ValueError(f"{where}:{arg}: expected {','.join(f'{k}=...' for k in defaults)}, got {item!r}")
    out[key] = value
  return out


def use_metric_loss(c: ml_collections.ConfigDict, loss: str, *, embedding_dim: int = 512, m: int = 4) -> None:
  """Stage 1 trained by `loss` (or the protocol's cross_entropy): head, sampler and rates as the configs use them."""
  from jsim import losses

  if loss != "cross_entropy" and loss not in losses.available():
    raise ValueError(f"loss={loss!r}: expected cross_entropy or one of {', '.join(losses.available())}")
  cl = c.classifier
  cl.loss = loss
  if loss == "cross_entropy":
    return
  cl.embedding_dim = embedding_dim
  cl.sampler = "m_per_class"
  cl.sampler_m = m
  if loss in LOSS_RATE_FACTOR:
    cl.loss_learning_rate = cl.get_ref("learning_rate") * LOSS_RATE_FACTOR[loss]


def metric_benchmark_config(arg: str | None, source: str, num_seen: int, where: str) -> ml_collections.ConfigDict:
  """configs/cub200.py, cars196.py and sop.py: `loss=...,format=archive|tfds` on the field's class split.

  ResNet50 from torchvision's weights, images decoded at 256 px, random 224 px crops, a
  512-d embedding head, batches of 16 classes x 4; the first `num_seen` classes seen.
  """
  from jsim.data import benchmarks

  args = parse_args(arg, {"loss": "multi_similarity", "format": "archive"}, where)
  if args["format"] not in benchmarks.FORMATS:
    raise ValueError(f"{where}:{arg}: format={args['format']!r}, expected one of {', '.join(benchmarks.FORMATS)}")
  c = base_config()
  c.stage = "all"
  c.data.source = source
  c.data.benchmark_format = args["format"]
  c.data.image_size = 256
  c.data.seen_classes = "first"
  c.data.num_seen_classes = num_seen
  c.data.val_fraction = 0.2
  c.model.name = "resnet50"
  c.classifier.input_size = 224
  c.classifier.augment.crop_size = 224
  c.classifier.batch_size = 64
  use_metric_loss(c, args["loss"], embedding_dim=512, m=4)
  # Balanced pairs over the seen classes (C*(C-1)*k dissimilar = C*s similar) and the test cases.
  s = c.similarity
  s.train_per_ordered_class_pair, s.train_similar_per_class = 10, 10 * (num_seen - 1)
  s.val_per_ordered_class_pair, s.val_similar_per_class = 6, 6 * (num_seen - 1)
  return c


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # prepare (the data, split and statistics only) | classifier | embed | similarity | evaluate |
  # all (every stage, skipping finished ones) | sweep.
  c.stage = "all"
  c.seed = 0
  c.overwrite = False  # True: redo a finished stage (its old outputs are replaced)

  c.data = sources.default_data_config()
  with c.data.ignore_type():
    # auto: `root` if set, else `zip_path` if set, else download the official archive.
    c.data.source = "auto"
  c.data.synthetic.update(num_classes=40, train_per_class=60, test_per_class=20)
  c.data.num_seen_classes = 180
  c.data.val_fraction = 0.3
  c.data.seen_classes = "random"  # random (the protocol: drawn from the seed) | first (benchmarks: first half)
  # auto (weights for model.init=pretrained, else t180) | weights (the initial weights' own input scaling) |
  # t180 (the data set's: T180's statistics, the source) | train (stage-1 train split) | imagenet
  c.data.normalization = "auto"
  # Stage 1's input: device (every train image held on each device, batches gathered in the step) |
  # stream (images stay on the host; grain reads each batch, sent sharded: device memory holds batches only).
  c.data.pipeline = "device"

  c.model = ml_collections.ConfigDict(
    dict(
      name="resnet50",  # see jsim.models.available()
      init="torchvision",  # torchvision | pretrained (a weights package: efficientnet_lite0/1/2) | random
      weights="IMAGENET1K_V1",  # torchvision weights name, or a .pth path (model.init=torchvision)
      freeze="none",  # none | backbone | stages:N (the stem and the first N stages fixed; jsim.models.freeze)
      dtype="auto",  # auto (bf16 on accelerators, float32 on CPU) | float32 | bfloat16
      # How convs and max-pools are lowered (jsim.models.layers): auto (XLA's conv on GPU/TPU, per shape on a CPU) | xla | matmul.
      # Not part of a stage's identity: every lowering computes the same convolution, only float rounding differs.
      conv_impl="auto",
    )
  )

  c.classifier = ml_collections.ConfigDict(
    dict(
      batch_size=64,
      eval_batch_size=256,
      learning_rate=0.01,
      momentum=0.8,
      nesterov=True,
      weight_decay=0.0,
      alpha=0.02,
      halving_wait=3,
      num_epochs=30,
      input_size=224,
      nag_form="optax",  # optax | paper: the paper's u_t keeps the old rate after a halving (PROTOCOL.md)
      # sgd (momentum, nesterov, nag_form: the protocol's) | adam | adamw | rmsprop, as torch.optim defines
      # them (jsim.train.schedule.base_optimizer); weight_decay: L2 in the gradient, decoupled for adamw.
      optimizer="sgd",
      b1=0.9,  # adam, adamw
      b2=0.999,  # adam, adamw
      eps=1e-8,  # adam, adamw, rmsprop
      rms_decay=0.99,  # rmsprop (torch's alpha)
      # halving (the protocol's rule: alpha, halving_wait) | plateau (halve when the smoothed validation
      # figure stalls for `patience` epochs) | constant | warmup_cosine (warmup_epochs, final_rate_factor)
      schedule="halving",
      patience=3,  # plateau
      smoothing=0.0,  # plateau: the validation figure's moving average, s = smoothing s + (1 - smoothing) v
      min_delta=0.0,  # plateau: the least improvement of the smoothed figure that counts
      warmup_epochs=0,  # warmup_cosine
      final_rate_factor=0.0,  # warmup_cosine: the last rate / learning_rate
      augment=augment.default_augment_config(),
      log_every_steps=50,
      checkpoint_every_steps=0,
      keep_checkpoints=2,
    )
  )
  add_metric_learning_fields(c.classifier)

  c.embed = ml_collections.ConfigDict(dict(batch_size=256))

  c.similarity = ml_collections.ConfigDict(
    dict(
      model="mlp",  # mlp (Ms, the protocol) | distance (a calibrated embedding distance, no training)
      distance="cosine",  # model=distance: cosine | l2
      feature="l1",  # l1 | sq | prod | cos | l2, or a concatenation such as "l1+prod"
      hidden=(),  # empty: halve the embedding width twice (the protocol)
      dropout=0.25,
      batch_size=256,
      learning_rate=0.005,
      momentum=0.8,
      nesterov=True,
      weight_decay=0.0,
      alpha=0.01,
      halving_wait=3,
      num_epochs=50,
      nag_form="optax",
      train_per_ordered_class_pair=10,
      train_similar_per_class=1790,
      val_per_ordered_class_pair=6,
      val_similar_per_class=1074,
      exclusion="redraw",  # a training pair that is a validation pair: redraw it | remove it (PROTOCOL.md)
      ensemble_workdirs=(),  # other workdirs (same data and seed) whose embeddings are concatenated
      log_every_steps=200,
      checkpoint_every_steps=0,
      keep_checkpoints=2,
    )
  )

  c.evaluation = ml_collections.ConfigDict(
    dict(
      mode="sampled",  # sampled (the protocol's 3.98M pairs) | exhaustive (every distinct pair)
      test_per_ordered_class_pair=50,
      test_similar_per_class=9950,
      chunk_size=65536,
      num_bins=1000,
      retrieval=True,
      retrieval_examples=8,
      # Stage 1 draws this many train images under each augmentation in W/figures/augmentations.png
      # and its TensorBoard (the source's Table 1); 0: none. Not part of stage 1's identity.
      augmentation_examples=4,
      compare_workdirs=(),  # other evaluated workdirs: their ROC curves beside this run's (figures/roc_backbones.png)
    )
  )

  c.sweep = ml_collections.ConfigDict(dict(features=("l1", "sq", "prod", "cos", "l1+prod")))
  c.lock()  # a config file sets these keys; a misspelt one is an error, not a new key
  return c


def config_from_dict(recorded: dict):
  """A ConfigDict: base_config() overlaid with a recorded (JSON) config; lists become tuples where
  the base has tuples, keys the base lacks are ignored."""
  c = base_config()
  _overlay(c, recorded)
  return c


def _overlay(cfg, d: dict) -> None:
  for key, value in d.items():
    if key not in cfg:
      continue
    current = cfg[key]
    if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
      _overlay(current, value)
      continue
    if isinstance(current, tuple) and isinstance(value, list):
      value = tuple(value)
    with cfg.ignore_type():
      cfg[key] = value
