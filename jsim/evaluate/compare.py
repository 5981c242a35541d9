"""The source's Figure 7: both backbones' ROC curves (all / seen / unseen pairs) in one figure.

  python -m jsim.evaluate.compare WORKDIR_RESNET WORKDIR_VGG --out=roc_backbones.png

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

from jsim.evaluate import figures, pairwise
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
  report = workdir / "report.json"
  if report.is_file():
    backbone = json.loads(report.read_text()).get("backbone") or label
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

  parser = argparse.ArgumentParser(
    prog="python -m jsim.evaluate.compare",
    description="Both backbones' ROC curves (the source's Figure 7) from evaluated workdirs.",
  )
  parser.add_argument("workdirs", nargs="+", help="evaluated workdirs (each has evaluation.npz)")
  parser.add_argument("--out", default=FIGURE, help=f"output PNG (default {FIGURE})")
  args = parser.parse_args(argv)
  out = Path(args.out)
  if out.exists():
    print(f"error: {out} exists; pass another --out (nothing is overwritten)", file=sys.stderr)
    return 1
  try:
    path = roc_of_workdirs(args.workdirs, out)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
