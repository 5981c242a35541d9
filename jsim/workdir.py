"""The workdir is the contract between stages.

    W/config.json                 the resolved config of the last successful run (for the record)
    W/split.json                  classes and image ids of every split
    W/preprocessing.json          image size, input size, normalisation statistics
    W/stage1/  config.json, checkpoints/, metrics.jsonl, tb/, result.json
    W/embeddings/  embeddings.npz, meta.json
    W/stage2/  config.json, checkpoints/, metrics.jsonl, tb/, result.json
    W/report.json, report.md, evaluation.npz, figures/, evaluation/   (the evaluation: EVALUATION_OUTPUTS)
    W/onnx/, W/predict_cache/      predict's export and gallery caches

A stage's config.json records the settings that define its outputs; a later run
with different ones is refused (another architecture, split, ...), while settings
that only extend or observe a run (more epochs, logging) may change.
`result.json` marks a finished stage, which is never redone unless
config.overwrite is set; overwriting a stage also removes what was derived from it
(`_DERIVED`: for stage 1 the embeddings, stage 2, the sweep, the evaluation and predict's
caches; for stage 2 the evaluation and the export), which would otherwise be read
although stale. result.json carries a `run_id`, new each time a stage finishes, that
derived outputs record (report.json, the export) and readers check (`report_problem`),
so that a retrained stage is never read through what an earlier one left.

Every file is written to a temporary name and renamed, so a killed run leaves
either the old file or the new one, never half of one; a full disk is `NoSpace`, one
line naming the file, with the temporary file removed.

One run at a time: `locked` holds an fcntl lock on W/.jsim.lock (the kernel drops it
when the process dies, so a SIGKILL leaves no stale lock). A stage is claimed (its
config.json written, stale outputs removed) only once its inputs are loaded, and
`drop_unused` removes what a failed or refused run made without doing any work (a
claim without a checkpoint, a split drawn for nothing, a workdir it created), so the
corrected command is not refused as "another configuration".

config.overwrite and preemption: W/overwrite.json records the overwrite run in
progress (a fingerprint of its config) and the stages it has replaced; its verbatim
rerun (a requeue) resumes those instead of replacing them again. It is removed when
the run completes, so the next overwrite run replaces again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import ml_collections
from absl import logging

STAGE1, EMBEDDINGS, STAGE2 = "stage1", "embeddings", "stage2"
RESULT_FILE = "result.json"
TMP_SUFFIX = ".tmp"
LOCK_FILE = ".jsim.lock"
OVERWRITE_FILE = "overwrite.json"
REPORT_FILE = "report.json"
# What the evaluation writes into W (jsim.evaluate.evaluation): computed from both stages.
EVALUATION_OUTPUTS = (REPORT_FILE, "report.md", "evaluation.npz", "figures", "evaluation")
PREDICT_CACHES = ("onnx", "predict_cache")  # jsim.export.DEFAULT_DIR, jsim.predict.CACHE_DIR
# What is computed from a stage's outputs, and goes stale when the stage is redone.
_DERIVED = {
  STAGE1: (EMBEDDINGS, STAGE2, "sweep", *EVALUATION_OUTPUTS, *PREDICT_CACHES),
  STAGE2: (*EVALUATION_OUTPUTS, *PREDICT_CACHES),
}

# Keys that may differ between a run and its resumption.
# learning_rate, alpha, halving_wait: the rate from here on (a NaN stop is continued at a lower one); so are
# the groups' rates (head_learning_rate, loss_learning_rate: the configs derive the latter from learning_rate)
# and the schedule and its settings.
# conv_impl: how convs are lowered; the same math, other float rounding, as on another platform.
_FREE_KEYS = {
  "stage",
  "overwrite",
  "num_epochs",
  "split_sha256",
  "learning_rate",
  "alpha",
  "halving_wait",
  "log_every_steps",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "eval_batch_size",
  "cache_dir",
  "num_workers",
  "pipeline",
  "conv_impl",
  "head_learning_rate",
  "loss_learning_rate",
  "schedule",
  "patience",
  "smoothing",
  "min_delta",
  "warmup_epochs",
  "final_rate_factor",
  "evaluation",
  "sweep",
  "embed",
}


class NoSpace(OSError):
  """A write failed because the disk (or quota) is full: one line naming the path."""


def is_no_space(e: BaseException | None) -> bool:
  """Whether `e` (or what caused it: orbax and tensorstore wrap the OSError, or keep only its text) is ENOSPC."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "no space left on device" in str(e).lower() or "disk quota exceeded" in str(e).lower():
      return True
    e = e.__cause__ or e.__context__
  return False


