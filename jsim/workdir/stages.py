"""Claiming, finishing and reading a stage: W/<stage>/config.json and result.json, the stale outputs
an overwrite removes, the claim of an overwrite run across a preemption, and what a failed run leaves."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path

from absl import logging

from jsim.workdir.identity import _differences, _identity, _read_record, _recorded_identity
from jsim.workdir.io import TMP_SUFFIX, read_json, write_json
from jsim.workdir.layout import (
  EMBEDDINGS,
  EVALUATION_OUTPUTS,
  LOCK_FILE,
  OVERWRITE_FILE,
  PREDICT_CACHES,
  RESULT_FILE,
  STAGE1,
  STAGE2,
)

# What is computed from a stage's outputs, and goes stale when the stage is redone.
_DERIVED = {
  STAGE1: (EMBEDDINGS, STAGE2, "sweep", *EVALUATION_OUTPUTS, *PREDICT_CACHES),
  STAGE2: (*EVALUATION_OUTPUTS, *PREDICT_CACHES),
}


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


# --- config.overwrite across a preemption: the claim of the overwrite run in progress -------------------------------

_overwrite_claim: dict | None = None  # {"workdir", "fingerprint", "stages"} of this process's run, if any


def begin_overwrite(workdir: Path, config_dict: dict) -> None:
  """Starts (or, for the verbatim rerun of an unfinished one, continues) an overwrite run's claim."""
  global _overwrite_claim
  fingerprint = hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode()).hexdigest()
  path = Path(workdir) / OVERWRITE_FILE
  stages: list[str] = []
  if path.exists():
    try:
      recorded = read_json(path)
      if isinstance(recorded, dict) and recorded.get("fingerprint") == fingerprint:
        stages = list(recorded.get("stages", []))
    except ValueError:
      pass  # unreadable: a new claim replaces it
  if stages:
    logging.info(
      "overwrite: continuing the interrupted run of the same command (already replaced: %s)", ", ".join(stages)
    )
  _overwrite_claim = {"workdir": str(Path(workdir).absolute()), "fingerprint": fingerprint, "stages": stages}
  # (written when it first replaces a stage: a refused run leaves no claim behind)


def _save_overwrite_claim() -> None:
  import jax

  if jax.process_index() == 0:
    c = _overwrite_claim
    write_json(Path(c["workdir"]) / OVERWRITE_FILE, {"fingerprint": c["fingerprint"], "stages": c["stages"]})


def end_overwrite(workdir: Path) -> None:
  """The overwrite run completed: a later run of the same command replaces again."""
  global _overwrite_claim
  import jax

  if _overwrite_claim is not None and jax.process_index() == 0:
    (Path(workdir) / OVERWRITE_FILE).unlink(missing_ok=True)
  _overwrite_claim = None


def replaces(workdir: Path, stage: str, overwrite: bool) -> bool:
  """Whether config.overwrite replaces W/<stage>: not when the current overwrite run made it itself."""
  c = _overwrite_claim
  if not overwrite or c is None or c["workdir"] != str(Path(workdir).absolute()):
    return overwrite
  return stage not in c["stages"]


def mark_replaced(workdir: Path, stages: list[str]) -> None:
  c = _overwrite_claim
  if c is not None and c["workdir"] == str(Path(workdir).absolute()):
    c["stages"] = sorted(set(c["stages"]) | set(stages))
    _save_overwrite_claim()


# --- claiming a stage ---------------------------------------------------------------------------------------------

_claimed: list[Path] = []  # stage folders whose config.json this process wrote anew (see drop_unused)


def _stale_only(diffs_keys: list[str], derived: tuple[str, ...]) -> bool:
  return bool(diffs_keys) and all(k.split(".")[0] in derived for k in diffs_keys)


def check_stage(
  workdir: Path,
  stage: str,
  identity: dict,
  *,
  overwrite: bool,
  derived: tuple[str, ...] = (),
  defaults: dict | None = None,
) -> bool:
  """What claim_stage would decide, without writing anything: returns whether W/<stage> is finished
  (and stays: not replaced); raises ValueError where claim_stage would refuse. `defaults`: the
  identity of the base config, for the keys a record made by an older jsim lacks."""
  stage_dir = Path(workdir) / stage
  if replaces(workdir, stage, overwrite):
    return False
  recorded_path = stage_dir / "config.json"
  if recorded_path.exists():
    diffs = _differences(_recorded_identity(_read_record(recorded_path), identity, defaults), _identity(identity))
    if diffs and _stale_only([d.split(":")[0] for d in diffs], derived):
      return False  # derived from outputs that have changed: claim_stage replaces it
    if diffs:
      raise ValueError(
        f"{stage_dir} was made by another configuration ({'; '.join(diffs[:4])}); "
        f"use another --workdir, or --config.overwrite=True to replace it"
      )
  elif stage_dir.exists() and any(not p.name.endswith(TMP_SUFFIX) for p in stage_dir.iterdir()):
    # (a run killed while writing config.json for the first time leaves only config.json.*.tmp)
    raise ValueError(
      f"{stage_dir} exists but has no config.json: not a jsim stage folder; "
      f"use another --workdir, or --config.overwrite=True to replace it"
    )
  return (stage_dir / RESULT_FILE).exists()


