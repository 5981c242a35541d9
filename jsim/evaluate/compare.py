"""The source's Figure 7: both backbones' ROC curves (all / seen / unseen pairs) in one figure,
and one table of any number of evaluated workdirs (methods, losses, backbones).

  python -m jsim.evaluate.compare WORKDIR_RESNET WORKDIR_VGG --out=roc_backbones.png
  python -m jsim.evaluate.compare runs/ce runs/ms runs/pa --out=roc.png --table=comparison.md

The table (markdown, and the rows as JSON beside it) has per workdir the stage-1 loss,
how pairs are scored, the five cases, overall / seen / unseen accuracy at 0.5, the
balanced mean of cases 4 and 5, AUC overall and unseen, and P@1 / MAP@R of the seen and
of the unseen test images (report.json's figures).

Each workdir must have been evaluated (stage `evaluate`, which writes W/evaluation.npz,
the test pairs' score histograms, beside report.json). A curve is labelled with the
workdir's backbone (ResNet50, VGG16, ...), or the workdir's name when two share one.
`evaluation.compare_workdirs=(W2,)` makes the evaluation of a run draw the same figure
with the other workdirs' curves in W/figures/roc_backbones.png.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from jsim.evaluate import figures, pairwise, report
from jsim.published import BACKBONE_TITLES

RESULT_FILE = "evaluation.npz"
FIGURE = "roc_backbones.png"


def load_evaluated(workdir: str | Path) -> tuple[str, pairwise.PairEvalResult]:
  """(backbone label, test-pair result) of an evaluated workdir; ValueError naming what is missing."""
  workdir = Path(workdir)
  path = workdir / RESULT_FILE
  if not path.is_file():
    raise ValueError(f"{path} is missing: evaluate that workdir first (--config.stage=evaluate)")
  label = workdir.name
  if (workdir / "report.json").is_file():
    backbone = _read_report(workdir).get("backbone") or label
    label = "+".join(BACKBONE_TITLES.get(b, b) for b in backbone.split("+"))
  return label, pairwise.load_result(path)


def roc_of_workdirs(workdirs: Sequence[str | Path], out_png: str | Path, extra: dict | None = None) -> Path:
  """Figure 7 from evaluated workdirs (plus `extra` {label: PairEvalResult} drawn first)."""
  results = dict(extra or {})
  loaded = [load_evaluated(w) for w in workdirs]
  for (label, result), w in zip(loaded, workdirs):
    if label in results or sum(lab == label for lab, _ in loaded) > 1:
      label = f"{label} ({Path(w).name})"
    results[label] = result
  return figures.plot_roc_backbones(results, out_png)


def main(argv: Sequence[str] | None = None) -> int:
  import argparse

  class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every jsim command says it
      print(f"jsim: {message} (see --help)", file=sys.stderr)
      sys.exit(2)

  parser = Parser(
    prog="python -m jsim.evaluate.compare",
    description="The ROC curves of evaluated workdirs side by side (with a ResNet50 and a VGG16 workdir: the "
    "source's Figure 7), and a table of their report.json figures.",
  )
  parser.add_argument("workdirs", nargs="+", help="evaluated workdirs (each has evaluation.npz)")
  parser.add_argument("--out", default=FIGURE, help=f"output PNG (default {FIGURE})")
  parser.add_argument("--table", default="", help="also write this markdown table (and its .json) of the workdirs")
  args = parser.parse_args(argv)
  out, table = Path(args.out), Path(args.table) if args.table else None
  for path in (out, table, table and table.with_suffix(".json")):
    if path is not None and path.exists():
      print(f"jsim: {path} exists; pass another path (nothing is overwritten)", file=sys.stderr)
      return 1
  try:
    rows = [report.comparison_row(_read_report(w), Path(w).name) for w in args.workdirs] if table else []
    print(f"wrote {roc_of_workdirs(args.workdirs, out)} (ROC curves of {len(args.workdirs)} workdirs)")
    if table:
      text = report.write_comparison(rows, table, table.with_suffix(".json"))
      print(f"wrote {table} and {table.with_suffix('.json')}:\n{text}", end="")
  except (ValueError, OSError, KeyError) as e:
    print(f"jsim: {e}", file=sys.stderr)
    return 1
  return 0


def _read_report(workdir: str | Path) -> dict:
  path = Path(workdir) / "report.json"
  if not path.is_file():
    raise ValueError(f"{path} is missing: evaluate that workdir first (--config.stage=evaluate)")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not JSON ({e})") from None


if __name__ == "__main__":
  sys.exit(main())
