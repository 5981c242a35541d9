"""config.stage -> the stages it runs, from one table (STAGES); 'all' chains them, skipping finished ones.

The table says for each stage its function, the stages whose outputs it reads, what it writes
into the workdir and how a run knows it is done; the run here, the dry run (jsim.plan) and the
prerequisite checks read it. The data set is prepared once per run, on first use, and handed to
every stage that reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from pathlib import Path
from typing import Callable

from absl import logging

from jsim import console, interrupts, parallel, validate, workdir as wd
from jsim.data import prepare as prepare_lib
from jsim.data.download import DownloadError
from jsim.models import freeze as freezing
from jsim.train import classifier, embeddings, feature_cache, similarity
from jsim.interrupts import preemption_guard
from jsim.train.loop import NonFiniteLoss, Preempted

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


def cpu_hints(config) -> list[str]:
  """Advice for settings that take hours on a CPU (printed when such a run starts, and by --dry_run)."""
  import jax

  if jax.default_backend() != "cpu" or config.stage not in ("all", "classifier", "embed", "similarity", "sweep"):
    return []
  hints = []
  if config.classifier.input_size >= 160:
    hints.append(
      f"classifier.input_size={config.classifier.input_size} on a CPU: stage 1 and the embeddings "
      f"take hours an epoch; for a first run add --config.classifier.input_size=64"
    )
  if config.model.freeze == freezing.BACKBONE and not feature_cache.applies(config):
    hints.append(
      "model.freeze=backbone with stage-1 augmentation: every epoch runs the frozen backbone on every "
      "image, and the embeddings run it again; with --config.classifier.augment.prob=0 its features are "
      "computed once (W/feature_cache) and stage 1 trains only the head on them"
    )
  return hints


def _evaluate(config, workdir: Path, data) -> dict:
  from jsim.evaluate import evaluation  # only when it runs: a stage-1 run loads no evaluator nor matplotlib

  return evaluation.evaluate(config, workdir)


def _sweep(config, workdir: Path, data) -> dict:
  from jsim.evaluate import evaluation

  return evaluation.sweep(config, workdir)


@dataclasses.dataclass(frozen=True)
class Stage:
  function: Callable  # (config, workdir, data) -> its result; data: the run's data, prepared on first call
  needs: tuple[str, ...]  # the stages whose outputs it reads, in the order they run
  writes: str  # what it writes into the workdir
  done: Callable[[Path], bool] | None  # whether its output is there (None: nothing reads it)
  missing: str = ""  # what a stage that needs it lacks, for the message
  trains: bool = False  # a SIGTERM/SIGINT anywhere in it (data loading and compilation too) stops it at a step


STAGES = {
  "prepare": Stage(
    prepare_lib.prepare_stage,
    needs=(),
    writes=f"{prepare_lib.PREPROCESSING_FILE}, split.json",
    done=None,
  ),
  "classifier": Stage(
    classifier.train_classifier,
    needs=(),
    writes=wd.STAGE1,
    done=lambda w: wd.stage_result(w, wd.STAGE1) is not None,
    missing="stage 1 has not finished",
    trains=True,
  ),
  "embed": Stage(
    embeddings.compute_embeddings,
    needs=("classifier",),
    writes=wd.EMBEDDINGS,
    done=lambda w: (w / wd.EMBEDDINGS / embeddings.META_FILE).exists(),
    missing="there are no embeddings",
  ),
  "similarity": Stage(
    lambda config, workdir, data: similarity.train_similarity(config, workdir),
    needs=("classifier",),
    writes=wd.STAGE2,
    done=lambda w: wd.stage_result(w, wd.STAGE2) is not None,
    missing="stage 2 has not finished",
    trains=True,
  ),
  "evaluate": Stage(_evaluate, needs=("classifier", "embed", "similarity"), writes="report.json, figures/", done=None),
  "sweep": Stage(_sweep, needs=("classifier",), writes="sweep/", done=None, trains=True),
}
# The stages config.stage runs: a stage runs what it needs first; finished stages and current embeddings are skipped.
CHAINS = {
  "all": ("classifier", "embed", "similarity", "evaluate"),
  "similarity": ("embed", "similarity"),
  "sweep": ("embed", "sweep"),
}


def chain(stage: str) -> tuple[str, ...]:
  """The stages --config.stage=`stage` runs, in order."""
  return CHAINS.get(stage, (stage,))


def first_missing_stage(stage: str, workdir: str | Path) -> str | None:
  """The first stage that `stage` needs and that has not run in workdir, or None."""
  workdir = Path(workdir)
  return (
    next((need for need in STAGES[stage].needs if not STAGES[need].done(workdir)), None) if stage in STAGES else None
  )


def check_prerequisites(config, workdir: str | Path) -> None:
  """FileNotFoundError naming the first stage that has to run before config.stage can (none for 'all')."""
  missing = first_missing_stage(config.stage, workdir)
  if missing is None:
    return
  # embed is run by 'similarity' itself: point at the stage that makes both.
  command = "similarity" if missing == "embed" else missing
  raise FileNotFoundError(
    f"{Path(workdir)}: {STAGES[missing].missing} (stage {config.stage!r} needs it); run "
    f"--config.stage={command} first, or --config.stage=all for every stage"
  )


def exit_code(error: Exception) -> int:
  return 0 if isinstance(error, Preempted) else 1


def run(config, workdir: str | Path) -> dict:
  """Runs config.stage in workdir and returns what the last stage returned.

  One run at a time holds the workdir (wd.locked); a run that fails, is refused or is
  interrupted removes what it made without doing any work (wd.drop_unused).
  """
  parallel.maybe_initialize_distributed()  # first: any JAX call (the device count) would prevent it
  validate.check_config(config)
  config.data.normalization = prepare_lib.resolved_normalization(config)  # a workdir records what 'auto' chose
  check_prerequisites(config, workdir)  # (before the workdir is made: a refused run leaves nothing)
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
  for hint in cpu_hints(config):
    logging.warning("%s", hint)
  data = functools.cache(lambda: prepare_lib.prepare(config, workdir))  # the run's data, prepared on first use
  _check_pair_supply(config, workdir, data)
  names = chain(config.stage)
  result, timings = None, []
  for name in names:
    interrupts.raise_if_received()
    if len(names) > 1:
      logging.info("=== %s", name)
    start = time.perf_counter()
    stage = STAGES[name]
    with preemption_guard() if stage.trains else contextlib.nullcontext() as guard:
      result = stage.function(config, workdir, data)
      if guard is not None and guard.stop_requested():  # the signal came after the last step (e.g. during the test)
        raise Preempted(
          f"{guard.signal_name} during stage {name!r}, which finished first; rerun the same command to continue"
        )
    timings.append((name, time.perf_counter() - start, console.stage_result_text(name, result)))
  # The run's config, with the finished stages' settings as they were trained (a learning rate given to a finished
  # stage changed nothing): what W/config.json's readers (predict, compare's seed groups) take it for.
  record = wd.trained_config(workdir, wd.config_to_dict(config))
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
  # Everything is written: a signal from here on (the summary's print can block on a slow reader of stdout)
  # says that the outputs are complete, instead of asking for a rerun.
  interrupts.install_after_run()
  if parallel.is_main_process():
    # One write, its newline included: a signal's line never lands in the middle of the summary's last line.
    print("\n".join(console.summary_lines(workdir, timings)) + "\n", end="", flush=True)
  return result


def _check_pair_supply(config, workdir: Path, data) -> None:
  """Refuses pair counts that the data cannot supply, before the first stage that would compile.

  The labels come from the embeddings when they exist; for 'all' on a fresh workdir,
  from the data itself (stage 1 would fail hours before stage 2 found out).
  """
  if config.stage not in ("all", "similarity", "sweep", "evaluate"):
    return
  emb_dir = workdir / wd.EMBEDDINGS
  if (emb_dir / embeddings.META_FILE).exists():
    try:
      emb = embeddings.load_embeddings(workdir, names=("train_labels", "test_labels"))
      train, test, class_ids = emb["train_labels"], emb["test_labels"], tuple(emb["meta"]["class_ids"])
    except (OSError, ValueError, KeyError, TypeError):
      return  # unreadable or changed embeddings: the stage that reads them says so (or computes them again)
  elif config.stage == "all":
    d = data()
    train, test = d.train_set.labels[d.t180_idx], d.test_set.labels[d.test_idx]
    class_ids = tuple(d.train_set.class_ids)
  else:
    return  # no embeddings yet: the stage itself asks for them
  if config.stage != "evaluate":  # for 'evaluate', stage 2 is trained already
    validate.check_pair_supply(config, train, class_ids)
  validate.check_test_pairs(config, test, class_ids)
