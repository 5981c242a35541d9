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
workdir's backbone (ResNet50, VGG16, ...), or, where that does not name it alone, with
its method's name in the table; a method's seeds are one legend entry (their curves in one
colour, the mean and standard deviation of their AUC).
`evaluation.compare_workdirs=(W2,)` makes the evaluation of a run draw the same figure
with the other workdirs' curves in W/figures/roc_backbones.png.
"""

from __future__ import annotations

import json
import re
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jsim import workdir as wd
from jsim.evaluate import figures, pairwise, report
from jsim.published import BACKBONE_TITLES

RESULT_FILE = "evaluation.npz"
RESULT_DIGEST = "evaluation_sha256"  # report.json's extra: the SHA-256 of the evaluation.npz written with it
FIGURE = "roc_backbones.png"
_REDO = "rerun --config.stage=evaluate --config.overwrite=True on that workdir"


def _workdir(workdir: str | Path) -> Path:
  w = Path(workdir)
  if not w.exists():
    raise FileNotFoundError(f"{w}: no such workdir")
  if not w.is_dir():
    raise NotADirectoryError(f"{w}: a file, not a workdir")
  return w


def read_current_report(workdir: str | Path) -> dict:
  """W/report.json, refused (one line naming it) when it is damaged or evaluated stages that W no longer holds."""
  w = _workdir(workdir)
  rep = wd.read_report(w)
  why = wd.report_problem(w, rep)
  if why is not None:
    raise ValueError(f"{why}; {_REDO}")
  return rep


def load_evaluated(workdir: str | Path) -> tuple[str, pairwise.PairEvalResult]:
  """(backbone label, test-pair result) of an evaluated workdir; one-line errors naming what is missing or stale.

  evaluation.npz is read only beside the report.json it was written with, of the stages W holds now.
  """
  w = _workdir(workdir)
  path = w / RESULT_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: evaluate that workdir first (--config.stage=evaluate)")
  rep = read_current_report(w)
  recorded = rep["extra"].get(RESULT_DIGEST)
  if recorded is not None and recorded != wd.file_digest(path):
    raise ValueError(f"{path} is not the evaluation that {w / wd.REPORT_FILE} was written with; {_REDO}")
  backbone = rep.get("backbone") or w.name
  label = "+".join(BACKBONE_TITLES.get(b, b) for b in str(backbone).split("+"))
  try:
    return label, pairwise.load_result(path)
  except (OSError, EOFError, zipfile.BadZipFile, KeyError, ValueError) as e:
    text = (str(e).strip().splitlines() or [""])[0][:200]
    raise ValueError(f"{path}: damaged or truncated ({type(e).__name__}: {text}); {_REDO}") from None


def split_ids(workdirs: Sequence[str | Path]) -> list[str | None]:
  """The first 12 hex digits of each workdir's split.json digest (None without one)."""
  return [(d or "")[:12] or None for d in (wd.split_digest(_workdir(w)) for w in workdirs)]


def roc_of_workdirs(workdirs: Sequence[str | Path], out_png: str | Path, extra: dict | None = None) -> Path:
  """Figure 7 from evaluated workdirs (plus `extra` {label: PairEvalResult} drawn first). A workdir is labelled
  with its backbone (ResNet50, VGG16, ...) where that names it alone; otherwise with the table's name of its
  method (`distinct_names`), after its backbone where the backbones differ. A method's seeds (`seed_groups`)
  are one entry: their curves in one colour, their AUC's mean and spread."""
  results = dict(extra or {})
  loaded = {Path(w): load_evaluated(w) for w in workdirs}
  groups = seed_groups(workdirs)
  backbones = [loaded[members[0]][0] for members in groups]
  for members, name, backbone in zip(groups, distinct_names(groups), backbones):
    if len(members) == 1 and backbones.count(backbone) == 1 and backbone not in results:
      label = backbone
    elif len(set(backbones)) == 1 and name not in results:
      label = name
    else:
      label = f"{backbone} ({name})"
    if label in results:
      label = f"{label} ({members[0]})"
    curves = [loaded[w][1] for w in members]
    results[label] = curves[0] if len(curves) == 1 else curves
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
  written = []  # (a failed command removes what it wrote: its rerun would refuse those paths)
  try:
    splits = split_ids(args.workdirs)
    # Seeds of one method are split differently by design; methods compare fairly when each ran on the same splits.
    split_of = dict(zip(map(Path, args.workdirs), splits))
    differ = len({frozenset(split_of[w] for w in members) for members in seed_groups(args.workdirs)}) > 1
    rows = comparison_rows(args.workdirs, splits if differ else None) if table else []
    written.append(roc_of_workdirs(args.workdirs, out))
    if table:
      written.append(table)  # (write_comparison writes each file whole or not at all)
      text = report.write_comparison(rows, table, table.with_suffix(".json"))
    print(f"wrote {out} (ROC curves of {len(args.workdirs)} workdirs)")
    if table:
      print(f"wrote {table} and {table.with_suffix('.json')}:\n{text}", end="")
    if differ:
      print(
        f"warning: the workdirs were split differently (split.json {', '.join(str(s) for s in splits)}: "
        f"other seen/unseen classes or test images), so their figures are not on the same test pairs"
        + (" (the table's split column says which)" if table else ""),
        file=sys.stderr,
      )
  except (ValueError, OSError, KeyError) as e:
    for path in written:
      path.unlink(missing_ok=True)
    print(f"jsim: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
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


def distinct_names(groups: Sequence[Sequence[Path]]) -> list[str]:
  """Each group's `group_name`; where the groups come from several folders (sweeps of several losses,
  which name their runs alike), prefixed by its folder's name: ms/lr=0.01 and pa/lr=0.01, not lr=0.01
  twice. Names that still coincide are the workdirs' paths."""
  names = [group_name(members) for members in groups]
  parents = [Path(members[0]).absolute().parent for members in groups]
  if len(set(parents)) > 1:
    names = [n if n == p.name else f"{p.name}/{n}" for p, n in zip(parents, names)]
  if len(set(names)) < len(names):
    names = ["+".join(str(w) for w in members) for members in groups]
  return names


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


def _row(workdir: Path, split: str | None) -> dict:
  """report.comparison_row of a workdir's current report (with its split where `split` is given)."""
  try:
    row = report.comparison_row(read_current_report(workdir), workdir.name)
  except (KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{workdir / wd.REPORT_FILE}: not a jsim report ({type(e).__name__}: {e}); {_REDO}") from None
  return row if split is None else {**row, "split": split}


def comparison_rows(workdirs: Sequence[str | Path], splits: Sequence[str | None] | None = None) -> list[dict]:
  """The table's rows: one per workdir (report.comparison_row); where several workdirs differ only in the
  seed, one per method with the mean and standard deviation over its seeds (`mean_row`). `splits` (one per
  workdir) adds a split column, which flags workdirs split differently."""
  groups = seed_groups(workdirs)
  split_of = dict(zip(map(Path, workdirs), splits)) if splits is not None else {}
  rows = {w: _row(w, split_of.get(w)) for members in groups for w in members}
  names = distinct_names(groups)
  if all(len(members) == 1 for members in groups):
    return [{**rows[members[0]], "name": name} for members, name in zip(groups, names)]
  return [
    mean_row([rows[w] for w in members], [_seed(w) for w in members], name) for members, name in zip(groups, names)
  ]


if __name__ == "__main__":
  sys.exit(main())
