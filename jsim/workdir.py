"""The workdir is the contract between stages.

    W/config.json                 the last resolved config (for the record)
    W/split.json                  classes and image ids of every split
    W/preprocessing.json          image size, input size, normalisation statistics
    W/stage1/  config.json, checkpoints/, metrics.jsonl, tb/, result.json
    W/embeddings/  embeddings.npz, meta.json
    W/stage2/  config.json, checkpoints/, metrics.jsonl, tb/, result.json
    W/report.json, report.md, figures/

A stage's config.json records the settings that define its outputs; a later run
with different ones is refused (another architecture, split, ...), while settings
that only extend or observe a run (more epochs, logging) may change.
`result.json` marks a finished stage, which is never redone unless
config.overwrite is set.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import ml_collections

STAGE1, EMBEDDINGS, STAGE2 = "stage1", "embeddings", "stage2"
RESULT_FILE = "result.json"

# Keys that may differ between a run and its resumption.
_FREE_KEYS = {"stage", "overwrite", "num_epochs", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
              "eval_batch_size", "cache_dir", "num_workers", "evaluation", "sweep", "embed"}


def write_json(path: Path, obj: Any) -> None:
  """Atomic: a reader never sees half a file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
  tmp.replace(path)


def read_json(path: Path) -> Any:
  try:
    return json.loads(Path(path).read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def _identity(d: Any) -> Any:
  if isinstance(d, dict):
    return {k: _identity(v) for k, v in d.items() if k not in _FREE_KEYS}
  return d


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  short = lambda v: r if len(r := repr(v)) <= 60 else r[:57] + "..."
  return [] if a == b else [f"{prefix[:-1]}: {short(a)} in the workdir, {short(b)} now"]


def claim_stage(workdir: Path, stage: str, identity: dict, *, overwrite: bool) -> tuple[Path, bool]:
  """Makes W/<stage> ready for a run; returns (stage_dir, already_finished).

  Refuses a stage folder made with other defining settings; with overwrite, clears it.
  """
  stage_dir = Path(workdir) / stage
  recorded_path = stage_dir / "config.json"
  if overwrite and stage_dir.exists():
    shutil.rmtree(stage_dir)
  if recorded_path.exists():
    diffs = _differences(_identity(read_json(recorded_path)), _identity(identity))
    if diffs:
      raise ValueError(f"{stage_dir} was made by another configuration ({'; '.join(diffs[:4])}); "
                       f"use another --workdir, or --config.overwrite=True to replace it")
  elif stage_dir.exists() and any(stage_dir.iterdir()):
    raise ValueError(f"{stage_dir} exists but has no config.json: not a jsim stage folder; "
                     f"use another --workdir, or --config.overwrite=True to replace it")
  write_json(recorded_path, identity)
  return stage_dir, (stage_dir / RESULT_FILE).exists()


def finish_stage(stage_dir: Path, result: dict) -> None:
  write_json(Path(stage_dir) / RESULT_FILE, result)


def stage_result(workdir: Path, stage: str) -> dict | None:
  path = Path(workdir) / stage / RESULT_FILE
  return read_json(path) if path.exists() else None
