"""`--dry_run`: what a run would do in a workdir, stage by stage (jsim.run.STAGES).

Reads only JSON records, folder listings and the digests of the embeddings (and, for the dry run,
the data set's layout and labels, decoding a sample of its images): nothing here trains, compiles
a step or writes into the workdir or the data cache.
"""

from __future__ import annotations

from pathlib import Path

from jsim import run, workdir as wd


def _done(workdir: Path, stage: str) -> bool:
  return run.STAGES[stage].done(workdir)


def _checkpoint_steps(stage_dir: Path) -> list[int]:
  ckpt = stage_dir / "checkpoints"
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def stage_status(config, workdir: Path, stage: str) -> str:
  """What running `stage` would do now: 'to run', 'finished: skipped', 'resumes from step N', ..."""
  if stage in ("classifier", "similarity"):
    sub, cfg = (wd.STAGE1, config.classifier) if stage == "classifier" else (wd.STAGE2, config.similarity)
    result = wd.stage_result(workdir, sub)
    if config.overwrite and (workdir / sub).exists():
      return f"redone from scratch ({cfg.num_epochs} epochs; overwrite=True removes the old one)"
    if result is not None:
      if result["epochs"] >= cfg.num_epochs:
        return f"finished ({result['epochs']} epochs): skipped"
      return f"continues from epoch {result['epochs']} to {cfg.num_epochs}"
    steps = _checkpoint_steps(workdir / sub)
    if steps:
      return f"resumes from step {steps[-1]} ({cfg.num_epochs} epochs in all)"
    return f"to run ({cfg.num_epochs} epochs)"
  if stage == "embed":
    return (
      "current: skipped"
      if _done(workdir, "embed") and _done(workdir, "classifier") and _embeddings_current(workdir)
      else "to run"
    )
  if stage == "evaluate":
    from jsim.evaluate.evaluation import changes_since_report

    upstream_done = all(stage_status(config, workdir, s).endswith("skipped") for s in ("classifier", "similarity"))
    if upstream_done and not config.overwrite and changes_since_report(config, workdir) == []:
      return "current (report.json): skipped"
    return f"to run ({config.evaluation.mode} test pairs)"
  if stage == "sweep":
    return f"to run (features {', '.join(config.sweep.features)})"
  return "to run"


def _embeddings_current(workdir: Path) -> bool:
  meta_path = workdir / wd.EMBEDDINGS / "meta.json"
  meta = wd.read_json(meta_path)
  stage1 = wd.stage_result(workdir, wd.STAGE1) or {}
  return (
    meta.get("stage1_step") == stage1.get("best_step")
    and meta.get("stage1_run_id") == stage1.get("run_id")
    and wd.changed_file(meta_path.parent, meta.get("sha256"), meta_path) is None  # (the arrays, by content)
  )


def _data_lines(config, workdir: Path) -> list[str]:
  """Reads the data set's layout and labels (decoding a sample only) and checks the split and the pairs."""
  import numpy as np
  from jsim import validate
  from jsim.data import prepare, splits
  from jsim.data.sources import probe_image_sets, resolve_source

  sets, cache_lines = probe_image_sets(config.data)
  if sets is None:  # still to be downloaded
    return cache_lines
  train, test = sets["train"], sets["test"]
  split = splits.load_split(workdir) if workdir.exists() else None
  where = "recorded in split.json"
  if split is None:
    split = splits.make_split(
      train, test, num_seen=config.data.num_seen_classes, val_fraction=config.data.val_fraction, seed=config.seed
    )
    where = f"would be drawn from seed {config.seed}"
  else:
    prepare.check_split(split, config, workdir)
  seen = split.seen_mask(train.class_ids)
  t180 = np.flatnonzero(seen[train.labels])
  lines = [
    f"data:   {resolve_source(config.data)}, {len(train):,} train + {len(test):,} test images, "
    f"{len(train.class_ids)} classes",
    f"split:  {len(split.seen_classes)} seen / {len(split.unseen_classes)} unseen classes; "
    f"{len(split.train_ids):,} stage-1 train, {len(split.val_ids):,} validation, {len(split.test_ids):,} "
    f"test images ({where})",
    *cache_lines,
  ]
  if config.stage in ("all", "similarity", "sweep"):
    validate.check_pair_supply(config, train.labels[t180], tuple(train.class_ids))
  if config.stage in ("all", "similarity", "sweep", "evaluate"):
    validate.check_test_pairs(config, test.labels, tuple(train.class_ids))
    lines.append("pairs:  stage 2's and the test pairs can be drawn from these images")
  return lines


def _weights_lines(config, workdir: Path) -> list[str]:
  """Where stage 1's starting weights come from, when it will start (model.init=torchvision)."""
  if config.model.init != "torchvision" or "classifier" not in run.chain(config.stage):
    return []
  if not stage_status(config, workdir, "classifier").startswith(("to run", "redone")):
    return []  # (a finished or started stage 1 reads its own checkpoints)
  from jsim.data import cache
  from jsim.models import torchvision_port

  text, download = torchvision_port.weights_status(config.model.name, config.model.weights)
  if download:
    import torch

    hub = Path(torch.hub.get_dir()) / "checkpoints"
    free = cache.check_free_space(hub, download, f"downloading model.weights={config.model.weights}")
    text += f"; {free / 1e9:.1f} GB free"
  return [f"weights: {text}"]


def dry_run(config, workdir: str | Path) -> list[str]:
  """Checks everything a run checks before it trains, prints what it would do; writes nothing.

  Raises what the run would raise (one line each) for a bad config, workdir or data.
  """
  from jsim import validate

  from jsim.data import prepare

  workdir = Path(workdir)
  validate.check_config(config)
  config.data.normalization = prepare.resolved_normalization(config)  # (as jsim.run does)
  names = run.chain(config.stage)
  if config.stage != "prepare":
    if config.stage in ("embed", "similarity", "evaluate", "sweep"):
      wd.check_recorded(workdir, wd.STAGE1, {"seed": config.seed, "model": {"name": config.model.name}})
      run.check_prerequisites(config, workdir)
  lines = [
    f"dry run in {workdir}{'' if workdir.exists() else ' (does not exist yet)'}: nothing is trained, nothing "
    "is written there or in the data cache",
    f"config: valid; stage {config.stage!r}",
  ]
  lines += _data_lines(config, workdir)
  lines += _weights_lines(config, workdir)
  lines.append("would run:")
  width = max(len(n) for n in names)
  for name in names:
    lines.append(f"  {name:<{width}}  {stage_status(config, workdir, name) if name != 'prepare' else 'to run'}")
  lines += [f"hint:   {h}" for h in run.cpu_hints(config)]
  lines.append("dry run OK")
  print("\n".join(lines), flush=True)
  return lines
