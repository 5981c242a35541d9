"""Where a stage reports: metrics.jsonl, TensorBoard event files, a progress bar.

Only the main process writes; metrics.jsonl is rebuilt from the checkpoint on
resume, so it never holds an epoch that the checkpoint does not.
"""

from __future__ import annotations

import json
from pathlib import Path

from jsim import parallel

METRICS_FILE = "metrics.jsonl"
# metrics.jsonl keys -> TensorBoard tags, all at the row's step (train/loss is written every few steps too).
EPOCH_TAGS = {
  "train_loss": "train/epoch_loss",
  "train_accuracy": "train/accuracy",
  "val_loss": "val/loss",
  "val_accuracy": "val/accuracy",
  "lr": "learning_rate",
  "halved": "learning_rate_halved",
  "items_per_s": "items_per_s",
  "epoch": "epoch",
}


def _flatten(d: dict, prefix: str = ""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


class MetricsWriter:
  def __init__(self, stage_dir: str | Path, filename_suffix: str = ""):
    # filename_suffix: a second writer of the same folder needs one; event files are named by
    # the second and the host, so two opened within a second would be the same file.
    self.stage_dir = Path(stage_dir)
    self.enabled = parallel.is_main_process()
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(self.stage_dir / "tb"), filename_suffix=filename_suffix)

  def reset(self, rows: list[dict]) -> None:
    """Makes metrics.jsonl hold exactly `rows` (the epochs the checkpoint has)."""
    if not self.enabled:
      return
    from jsim import workdir as wd

    text = "".join(json.dumps(r) + "\n" for r in rows)
    wd.write_file(self.stage_dir / METRICS_FILE, lambda tmp: Path(tmp).write_text(text))

  def write_epoch(self, row: dict) -> None:
    """A metrics.jsonl row, and its numbers in TensorBoard at the row's step (one x axis per stage)."""
    if not self.enabled:
      return
    from jsim import workdir as wd

    try:  # (a line cut by a full disk is dropped on resume: the file is rebuilt from the checkpoint)
      with open(self.stage_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
    except OSError as e:
      if wd.is_no_space(e):
        raise wd.no_space(self.stage_dir / METRICS_FILE) from None
      raise
    step = row["step"]
    for key, value in row.items():
      if key in EPOCH_TAGS and isinstance(value, (bool, int, float)):
        self._tb.add_scalar(EPOCH_TAGS[key], float(value), step)
    self._tb.flush()

  def write_image(self, tag: str, image, step: int = 0) -> None:
    """A uint8 [H, W, 3] image (e.g. a figure's pixels) in TensorBoard's Images tab."""
    if self.enabled:
      self._tb.add_image(tag, image, step, dataformats="HWC")
      self._tb.flush()

  def write_scalars(self, step: int, scalars: dict) -> None:
    if self.enabled:
      for key, value in scalars.items():
        self._tb.add_scalar(key, value, step)
      self._tb.flush()

  def write_config(self, config_dict: dict, metrics: tuple[str, ...] = ("val/accuracy",)) -> None:
    """The resolved config as text, and as hparams (flattened keys) with `metrics` as their metrics."""
    if not self.enabled:
      return
    from tensorboardX.summary import hparams

    text = json.dumps(config_dict, indent=1, sort_keys=True)
    self._tb.add_text("config", "    " + text.replace("\n", "\n    "), 0)  # (indented: markdown code)
    flat = {k: (v if isinstance(v, (bool, int, float, str)) else json.dumps(v)) for k, v in _flatten(config_dict)}
    for summary in hparams(flat, {m: 0.0 for m in metrics}):
      self._tb.file_writer.add_summary(summary)
    self._tb.flush()

  def write_text(self, tag: str, text: str, step: int) -> None:
    if self.enabled:
      self._tb.add_text(tag, text, step)
      self._tb.flush()

  def write_pr_curve(self, tag: str, hist_pos, hist_neg, step: int, num_thresholds: int = 101) -> None:
    """A precision/recall curve from score histograms [B] ("same" iff p > threshold)."""
    if not self.enabled:
      return
    import numpy as np

    pos, neg = np.asarray(hist_pos, np.float64), np.asarray(hist_neg, np.float64)
    bins = pos.shape[-1]
    at_or_above = lambda h: np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])  # scores in bins >= b
    edges = np.round(np.linspace(0, 1, num_thresholds) * bins).astype(int)
    tp, fp = at_or_above(pos)[edges], at_or_above(neg)[edges]
    fn, tn = pos.sum() - tp, neg.sum() - fp
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    recall = tp / max(pos.sum(), 1)
    self._tb.add_pr_curve_raw(tag, tp, fp, tn, fn, precision, recall, step, num_thresholds)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def progress_bar(total: int, initial: int, desc: str, unit: str, *, compiles: bool = True, announce: bool = False):
  """A bar with items/s and ETA ('compiling' until the first update); silent on other processes.

  A plain line every so often instead of a bar when stderr is not a terminal (jsim.progress.Progress).
  """
  from jsim import progress

  return progress.progress(total, desc, unit, initial=initial, compiles=compiles, announce=announce)
