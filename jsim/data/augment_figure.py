"""The source's Table 1 as a picture: a few training images under each of the four augmentations.

Written by stage 1 (W/figures/augmentations.png and its TensorBoard), so it lives with the
data it draws rather than with the evaluation's figures (matplotlib's object API, Agg, no pyplot;
imported only when the figure is drawn).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jsim import workdir as wd
from jsim.data import augment

AUGMENTATION_COLUMNS = ("original", "jitter", "crop", "flip", "rotation", "all four")


def augmentation_examples(images: np.ndarray, augment_cfg, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [N, len(AUGMENTATION_COLUMNS), H, W, 3], rotation angles [N] in radians): each image
  as it is, under each of the four augmentations alone (drawn from `seed`, firing with
  probability 1) and under all four.

  The pixels are the training path's (jsim.data.augment.apply_params, in augment_cfg's
  order and ranges) before normalisation, at the images' own size.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
  n, h, w, _ = images.shape
  cfg = augment_cfg.to_dict() if hasattr(augment_cfg, "to_dict") else dict(augment_cfg)
  cfg.update(prob=1.0, enabled=augment.TRANSFORMS)
  params = augment.sample_params(jax.random.PRNGKey(seed), n, cfg, (h, w))
  # One compilation for the five columns (which transforms fire is data, not structure).
  apply = jax.jit(lambda p: augment.apply_params(images, p, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), max(h, w), cfg))
  columns = [images]
  for name in AUGMENTATION_COLUMNS[1:]:
    only = {t: params[t] & (name == "all four" or t == name) for t in augment.TRANSFORMS}
    x = np.asarray(apply(dict(params, **only)))
    columns.append(np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8))
  return np.stack(columns, axis=1), np.asarray(params["angle"])


def plot_augmentations(
  examples: np.ndarray, out_png: str | Path, *, title: str | None = None, angles: Sequence[float] | None = None
) -> Path:
  """The grid of `augmentation_examples` (one row per image, one column per augmentation)."""
  examples = np.asarray(examples)
  rows, cols = examples.shape[:2]
  fig = Figure(figsize=(1.45 * cols, 1.5 * rows + (0.45 if title else 0.1)))
  axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
  for r in range(rows):
    for c in range(cols):
      axes[r, c].imshow(examples[r, c], interpolation="nearest")
      axes[r, c].set_xticks([])
      axes[r, c].set_yticks([])
      if r == 0:
        axes[r, c].set_title(AUGMENTATION_COLUMNS[c] if c < len(AUGMENTATION_COLUMNS) else str(c), fontsize=8)
    if angles is not None:
      axes[r, 4].set_xlabel(f"{np.degrees(angles[r]):+.0f}°", fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  out_png = Path(out_png)
  FigureCanvasAgg(fig)
  wd.write_file(out_png, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))  # (whole or not at all)
  return out_png
