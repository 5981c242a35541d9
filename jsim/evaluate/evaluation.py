"""The evaluation stage (report, figures) and the research sweep over pair features."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from absl import logging

from jsim import parallel, workdir as wd
from jsim.data import pairs as pairs_lib
from jsim.evaluate import compare, figures, report, retrieval
from jsim.evaluate.pairwise import evaluate_pairs, save_result
from jsim.models import similarity as similarity_model
from jsim.train import calibration, metric, similarity

_TEST_PAIRS = 7  # stream of the seed for the sampled test pairs (apart from stage 2's)
FIGURES = "figures"


def check_current(workdir: Path, stage: str, emb: dict) -> None:
  """Refuses a stage 2 trained on other embeddings than the current ones, and embeddings of an older stage 1."""
  stage1 = wd.stage_result(workdir, wd.STAGE1)
  meta = emb["meta"]
  if stage1 is not None and meta.get("stage1_run_id") not in (None, stage1.get("run_id")):
    raise ValueError(
      f"{workdir / wd.EMBEDDINGS} come from an earlier stage 1 (step {meta['stage1_step']}; its best "
      f"step is now {stage1['best_step']}); run --config.stage=all to recompute them and retrain "
      f"stage 2"
    )
  record = workdir / stage / "config.json"
  recorded = wd.read_json(record) if record.exists() else None
  trained_on = recorded.get("embeddings") if isinstance(recorded, dict) else None
  current = json.loads(json.dumps(similarity.stage_identity_sources(emb)))
  if trained_on is not None and trained_on != current:
    was = ", ".join(f"stage-1 step {s.get('stage1_step')}" for s in trained_on)
    now = ", ".join(f"stage-1 step {s.get('stage1_step')}" for s in current)
    raise ValueError(
      f"{workdir / stage} was trained on other embeddings ({was}; now {now}); run "
      f"--config.stage=all (or similarity) to retrain it on the current ones"
    )


def evaluate_stage2(config, workdir: Path, stage: str, emb: dict, mesh) -> dict:
  """Threshold on the validation pairs, then the test pairs; returns the pieces of a report."""
  check_current(workdir, stage, emb)
  ev = config.evaluation
  dim = emb["train"].shape[1]
  prob_fn, params = similarity.restore_scorer(config, workdir, mesh, dim=dim, stage=stage)
  class_ids = emb["meta"]["class_ids"]
  seen = set(emb["meta"]["seen_classes"])
  seen_mask = np.array([c in seen for c in class_ids])
  put = lambda x: parallel.put_replicated(np.asarray(x), mesh)

  # The validation pairs of stage 2, drawn again from the seed, choose the threshold.
  train_labels = emb["train_labels"]
  index = pairs_lib.build_class_index(train_labels, len(class_ids))
  val_pairs, _ = similarity.validation_pairs(config, index, similarity.seen_classes(emb))
  kw = dict(chunk_size=ev.chunk_size, num_bins=ev.num_bins, mesh=mesh)
  val = evaluate_pairs(
    prob_fn,
    params,
    put(emb["train"]),
    train_labels,
    seen_mask,
    pairs=val_pairs,
    progress=parallel.is_main_process(),
    desc="validation pairs (threshold)",
    **kw,
  )
  threshold = val.best_threshold("all")

  test_emb, test_labels = put(emb["test"]), emb["test_labels"]
  if ev.mode == "sampled":
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), _TEST_PAIRS)
    test_pairs = pairs_lib.sample_test_pairs(
      key,
      pairs_lib.build_class_index(test_labels, len(class_ids)),
      seen_mask,
      ev.test_per_ordered_class_pair,
      ev.test_similar_per_class,
    )
  else:
    test_pairs = None
  result = evaluate_pairs(
    prob_fn,
    params,
    test_emb,
    test_labels,
    seen_mask,
    pairs=test_pairs,
    mode=ev.mode,
    threshold=threshold,
    progress=parallel.is_main_process(),
    desc=f"test pairs ({ev.mode})",
    **kw,
  )
  return {
    "result": result,
    "threshold": threshold,
    "val_accuracy_at_0.5": val.accuracy("all"),
    "prob_fn": prob_fn,
    "params": params,
    "test_emb": test_emb,
    "seen_mask": seen_mask,
  }


def backbone_label(emb: dict) -> str:
  """'resnet50', or 'resnet50+vgg16' for an ensemble (which has no published numbers)."""
  return "+".join(m["model"] for m in emb["sources"])


def _report_summary(rep: dict) -> dict:
  acc = rep["accuracy_at_0.5"]
  return {
    "accuracy": acc["overall"],
    "seen_accuracy": acc["seen"],
    "unseen_accuracy": acc["unseen"],
    "auc": rep["auc"]["overall"],
    "threshold": rep["val_threshold"],
    "table": report.case_table_markdown(rep),
  }


def changes_since_report(config, workdir: Path) -> list[str] | None:
  """What differs from the run that wrote report.json: [] when nothing, None when there is no report."""
  path = workdir / report.REPORT_JSON
  if not path.exists():
    return None
  try:
    rep = wd.read_json(path)
    extra, recorded = rep.get("extra") or {}, rep.get("config") or {}
  except (OSError, ValueError, AttributeError):
    return ["report.json is unreadable"]
  changes = []
  for key, stage in (("stage1", wd.STAGE1), ("stage2", wd.STAGE2)):
    now = wd.stage_result(workdir, stage) or {}
    if (extra.get(key) or {}).get("run_id") != now.get("run_id"):
      changes.append(f"{stage} was retrained")
  evaluated = [m.get("sha256") if isinstance(m, dict) else None for m in extra.get("embeddings") or []]
  if any(evaluated) and evaluated != _embedding_digests(config, workdir):
    changes.append("the embeddings were computed again")  # (by content: bitwise the same ones change nothing)
  # (the settings of the finished stages as they were trained: a value given now that retrained nothing is no change)
  current = report.report_config(wd.trained_config(workdir, wd.config_to_dict(config)))
  # (evaluation.augmentation_examples is stage 1's figure: no reason to redo the evaluation)
  drop = lambda d: {k: v for k, v in d.items() if k != "augmentation_examples"} if isinstance(d, dict) else d
  for key in ("seed", "evaluation", "similarity"):
    if drop(recorded.get(key)) != drop(current.get(key)):
      changes.append(f"config.{key} changed")
  if not (workdir / FIGURES).is_dir():
    changes.append("figures/ is missing")
  return changes


def _embedding_digests(config, workdir: Path) -> list[dict | None]:
  """The SHA-256 of each embedding source's arrays (this workdir's, then the ensemble's), from their meta.json."""
  out = []
  for w in (workdir, *config.similarity.ensemble_workdirs):
    try:
      meta = wd.read_json(Path(w) / wd.EMBEDDINGS / "meta.json")
    except (OSError, ValueError):
      meta = None
    out.append(meta.get("sha256") if isinstance(meta, dict) else None)
  return out


