"""What predict (and anything else that uses a trained workdir) checks before JAX loads: the records of
stage 1, the embeddings and stage 2 agree with each other; and W/report.json, current or stale."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from jsim.workdir.io import read_json
from jsim.workdir.layout import EMBEDDINGS, REPORT_FILE, RESULT_FILE, STAGE1, STAGE2
from jsim.workdir.stages import stage_result


_RESTORE = "restore it, or redo the stage that wrote it with --config.overwrite=True"


def _read(path: Path, what: str, keys: tuple[str, ...] = (), *, kind: str = "record", redo: str = _RESTORE) -> dict:
  """A JSON object with `keys` (a workdir record, or the report), or a one-line error naming the file."""
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: {what}")
  record = read_json(path)
  if not isinstance(record, dict):
    raise ValueError(f"{path}: not a jsim {kind} (a JSON object expected, found {type(record).__name__}); {redo}")
  missing = [k for k in keys if k not in record]
  if missing:
    raise ValueError(f"{path}: not a jsim {kind} (no {missing[0]!r}); {redo}")
  return record


def _value(path: Path, key: str, convert: Callable[[], Any]) -> Any:
  """convert() of a record's field; a one-line error naming the file and the key when it has the wrong type."""
  try:
    return convert()
  except (TypeError, ValueError, KeyError, AttributeError) as e:
    raise ValueError(f"{path}: not a jsim record ({key!r}: {e}); {_RESTORE}") from None


@dataclasses.dataclass(frozen=True)
class StageRecords:
  """What one workdir recorded about its stage 1 and embeddings (JSON only, no JAX)."""

  workdir: Path
  config: dict  # W/config.json overlaid with stage1/config.json
  num_classes: int
  image_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  stage1_step: int
  embedding_dim: int

  @property
  def model_name(self) -> str:
    return self.config["model"]["name"]


def stage1_records(workdir: Path) -> StageRecords:
  if workdir.exists() and not workdir.is_dir():
    raise NotADirectoryError(
      f"workdir {workdir} is a file, not a directory: give the folder that python -m jsim.main --workdir=... trained"
    )
  if not workdir.is_dir():
    raise FileNotFoundError(f"workdir {workdir}: no such directory")
  hint = "train the model first (python -m jsim.main --config=... --workdir=...)"
  pre_path, split_path = workdir / "preprocessing.json", workdir / "split.json"
  pre = _read(pre_path, f"not a trained jsim workdir; {hint}", ("mean", "std"))
  split = _read(split_path, f"not a trained jsim workdir; {hint}", ("seen_classes",))
  stage1_path = workdir / STAGE1 / "config.json"
  stage1 = _read(stage1_path, f"stage 1 never ran here; {hint}")
  result_path = workdir / STAGE1 / RESULT_FILE
  result = _read(result_path, f"stage 1 has not finished; {hint}", ("best_step",))
  if not (workdir / STAGE1 / "checkpoints").is_dir():
    raise FileNotFoundError(f"{workdir / STAGE1}/checkpoints: no checkpoint; {hint}")
  meta_path = workdir / EMBEDDINGS / "meta.json"
  meta = _read(meta_path, "no embeddings; run --config.stage=embed first", ("dim",))
  config = {}
  if (workdir / "config.json").exists():
    config = _read(workdir / "config.json", "")
  for key in ("seed", "data", "model", "classifier"):
    if key in stage1:
      config[key] = stage1[key]
  name = _value(stage1_path, "model", lambda: config["model"]["name"])
  if meta.get("model") != name:
    raise ValueError(
      f"{workdir / EMBEDDINGS}/meta.json was made by model {meta.get('model')!r}, stage 1 "
      f"is {name!r}; rerun --config.stage=embed"
    )
  if meta.get("stage1_step") != result["best_step"]:
    raise ValueError(
      f"{workdir / EMBEDDINGS} come from stage-1 step {meta.get('stage1_step')}, the best "
      f"stage-1 checkpoint is step {result['best_step']}; rerun --config.stage=embed and similarity"
    )
  mean = _value(pre_path, "mean", lambda: tuple(float(x) for x in pre["mean"]))
  std = _value(pre_path, "std", lambda: tuple(float(x) for x in pre["std"]))
  if len(mean) != 3 or len(std) != 3:
    raise ValueError(f"{workdir}/preprocessing.json: mean and std need 3 values each")
  image_size = _value(
    pre_path, "image_size", lambda: int(pre.get("image_size") or config.get("data", {}).get("image_size", 64))
  )
  return StageRecords(
    workdir=workdir,
    config=config,
    num_classes=_value(split_path, "seen_classes", lambda: len(split["seen_classes"])),
    image_size=image_size,
    mean=mean,
    std=std,
    stage1_step=_value(result_path, "best_step", lambda: int(result["best_step"])),
    embedding_dim=_value(meta_path, "dim", lambda: int(meta["dim"])),
  )


def _resolve_member(path: str, workdir: Path) -> Path:
  for candidate in (Path(path), workdir.parent / path, workdir / path):
    if candidate.is_dir():
      return candidate
  raise FileNotFoundError(
    f"{workdir / STAGE2}/config.json names ensemble workdir {path!r}, which is not a "
    f"directory (from here, nor beside {workdir})"
  )


