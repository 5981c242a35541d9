"""What a metric-learning loss (config.classifier.loss, see jsim.losses) changes in stage 1.

The same stage, step and plan as cross-entropy's (jsim.train.classifier.Stage1Plan,
jsim.train.step; its workdir, checkpoints, resume, halving rule, NaN checks and devices),
with three differences:

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
import optax

from jsim import losses
from jsim.losses import base as loss_base
from jsim.models.metric_model import MetricModel, param_group
from jsim.train import schedule

CROSS_ENTROPY = losses.CROSS_ENTROPY
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


def loss_label(cfg) -> str:
  """config.classifier's loss as reports and tables name it: with its miner, e.g.
  'multi_similarity + multi_similarity miner' (the miner changes the method)."""
  miner = dict(cfg.loss_hparams.get(cfg.loss, {})).get("miner", losses.miners.NONE) if is_metric(cfg) else None
  return cfg.loss if miner in (None, losses.miners.NONE) else f"{cfg.loss} + {miner} miner"


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
  """config.classifier's loss: cross_entropy, or a metric-learning loss with its loss_hparams."""
  if cfg.loss == CROSS_ENTROPY:
    return losses.build(CROSS_ENTROPY)
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