def evaluate(config, workdir: str | Path) -> dict:
  """Evaluates the best stage-2 checkpoint: report.json, report.md and figures in the workdir.

  Skipped when report.json came from the same stage-1 and stage-2 runs with the same
  settings (unless config.overwrite).
  """
  workdir = Path(workdir)
  emb = similarity.load_stage2_embeddings(config, workdir)
  check_current(workdir, wd.STAGE2, emb)  # (a stage 2 of older embeddings is refused, even with a report)
  changes = changes_since_report(config, workdir)
  if config.stage == "evaluate":  # (in a chain, the line that skipped the stage said so)
    for stage, name in ((wd.STAGE1, "stage 1"), (wd.STAGE2, "stage 2")):
      if text := wd.not_applied_text(workdir, stage, config):
        logging.info("evaluation: %s is evaluated%s; report.json records the trained values", name, text)
  if changes == [] and not config.overwrite:
    logging.info(
      "evaluation is current (as in report.json): skipped; --config.stage=evaluate --config.overwrite=True redoes it"
    )
    return _report_summary(wd.read_json(workdir / report.REPORT_JSON))
  if changes:
    logging.info("evaluation: redone, report.json is replaced (%s)", "; ".join(changes))
  elif changes == []:
    logging.info("evaluation: redone (overwrite=True), report.json is replaced")
  mesh = parallel.make_mesh()
  out = evaluate_stage2(config, workdir, wd.STAGE2, emb, mesh)
  result = out["result"]
  fig_dir = workdir / FIGURES
  retrieval_metrics = None
  if parallel.is_main_process():
    fig_dir.mkdir(parents=True, exist_ok=True)
    curves = [(wd.STAGE1, "Stage 1: classifier Mc")]
    if not calibration.uses_distance(config):  # a distance model has no training curve
      curves.append((wd.STAGE2, "Stage 2: similarity net Ms"))
    for stage, title in curves:
      figures.plot_stage_curves(
        workdir / stage / "metrics.jsonl", fig_dir / f"{stage}_curves.png", f"{title} ({config.model.name})"
      )
    scored_by = (
      calibration.method_name(config)
      if calibration.uses_distance(config)
      else f"Ms on {similarity_model.feature_formula(config.similarity.feature)}"
    )
    figures.plot_roc(result, fig_dir / "roc.png", title=f"ROC of {scored_by} ({backbone_label(emb)})")
  if config.evaluation.retrieval:
    retrieval_metrics = _unseen_retrieval(config, workdir, emb, out, fig_dir)
  embedding_retrieval = _embedding_retrieval(config, emb, out["seen_mask"])
  extra = {
    "stage1": wd.stage_result(workdir, wd.STAGE1),
    "stage2": wd.stage_result(workdir, wd.STAGE2),
    "embeddings": emb["sources"],
    "val_accuracy_at_0.5": out["val_accuracy_at_0.5"],
  }
  table = ""
  config_dict = wd.trained_config(workdir, wd.config_to_dict(config))  # (what the stages were trained with)
  if parallel.is_main_process():
    save_result(result, workdir / compare.RESULT_FILE)  # for Figure 7 (jsim.evaluate.compare)
    extra[compare.RESULT_DIGEST] = wd.file_digest(workdir / compare.RESULT_FILE)  # (compare checks the pair)
    if config.evaluation.get("compare_workdirs"):
      this = "+".join(report.BACKBONE_TITLES.get(m["model"], m["model"]) for m in emb["sources"])
      compare.roc_of_workdirs(config.evaluation.compare_workdirs, fig_dir / compare.FIGURE, extra={this: result})
    table = report.write_report(
      workdir,
      result,
      val_threshold=out["threshold"],
      backbone=backbone_label(emb),
      config_dict=config_dict,
      retrieval=retrieval_metrics,
      extra=extra,
      method={"stage1_loss": metric.loss_label(config.classifier), "similarity": calibration.method_name(config)},
      embedding_retrieval=embedding_retrieval,
    )
    print(f"\nFive-case test accuracy ({result.mode}, {result.num_pairs:,} pairs; {workdir / 'report.md'}):\n")
    print(table, flush=True)
    _write_tensorboard(workdir, result, table, extra["stage2"]["best_step"], fig_dir, config_dict)
  parallel.sync_processes("report written")
  return {
    "accuracy": result.accuracy("all"),
    "seen_accuracy": result.accuracy("seen"),
    "unseen_accuracy": result.accuracy("unseen"),
    "auc": result.auc("all"),
    "threshold": out["threshold"],
    "table": table,
  }