def stage2_records(workdir: Path, own: StageRecords) -> tuple[dict, list[StageRecords]]:
  """stage2/config.json and the records of every embedding source it names (this workdir first)."""
  hint = "train stage 2 first (--config.stage=similarity)"
  stage2 = _read(workdir / STAGE2 / "config.json", f"stage 2 never ran here; {hint}", ("similarity",))
  result_path = workdir / STAGE2 / RESULT_FILE
  result = _read(result_path, f"stage 2 has not finished; {hint}")
  # (similarity.model=distance has no checkpoint: its calibration is result.json itself.)
  if result.get("model") != "distance" and not (workdir / STAGE2 / "checkpoints").is_dir():
    raise FileNotFoundError(f"{workdir / STAGE2}/checkpoints: no checkpoint; {hint}")
  where = workdir / STAGE2 / "config.json"
  if stage2.get("model") != own.model_name:
    raise ValueError(
      f"{where}: stage 2 was trained for model {stage2.get('model')!r}, stage 1 is "
      f"{own.model_name!r}; retrain stage 2 (--config.stage=similarity --config.overwrite=True)"
    )
  others = _value(where, "similarity", lambda: [str(p) for p in stage2["similarity"].get("ensemble_workdirs", [])])
  members = [own] + [stage1_records(_resolve_member(p, workdir)) for p in others]
  sources = _value(where, "embeddings", lambda: [dict(src) for src in stage2.get("embeddings", [])])
  if len(sources) != len(members):
    raise ValueError(
      f"{where} records {len(sources)} embedding sources for {len(members)} workdirs "
      f"(this one + similarity.ensemble_workdirs)"
    )
  for src, rec in zip(sources, members):
    got = {"model": rec.model_name, "stage1_step": rec.stage1_step, "dim": rec.embedding_dim}
    diffs = [f"{k} {src.get(k)!r} there, {v!r} in {rec.workdir}" for k, v in got.items() if src.get(k) != v]
    if diffs:
      raise ValueError(
        f"{where}: stage 2 does not match the stage-1 backbone ({'; '.join(diffs)}); rerun "
        f"--config.stage=embed and --config.stage=similarity with --config.overwrite=True"
      )
  if len({m.image_size for m in members}) > 1:
    raise ValueError(
      f"{where}: the ensemble's workdirs use different image sizes "
      f"{[m.image_size for m in members]}; they must share the data"
    )
  dim = sum(m.embedding_dim for m in members)
  if "embedding_dim" in result and _value(result_path, "embedding_dim", lambda: int(result["embedding_dim"])) != dim:
    raise ValueError(
      f"{workdir / STAGE2}/result.json: embedding_dim {result['embedding_dim']} differs from "
      f"the {dim} of its embedding sources"
    )
  return stage2, members


@dataclasses.dataclass(frozen=True)
class WorkdirRecords:
  """A trained workdir's records, checked against each other (JSON only: no JAX, no checkpoint read)."""

  workdir: Path
  stage2: dict  # stage2/config.json
  members: list[StageRecords]  # this workdir's stage 1, then each ensemble member's
  threshold: float | None  # report.json "val_threshold" (None without a report of the current stages)
  notes: tuple[str, ...] = ()  # one line each: what was not used and why (a stale report)

  @property
  def image_size(self) -> int:
    return self.members[0].image_size


def read_records(workdir: str | os.PathLike) -> WorkdirRecords:
  """Reads and cross-checks what a trained workdir recorded (the cheap part of `predict.Similarity.load`).

  The threshold comes from W/report.json only when that report was made from the stages that
  exist now (`report_problem`); otherwise it is None and `notes` says why, in one line.
  """
  workdir = Path(workdir)
  own = stage1_records(workdir)
  stage2, members = stage2_records(workdir, own)
  threshold, notes = None, []
  if (workdir / REPORT_FILE).exists():
    report = read_report(workdir)
    why = report_problem(workdir, report)
    if why is None:
      threshold = report.get("val_threshold")
      if threshold is not None and (not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1):
        raise ValueError(
          f"{workdir / REPORT_FILE}: not a jsim report (val_threshold {threshold!r}, not a probability); "
          "rerun --config.stage=evaluate --config.overwrite=True"
        )
    else:
      notes.append(f"{why}: its validation threshold is not used (0.5 is); rerun --config.stage=evaluate")
  return WorkdirRecords(workdir, stage2, members, None if threshold is None else float(threshold), tuple(notes))


# What a report.json must hold for the readers of an evaluation (predict's threshold, compare's table).
REPORT_KEYS = ("backbone", "val_threshold", "cases", "accuracy_at_0.5", "auc", "extra")


def read_report(workdir: str | os.PathLike, required: tuple[str, ...] = REPORT_KEYS) -> dict:
  """W/report.json as a dict with `required` keys; one-line errors naming the file otherwise."""
  return _read(
    Path(workdir) / REPORT_FILE,
    "evaluate that workdir first (--config.stage=evaluate)",
    required,
    kind="report",
    redo="rerun --config.stage=evaluate --config.overwrite=True",
  )


def report_problem(workdir: str | os.PathLike, report: dict) -> str | None:
  """Why `report` (W/report.json) is not the evaluation of the stages W holds now; None when it is.

  The report records each stage's result.json (`extra.stage1`, `extra.stage2`) with its run_id, new
  each time a stage finishes: a stage retrained, continued or removed since makes it stale.
  """
  path = Path(workdir) / REPORT_FILE
  extra = report.get("extra") if isinstance(report.get("extra"), dict) else {}
  for key, stage in (("stage1", STAGE1), ("stage2", STAGE2)):
    try:
      now = stage_result(workdir, stage, required=())
    except ValueError:
      now = None
    was = extra.get(key) if isinstance(extra.get(key), dict) else {}
    if not isinstance(now, dict):
      return f"{path} is stale: {Path(workdir) / stage} has no finished stage now"
    if was.get("run_id") is None or was.get("run_id") != now.get("run_id"):
      return (
        f"{path} is stale: it evaluated another {stage} run (run id {str(was.get('run_id'))[:8]}, "
        f"now {str(now.get('run_id'))[:8]})"
      )
  return None
