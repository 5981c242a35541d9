"""config.stage -> the stage functions; 'all' chains them, skipping finished ones."""

from __future__ import annotations

from pathlib import Path

from absl import logging

from jsim import parallel, workdir as wd
from jsim.train.loop import NonFiniteLoss, Preempted

# Errors that reach the user as one line (no traceback).
EXPECTED_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, Preempted, NonFiniteLoss)


def exit_code(error: Exception) -> int:
  return 0 if isinstance(error, Preempted) else 1


def run(config, workdir: str | Path) -> dict:
  """Runs config.stage in workdir and returns what the last stage returned."""
  from jsim import validate
  validate.check_config(config)
  parallel.maybe_initialize_distributed()
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if parallel.is_main_process():
    wd.write_json(workdir / "config.json", wd.config_to_dict(config))
  stages = _stages()
  result = None
  for name in _CHAINS.get(config.stage, (config.stage,)):
    logging.info("=== %s", name)
    result = stages[name](config, workdir)
  return result


# A stage runs what it needs first; finished or current steps are skipped.
_CHAINS = {"all": ("classifier", "embed", "similarity", "evaluate"),
           "similarity": ("embed", "similarity"),
           "sweep": ("embed", "sweep")}


def _stages() -> dict:
  from jsim.evaluate.embed import compute_embeddings
  from jsim.train.classifier import train_classifier
  from jsim.train.similarity import train_similarity
  out = {"classifier": train_classifier, "embed": compute_embeddings, "similarity": train_similarity}
  try:  # lands with the evaluator
    from jsim.evaluate.evaluation import evaluate, sweep
    out.update(evaluate=evaluate, sweep=sweep)
  except ImportError:
    pass
  return out
