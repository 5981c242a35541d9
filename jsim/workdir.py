"""The workdir is the contract between stages.

    W/config.json                 the resolved config of the last successful run (for the record)
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
config.overwrite is set; overwriting stage 1 also removes what was derived from it
(embeddings, stage 2, sweep), which would otherwise be reused although stale.
result.json carries a `run_id`, new each time a stage finishes, that derived
outputs can record to tell a retrained stage from the one they came from.

Every file is written to a temporary name and renamed, so a killed run leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import ml_collections
from absl import logging

STAGE1, EMBEDDINGS, STAGE2 = "stage1", "embeddings", "stage2"
RESULT_FILE = "result.json"
TMP_SUFFIX = ".tmp"
# What is computed from a stage's outputs, and goes stale when the stage is redone.
_DERIVED = {STAGE1: (EMBEDDINGS, STAGE2, "sweep")}

# Keys that may differ between a run and its resumption.
_FREE_KEYS = {"stage", "overwrite", "num_epochs", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
              "eval_batch_size", "cache_dir", "num_workers", "pipeline", "evaluation", "sweep", "embed"}


def write_json(path: Path, obj: Any) -> None:
  """Atomic: a reader never sees half a file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  # One temporary name per process: several processes may write the same file.
  tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
  with open(tmp, "w") as f:
    f.write(json.dumps(obj, indent=1, sort_keys=True, default=str))
    f.flush()
    os.fsync(f.fileno())   # the rename must not land before the data (a crash, not only a kill)
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


def _subset(recorded: Any, like: Any) -> Any:
  """The part of `recorded` with the keys of `like` (recursively)."""
  if isinstance(recorded, dict) and isinstance(like, dict):
    return {k: _subset(recorded.get(k), v) for k, v in like.items()}
  return recorded


def check_recorded(workdir: Path, stage: str, expected: dict) -> None:
  """Refuses to build on W/<stage> when its config.json records other values of `expected`'s keys.

  For stages that read another's outputs (embed reads stage 1 with config.model), so
  that another architecture is a clear error rather than a failed restore.
  """
  path = Path(workdir) / stage / "config.json"
  if not path.exists():
    return
  diffs = _differences(_subset(read_json(path), expected), expected)
  if diffs:
    raise ValueError(f"{path.parent} was made by another configuration ({'; '.join(diffs[:4])}); "
                     f"use another --workdir, or redo that stage with --config.overwrite=True")


def _remove_stale(paths: list[Path], stage: str) -> None:
  """Removes `paths` (process 0 only; the others wait, so that none sees them half gone)."""
  import jax
  if jax.process_index() == 0:
    for p in paths:
      if p.is_dir():
        shutil.rmtree(p)
      else:
        p.unlink()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"overwrite {stage}")


def claim_stage(workdir: Path, stage: str, identity: dict, *, overwrite: bool) -> tuple[Path, bool]:
  """Makes W/<stage> ready for a run; returns (stage_dir, already_finished).

  Refuses a stage folder made with other defining settings; with overwrite, clears it
  and what was derived from it.
  """
  stage_dir = Path(workdir) / stage
  recorded_path = stage_dir / "config.json"
  if overwrite:
    stale = [p for p in [stage_dir] + [Path(workdir) / d for d in _DERIVED.get(stage, ())] if p.exists()]
    if stale:
      logging.warning("overwrite: removing %s", ", ".join(str(p) for p in stale))
    _remove_stale(stale, stage)
  recorded = None
  if recorded_path.exists():
    recorded = read_json(recorded_path)
    diffs = _differences(_identity(recorded), _identity(identity))
    if diffs:
      raise ValueError(f"{stage_dir} was made by another configuration ({'; '.join(diffs[:4])}); "
                       f"use another --workdir, or --config.overwrite=True to replace it")
  elif stage_dir.exists() and any(not p.name.endswith(TMP_SUFFIX) for p in stage_dir.iterdir()):
    # (a run killed while writing config.json for the first time leaves only config.json.*.tmp)
    raise ValueError(f"{stage_dir} exists but has no config.json: not a jsim stage folder; "
                     f"use another --workdir, or --config.overwrite=True to replace it")
  if recorded != json.loads(json.dumps(identity, default=str)):   # (a finished stage is left untouched)
    write_json(recorded_path, identity)
  return stage_dir, (stage_dir / RESULT_FILE).exists()


def finish_stage(stage_dir: Path, result: dict) -> None:
  """Marks the stage finished: writes result.json, adding (in place) a new run_id and the time."""
  result.update(run_id=uuid.uuid4().hex, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
  write_json(Path(stage_dir) / RESULT_FILE, result)


def stage_result(workdir: Path, stage: str) -> dict | None:
  path = Path(workdir) / stage / RESULT_FILE
  return read_json(path) if path.exists() else None
