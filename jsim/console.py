"""What a user of `python -m jsim.main` sees: help, the resolved config, short log lines,
progress bars, and the summary at the end of a run.

Everything here is presentation; the stages call `progress`, `epoch_line` and
`once` and stay free of formatting details.
"""

from __future__ import annotations

import ast
import logging as logging_std
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from jsim.progress import duration, rate

REPO = Path(__file__).resolve().parents[1]

STAGE_HELP = (
  ("prepare", "decode and cache the data, write the split and the normalisation statistics, stop"),
  ("classifier", "stage 1: fine-tune (or train) the classifier Mc on the seen classes"),
  ("embed", "embeddings of the best stage-1 checkpoint (the input of Mc's last layer)"),
  ("similarity", "stage 2: the similarity net Ms on pairs of embeddings (runs embed first)"),
  ("evaluate", "the five-case test of Ms: report.md, report.json, figures/"),
  ("all", "classifier, embed, similarity, evaluate in turn, skipping finished ones (the default)"),
  ("sweep", "one Ms per pair feature in sweep.features, one comparison table"),
)


# ---------------------------------------------------------------------------------------------- logging


class _ShortFormatter(logging_std.Formatter):
  """'09:36:30 message' ('09:36:30 warning: message' above INFO), instead of absl's 45-character prefix."""

  def format(self, record):
    stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
    level = "" if record.levelno <= logging_std.INFO else f"{record.levelname.lower()}: "
    text = f"{stamp} {level}{record.getMessage()}"
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    return text


class _QuietFilter(logging_std.Filter):
  """Drops library chatter below WARNING (orbax's per-save lines, JAX's 'Unable to initialize backend
  tpu'), and repeats of the lines `once` marks (the data set is read by several stages of one run)."""

  def __init__(self):
    super().__init__()
    self._seen: set = set()

  def filter(self, record):
    if record.levelno < logging_std.WARNING:
      if "/orbax/" in record.pathname or record.name.startswith(("jax", "orbax", "absl.", "grain")):
        return False
      key = (record.pathname, record.lineno)
      if record.pathname.endswith(_ONCE_FILES):
        if key in self._seen:
          return False
        self._seen.add(key)
    return True


# Modules whose INFO lines describe the data set: shown the first time only.
_ONCE_FILES = ("tiny_imagenet.py", "tfds_source.py")


def setup_logging() -> None:
  """INFO lines with a short time stamp, without library chatter or repeats (for jsim.main)."""
  from absl import logging

  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  handler.setFormatter(_ShortFormatter())
  handler.addFilter(_QuietFilter())


# ---------------------------------------------------------------------------------------------- help


def config_files(folder: Path | None = None) -> list[tuple[str, str]]:
  """(path relative to the repository, first docstring line) of every configs/*.py, read without importing."""
  folder = folder or REPO / "configs"
  out = []
  for path in sorted(folder.glob("*.py")):
    try:
      doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    except (OSError, SyntaxError, ValueError):
      doc = ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ").strip() or "(no docstring)"
    first = re.sub(r"\s*\(PROTOCOL\.md[^)]*\)", "", first).rstrip(".")
    out.append((f"configs/{path.name}", first))
  return out


def help_text(prog: str = "python -m jsim.main") -> str:
  lines = [
    f"usage: {prog} --config=configs/FILE.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]",
    f"       {prog} --config=configs/FILE.py --print_config      (every key and its value, then stop)",
    f"       {prog} --config=configs/FILE.py --workdir=DIR --dry_run   (check everything, write nothing)",
    "",
    "Trains and evaluates two-stage image similarity (a classifier's embeddings, then a similarity",
    "net on |x1 - x2|) with seen/unseen classes; everything a run writes goes to --workdir, and",
    "rerunning the same command resumes or skips what is finished.",
    "",
    "stages (--config.stage=NAME):",
  ]
  width = max(len(n) for n, _ in STAGE_HELP)
  lines += [f"  {name:<{width}}  {text}" for name, text in STAGE_HELP]
  lines += ["", "configs (each file's docstring gives its command and expected result):"]
  files = config_files()
  if files:
    width = max(len(p) for p, _ in files)
    lines += [f"  {p:<{width}}  {_clip(d, 104 - width)}" for p, d in files]
  else:
    lines.append(f"  (no configs/ folder beside {REPO / 'jsim'})")
  lines += [
    "",
    "overrides: any key of the config, typed as in the config:",
    "  --config.classifier.num_epochs=5 --config.model.init=random --config.classifier.input_size=64",
    "  --config.data.root=/path/to/tiny-imagenet-200 --config.similarity.hidden='(512,256)'",
    "  --print_config lists every key, its default and the value in force.",
    "",
    "flags:",
    "  --config       the experiment config file (required)",
    "  --workdir      directory for the split, checkpoints, metrics, report (required, except with",
    "                 --print_config)",
    "  --print_config print the resolved config and stop",
    "  --dry_run      check the config, the data, the workdir, the packages, weights and disk space the",
    "                 run needs, show what would run, and stop (writes nothing)",
    "  --helpfull     every absl flag (logging and the like)",
    "",
    "Ask a trained model about your own images: jsim-predict --help",
  ]
  return "\n".join(lines) + "\n"


def _clip(text: str, width: int) -> str:
  width = max(width, 30)
  if len(text) <= width:
    return text
  return text[: width - 3].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


# ---------------------------------------------------------------------------------------------- the config