def claim_stage(
  workdir: Path,
  stage: str,
  identity: dict,
  *,
  overwrite: bool,
  derived: tuple[str, ...] = (),
  defaults: dict | None = None,
) -> tuple[Path, bool]:
  """Makes W/<stage> ready for a run; returns (stage_dir, already_finished).

  Refuses a stage folder made with other defining settings; with overwrite, clears it
  and what was derived from it (unless this overwrite run made it: see begin_overwrite).
  A stage whose record differs only in `derived` keys (what it was computed from, such
  as stage 2's embeddings) is stale, not the user's work: it is replaced.
  """
  workdir = Path(workdir)
  stage_dir = workdir / stage
  recorded_path = stage_dir / "config.json"
  replace = replaces(workdir, stage, overwrite)
  if not replace and recorded_path.exists():
    diffs = _differences(_recorded_identity(_read_record(recorded_path), identity, defaults), _identity(identity))
    if diffs and _stale_only([d.split(":")[0] for d in diffs], derived):
      logging.warning("%s was computed from other inputs (%s): replacing it", stage_dir, "; ".join(diffs[:2]))
      _remove_stale([p for p in [stage_dir] + [workdir / d for d in _DERIVED.get(stage, ())] if p.exists()], stage)
  if replace:
    stale = [p for p in [stage_dir] + [workdir / d for d in _DERIVED.get(stage, ())] if p.exists()]
    if stale:
      logging.warning("overwrite: removing %s", ", ".join(str(p) for p in stale))
    _remove_stale(stale, stage)
    mark_replaced(workdir, [stage, *_DERIVED.get(stage, ())])
  finished = check_stage(workdir, stage, identity, overwrite=False, derived=derived, defaults=defaults)
  recorded = _read_record(recorded_path) if recorded_path.exists() else None
  if recorded != json.loads(json.dumps(identity, default=str)):  # (a finished stage is left untouched)
    if recorded is None:
      _claimed.append(stage_dir)
    write_json(recorded_path, identity)
  return stage_dir, finished


def start_run() -> None:
  """Forgets the claims of an earlier run in this process (run.run calls it first)."""
  global _overwrite_claim
  _claimed.clear()
  _overwrite_claim = None


def _holds_work(path: Path) -> bool:
  """Whether a folder holds something a run produced: a complete checkpoint, a result, embeddings, a report."""
  if not path.is_dir():
    return False
  for p in path.rglob("*"):
    if p.name in (RESULT_FILE, "meta.json", "report.json") or (p.parent.name == "checkpoints" and p.name.isdigit()):
      return True
  return False


def drop_unused(workdir: Path, existed_before: set[str] | None) -> None:
  """After a failed, refused or interrupted run: removes what it made without doing any work.

  existed_before: the names in W when the run began (None: the run created W). Stage
  folders it claimed without a checkpoint go; then, if nothing in W holds work, so
  does every entry the run created, and W itself if the run created it and it is empty.
  """
  import jax

  workdir = Path(workdir)
  if jax.process_index() != 0 or not workdir.is_dir():
    return
  for stage_dir in _claimed:
    if stage_dir.is_dir() and not _holds_work(stage_dir):
      shutil.rmtree(stage_dir, ignore_errors=True)
  _claimed.clear()
  before = existed_before or set()
  if any(_holds_work(p) for p in workdir.iterdir()):
    return
  for p in workdir.iterdir():
    if p.name not in before and p.name != LOCK_FILE:
      shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def finish_stage(stage_dir: Path, result: dict) -> None:
  """Marks the stage finished: writes result.json, adding (in place) a new run_id and the time."""
  result.update(run_id=uuid.uuid4().hex, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
  write_json(Path(stage_dir) / RESULT_FILE, result)


def stage_result(workdir: Path, stage: str, required: tuple[str, ...] = ("best_step",)) -> dict | None:
  """W/<stage>/result.json (None if the stage has not finished); ValueError naming it if it lacks `required`."""
  path = Path(workdir) / stage / RESULT_FILE
  if not path.exists():
    return None
  result = read_json(path)
  missing = [k for k in required if not isinstance(result, dict) or k not in result]
  if missing:
    raise ValueError(
      f"{path}: not a jsim result (no {missing[0]!r}); restore it, or redo that stage with --config.overwrite=True"
    )
  return result