TENSORBOARD_DIR = "evaluation"  # MetricsWriter writes its tb/ inside


def _write_tensorboard(workdir: Path, result, table: str, step: int, fig_dir: Path, config_dict: dict) -> None:
  """The five-case table, accuracies, AUCs, PR curves, the figures and the config (hparams) in
  W/evaluation/tb, at stage 2's best step."""
  from PIL import Image
  from jsim.train.metrics_writer import MetricsWriter
  from jsim.evaluate.pairwise import GROUPS

  writer = MetricsWriter(workdir / TENSORBOARD_DIR)
  try:
    writer.write_config(
      config_dict, metrics=("test/accuracy_all", "test/accuracy_seen", "test/accuracy_unseen", "test/auc_all")
    )
    scalars = {}
    for case, acc in result.case_accuracy("0.5").items():
      scalars[f"test/accuracy_case{case}"] = acc
    for group in GROUPS:
      scalars[f"test/accuracy_{group}"] = result.accuracy(group)
      scalars[f"test/accuracy_{group}_at_val_threshold"] = result.accuracy(group, "threshold")
      scalars[f"test/auc_{group}"] = result.auc(group)
    scalars["test/val_threshold"] = result.threshold
    writer.write_scalars(step, {k: v for k, v in scalars.items() if np.isfinite(v)})
    writer.write_text("test/five_case_table", table, step)
    for group, cases in GROUPS.items():
      idx = [c - 1 for c in cases]
      writer.write_pr_curve(f"test/pr_{group}", result.hist_pos[idx].sum(0), result.hist_neg[idx].sum(0), step)
    for png in sorted(fig_dir.glob("*.png")):
      with Image.open(png) as im:
        writer.write_image(f"figures/{png.stem}", np.asarray(im.convert("RGB")), step)
  finally:
    writer.close()


