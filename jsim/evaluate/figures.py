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

from jsim import workdir as wd

GROUP_LABELS = {"all": "all pairs (cases 1-5)", "seen": "seen (cases 1-2)", "unseen": "unseen (cases 4-5)"}
GROUP_COLORS = {"all": "black", "seen": "tab:green", "unseen": "tab:red"}
# Borders of example images, the same meaning in every figure (and in jsim-predict's sheet):
QUERY_COLOR = (30, 90, 220)  # blue: the query
SAME_COLOR = (20, 170, 40)  # green: the same class as the query (ground truth)
OTHER_COLOR = (210, 30, 30)  # red: another class
ABOVE_COLOR = (235, 150, 20)  # orange: P(same) above the threshold (the model's decision; no ground truth)
BELOW_COLOR = (160, 160, 160)  # gray: below the threshold


def _save(fig: Figure, out_png: str | Path, *, dpi: int = 120, palette: bool = False) -> Path:
  """Writes the figure, whole or not at all (jsim.workdir.write_file: a full disk raises NoSpace naming it, and a
  figure listed in a report is never half a file); palette=True stores it with 256 colours (photo sheets: a few
  times smaller)."""
  out_png = Path(out_png)
  canvas = FigureCanvasAgg(fig)
  if not palette:
    wd.write_file(out_png, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    return out_png
  from PIL import Image

  fig.set_dpi(dpi)
  canvas.draw()
  rgb = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
  image = rgb.quantize(256, method=Image.Quantize.MEDIANCUT)
  wd.write_file(out_png, lambda tmp: image.save(tmp, format="PNG", optimize=True))
  return out_png


def legend_patches(entries: Sequence[tuple[tuple[int, int, int], str]]) -> list:
  """Legend handles for coloured image borders."""
  from matplotlib.patches import Patch

  return [Patch(facecolor="white", edgecolor=np.asarray(c) / 255.0, linewidth=3, label=text) for c, text in entries]


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
  """Train and validation accuracy per epoch above, the learning rate below, halvings in both.

  Reads the metrics.jsonl format shared by both stages ({"epoch", "lr", "train_accuracy",
  "val_accuracy", "halved", ...}; extra or missing keys tolerated). Epoch k's points are
  at x = k (the end of the epoch); its learning rate spans (k - 1, k]. A halving after
  epoch k is a dashed line at x = k, where the halved rate starts; one after the last
  epoch drawn is not shown (no epoch trained at that rate; a continued stage draws it).
  Accuracies in [0, 1] are shown in percent.
  """
  from matplotlib.ticker import MaxNLocator

  rows = sorted(read_metrics_jsonl(metrics_jsonl_path), key=lambda r: r["epoch"])
  epoch = _column(rows, "epoch")
  train, val = _column(rows, "train_accuracy"), _column(rows, "val_accuracy")
  finite = np.concatenate([train[np.isfinite(train)], val[np.isfinite(val)]])
  scale = 100.0 if finite.size and np.nanmax(np.abs(finite)) <= 1.0 else 1.0
  lr = _column(rows, "lr")
  has_lr = bool(np.isfinite(lr).any() and np.nanmin(lr) > 0)
  fig = Figure(figsize=(7, 5.2 if has_lr else 4.2))
  if has_lr:
    ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
  else:
    ax, ax_lr = fig.subplots(), None
  ax.plot(epoch, train * scale, "o-", ms=3, label="train accuracy")
  ax.plot(epoch, val * scale, "s-", ms=3, label="validation accuracy")
  halved = [r["epoch"] for r in rows[:-1] if r.get("halved")]
  for i, e in enumerate(halved):
    label = (
      f"learning rate halved (after epoch{'s' if len(halved) > 1 else ''} {', '.join(str(h) for h in halved)})"
      if i == 0
      else None
    )
    for a in (ax, ax_lr) if ax_lr is not None else (ax,):
      a.axvline(e, color="gray", ls="--", lw=1, label=label if a is ax else None)
  ax.set_ylabel("accuracy (%)" if scale == 100.0 else "accuracy")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(loc="best", fontsize=8, framealpha=0.9)
  bottom = ax
  if ax_lr is not None:
    # Epoch k trains at lr_k on (k - 1, k]: a step drawn from x = epoch_1 - 1.
    xs = np.concatenate([[epoch[0] - 1], epoch])
    ax_lr.step(xs, np.concatenate([[lr[0]], lr]), where="pre", color="tab:purple", lw=1.5)
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")
    values = sorted({float(v) for v in lr[np.isfinite(lr)]})
    if len(values) <= 6:
      ax_lr.set_yticks(values, [f"{v:.3g}" for v in values])
      ax_lr.minorticks_off()
    lo, hi = min(values), max(values)
    ax_lr.set_ylim(lo / 1.6, hi * 1.6)
    ax_lr.grid(alpha=0.3)
    bottom = ax_lr
  bottom.set_xlabel("epoch")
  bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlim(epoch[0] - 1 if ax_lr is not None else epoch[0] - 0.5, epoch[-1] + 0.5)
  fig.tight_layout()
  return _save(fig, out_png)


def plot_roc(
  result,
  out_png: str | Path,
  title: str = "ROC of Ms on the test pairs",
  groups: Sequence[str] = ("all", "seen", "unseen"),
) -> Path:
  """ROC curves for all / seen / unseen pairs with their AUCs in the legend.

  `result` is a PairEvalResult, or {name: PairEvalResult} (e.g. both backbones), drawn
  with one line style per name.
  """
  results = result if isinstance(result, Mapping) else {"": result}
  styles = ["-", "--", ":", "-."]
  fig = Figure(figsize=(5.5, 5.2))
  ax = fig.subplots()
  ax.plot([0, 1], [0, 1], color="lightgray", lw=1)
  # 'all' lies between 'seen' and 'unseen' and often on one of them: it is drawn last, thinner and
  # dashed (dotted with several results), so that both stay visible.
  order = sorted(groups, key=lambda g: g == "all")
  for n, (name, res) in enumerate(results.items()):
    for g in order:
      fpr, tpr = res.roc(g)
      if np.isnan(fpr).any() or np.isnan(tpr).any():
        continue  # a group without positives or negatives has no curve
      label = f"{name + ': ' if name else ''}{GROUP_LABELS.get(g, g)}, AUC {res.auc(g):.4f}"
      if g == "all":
        style = (0, (4, 2)) if len(results) == 1 else styles[n % len(styles)]
        ax.plot(fpr, tpr, linestyle=style, color=GROUP_COLORS[g], lw=1.3, label=label, zorder=3)
      else:
        ax.plot(fpr, tpr, styles[n % len(styles)], color=GROUP_COLORS.get(g), lw=2.2, alpha=0.85, label=label)
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


def plot_retrieval_sheet(
  images: np.ndarray,
  labels,
  query_indices,
  top_indices,
  out_png: str | Path,
  *,
  class_names: Sequence[str] | None = None,
  title: str | None = None,
) -> Path:
  """A sheet of retrieval examples: one row per query, then its top-k matches.

  images: uint8 [N, H, W, 3]; labels: [N]; query_indices: [Q]; top_indices: [Q, k]
  (e.g. `rank_queries(...)["top_indices"][query_indices]`); class_names: label -> name
  (e.g. from words.txt). Borders: the query blue, a match green if it shares the
  query's class, red otherwise (explained in a legend). Images are drawn at about their
  own size and stored with a 256-colour palette, so the sheet stays small.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
  labels = np.asarray(labels)
  query_indices = np.asarray(query_indices).reshape(-1)
  top_indices = np.asarray(top_indices).reshape(query_indices.shape[0], -1)
  q, k = top_indices.shape
  width = max(2, images.shape[1] // 16)
  cell = 0.95  # inches a cell (about 90 pixels at the saved dpi)
  fig = Figure(figsize=(cell * (k + 1), (cell + 0.22) * q + 0.35 + (0.25 if title else 0)))
  axes = np.asarray(fig.subplots(q, k + 1, squeeze=False))
  name = (lambda c: str(class_names[c])) if class_names is not None else (lambda c: f"class {c}")
  for r in range(q):
    qi = int(query_indices[r])
    axes[r, 0].imshow(_bordered(images[qi], QUERY_COLOR, width), interpolation="nearest")
    axes[r, 0].set_title(_two_lines(name(int(labels[qi]))), fontsize=5.5, fontweight="bold")
    for c in range(k):
      mi = int(top_indices[r, c])
      right = labels[mi] == labels[qi]
      axes[r, c + 1].imshow(_bordered(images[mi], SAME_COLOR if right else OTHER_COLOR, width), interpolation="nearest")
      axes[r, c + 1].set_title(_two_lines(f"{c + 1}: {name(int(labels[mi]))}"), fontsize=5.5)
  for ax in axes.ravel():
    ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=8)
  fig.legend(
    handles=legend_patches(
      [(QUERY_COLOR, "query"), (SAME_COLOR, "same class as the query"), (OTHER_COLOR, "another class")]
    ),
    loc="lower center",
    ncol=3,
    fontsize=7,
    frameon=False,
    borderaxespad=0.2,
  )
  fig.tight_layout(rect=(0, 0.28 / fig.get_figheight(), 1, 1))
  return _save(fig, out_png, dpi=100, palette=True)


def _two_lines(text: str, width: int = 18) -> str:
  """A class name in at most two lines of a cell's width, broken between words; cut with '...' only
  beyond two lines ('7: orange stripes crescent' -> '7: orange stripes' / 'crescent')."""
  import textwrap

  lines = textwrap.wrap(text, width, break_long_words=True) or [""]
  if len(lines) > 2:
    lines = [lines[0], lines[1][: width - 1].rstrip() + "\u2026"]
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# The source's Figure 7 (both backbones' ROC curves); its Table 1 is jsim.data.augment_figure.


def plot_roc_backbones(
  results: Mapping[str, object],
  out_png: str | Path,
  groups: Sequence[str] = ("all", "seen", "unseen"),
  title: str = "ROC of the pair scores: the workdirs side by side",
) -> Path:
  """One panel per pair group (all / seen / unseen), each with every run's curve and AUC.

  results: {label: PairEvalResult, or a list of them (one method's seeds: one colour, one legend entry with
  the AUC's mean and standard deviation)}, e.g. {"ResNet50": ..., "VGG16": ...} from two workdirs.
  """
  if not results:
    raise ValueError("plot_roc_backbones: no results")
  colors = [f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive", "cyan")]
  many = len(results) > 4  # (the legends go below the panels: inside, they would hide the curves)
  fig = Figure(figsize=(4.2 * len(groups), 4.9 + (0.17 * len(results) if many else 0)))
  axes = np.atleast_1d(fig.subplots(1, len(groups)))
  for ax, g in zip(axes, groups):
    ax.plot([0, 1], [0, 1], color="lightgray", lw=1)
    for n, (name, runs) in enumerate(results.items()):
      runs = runs if isinstance(runs, (list, tuple)) else [runs]
      aucs = []
      for res in runs:
        fpr, tpr = res.roc(g)
        if np.isnan(fpr).any() or np.isnan(tpr).any():
          continue
        aucs.append(res.auc(g))
        label = None if len(aucs) > 1 else f"{name}, AUC {aucs[0]:.4f}"
        ax.plot(fpr, tpr, color=colors[n % len(colors)], lw=1.6 if len(runs) == 1 else 1.0, label=label)
      if len(aucs) > 1:  # one entry per method, its AUC over its seeds
        ax.lines[-len(aucs)].set_label(
          f"{name}, AUC {np.mean(aucs):.4f} ± {np.std(aucs, ddof=1):.4f} ({len(aucs)} runs)"
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.005)
    ax.set_aspect("equal")
    ax.set_title(GROUP_LABELS.get(g, g), fontsize=10)
    ax.set_xlabel("false positive rate")
    ax.grid(alpha=0.3)
    if many:
      ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=6.5, frameon=False)
    else:
      ax.legend(loc="lower right", fontsize=8)
  axes[0].set_ylabel("true positive rate")
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  return _save(fig, out_png)
