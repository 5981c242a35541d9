"""Figures of a run: training curves, ROC curves, a retrieval sheet (PNG, matplotlib Agg).

Uses matplotlib's object API (`Figure` + Agg canvas) without pyplot, so no global
backend or figure state is touched and it runs headless.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

GROUP_LABELS = {"all": "all pairs (cases 1-5)", "seen": "seen (cases 1-2)", "unseen": "unseen (cases 4-5)"}
GROUP_COLORS = {"all": "tab:blue", "seen": "tab:green", "unseen": "tab:red"}


def _save(fig: Figure, out_png: str | Path) -> Path:
  out_png = Path(out_png)
  out_png.parent.mkdir(parents=True, exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(out_png, dpi=120)
  return out_png


def read_metrics_jsonl(path: str | Path) -> list[dict]:
  """Rows of a metrics.jsonl (one JSON object per line, blank lines skipped)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"metrics file not found: {path}")
  rows = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
  if not rows:
    raise ValueError(f"metrics file {path} has no rows")
  if any("epoch" not in r for r in rows):
    raise ValueError(f"metrics file {path}: every row needs an 'epoch' key")
  return rows


def _column(rows: list[dict], key: str) -> np.ndarray:
  vals = [r.get(key) for r in rows]
  return np.array([np.nan if v is None else float(v) for v in vals], np.float64)


def plot_stage_curves(metrics_jsonl_path: str | Path, out_png: str | Path, title: str) -> Path:
  """Train and validation accuracy per epoch, learning-rate halvings as vertical lines.

  Reads the metrics.jsonl format shared by both stages ({"epoch", "lr", "train_accuracy",
  "val_accuracy", "halved", ...}; extra or missing keys tolerated). A halving after epoch
  k is drawn at k + 0.5. Accuracies in [0, 1] are shown in percent. The learning rate is
  drawn on a second (log) axis when present.
  """
  rows = sorted(read_metrics_jsonl(metrics_jsonl_path), key=lambda r: r["epoch"])
  epoch = _column(rows, "epoch")
  train, val = _column(rows, "train_accuracy"), _column(rows, "val_accuracy")
  finite = np.concatenate([train[np.isfinite(train)], val[np.isfinite(val)]])
  scale = 100.0 if finite.size and np.nanmax(np.abs(finite)) <= 1.0 else 1.0
  fig = Figure(figsize=(7, 4.2))
  ax = fig.subplots()
  ax.plot(epoch, train * scale, "o-", ms=3, label="train accuracy")
  ax.plot(epoch, val * scale, "s-", ms=3, label="validation accuracy")
  halved = [r["epoch"] for r in rows if r.get("halved")]
  for i, e in enumerate(halved):
    ax.axvline(e + 0.5, color="gray", ls="--", lw=1, label="learning rate halved" if i == 0 else None)
  lr = _column(rows, "lr")
  if np.isfinite(lr).any() and np.nanmin(lr) > 0:
    ax2 = ax.twinx()
    ax2.step(epoch, lr, where="mid", color="tab:purple", alpha=0.35, lw=1)
    ax2.set_yscale("log")
    ax2.set_ylabel("learning rate", color="tab:purple")
  ax.set_xlabel("epoch")
  ax.set_ylabel("accuracy (%)" if scale == 100.0 else "accuracy")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  return _save(fig, out_png)


def plot_roc(result, out_png: str | Path, title: str = "ROC of Ms on the test pairs",
             groups: Sequence[str] = ("all", "seen", "unseen")) -> Path:
  """ROC curves for all / seen / unseen pairs with their AUCs in the legend.

  `result` is a PairEvalResult, or {name: PairEvalResult} (e.g. both backbones), drawn
  with one line style per name.
  """
  results = result if isinstance(result, Mapping) else {"": result}
  styles = ["-", "--", ":", "-."]
  fig = Figure(figsize=(5.5, 5.2))
  ax = fig.subplots()
  ax.plot([0, 1], [0, 1], color="lightgray", lw=1)
  for n, (name, res) in enumerate(results.items()):
    for g in groups:
      fpr, tpr = res.roc(g)
      if np.isnan(fpr).any() or np.isnan(tpr).any():
        continue  # a group without positives or negatives has no curve
      label = f"{name + ': ' if name else ''}{GROUP_LABELS.get(g, g)}, AUC {res.auc(g):.4f}"
      ax.plot(fpr, tpr, styles[n % len(styles)], color=GROUP_COLORS.get(g), lw=1.5, label=label)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.005)
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=7)
  fig.tight_layout()
  return _save(fig, out_png)