def no_space(path: Path | str, what: str = "") -> NoSpace:
  """The one-line error of a full disk while writing `path`."""
  return NoSpace(
    errno.ENOSPC,
    f"{path}: no space left on device{what}; nothing half-written was kept: free some space and rerun the same "
    f"command (it continues from what is complete)",
  )


def _oserror_str(self) -> str:  # NoSpace(errno, message) prints as its message alone, without "[Errno 28]"
  return self.strerror


NoSpace.__str__ = _oserror_str


def write_json(path: Path, obj: Any) -> None:
  """Atomic: a reader never sees half a file. A full disk raises NoSpace naming `path`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  # One temporary name per process: several processes may write the same file.
  tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
  try:
    with open(tmp, "w") as f:
      f.write(json.dumps(obj, indent=1, sort_keys=True, default=str))
      f.flush()
      os.fsync(f.fileno())  # the rename must not land before the data (a crash, not only a kill)
    tmp.replace(path)
  except BaseException as e:  # (a signal, a full disk: no half-written temporary file stays)
    tmp.unlink(missing_ok=True)
    if is_no_space(e):
      raise no_space(path) from None
    raise


def write_file(path: Path, write: Any) -> None:
  """Atomic like write_json for any writer: `write(tmp_path)` makes the file, renamed to `path` once complete.

  The temporary name ends in TMP_SUFFIX (readers and the stage checks skip such names); it is
  removed on any failure, and a full disk raises NoSpace naming `path`.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
  try:
    write(tmp)
    tmp.replace(path)
  except BaseException as e:
    tmp.unlink(missing_ok=True)
    if is_no_space(e):
      raise no_space(path) from None
    raise


def is_read_only(e: BaseException) -> bool:
  """Whether an OSError means the folder cannot be written (a read-only mount, no permission)."""
  return isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


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


def _with_new_keys(recorded: Any, now: Any, defaults: Any) -> Any:
  """`recorded` plus the keys it lacks that `now` has, at their `defaults` value.

  A key added to jsim after a workdir was made reads as its default there: a new key's
  default keeps the old behaviour (the rule for every new key; a changed default is a
  recorded value that differs, and still refuses).
  """
  if not (isinstance(recorded, dict) and isinstance(now, dict) and isinstance(defaults, dict)):
    return recorded
  out = dict(recorded)
  for k, v in now.items():
    if k not in recorded and k in defaults:
      out[k] = defaults[k]
    elif k in recorded:
      out[k] = _with_new_keys(recorded[k], v, defaults.get(k))
  return out


# Keys jsim no longer has, each with the value that meant what a record without it means now: a record
# holding that value reads as current; another value still refuses (it asked for what is now said otherwise).
# loss_hparams.triplet.mining='all' is miner='none' (every triplet); its other values are miners now.
_RETIRED = {("classifier", "loss_hparams", "triplet", "mining"): "all"}


def _without_retired(recorded: Any) -> Any:
  recorded = json.loads(json.dumps(recorded))  # (a copy)
  for path, meant_now in _RETIRED.items():
    node = recorded
    for key in path[:-1]:
      node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and path[-1] in node and node[path[-1]] == meant_now:
      del node[path[-1]]
  return recorded


def _recorded_identity(recorded: dict, now: dict, defaults: dict | None) -> Any:
  return _with_new_keys(_identity(_without_retired(recorded)), _identity(now), _identity(defaults or {}))


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


def _read_record(path: Path) -> dict:
  """A stage's config.json: a JSON object, or a one-line error naming the file."""
  recorded = read_json(path)
  if not isinstance(recorded, dict):
    raise ValueError(
      f"{path}: not a jsim stage record (a JSON object expected, found {type(recorded).__name__}); "
      f"restore it, or redo that stage with --config.overwrite=True"
    )
  return recorded


