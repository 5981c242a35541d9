"""Stage 2: the similarity net Ms on pair features of stage-1 embeddings."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jsim import configs, models, parallel, workdir as wd
from jsim.checkpoint import abstract_like, restore_best
from jsim.data import pairs as pairs_lib
from jsim.models.similarity import SimilarityMLP, make_prob_fn
from jsim.train import batching, calibration, loop, schedule
from jsim.train.embeddings import load_embeddings
from jsim.train.state import TrainState

# Independent streams of the seed: validation pairs, training pairs (and their order), dropout.
_VAL, _TRAIN, _DROPOUT = range(3)


def load_stage2_embeddings(config, workdir: Path) -> dict:
  """This workdir's embeddings, concatenated with those of config.similarity.ensemble_workdirs."""
  emb = load_embeddings(workdir)
  sources = [emb["meta"]]
  for other in config.similarity.ensemble_workdirs:
    e = load_embeddings(other)
    for key in ("train_index", "test_index", "train_labels", "test_labels"):
      if not np.array_equal(e[key], emb[key]):
        raise ValueError(
          f"similarity.ensemble_workdirs: {other} embeds other images ({key} differs); "
          f"ensemble workdirs must share the data and the seed"
        )
    emb["train"] = np.concatenate([emb["train"], e["train"]], axis=1)
    emb["test"] = np.concatenate([emb["test"], e["test"]], axis=1)
    sources.append(e["meta"])
  emb["sources"] = sources
  return emb


def build_similarity(config, embedding_dim: int) -> SimilarityMLP:
  cfg = config.similarity
  return SimilarityMLP(
    hidden=tuple(cfg.hidden) or None,
    dropout_rate=cfg.dropout,
    feature=cfg.feature,
    dtype=models.compute_dtype(config.model.dtype),
  )


def seen_classes(emb: dict) -> np.ndarray:
  """Data-set class indices of T180 (the classes present among its embeddings)."""
  return np.unique(emb["train_labels"]).astype(np.int32)


def validation_pairs(config, class_index, classes):
  """The fixed validation pairs: a function of the seed alone."""
  cfg = config.similarity
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), _VAL)
  return pairs_lib.sample_pairs(key, class_index, classes, cfg.val_per_ordered_class_pair, cfg.val_similar_per_class)


def pair_eval_sums(params, emb, pairs, same, start, *, model, chunk: int, mesh) -> dict:
  """Loss, correct and count sums over pairs[start:start + chunk] (padded past the end, and masked)."""
  n = pairs.shape[0]
  pos = start + jnp.arange(chunk)
  mask = pos < n
  pos = jnp.where(mask, pos, 0)
  pos = jax.lax.with_sharding_constraint(pos, parallel.batch_sharded(mesh))
  p, y = pairs[pos], same[pos].astype(jnp.int32)
  logits = model.apply({"params": params}, emb[p[:, 0]], emb[p[:, 1]], train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  w = mask.astype(jnp.float32)
  return {"loss_sum": jnp.sum(losses * w), "correct": jnp.sum((jnp.argmax(logits, -1) == y) * w), "count": jnp.sum(w)}


def make_pair_eval(model, mesh, chunk: int):
  """(params, emb, pairs, same) -> {'loss', 'accuracy', 'count'} over all pairs, in chunks."""
  rep = parallel.replicated(mesh)
  chunk_sums = jax.jit(
    functools.partial(pair_eval_sums, model=model, chunk=chunk, mesh=mesh), in_shardings=(rep,) * 5, out_shardings=rep
  )

  def evaluate(params, emb, pairs, same, desc: str | None = None) -> dict:
    # The chunks are sliced on the device; a batch's first index is its chunk's start.
    fn = lambda idx, mask: chunk_sums(params, emb, pairs, same, jnp.int32(idx[0]))
    total = None
    for s, _ in batching.run(fn, np.arange(pairs.shape[0]), chunk, desc=desc, unit="pair"):
      total = loop.add_eval_sums(total, s)
    return loop.eval_metrics(total)

  return evaluate


def draw_epoch_pairs(
  train_key,
  epoch,
  class_index,
  classes,
  exclusion,
  *,
  per_ordered_class_pair: int,
  similar_per_class: int,
  exclusion_mode: str = "redraw",
):
  """The training pairs of epoch `epoch`: balanced, shuffled, none of them a validation pair
  (one that is gets redrawn, or with exclusion_mode='remove' dropped: fewer pairs)."""
  return pairs_lib.sample_pairs(
    jax.random.fold_in(train_key, epoch),
    class_index,
    classes,
    per_ordered_class_pair,
    similar_per_class,
    exclude=exclusion,
    shuffle=True,
    exclusion=exclusion_mode,
  )


def train_step(
  state: TrainState, emb, pairs, same, batch, sums: dict, size: int, *, batch_size: int, model, tx, dropout_key, mesh
):
  """One update on batch `batch` of the epoch's pairs of embeddings; adds to the epoch's sums."""
  start = batch * batch_size
  p = jax.lax.dynamic_slice_in_dim(pairs, start, size)
  y = jax.lax.dynamic_slice_in_dim(same, start, size).astype(jnp.int32)
  p = jax.lax.with_sharding_constraint(p, parallel.batch_sharded(mesh))
  e1, e2 = emb[p[:, 0]], emb[p[:, 1]]
  key = jax.random.fold_in(dropout_key, state.step)

  def loss_fn(params):
    logits = model.apply({"params": params}, e1, e2, train=True, rngs={"dropout": key})
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return losses.mean(), (losses, logits)

  grads, (losses, logits) = jax.grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads, tx)
  return new_state, loop.add_to_sums(sums, losses, jnp.argmax(logits, -1) == y, state.step)


