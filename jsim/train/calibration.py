"""Stage 2 without Ms: score pairs by an embedding distance, calibrated on the validation pairs.

similarity.model='distance' (similarity.distance='cosine' | 'l2'): instead of training Ms,
stage 2 fits P(same) = sigmoid(scale * d + bias) by logistic regression on the distances
of its validation pairs (the same pairs, from the seed, that select Ms's best epoch), and
writes the fit to W/<stage>/result.json; the evaluation chooses its threshold on the same
pairs, as for Ms. jsim.train.similarity.restore_scorer gives every consumer (evaluation,
predict, export) the prob_fn(params, e1, e2) of either kind of stage 2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import logging

from jsim import parallel, workdir as wd
from jsim.models import distance as distance_lib

SIMILARITY_MODELS = ("mlp", "distance")


def uses_distance(config) -> bool:
  model = config.similarity.model
  if model not in SIMILARITY_MODELS:
    raise ValueError(f"similarity.model={model!r}: expected one of {', '.join(SIMILARITY_MODELS)}")
  return model == "distance"


def identity(similarity_dict: dict) -> dict:
  """Stage 2's config identity: an Ms run's is what it was before the distance model existed."""
  if similarity_dict.get("model", "mlp") == "mlp":
    return {k: v for k, v in similarity_dict.items() if k not in ("model", "distance")}
  return similarity_dict


def method_name(config) -> str:
  """How stage 2 scores a pair, for reports: 'Ms on l1' or 'distance (cosine), calibrated'."""
  if uses_distance(config):
    return f"distance ({config.similarity.distance}), calibrated by logistic regression"
  return f"Ms on {config.similarity.feature}"


def calibrate_stage(
  config, workdir: str | Path, emb: dict, val_pairs, val_same, identity: dict, defaults: dict, *, stage: str = wd.STAGE2
) -> dict:
  """Fits the distance model in workdir/<stage> (or returns the finished fit) on stage 2's embeddings `emb`,
  judged on its validation pairs; identity, defaults: stage 2's (jsim.train.similarity, which calls this)."""
  workdir = Path(workdir)
  if wd.check_stage(workdir, stage, identity, overwrite=config.overwrite, defaults=defaults):
    result = wd.stage_result(workdir, stage)  # (its record left as it is: the settings it was fitted with)
    logging.info("stage 2 (distance) already finished: %s%s", result, wd.not_applied_text(workdir, stage, config))
    return result
  stage_dir, _ = wd.claim_stage(workdir, stage, identity, overwrite=config.overwrite, defaults=defaults)
  kind = config.similarity.distance
  val_pairs, val_same = np.asarray(val_pairs), np.asarray(val_same)
  fit = distance_lib.calibrate(emb["train"], val_pairs, val_same, kind)
  prob_fn = distance_lib.make_prob_fn(kind)
  e = emb["train"]
  p = np.concatenate(
    [
      np.asarray(prob_fn(distance_lib.params_of(fit), e[val_pairs[s : s + 65536, 0]], e[val_pairs[s : s + 65536, 1]]))
      for s in range(0, len(val_pairs), 65536)
    ]
  )
  accuracy = float(np.mean((p > 0.5) == val_same))
  result = {
    "model": "distance",
    "distance": kind,
    "scale": fit["scale"],
    "bias": fit["bias"],
    "distance_at_0.5": fit["distance_at_0.5"],
    "best_val_accuracy": accuracy,
    "epochs": 0,
    "best_epoch": 0,
    "best_step": 0,  # no checkpoint: what every reader of a stage result requires (predict's step 0)
    "halving_epochs": [],
    "embedding_dim": int(e.shape[1]),
    "val_pairs": int(len(val_pairs)),
  }
  if parallel.is_main_process():
    wd.finish_stage(stage_dir, result)
  parallel.sync_processes(f"{stage} result")
  logging.info(
    "stage 2 (%s distance): P(same) = sigmoid(%.4g d + %.4g), 0.5 at d = %.4g; validation accuracy %.4f on %d pairs",
    kind,
    fit["scale"],
    fit["bias"],
    fit["distance_at_0.5"],
    accuracy,
    len(val_pairs),
  )
  return result


def restore_distance(workdir: str | Path, *, stage: str = wd.STAGE2):
  """(prob_fn, params) of workdir's finished distance calibration."""
  result = wd.stage_result(Path(workdir), stage)
  if result is None or result.get("model") != "distance":
    raise FileNotFoundError(f"{Path(workdir) / stage}: no distance calibration; run --config.stage=similarity first")
  return distance_lib.make_prob_fn(result["distance"]), distance_lib.params_of(result)