def check_recorded(workdir: Path, stage: str, expected: dict) -> None:
  """Refuses to build on W/<stage> when its config.json records other values of `expected`'s keys.

  For stages that read another's outputs (embed reads stage 1 with config.model), so
  that another architecture is a clear error rather than a failed restore.
  """
  path = Path(workdir) / stage / "config.json"
  if not path.exists():
    return
  diffs = _differences(_subset(_read_record(path), expected), expected)
  if diffs:
    raise ValueError(
      f"{path.parent} was made by another configuration ({'; '.join(diffs[:4])}); "
      f"use another --workdir, or redo that stage with --config.overwrite=True"
    )


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


# --- one run at a time --------------------------------------------------------------------------------------------


class WorkdirInUse(ValueError):
  """Another process holds the workdir's lock."""


@contextlib.contextmanager
def locked(workdir: Path):
  """Holds W/.jsim.lock for the duration (process 0 only, for several processes).

  A read-only workdir is not locked: no run can write it anyway. The lock file is
  removed on exit; a run that opened it in the meantime sees another inode and retries.
  """
  import jax

  workdir = Path(workdir)
  if jax.process_index() != 0:
    yield
    return
  path = workdir / LOCK_FILE
  while True:
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      if is_read_only(e):
        yield  # read-only
        return
      if is_no_space(e):  # (no inode left)
        raise no_space(path, " (the workdir's lock)") from None
      raise
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 200).decode(errors="replace").split()
      os.close(fd)
      who = f"process {holder[0]} on host {holder[1]}" if len(holder) >= 2 else "another process"
      raise WorkdirInUse(f"{workdir} is in use by {who}; wait until it ends, or use another --workdir") from None
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)  # its holder removed it on exit: lock the new one
  try:
    try:
      os.ftruncate(fd, 0)
      os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    except OSError as e:
      if is_no_space(e):
        raise no_space(path, " (the workdir's lock)") from None
      raise
    yield
  finally:
    with contextlib.suppress(OSError):
      path.unlink()
    os.close(fd)


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


# ----------------------------------------------------------------------------- a trained workdir's records
# What predict (and anything else that uses a trained workdir) checks before JAX loads:
# the records of stage 1, the embeddings and stage 2 agree with each other.