def _bordered(img: np.ndarray, color: tuple[int, int, int], width: int) -> np.ndarray:
  out = np.empty((img.shape[0] + 2 * width, img.shape[1] + 2 * width, 3), np.uint8)
  out[...] = np.asarray(color, np.uint8)
  out[width:-width, width:-width] = img
  return out


def plot_retrieval_sheet(images: np.ndarray, labels, query_indices, top_indices, out_png: str | Path, *,
                         class_names: Sequence[str] | None = None, title: str | None = None) -> Path:
  """A sheet of retrieval examples: one row per query, then its top-k matches.

  images: uint8 [N, H, W, 3]; labels: [N]; query_indices: [Q]; top_indices: [Q, k]
  (e.g. `rank_queries(...)["top_indices"][query_indices]`). The query has a blue border,
  a match a green one if it shares the query's class, red otherwise.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
  labels = np.asarray(labels)
  query_indices = np.asarray(query_indices).reshape(-1)
  top_indices = np.asarray(top_indices).reshape(query_indices.shape[0], -1)
  q, k = top_indices.shape
  width = max(2, images.shape[1] // 16)
  fig = Figure(figsize=(1.3 * (k + 1), 1.4 * q + (0.4 if title else 0)))
  axes = np.asarray(fig.subplots(q, k + 1, squeeze=False))
  name = (lambda c: class_names[c]) if class_names is not None else (lambda c: f"class {c}")
  for r in range(q):
    qi = int(query_indices[r])
    axes[r, 0].imshow(_bordered(images[qi], (30, 90, 220), width))
    axes[r, 0].set_title(f"query: {name(int(labels[qi]))}", fontsize=6)
    for c in range(k):
      mi = int(top_indices[r, c])
      right = labels[mi] == labels[qi]
      axes[r, c + 1].imshow(_bordered(images[mi], (20, 170, 40) if right else (210, 30, 30), width))
      axes[r, c + 1].set_title(f"{c + 1}: {name(int(labels[mi]))}", fontsize=6)
  for ax in axes.ravel():
    ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, out_png)



# ---------------------------------------------------------------------------
# The source's Figure 7 (both backbones' ROC curves); its Table 1 is jsim.data.augment_figure.


def plot_roc_backbones(results: Mapping[str, object], out_png: str | Path,
                       groups: Sequence[str] = ("all", "seen", "unseen"),
                       title: str = "ROC of Ms: the backbones side by side") -> Path:
  """One panel per pair group (all / seen / unseen), each with every backbone's curve and AUC.

  results: {label: PairEvalResult}, e.g. {"ResNet50": ..., "VGG16": ...} from two workdirs.
  """
  if not results:
    raise ValueError("plot_roc_backbones: no results")
  colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
  fig = Figure(figsize=(4.2 * len(groups), 4.9))
  axes = np.atleast_1d(fig.subplots(1, len(groups)))
  for ax, g in zip(axes, groups):
    ax.plot([0, 1], [0, 1], color="lightgray", lw=1)
    for n, (name, res) in enumerate(results.items()):
      fpr, tpr = res.roc(g)
      if np.isnan(fpr).any() or np.isnan(tpr).any():
        continue
      ax.plot(fpr, tpr, color=colors[n % len(colors)], lw=1.6, label=f"{name}, AUC {res.auc(g):.4f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.005)
    ax.set_aspect("equal")
    ax.set_title(GROUP_LABELS.get(g, g), fontsize=10)
    ax.set_xlabel("false positive rate")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
  axes[0].set_ylabel("true positive rate")
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  return _save(fig, out_png)
