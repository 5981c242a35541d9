"""The source's Figure 7: both backbones' ROC curves (all / seen / unseen pairs) in one figure,
and one table of any number of evaluated workdirs (methods, losses, backbones).

  python -m jsim.evaluate.compare WORKDIR_RESNET WORKDIR_VGG --out=roc_backbones.png
  python -m jsim.evaluate.compare runs/ce runs/ms runs/pa --out=roc.png --table=comparison.md

The table (markdown, and the rows as JSON beside it) has per workdir the stage-1 loss,
how pairs are scored, the five cases, overall / seen / unseen accuracy at 0.5, the
balanced mean of cases 4 and 5, AUC overall and unseen, and P@1 / MAP@R of the seen and
of the unseen test images (report.json's figures). Workdirs whose runs differ only in the
seed (their config.json, `python -m jsim.sweep --seeds=...`) make one row per method: each
figure the mean ± standard deviation over the seeds, and the seeds in a column.

Each workdir must have been evaluated (stage `evaluate`, which writes W/evaluation.npz,
the test pairs' score histograms, beside report.json). A curve is labelled with the
workdir's backbone (ResNet50, VGG16, ...), or the workdir's name when two share one.
`evaluation.compare_workdirs=(W2,)` makes the evaluation of a run draw the same figure
with the other workdirs' curves in W/figures/roc_backbones.png.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

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

  parser = argparse.ArgumentParser(
    prog="python -m jsim.evaluate.compare",
    description="Both backbones' ROC curves (the source's Figure 7) from evaluated workdirs, and a table of them.",
  )
  parser.add_argument("workdirs", nargs="+", help="evaluated workdirs (each has evaluation.npz)")
  parser.add_argument("--out", default=FIGURE, help=f"output PNG (default {FIGURE})")
  parser.add_argument("--table", default="", help="also write this markdown table (and its .json) of the workdirs")
  args = parser.parse_args(argv)
  out, table = Path(args.out), Path(args.table) if args.table else None
  for path in (out, table, table and table.with_suffix(".json")):
    if path is not None and path.exists():
      print(f"error: {path} exists; pass another path (nothing is overwritten)", file=sys.stderr)
      return 1
  try:
    rows = comparison_rows(args.workdirs) if table else []
    print(roc_of_workdirs(args.workdirs, out))
    if table:
      print(report.write_comparison(rows, table, table.with_suffix(".json")), end="")
  except (ValueError, OSError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


# Config keys that do not make a method: workdirs that differ only in these are its seeds.
NOT_THE_METHOD = ("seed", "overwrite", "stage")
_SEED_IN_NAME = re.compile(r"(^|[,_+-])seed=?\d+(?=$|[,_+-])")


def _method_key(workdir: Path) -> str:
  """What a workdir's run was, its seed left out: its resolved config (config.json) as JSON, or (without
  a readable config.json) its path, a group of its own."""
  try:
    config = json.loads((workdir / "config.json").read_text())
  except (OSError, ValueError):
    return f"workdir:{workdir.resolve()}"
  return json.dumps({k: v for k, v in config.items() if k not in NOT_THE_METHOD}, sort_keys=True)


def _seed(workdir: Path):
  try:
    return json.loads((workdir / "config.json").read_text()).get("seed")
  except (OSError, ValueError, AttributeError):
    return None


def seed_groups(workdirs: Sequence[str | Path]) -> list[list[Path]]:
  """The workdirs grouped by method: those whose config.json differ only in the seed (NOT_THE_METHOD),
  in the order first named. ValueError for two workdirs of the same method and seed (the same run twice:
  its spread would not be the seeds')."""
  groups: dict[str, list[Path]] = {}
  for w in map(Path, workdirs):
    groups.setdefault(_method_key(w), []).append(w)
  for members in groups.values():
    seeds = [_seed(w) for w in members]
    for i, s in enumerate(seeds):
      if s in seeds[:i]:
        other = members[seeds.index(s)]
        raise ValueError(f"{other} and {members[i]} are the same run (same config, seed {s}): name each run once")
  return list(groups.values())


def group_name(members: Sequence[Path]) -> str:
  """A method's name: its workdirs' name without the seed ('lr=0.1,seed=0' -> 'lr=0.1') where they agree
  on one, else their names joined by '+'."""
  names = {_SEED_IN_NAME.sub("", w.name).strip(",_+-") or w.parent.name for w in members}
  return names.pop() if len(names) == 1 else "+".join(w.name for w in members)


def mean_row(rows: Sequence[dict], seeds: Sequence, name: str) -> dict:
  """One row for a method over its seeds: each number the mean (KEY) and sample standard deviation
  (KEY_std, ddof=1; 0 for one seed) of its runs; other values kept where the runs agree, else None."""
  out = {"name": name, "seeds": ",".join(str(s) for s in seeds)}
  for key in rows[0]:
    if key == "name":
      continue
    values = [r.get(key) for r in rows]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
      x = np.asarray(values, np.float64)
      out[key] = float(x.mean())
      out[f"{key}_std"] = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    else:
      out[key] = values[0] if all(v == values[0] for v in values) else None
  return out


def comparison_rows(workdirs: Sequence[str | Path]) -> list[dict]:
  """The table's rows: one per workdir (report.comparison_row); where several workdirs differ only in the
  seed, one per method with the mean and standard deviation over its seeds (`mean_row`)."""
  groups = seed_groups(workdirs)
  rows = {w: report.comparison_row(_read_report(w), w.name) for members in groups for w in members}
  if all(len(members) == 1 for members in groups):
    return [rows[members[0]] for members in groups]
  return [mean_row([rows[w] for w in members], [_seed(w) for w in members], group_name(members)) for members in groups]


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
