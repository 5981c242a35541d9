"""Command line: flags only. Everything else is `jsim.run.run(config, workdir)`.

  python -m jsim.main --config=configs/resnet_cls.py --workdir=runs/resnet50 \
      [--config.classifier.num_epochs=5 ...]
"""

from __future__ import annotations

import logging as logging_std
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for split, checkpoints, metrics and reports.")
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging_std.Filter):
  """Keeps orbax's per-save INFO chatter out of the run's log (warnings still show)."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from jsim import run  # after flag parsing: keeps --help fast
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    run.run(FLAGS.config, FLAGS.workdir)
  except run.EXPECTED_ERRORS as e:
    logging.flush()
    print(f"jsim: {e}", file=sys.stderr)
    sys.exit(run.exit_code(e))


def entry_point():
  app.run(main)


if __name__ == "__main__":
  entry_point()