class SimilarityPlan:
  """Stage 2's epochs: fresh balanced training pairs each epoch, in a seeded order."""

  item_name = "pair"

  def __init__(self, config, emb_train: np.ndarray, labels: np.ndarray, model, tx, mesh):
    cfg = config.similarity
    self.cfg, self.mesh = cfg, mesh
    self.batch_size = self.items_per_batch = cfg.batch_size
    parallel.check_divisible(cfg.batch_size, mesh, "similarity.batch_size")
    self.emb = parallel.put_replicated(emb_train, mesh)
    self.class_index = pairs_lib.build_class_index(labels)
    self.classes = jnp.asarray(seen_classes({"train_labels": labels}))
    self.val_pairs, self.val_same = parallel.put_replicated(
      validation_pairs(config, self.class_index, self.classes), mesh
    )
    self.exclusion = pairs_lib.make_exclusion(self.val_pairs)
    self._exclusion_mode = cfg.exclusion
    n_dev = mesh.devices.size
    # 'redraw' keeps C(C-1)k + Cs pairs every epoch; 'remove' drops the drawn ones that are
    # validation pairs, so an epoch's count (and its last batch) is known once it is drawn.
    self._num_drawn = pairs_lib.num_pairs(
      len(self.classes), cfg.train_per_ordered_class_pair, cfg.train_similar_per_class
    )
    self._n_dev = n_dev
    self.batch_sizes = loop.epoch_batch_sizes(self._num_drawn, cfg.batch_size, n_dev)
    seed_key = jax.random.PRNGKey(config.seed)
    self._train_key = jax.random.fold_in(seed_key, _TRAIN)
    self._pair_counts = dict(
      per_ordered_class_pair=cfg.train_per_ordered_class_pair,
      similar_per_class=cfg.train_similar_per_class,
      exclusion_mode=self._exclusion_mode,
    )
    self._train_step = jax.jit(
      functools.partial(
        train_step,
        batch_size=cfg.batch_size,
        model=model,
        tx=tx,
        dropout_key=jax.random.fold_in(seed_key, _DROPOUT),
        mesh=mesh,
      ),
      static_argnums=6,  # size: the epoch's last batch may be shorter
      in_shardings=(parallel.replicated(mesh),) * 6,
      donate_argnums=(0, 5),
      out_shardings=parallel.replicated(mesh),
    )
    self._evaluate = make_pair_eval(model, mesh, chunk=max(cfg.batch_size, 16384 // n_dev * n_dev))
    self._pairs = self._same = None

  def num_batches(self, epoch: int) -> int:
    return len(self.batch_sizes)

  def begin_epoch(self, epoch: int) -> None:
    pairs, same = draw_epoch_pairs(
      self._train_key, epoch, self.class_index, self.classes, self.exclusion, **self._pair_counts
    )
    kept = int(pairs.shape[0])
    if kept < self._num_drawn:  # exclusion='remove': padded back to the drawn shape (no retrace)
      pad = self._num_drawn - kept
      pairs = jnp.concatenate([pairs, jnp.zeros((pad, 2), pairs.dtype)])
      same = jnp.concatenate([same, jnp.zeros((pad,), same.dtype)])
    self._pairs, self._same = parallel.put_replicated((pairs, same), self.mesh)
    self.batch_sizes = loop.epoch_batch_sizes(kept, self.cfg.batch_size, self._n_dev)  # never the padding

  def train_step(self, state, epoch: int, batch: int, sums: dict):
    sums = parallel.ensure_replicated(sums, self.mesh)  # fresh zero sums: no second compilation
    return self._train_step(state, self.emb, self._pairs, self._same, jnp.int32(batch), sums, self.batch_sizes[batch])

  def evaluate(self, state) -> dict:
    return self._evaluate(state.params, self.emb, self.val_pairs, self.val_same, desc="stage 2 validation")


def stage_identity_sources(emb: dict) -> list[dict]:
  """What stage 2 was trained on: each embedding source's model, stage-1 checkpoint and run, width."""
  return [{k: m.get(k) for k in ("model", "stage1_step", "stage1_run_id", "dim")} for m in emb["sources"]]


def stage_identity(config, emb: dict) -> dict:
  d = wd.config_to_dict(config)
  return {
    "seed": d["seed"],
    "model": d["model"]["name"],
    "similarity": calibration.identity(d["similarity"]),
    "embeddings": stage_identity_sources(emb),
  }


def identity_and_defaults(config, emb: dict) -> tuple[dict, dict]:
  """stage_identity of `config`, and of the base config (what a record lacking a newer key means)."""
  return stage_identity(config, emb), stage_identity(configs.base_config(), emb)


def init_state(config, model, embedding_dim: int, tx) -> TrainState:
  key = jax.random.PRNGKey(config.seed)
  e = jnp.zeros((1, embedding_dim), jnp.float32)
  variables = jax.jit(lambda k: model.init({"params": k}, e, e, train=False))(key)
  return TrainState.create(variables, tx)


def restore_similarity(config, workdir: str | Path, mesh, *, dim: int, stage: str = wd.STAGE2):
  """(model, state) of the best checkpoint of stage 2 (or of a sweep's `stage`) for dim-wide embeddings."""
  workdir = Path(workdir)
  if wd.stage_result(workdir, stage) is None:
    raise FileNotFoundError(f"{workdir / stage}: stage 2 has not finished; run --config.stage=similarity first")
  model = build_similarity(config, dim)
  tx = schedule.optimizer_from(config.similarity)
  abstract = abstract_like(jax.eval_shape(lambda: init_state(config, model, dim, tx)), parallel.replicated(mesh))
  state, _ = restore_best(workdir / stage, abstract, "stage-2")
  return model, state


def restore_scorer(config, workdir: str | Path, mesh, *, dim: int, stage: str = wd.STAGE2):
  """(prob_fn, params) of workdir's finished stage 2: Ms's best checkpoint, or the calibrated distance."""
  if calibration.uses_distance(config):
    return calibration.restore_distance(workdir, stage=stage)
  model, state = restore_similarity(config, workdir, mesh, dim=dim, stage=stage)
  return make_prob_fn(model), state.params


def train_similarity(config, workdir: str | Path, *, stage: str = wd.STAGE2) -> dict:
  """Trains (or resumes) Ms in workdir/<stage> and returns its result.json (similarity.model=distance: fits it)."""
  workdir = Path(workdir)
  emb = load_stage2_embeddings(config, workdir)
  identity, defaults = identity_and_defaults(config, emb)
  if calibration.uses_distance(config):
    index = pairs_lib.build_class_index(emb["train_labels"])
    val_pairs, val_same = validation_pairs(config, index, seen_classes(emb))
    return calibration.calibrate_stage(config, workdir, emb, val_pairs, val_same, identity, defaults, stage=stage)
  # A stage 2 on other embeddings (stage 1 retrained or continued) is derived, not the user's work: replaced.
  check = dict(overwrite=config.overwrite, derived=("embeddings",), defaults=defaults)
  finished = wd.check_stage(workdir, stage, identity, **check)
  if finished:
    result = wd.stage_result(workdir, stage, required=("best_step", "epochs"))
    if result["epochs"] >= config.similarity.num_epochs:
      logging.info(
        "%s already finished (%d epochs, best validation accuracy %.1f %%): skipped%s",
        "stage 2" if stage == wd.STAGE2 else stage,
        result["epochs"],
        100 * result["best_val_accuracy"],
        wd.not_applied_text(workdir, stage, config),
      )
      return result
  mesh = parallel.make_mesh()
  dim = emb["train"].shape[1]
  model = build_similarity(config, dim)
  tx = schedule.optimizer_from(config.similarity)
  state = parallel.put_replicated(init_state(config, model, dim, tx), mesh)
  plan = SimilarityPlan(config, emb["train"], emb["train_labels"], model, tx, mesh)
  identity["split_sha256"] = wd.split_digest(workdir)
  stage_dir, _ = wd.claim_stage(workdir, stage, identity, **check)
  settings = loop.LoopSettings.from_config(config.similarity, "stage 2")
  state, meta = loop.fit(
    plan,
    state,
    stage_dir,
    settings,
    place_state=lambda s: parallel.put_replicated(s, mesh),
    config_dict=wd.config_to_dict(config),
  )
  best = meta["best"]
  extra = {
    "embedding_dim": int(dim),
    "val_pairs": int(plan.val_pairs.shape[0]),
    "train_pairs_per_epoch": int(sum(plan.batch_sizes)),
  }
  result = loop.write_result(stage_dir, meta, extra, stage)
  logging.info(
    "stage 2 finished: best validation accuracy %.2f %% (epoch %d)", 100 * best["val_accuracy"], best["epoch"]
  )
  return result
