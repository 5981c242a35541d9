"""Where a stage reports: metrics.jsonl, TensorBoard event files, a progress bar.

Only the main process writes. metrics.jsonl is replaced whole at each epoch (jsim.workdir.write_file) and
rebuilt from the checkpoint on resume, so it never holds an epoch that the checkpoint does not, nor half a
line. Event files are appended in the caller's thread one whole record at a time (`EventFile`), not by a
writer thread (tensorboardX's dies on a full disk with a traceback, and its queue then blocks the run).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path

from jsim import parallel, workdir as wd

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


def _import_tensorboardx() -> None:
  """Imports tensorboardX without torch where torch is not imported yet: tensorboardX's package imports torch
  if it is installed (3-4 s of every run's start, measured here), only to accept torch tensors, which jsim
  never passes it; without torch it takes numpy arrays, as it does where torch is not installed."""
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    return
  sys.modules["torch"] = None  # (`import torch` raises ImportError, which tensorboardX expects)
  try:
    import tensorboardX  # noqa: F401
  finally:
    del sys.modules["torch"]


class EventFile:
  """A TensorBoard event file (TFRecord framing), appended a whole record at a time.

  An append that fails part-way (a full disk, a signal) is cut back to the last whole record, so that the
  file never holds half of one (TensorBoard stops reading a file at a damaged record); a full disk raises
  NoSpace naming the file.
  """

  def __init__(self, logdir: Path, filename_suffix: str = ""):
    self.path = Path(logdir) / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}{filename_suffix}"
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
      if wd.is_no_space(e):
        raise wd.no_space(self.path) from None
      raise
    self._size = os.fstat(self._fd).st_size
    _import_tensorboardx()
    from tensorboardX.proto import event_pb2

    self._event = event_pb2.Event
    self.add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def add_summary(self, summary, step: int | None = None) -> None:
    event = self._event(summary=summary, wall_time=time.time())
    if step is not None:
      event.step = int(step)
    self.add(event)

  def add(self, event) -> None:
    from tensorboardX.record_writer import masked_crc32c

    data = event.SerializeToString()
    header = struct.pack("Q", len(data))
    record = header + struct.pack("I", masked_crc32c(header)) + data + struct.pack("I", masked_crc32c(data))
    done = 0
    try:
      while done < len(record):
        done += os.write(self._fd, record[done:])
    except BaseException as e:
      with contextlib.suppress(OSError):
        os.ftruncate(self._fd, self._size)
      if wd.is_no_space(e):
        raise wd.no_space(self.path) from None
      raise
    self._size += done

  def close(self) -> None:
    if self._fd is not None:
      with contextlib.suppress(OSError):  # (durable across a crash; nothing is lost if it cannot be)
        os.fsync(self._fd)
      os.close(self._fd)
      self._fd = None


class MetricsWriter:
  def __init__(self, stage_dir: str | Path, filename_suffix: str = ""):
    # filename_suffix: a second writer of the same folder needs one; event files are named by
    # the second and the host, so two opened within a second would be the same file.
    self.stage_dir = Path(stage_dir)
    self.enabled = parallel.is_main_process()
    self._rows: list[dict] = []
    self._tb = EventFile(self.stage_dir / "tb", filename_suffix) if self.enabled else None

  def reset(self, rows: list[dict]) -> None:
    """Makes metrics.jsonl hold exactly `rows` (the epochs the checkpoint has)."""
    if self.enabled:
      self._rows = list(rows)
      self._write_rows()

  def _write_rows(self) -> None:
    text = "".join(json.dumps(r) + "\n" for r in self._rows)
    wd.write_file(self.stage_dir / METRICS_FILE, lambda tmp: Path(tmp).write_text(text))

  def write_epoch(self, row: dict) -> None:
    """A metrics.jsonl row, and its numbers in TensorBoard at the row's step (one x axis per stage)."""
    if not self.enabled:
      return
    self._rows.append(row)
    try:
      self._write_rows()
    except BaseException:
      self._rows.pop()
      raise
    from tensorboardX.summary import scalar

    for key, value in row.items():
      if key in EPOCH_TAGS and isinstance(value, (bool, int, float)):
        self._tb.add_summary(scalar(EPOCH_TAGS[key], float(value)), row["step"])

  def write_image(self, tag: str, image, step: int = 0) -> None:
    """A uint8 [H, W, 3] image (e.g. a figure's pixels) in TensorBoard's Images tab."""
    if self.enabled:
      from tensorboardX.summary import image as image_summary

      self._tb.add_summary(image_summary(tag, image, dataformats="HWC"), step)

  def write_scalars(self, step: int, scalars: dict) -> None:
    if self.enabled:
      from tensorboardX.summary import scalar

      for key, value in scalars.items():
        self._tb.add_summary(scalar(key, value), step)

  def write_config(self, config_dict: dict, metrics: tuple[str, ...] = ("val/accuracy",)) -> None:
    """The resolved config as text, and as hparams (flattened keys) with `metrics` as their metrics."""
    if not self.enabled:
      return
    from tensorboardX.summary import hparams, text as text_summary

    text = json.dumps(config_dict, indent=1, sort_keys=True)
    self._tb.add_summary(text_summary("config", "    " + text.replace("\n", "\n    ")), 0)  # (indented: markdown code)
    flat = {k: (v if isinstance(v, (bool, int, float, str)) else json.dumps(v)) for k, v in _flatten(config_dict)}
    for summary in hparams(flat, {m: 0.0 for m in metrics}):
      self._tb.add_summary(summary)

  def write_text(self, tag: str, text: str, step: int) -> None:
    if self.enabled:
      from tensorboardX.summary import text as text_summary

      self._tb.add_summary(text_summary(tag, text), step)

  def write_pr_curve(self, tag: str, hist_pos, hist_neg, step: int, num_thresholds: int = 101) -> None:
    """A precision/recall curve from score histograms [B] ("same" iff p > threshold)."""
    if not self.enabled:
      return
    import numpy as np
    from tensorboardX.summary import pr_curve_raw

    pos, neg = np.asarray(hist_pos, np.float64), np.asarray(hist_neg, np.float64)
    bins = pos.shape[-1]
    at_or_above = lambda h: np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])  # scores in bins >= b
    edges = np.round(np.linspace(0, 1, num_thresholds) * bins).astype(int)
    tp, fp = at_or_above(pos)[edges], at_or_above(neg)[edges]
    fn, tn = pos.sum() - tp, neg.sum() - fp
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    recall = tp / max(pos.sum(), 1)
    self._tb.add_summary(pr_curve_raw(tag, tp, fp, tn, fn, precision, recall, num_thresholds), step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def progress_bar(total: int, initial: int, desc: str, unit: str, *, announce: bool = False):
  """A bar with items/s and ETA ('compiling' while JAX compiles the first step); silent on other processes.

  A plain line every so often instead of a bar when stderr is not a terminal (jsim.progress.Progress).
  """
  from jsim import progress

  return progress.progress(total, desc, unit, initial=initial, announce=announce)
