"""config.stage -> the stage functions; 'all' chains them, skipping finished ones."""

from __future__ import annotations

import contextlib
import importlib
import time
from pathlib import Path

import numpy as np
from absl import logging

from jsim import console, interrupts, parallel, plan, workdir as wd
from jsim.data import prepare
from jsim.data.download import DownloadError
from jsim.train.loop import NonFiniteLoss, Preempted, preemption_guard

# Errors that reach the user as one line (no traceback).
EXPECTED_ERRORS = (
  ValueError,
  FileNotFoundError,
  NotADirectoryError,
  PermissionError,
  wd.NoSpace,
  ConnectionError,
  DownloadError,
  Preempted,
  NonFiniteLoss,
)

# Stages that train: a SIGTERM/SIGINT anywhere in them (data loading and compilation
# included) stops them at the next step, with a checkpoint.
_TRAINING = ("classifier", "similarity", "sweep")


# A stage runs what it needs first; finished stages and current embeddings are skipped.
_CHAINS = plan.CHAINS


def exit_code(error: Exception) -> int:
  return 0 if isinstance(error, Preempted) else 1


def run(config, workdir: str | Path) -> dict:
  """Runs config.stage in workdir and returns what the last stage returned.

  One run at a time holds the workdir (wd.locked); a run that fails, is refused or is
  interrupted removes what it made without doing any work (wd.drop_unused).
  """
  from jsim import validate

  parallel.maybe_initialize_distributed()  # first: any JAX call (the device count) would prevent it
  validate.check_config(config)
  config.data.normalization = prepare.resolved_normalization(config)  # a workdir records what 'auto' chose
  plan.check_prerequisites(config, workdir)  # (before the workdir is made: a refused run leaves nothing)
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise NotADirectoryError(f"--workdir={workdir} is a file, not a folder; name a folder (new or a jsim workdir)")
  wd.start_run()
  existed = {p.name for p in workdir.iterdir()} if workdir.is_dir() else None
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    with wd.locked(workdir):
      try:
        return _run_stages(config, workdir)
      except BaseException:
        wd.drop_unused(workdir, existed)
        raise
  finally:
    if existed is None and parallel.is_main_process():
      with contextlib.suppress(OSError):
        workdir.rmdir()  # (only if it is empty: a refused run's workdir)


def _run_stages(config, workdir: Path) -> dict:
  if config.overwrite:
    wd.begin_overwrite(workdir, wd.config_to_dict(config))
  wd.check_split(workdir)
  if config.stage in ("embed", "similarity", "evaluate", "sweep"):  # ('all' checks in stage 1's claim)
    # They read stage 1 with config.model: another backbone would fail to restore, obscurely.
    wd.check_recorded(workdir, wd.STAGE1, {"seed": config.seed, "model": {"name": config.model.name}})
  for hint in console.cpu_hints(config):
    logging.warning("%s", hint)
  _check_pair_supply(config, workdir)
  names = _CHAINS.get(config.stage, (config.stage,))
  result, timings = None, []
  for name in names:
    interrupts.raise_if_received()
    if len(names) > 1:
      logging.info("=== %s", name)
    start = time.perf_counter()
    result = _run_stage(stage_function(name), name, config, workdir)
    timings.append((name, time.perf_counter() - start, console.stage_result_text(name, result)))
  record = wd.config_to_dict(config)
  path = workdir / "config.json"
  with contextlib.suppress(ValueError):  # (an unreadable record is replaced)
    if path.exists() and wd.read_json(path) == record:
      path = None  # unchanged: a read-only finished workdir needs no write
  if parallel.is_main_process() and path is not None:
    try:
      wd.write_json(path, record)  # (not before: a refused or failed run must not replace the record)
    except OSError as e:
      if not wd.is_read_only(e):
        raise
      # (every stage was skipped, or it would have failed writing: a read-only finished workdir)
      logging.info("%s is read-only: its config.json, the record of the last run, is left as it is", workdir)
  interrupts.raise_if_received()
  wd.end_overwrite(workdir)
  if parallel.is_main_process():
    print("\n".join(console.summary_lines(workdir, timings)), flush=True)
  return result


def _run_stage(stage, name: str, config, workdir: Path):
  if name not in _TRAINING:
    return stage(config, workdir)
  with preemption_guard() as guard:
    result = stage(config, workdir)
    if guard.stop_requested():  # the signal came after the last step (e.g. during the test evaluation)
      raise Preempted(
        f"{guard.signal_name} during stage {name!r}, which finished first; rerun the same command to continue"
      )
  return result


def _check_pair_supply(config, workdir: Path) -> None:
  """Refuses pair counts that the data cannot supply, before the first stage that would compile.

  The labels come from the embeddings when they exist; for 'all' on a fresh workdir,
  from the data itself (stage 1 would fail hours before stage 2 found out).
  """
  from jsim import validate

  if config.stage not in ("all", "similarity", "sweep", "evaluate"):
    return
  emb_dir = workdir / wd.EMBEDDINGS
  if (emb_dir / "meta.json").exists():
    try:
      train, test = np.load(emb_dir / "train_labels.npy"), np.load(emb_dir / "test_labels.npy")
      class_ids = tuple(wd.read_json(emb_dir / "meta.json")["class_ids"])
    except (OSError, ValueError, KeyError):
      return  # unreadable embeddings: the stage that reads them says so
  elif config.stage == "all":
    from jsim.data.prepare import prepare

    data = prepare(config, workdir)
    train, test = data.train_set.labels[data.t180_idx], data.test_set.labels[data.test_idx]
    class_ids = tuple(data.train_set.class_ids)
  else:
    return  # no embeddings yet: the stage itself asks for them
  if config.stage != "evaluate":  # for 'evaluate', stage 2 is trained already
    validate.check_pair_supply(config, train, class_ids)
  validate.check_test_pairs(config, test, class_ids)


# Each stage's function by module path, imported only when the stage runs (a stage-1 run
# loads neither the evaluators nor matplotlib).
STAGE_FUNCTIONS = {
  "prepare": "jsim.data.prepare:prepare_stage",
  "classifier": "jsim.train.classifier:train_classifier",
  "embed": "jsim.train.embeddings:compute_embeddings",
  "similarity": "jsim.train.similarity:train_similarity",
  "evaluate": "jsim.evaluate.evaluation:evaluate",
  "sweep": "jsim.evaluate.evaluation:sweep",
}


def stage_function(name: str):
  """The function (config, workdir) -> result of stage `name`."""
  module, _, function = STAGE_FUNCTIONS[name].partition(":")
  return getattr(importlib.import_module(module), function)