def _embedding_retrieval(config, emb: dict, seen_mask: np.ndarray) -> dict:
  """P@1, R-precision, MAP@R and k-means NMI of the seen and of the unseen test images, each set
  among itself, ranked by embedding distance (metric.retrieval_distance): the field's figures; and
  'unseen_in_all': P@1, R-precision, MAP@R of the unseen ones against all test images."""
  out = {"distance": metric.retrieval_distance(config.classifier)}
  seen_test = seen_mask[emb["test_labels"]]
  for name, keep in (("seen", seen_test), ("unseen", ~seen_test)):
    e, labels = emb["test"][keep], emb["test_labels"][keep]
    if len(labels) < 3 or len(np.unique(labels)) < 2:
      out[name] = None
      continue
    m = retrieval.embedding_metrics(e, labels, distance=out["distance"])
    if out["distance"] == "cosine":
      e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    m["nmi"] = retrieval.kmeans_nmi(e, labels, seed=config.seed)
    out[name] = m
  # The unseen test images as queries against a gallery of all test images (themselves left out): seen
  # classes' images can now come first, as they would in a real gallery.
  unseen = np.flatnonzero(~seen_test)
  out["unseen_in_all"] = None
  if out["unseen"] is not None:
    out["unseen_in_all"] = retrieval.embedding_metrics(
      emb["test"][unseen],
      emb["test_labels"][unseen],
      reference=emb["test"],
      reference_labels=emb["test_labels"],
      query_in_reference=unseen,
      distance=out["distance"],
    )
  return out


def _unseen_retrieval(config, workdir: Path, emb: dict, out: dict, fig_dir: Path) -> dict:
  """recall@k and mAP among the unseen classes' test images, ranked by Ms; and a sheet of examples."""
  unseen = np.flatnonzero(~out["seen_mask"][emb["test_labels"]])
  if len(unseen) < 3:
    logging.info("retrieval skipped: fewer than 3 unseen test images")
    return None
  emb_u, labels_u = emb["test"][unseen], emb["test_labels"][unseen]
  metrics = retrieval.retrieval_metrics(out["prob_fn"], out["params"], emb_u, labels_u)
  num = min(config.evaluation.retrieval_examples, len(unseen))
  if num and parallel.is_main_process():
    from jsim.data import sources

    test_images = sources.load_image_sets(config.data)["test"].images[emb["test_index"][unseen]]
    ranked = retrieval.rank_queries(out["prob_fn"], out["params"], emb_u, labels_u, num_top=min(8, len(unseen) - 1))
    queries = _one_query_per_class(labels_u, num, config.seed)
    names = sources.class_names(config.data, tuple(emb["meta"]["class_ids"]))
    figures.plot_retrieval_sheet(
      test_images,
      labels_u,
      queries,
      ranked["top_indices"][queries],
      fig_dir / "retrieval_unseen.png",
      class_names=names,
      title="Unseen classes: a query per class and its top matches by Ms",
    )
  return metrics


def _one_query_per_class(labels: np.ndarray, num: int, seed: int) -> np.ndarray:
  """`num` image positions: a random one of each class in turn (a second round only past the last class)."""
  rng = np.random.default_rng(seed)
  pools = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
  rng.shuffle(pools)
  out = []
  while len(out) < num and any(pools):
    for pool in pools:
      if pool and len(out) < num:
        out.append(pool.pop())
  return np.asarray(out, np.int64)


def sweep(config, workdir: str | Path) -> dict:
  """Trains and evaluates Ms for each of config.sweep.features on the same embeddings."""
  workdir = Path(workdir)
  mesh = parallel.make_mesh()
  emb = similarity.load_stage2_embeddings(config, workdir)
  rows = []
  for feature in config.sweep.features:
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.similarity.feature = feature
    stage = f"sweep/{feature}"
    logging.info("=== sweep: feature %s", feature)
    trained = similarity.train_similarity(cfg, workdir, stage=stage)
    out = evaluate_stage2(cfg, workdir, stage, emb, mesh)
    r = out["result"]
    rows.append(
      {
        "name": stage,
        "backbone": backbone_label(emb),
        "feature": feature,
        "val_accuracy": trained["best_val_accuracy"],
        "test_accuracy": r.accuracy("all"),
        "seen_accuracy": r.accuracy("seen"),
        "unseen_accuracy": r.accuracy("unseen"),
        "auc": r.auc("all"),
      }
    )
  table = ""
  if parallel.is_main_process():
    table = report.write_comparison(rows, workdir / "sweep" / "comparison.md", workdir / "sweep" / "comparison.json")
    print(table, flush=True)
  return {"rows": rows, "table": table}
