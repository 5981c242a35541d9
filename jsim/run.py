"""config.stage -> the stage functions; 'all' chains them, skipping finished ones."""

from __future__ import annotations

from pathlib import Path

from absl import logging

from jsim import configs, parallel, workdir as wd
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
  if config.stage == "all":
    result = None
    for name in ("classifier", "embed", "similarity", "evaluate"):
      logging.info("=== %s", name)
      result = stages[name](config, workdir)
    return result
  return stages[config.stage](config, workdir)


def _stages() -> dict:
  from jsim.train.classifier import train_classifier
  out = {"classifier": train_classifier}
  try:  # stage 2 and evaluation (jsim.stages) land with the stage-2 issue
    from jsim import stages
    out.update(stages.STAGES)
  except ImportError:
    pass
  missing = set(configs.STAGES) - set(out)
  for name in missing:
    out[name] = _missing(name)
  return out


def _missing(name):
  def fn(config, workdir):
    raise ValueError(f"stage={name!r} is not available in this build")
  return fn