def _leaves(d: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
  if isinstance(d, dict):
    for k, v in d.items():
      yield from _leaves(v, f"{prefix}{k}.")
  else:
    yield prefix[:-1], d


def config_lines(config) -> list[str]:
  """'key = value' for every key of the resolved config, with the default where the value differs."""
  from jsim import configs, workdir as wd

  values = dict(_leaves(wd.config_to_dict(config)))
  defaults = dict(_leaves(wd.config_to_dict(configs.base_config())))
  width = min(max(len(k) for k in values), 48)
  out = []
  for key, value in values.items():
    line = f"{key:<{width}} = {value!r}"
    if key not in defaults:
      line += "   (not in the base config)"
    elif defaults[key] != value:
      line += f"   (default {defaults[key]!r})"
    out.append(line)
  return out


def print_config(config, file=None) -> None:
  file = file or sys.stdout
  try:
    print("# the resolved config: every key, the value in force, the default where it differs", file=file)
    print("\n".join(config_lines(config)), file=file, flush=True)
  except BrokenPipeError:  # `... --print_config | head`
    os.dup2(os.open(os.devnull, os.O_WRONLY), file.fileno())


# ---------------------------------------------------------------------------------------------- hints


# ---------------------------------------------------------------------------------------------- numbers


def pct(x: float | None) -> str:
  return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f} %"


def _num3(x: float | None) -> str:
  return "-" if x is None else f"{x:.3f}"


def epoch_line(name: str, row: dict, num_epochs: int) -> str:
  """One short aligned line per epoch: 'stage 1 epoch  3/16  loss 2.261 acc 24.9 % | val ...'."""
  width = len(str(num_epochs))
  if "val_precision_at_1" in row:  # a metric-learning stage 1: batch P@1, validation MAP@R and P@1
    train, val = "P@1", f"MAP@R {pct(row['val_accuracy']):>7}  P@1 {pct(row['val_precision_at_1']):>7}"
  else:
    train, val = "acc", f"loss {_num3(row['val_loss'])}  acc {pct(row['val_accuracy']):>7}"
  line = (
    f"{name} epoch {row['epoch']:>{width}}/{num_epochs}  loss {row['train_loss']:.3f}  {train} "
    f"{pct(row['train_accuracy']):>7} | val {val} | lr {row['lr']:.3g}  {rate(row['items_per_s'])}/s"
  )
  if row.get("halved") and row["epoch"] < num_epochs:
    line += f"  -> lr halved to {row['lr'] / 2:.3g}"
  elif row.get("halved"):  # the rule met after the last epoch: only a continued stage trains at that rate
    line += f"  (a continued stage would start at lr {row['lr'] / 2:.3g})"
  return line


# ---------------------------------------------------------------------------------------------- the summary


def summary_lines(workdir: Path, timings: list[tuple[str, float, str]]) -> list[str]:
  """The end of a run: each stage's time and result, then where the report and figures are."""
  lines = ["", f"done in {duration(sum(t for _, t, _ in timings))}:"]
  width = max(len(n) for n, _, _ in timings) if timings else 0
  for name, seconds, result in timings:
    lines.append(f"  {name:<{width}}  {duration(seconds):>12}  {result}")
  report = workdir / "report.md"
  if report.exists():
    lines.append(f"report:  {report}")
    figures = sorted((workdir / "figures").glob("*.png"))
    if figures:
      lines.append(f"figures: {workdir / 'figures'}/ ({', '.join(p.name for p in figures)})")
  if any(workdir.glob("*/tb")) or any(workdir.glob("*/*/tb")):  # (a prepare-only run has no event files)
    lines.append(f"tensorboard --logdir {workdir}   (pip install tensorboard)")
  return lines


def stage1_test_text(result: dict) -> str:
  """Stage 1's test figure: the classifier's accuracy, or a metric-learned embedding's MAP@R and P@1."""
  if "test_accuracy" in result or "test_map@r" not in result:
    return f"test accuracy {pct(result.get('test_accuracy'))}"
  return f"test MAP@R {pct(result.get('test_map@r'))}, P@1 {pct(result.get('test_precision@1'))}"


def stage_result_text(name: str, result: Any) -> str:
  """One phrase of what a stage produced, for the summary."""
  r = result if isinstance(result, dict) else {}
  if name == "prepare":
    return (
      f"{r.get('seen_classes')} seen / {r.get('unseen_classes')} unseen classes, {r.get('train', 0):,} + "
      f"{r.get('val', 0):,} + {r.get('test', 0):,} images"
    )
  if name == "classifier":
    return (
      f"{stage1_test_text(r)} on {r.get('test_images', 0):,} seen-class images "
      f"(best epoch {r.get('best_epoch')} of {r.get('epochs')})"
    )
  if name == "embed":
    return f"{r.get('train_count', 0):,} + {r.get('test_count', 0):,} images, {r.get('dim')}-d"
  if name == "similarity":
    return (
      f"validation accuracy {pct(r.get('best_val_accuracy'))} (best epoch {r.get('best_epoch')} of {r.get('epochs')})"
    )
  if name == "evaluate":
    return (
      f"test accuracy {pct(r.get('accuracy'))}: seen {pct(r.get('seen_accuracy'))}, unseen "
      f"{pct(r.get('unseen_accuracy'))}, AUC {r.get('auc', float('nan')):.3f}"
    )
  if name == "sweep":
    return f"{len(r.get('rows', []))} pair features compared"
  return ""
