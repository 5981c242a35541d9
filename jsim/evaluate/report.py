"""report.json / report.md of an evaluation, beside the published numbers, and sweep tables.

Accuracies and AUCs are fractions in [0, 1] in every JSON file (published numbers
included, converted from the source's percentages); the markdown shows percentages.
NaN (e.g. a case without pairs) is written as null in JSON and '-' in markdown.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jsim import workdir as wd
from jsim.data.pairs import CASE_NAMES, UNSEEN_CASES
from jsim.evaluate.pairwise import PairEvalResult
from jsim.published import BACKBONE_TITLES, PUBLISHED, published  # noqa: F401  (one place; re-exported)

UNSEEN_IN_ALL = "unseen classes among all test images"
GROUP_ROWS = (
  ("all", "all (1-5)", "test_accuracy"),
  ("seen", "seen (1-2)", "seen_accuracy"),
  ("unseen", "unseen (4-5)", "unseen_accuracy"),
)
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def _clean(x: Any) -> Any:
  """JSON-ready copy: NaN/inf -> None, numpy scalars/arrays -> Python, tuples -> lists, keys -> str."""
  if isinstance(x, dict):
    return {str(k): _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  if isinstance(x, np.ndarray):
    return _clean(x.tolist())
  if isinstance(x, (np.bool_, bool)):
    return bool(x)
  if isinstance(x, (np.integer, int)):
    return int(x)
  if isinstance(x, (np.floating, float)):
    return float(x) if math.isfinite(float(x)) else None
  if x is None or isinstance(x, str):
    return x
  if hasattr(x, "to_dict"):  # ml_collections.ConfigDict
    return _clean(x.to_dict())
  return str(x)


def _pct(v: float | None, digits: int = 2) -> str:
  return "-" if v is None or not math.isfinite(v) else f"{100 * v:.{digits}f} %"


def _frac(percent: float | None) -> float | None:
  return None if percent is None else percent / 100.0


def _num(v: float | None, digits: int = 4) -> str:
  return "-" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def report_config(config_dict: Any) -> Any:
  """The config as report.json records it (JSON types: lists for tuples, None for NaN)."""
  return _clean(config_dict)


def report_dict(
  result: PairEvalResult,
  *,
  val_threshold: float | None,
  backbone: str,
  config_dict: Any = None,
  retrieval: dict | None = None,
  extra: dict | None = None,
  method: dict | None = None,
  embedding_retrieval: dict | None = None,
) -> dict:
  """The content of report.json (see `write_report`)."""
  if val_threshold is not None and not math.isclose(val_threshold, result.threshold, abs_tol=1e-9):
    raise ValueError(
      f"val_threshold={val_threshold} differs from the threshold the result was counted at "
      f"({result.threshold}); evaluate with threshold=val_threshold"
    )
  pub = published(backbone)
  acc05, acct = result.case_accuracy("0.5"), result.case_accuracy("threshold")
  cases = [
    {
      "case": c,
      "name": CASE_NAMES[c],
      "pairs": int(result.count[c - 1]),
      "accuracy_at_0.5": acc05[c],
      "accuracy_at_val_threshold": acct[c],
      "published_accuracy": _frac(pub["case_accuracy"][c]) if pub else None,
    }
    for c in CASE_NAMES
  ]
  groups = {"overall": "all", "seen": "seen", "unseen": "unseen"}
  out = {
    "backbone": backbone,
    "mode": result.mode,
    "num_pairs": result.num_pairs,
    "num_bins": result.num_bins,
    "val_threshold": result.threshold,
    "pairs_per_s": result.pairs_per_s,
    "cases": cases,
    "accuracy_at_0.5": {k: result.accuracy(g, "0.5") for k, g in groups.items()},
    "accuracy_at_val_threshold": {k: result.accuracy(g, "threshold") for k, g in groups.items()},
    "auc": {k: result.auc(g) for k, g in groups.items()},
    "published": None
    if pub is None
    else {
      "overall": _frac(pub["test_accuracy"]),
      "seen": _frac(pub["seen_accuracy"]),
      "unseen": _frac(pub["unseen_accuracy"]),
      "stage2_val_accuracy": _frac(pub["stage2_val_accuracy"]),
      "stage1_test_accuracy": _frac(pub["stage1_test_accuracy"]),
    },
    "retrieval": retrieval,
    # Case 4 outweighs case 5 about ten to one in the pair-weighted unseen figure: their plain mean too.
    "balanced_unseen_accuracy": {
      "at_0.5": _mean_of(acc05, UNSEEN_CASES),
      "at_val_threshold": _mean_of(acct, UNSEEN_CASES),
    },
    "method": method,
    "embedding_retrieval": embedding_retrieval,
    "config": config_dict,
    "extra": extra or {},
  }
  return _clean(out)


def _published_columns(report: dict) -> list[tuple[str, dict[int, float | None], dict[str, float | None]]]:
  """(header, case -> fraction, group -> fraction) of the published numbers to show beside a report.

  The report's own backbone if the source has numbers for it; otherwise ResNet50's and
  VGG16's, labelled as such, for scale.
  """
  if report["published"] is not None:
    title = BACKBONE_TITLES.get(report["backbone"], report["backbone"])
    cases = {c["case"]: c["published_accuracy"] for c in report["cases"]}
    return [(f"published {title}", cases, report["published"])]
  out = []
  for name, title in BACKBONE_TITLES.items():
    pub = published(name)
    cases = {c: _frac(v) for c, v in pub["case_accuracy"].items()}
    groups = {
      "overall": _frac(pub["test_accuracy"]),
      "seen": _frac(pub["seen_accuracy"]),
      "unseen": _frac(pub["unseen_accuracy"]),
    }
    out.append((f"published {title} (for scale)", cases, groups))
  return out


def _mean_of(case_accuracy: dict, cases) -> float | None:
  values = [case_accuracy[c] for c in cases if case_accuracy.get(c) is not None and math.isfinite(case_accuracy[c])]
  return sum(values) / len(values) if len(values) == len(cases) else None


def case_table_markdown(report: dict) -> str:
  """The five-case table (plus all / seen / unseen rows) of a report dict, beside the published numbers."""
  t = report["val_threshold"]
  columns = _published_columns(report)
  lines = [
    f"| case | pairs | accuracy (p > 0.5) | accuracy (p > {t:.3f}, val threshold) | "
    + " | ".join(h for h, _, _ in columns)
    + " |",
    "|---|---:|---:|---:|" + "---:|" * len(columns),
  ]
  for c in report["cases"]:
    lines.append(
      f"| {c['case']}. {c['name']} | {c['pairs']:,} | {_pct(c['accuracy_at_0.5'])} | "
      f"{_pct(c['accuracy_at_val_threshold'])} | "
      + " | ".join(_pct(cases.get(c["case"])) for _, cases, _ in columns)
      + " |"
    )
  counts = {c["case"]: c["pairs"] for c in report["cases"]}
  for key, label, _ in GROUP_ROWS:
    name = "overall" if key == "all" else key
    n = sum(counts[c] for c in {"all": (1, 2, 3, 4, 5), "seen": (1, 2), "unseen": (4, 5)}[key])
    lines.append(
      f"| **{label}** | {n:,} | {_pct(report['accuracy_at_0.5'][name])} | "
      f"{_pct(report['accuracy_at_val_threshold'][name])} | "
      + " | ".join(_pct(groups.get(name)) for _, _, groups in columns)
      + " |"
    )
  return "\n".join(lines) + "\n"


def _markdown(report: dict, table: str, figures: list[str]) -> str:
  title = BACKBONE_TITLES.get(report["backbone"], report["backbone"])
  auc = report["auc"]
  parts = [
    f"# Similarity evaluation: {title}\n",
    f"{report['num_pairs']:,} test pairs ({report['mode']}); validation threshold "
    f"{report['val_threshold']:.3f}; accuracies are exact counts, AUCs from {report['num_bins']}-bin "
    "score histograms.\n",
    "## Accuracy per case\n",
    table,
    "Published seen numbers are the source's section 6 (cases 1-2 weighted by their pair counts), "
    "unseen the abstract's (ResNet50 only); '-' where the source gives none."
    + (
      " The source did not use this backbone: its ResNet50 and VGG16 numbers (Tiny ImageNet, 180 seen "
      "classes) are there for scale only."
      if report["published"] is None
      else ""
    )
    + "\n",
    "## ROC AUC\n",
    "| pairs | all (1-5) | seen (1-2) | unseen (4-5) |",
    "|---|---:|---:|---:|",
    f"| AUC | {_num(auc['overall'])} | {_num(auc['seen'])} | {_num(auc['unseen'])} |\n",
    "(The source publishes ROC curves but no AUC values.)\n",
  ]
  if report.get("method"):
    m = report["method"]
    parts.insert(1, f"Stage 1 trained by {m.get('stage1_loss')}; pairs scored by {m.get('similarity')}.\n")
  if report.get("balanced_unseen_accuracy", {}).get("at_0.5") is not None:
    b = report["balanced_unseen_accuracy"]
    parts += [
      f"Balanced unseen accuracy (mean of cases 4 and 5): {_pct(b['at_0.5'])} at 0.5, "
      f"{_pct(b['at_val_threshold'])} at the validation threshold.\n"
    ]
  er = report.get("embedding_retrieval") or {}
  if er.get("seen") or er.get("unseen"):
    parts += [
      f"## Retrieval by embedding distance ({er['distance']} between embeddings, no Ms; each set among itself, "
      "and the unseen against all test images)\n",
      "| test images | P@1 | R-precision | MAP@R | NMI (k-means) | queries |",
      "|---|---:|---:|---:|---:|---:|",
    ]
    for name, title in (("seen", "seen classes"), ("unseen", "unseen classes"), ("unseen_in_all", UNSEEN_IN_ALL)):
      if er.get(name):
        r = er[name]
        parts.append(
          f"| {title} | {_pct(r['precision@1'])} | {_pct(r['r_precision'])} | "
          f"{_pct(r['map@r'])} | {_num(r.get('nmi'))} | {r['num_queries']} |"
        )
    parts.append("")
  if report.get("retrieval"):
    r = report["retrieval"]
    keys = [k for k in r if k.startswith("recall@") or k == "mAP"]
    parts += [
      "## Retrieval by Ms (test images of the unseen classes, ranked by P(same) with the query)\n",
      "| " + " | ".join(keys) + " | queries |",
      "|" + "---:|" * (len(keys) + 1),
      "| " + " | ".join(_pct(r[k]) for k in keys) + f" | {r.get('num_queries', '-')} |\n",
    ]
  if figures:
    parts += ["## Figures\n"] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
  return "\n".join(parts)


def write_report(
  out_dir: str | Path,
  result: PairEvalResult,
  *,
  val_threshold: float | None,
  backbone: str,
  config_dict: Any = None,
  retrieval: dict | None = None,
  extra: dict | None = None,
  method: dict | None = None,
  embedding_retrieval: dict | None = None,
) -> str:
  """Writes out_dir/report.json and out_dir/report.md; returns the markdown case table.

  report.json: pair counts and accuracy per case, overall / seen / unseen accuracy at 0.5
  and at the validation threshold, AUCs, the published numbers for `backbone` (null for
  another backbone), retrieval metrics, the config and `extra`. report.md: the same as
  tables (a '-' where the source has no number) and links to out_dir/figures/*.png.
  `val_threshold` must be the threshold `result` was evaluated with (None: take it from result).
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  report = report_dict(
    result,
    val_threshold=val_threshold,
    backbone=backbone,
    config_dict=config_dict,
    retrieval=retrieval,
    extra=extra,
    method=method,
    embedding_retrieval=embedding_retrieval,
  )
  table = case_table_markdown(report)
  figures = sorted(f"figures/{p.name}" for p in (out_dir / "figures").glob("*.png"))
  text = json.dumps(report, indent=2, allow_nan=False) + "\n"
  wd.write_file(out_dir / REPORT_MD, lambda tmp: Path(tmp).write_text(_markdown(report, table, figures)))
  # report.json last: it is what says the evaluation is done (evaluation.changes_since_report), so a signal
  # between the two leaves a report that is redone, never a current report.json beside a missing or older report.md
  wd.write_file(out_dir / REPORT_JSON, lambda tmp: Path(tmp).write_text(text))
  return table


# ---------------------------------------------------------------------------
# The research sweep.

COMPARISON_COLUMNS: tuple[tuple[str, str, str], ...] = (
  # key, header, format ('pct' | 'num' | 'str'); the sweep's rows and comparison_row's
  ("name", "run", "str"),
  ("seeds", "seeds", "str"),
  ("backbone", "backbone", "str"),
  ("stage1_loss", "stage 1 loss", "str"),
  ("similarity", "pairs scored by", "str"),
  ("feature", "feature", "str"),
  ("val_accuracy", "val accuracy", "pct"),
  ("test_accuracy", "test accuracy", "pct"),
  *((f"case_{k}", f"case {k}", "pct") for k in range(1, 6)),
  ("overall_accuracy", "overall", "pct"),
  ("seen_accuracy", "seen (1-2)", "pct"),
  ("unseen_accuracy", "unseen (4-5)", "pct"),
  ("balanced_unseen_accuracy", "balanced (4, 5)", "pct"),
  ("auc", "AUC", "num"),
  ("unseen_auc", "unseen AUC", "num"),
  ("seen_precision@1", "P@1 seen", "pct"),
  ("unseen_precision@1", "P@1 unseen", "pct"),
  ("seen_map@r", "MAP@R seen", "pct"),
  ("unseen_map@r", "MAP@R unseen", "pct"),
  ("unseen_in_all_precision@1", "P@1 unseen in all", "pct"),
  ("unseen_in_all_map@r", "MAP@R unseen in all", "pct"),
)


def comparison_row(report: dict, name: str) -> dict:
  """A report.json as one row of write_comparison: the method, the five cases and the seen/unseen figures at 0.5."""
  at = report["accuracy_at_0.5"]
  method = report.get("method") or {}  # (older reports have no method: cross-entropy)
  row = {
    "name": name,
    "backbone": report.get("backbone"),
    "stage1_loss": method.get("stage1_loss", "cross_entropy"),
    "similarity": method.get("similarity"),
    **{f"case_{c['case']}": c["accuracy_at_0.5"] for c in report["cases"]},
    "overall_accuracy": at["overall"],
    "seen_accuracy": at["seen"],
    "unseen_accuracy": at["unseen"],
    "balanced_unseen_accuracy": (report.get("balanced_unseen_accuracy") or {}).get("at_0.5"),
    "auc": report["auc"]["overall"],
    "unseen_auc": report["auc"]["unseen"],
  }
  for part in ("seen", "unseen", "unseen_in_all"):
    for key in ("precision@1", "map@r"):
      row[f"{part}_{key}"] = ((report.get("embedding_retrieval") or {}).get(part) or {}).get(key)
  return row


def _cell(v: Any, fmt: str, std: float | None = None) -> str:
  """A table cell; with `std` (a mean over seeds): 'mean ± std'."""
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "-"
  if std is not None and fmt in ("pct", "num"):
    scale, digits, unit = (100.0, 2, " %") if fmt == "pct" else (1.0, 4, "")
    return f"{scale * float(v):.{digits}f} ± {scale * float(std):.{digits}f}{unit}"
  if fmt == "pct":
    return _pct(float(v))
  if fmt == "num":
    return _num(float(v))
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def write_comparison(rows: Sequence[dict], out_md: str | Path, out_json: str | Path) -> str:
  """A comparison table of sweep runs -> markdown at out_md, the rows at out_json; returns the markdown.

  Each row is a dict with any of: name, backbone, feature, val_accuracy, test_accuracy,
  seen_accuracy, unseen_accuracy (fractions), auc; missing values show as '-'. Columns no
  row has are left out; other keys become extra columns after the known ones. A row over
  several seeds has `seeds` and, beside a figure KEY that is their mean, KEY_std (shown as
  'mean ± std').
  """
  rows = [dict(r) for r in rows]
  if not rows:
    raise ValueError("write_comparison: no rows")
  known = [c for c in COMPARISON_COLUMNS if any(c[0] in r for r in rows)]
  known_keys = {c[0] for c in COMPARISON_COLUMNS} | {f"{c[0]}_std" for c in COMPARISON_COLUMNS}
  extra = []
  for r in rows:
    extra += [k for k in r if k not in known_keys and k not in extra]
  columns = known + [(k, k, "str") for k in extra]
  lines = [
    "| " + " | ".join(h for _, h, _ in columns) + " |",
    "|" + "|".join("---" if f == "str" else "---:" for _, _, f in columns) + "|",
  ]
  for r in rows:
    lines.append("| " + " | ".join(_cell(r.get(k), f, r.get(f"{k}_std")) for k, _, f in columns) + " |")
  md = "\n".join(lines) + "\n"
  text = json.dumps(_clean(rows), indent=2, allow_nan=False) + "\n"
  # Each file whole or not at all (a full disk, a kill): a half-written table is never read as the comparison.
  wd.write_file(Path(out_md), lambda tmp: Path(tmp).write_text(md))
  wd.write_file(Path(out_json), lambda tmp: Path(tmp).write_text(text))
  return md