def _read(path: Path, what: str) -> Any:
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: {what}")
  return read_json(path)


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
  pre = _read(workdir / "preprocessing.json", f"not a trained jsim workdir; {hint}")
  split = _read(workdir / "split.json", f"not a trained jsim workdir; {hint}")
  stage1 = _read(workdir / STAGE1 / "config.json", f"stage 1 never ran here; {hint}")
  result = _read(workdir / STAGE1 / RESULT_FILE, f"stage 1 has not finished; {hint}")
  if not (workdir / STAGE1 / "checkpoints").is_dir():
    raise FileNotFoundError(f"{workdir / STAGE1}/checkpoints: no checkpoint; {hint}")
  meta = _read(workdir / EMBEDDINGS / "meta.json", "no embeddings; run --config.stage=embed first")
  config = {}
  if (workdir / "config.json").exists():
    config = read_json(workdir / "config.json")
  for key in ("seed", "data", "model", "classifier"):
    if key in stage1:
      config[key] = stage1[key]
  name = config["model"]["name"]
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
  mean, std = tuple(float(x) for x in pre["mean"]), tuple(float(x) for x in pre["std"])
  if len(mean) != 3 or len(std) != 3:
    raise ValueError(f"{workdir}/preprocessing.json: mean and std need 3 values each")
  image_size = int(pre.get("image_size") or config.get("data", {}).get("image_size", 64))
  return StageRecords(
    workdir=workdir,
    config=config,
    num_classes=len(split["seen_classes"]),
    image_size=image_size,
    mean=mean,
    std=std,
    stage1_step=int(result["best_step"]),
    embedding_dim=int(meta["dim"]),
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
  stage2 = _read(workdir / STAGE2 / "config.json", f"stage 2 never ran here; {hint}")
  result = _read(workdir / STAGE2 / RESULT_FILE, f"stage 2 has not finished; {hint}")
  # (similarity.model=distance has no checkpoint: its calibration is result.json itself.)
  if result.get("model") != "distance" and not (workdir / STAGE2 / "checkpoints").is_dir():
    raise FileNotFoundError(f"{workdir / STAGE2}/checkpoints: no checkpoint; {hint}")
  where = workdir / STAGE2 / "config.json"
  if stage2.get("model") != own.model_name:
    raise ValueError(
      f"{where}: stage 2 was trained for model {stage2.get('model')!r}, stage 1 is "
      f"{own.model_name!r}; retrain stage 2 (--config.stage=similarity --config.overwrite=True)"
    )
  members = [own] + [
    stage1_records(_resolve_member(p, workdir)) for p in stage2.get("similarity", {}).get("ensemble_workdirs", [])
  ]
  sources = stage2.get("embeddings", [])
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
  if "embedding_dim" in result and int(result["embedding_dim"]) != dim:
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
    else:
      notes.append(f"{why}: its validation threshold is not used (0.5 is); rerun --config.stage=evaluate")
  return WorkdirRecords(workdir, stage2, members, None if threshold is None else float(threshold), tuple(notes))


# What a report.json must hold for the readers of an evaluation (predict's threshold, compare's table).
REPORT_KEYS = ("backbone", "val_threshold", "cases", "accuracy_at_0.5", "auc", "extra")


def read_report(workdir: str | os.PathLike, required: tuple[str, ...] = REPORT_KEYS) -> dict:
  """W/report.json as a dict with `required` keys; one-line errors naming the file otherwise."""
  path = Path(workdir) / REPORT_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: evaluate that workdir first (--config.stage=evaluate)")
  report = read_json(path)
  redo = "rerun --config.stage=evaluate --config.overwrite=True"
  if not isinstance(report, dict):
    raise ValueError(f"{path}: not a jsim report (a JSON object expected, found {type(report).__name__}); {redo}")
  missing = [k for k in required if k not in report]
  if missing:
    raise ValueError(f"{path}: not a jsim report (no {missing[0]!r}); {redo}")
  return report


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


def file_digest(path: str | os.PathLike) -> str:
  """SHA-256 of a file's bytes (content, not size and time: a copy or a touch keeps it, an edit does not)."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_identity(stage_dir: Path, step: int) -> str | None:
  """What a checkpoint holds, by content: the SHA-256 of its arrays recorded in its meta (jsim.checkpoint),
  read as JSON (no orbax). A copy (cp -r, rsync) has the same; another training run another.
  None when there is no such checkpoint or its meta has no checksum."""
  try:
    meta = json.loads((Path(stage_dir) / "checkpoints" / str(step) / "meta" / "metadata").read_text())
  except (OSError, ValueError):
    return None
  checksum = meta.get("checksum") if isinstance(meta, dict) else None
  return checksum.get("state") if isinstance(checksum, dict) else None


def split_digest(workdir: Path) -> str | None:
  """SHA-256 of W/split.json's content (not its formatting); None if there is none."""
  path = Path(workdir) / "split.json"
  if not path.exists():
    return None
  split = read_json(path)
  if not isinstance(split, dict):
    raise ValueError(
      f"{path}: not a valid split file (a JSON object expected, found {type(split).__name__}); "
      f"restore it, or use another --workdir"
    )
  return hashlib.sha256(json.dumps(split, sort_keys=True).encode()).hexdigest()


def check_split(workdir: Path) -> None:
  """Refuses a workdir whose split.json is not the one its stages were made with (an edit, a copy)."""
  workdir = Path(workdir)
  current = None
  for record in (
    workdir / STAGE1 / "config.json",
    workdir / EMBEDDINGS / "meta.json",
    workdir / STAGE2 / "config.json",
  ):
    if not record.exists():
      continue
    recorded = read_json(record)
    digest = recorded.get("split_sha256") if isinstance(recorded, dict) else None
    if digest is None:
      continue  # (made before digests were recorded)
    current = current or split_digest(workdir)
    if current is None:
      raise ValueError(
        f"{workdir / 'split.json'} is missing, but {record} was made with one; restore it, or use another --workdir"
      )
    if digest != current:
      raise ValueError(
        f"{workdir / 'split.json'} is not the split that {record.parent.name} was made with "
        f"(SHA-256 {current[:12]}... now, {digest[:12]}... recorded); restore it, or use another "
        f"--workdir"
      )
