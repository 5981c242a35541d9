"""Where a stage reports: metrics.jsonl, TensorBoard event files, a progress bar.

Only the main process writes; metrics.jsonl is rebuilt from the checkpoint on
resume, so it never holds an epoch that the checkpoint does not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tqdm

from jsim import parallel

METRICS_FILE = "metrics.jsonl"


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
    path = self.stage_dir / METRICS_FILE
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)

  def write_epoch(self, row: dict) -> None:
    if not self.enabled:
      return
    with open(self.stage_dir / METRICS_FILE, "a") as f:
      f.write(json.dumps(row) + "\n")
    for key, value in row.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
        self._tb.add_scalar(f"epoch/{key}", value, row["epoch"])
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

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def progress_bar(total: int, initial: int, desc: str, unit: str) -> tqdm.tqdm:
  """A bar with items/s and ETA; silent on other processes."""
  return tqdm.tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
                   disable=not parallel.is_main_process(), file=sys.stderr, mininterval=1.0)
