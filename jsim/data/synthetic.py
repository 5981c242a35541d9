"""A synthetic stand-in for Tiny ImageNet, written to disk in the official layout.

Every class is a combination of three visual factors: a shape (circle, square,
triangle, ...), a hue, and a texture of the shape's fill (solid, stripes,
checker, dots). Each image draws its own position, scale, rotation, texture
phase/orientation, background colour, gradient and noise, so a network must
learn the factors rather than memorise pixels. Held-out classes are new
combinations of factors seen in training, so features learned on some classes
transfer to the others, as the method requires of unseen classes.

The files are real JPEGs (PIL, quality 90) in the official layout, so the demo
and the tests go through the same reader as the real data:

  root/wnids.txt, root/words.txt
  root/train/<wnid>/images/<wnid>_<k>.JPEG, root/train/<wnid>/<wnid>_boxes.txt
  root/val/images/val_<k>.JPEG, root/val/val_annotations.txt
  root/synthetic_info.json  (parameters, class factors, deliberately corrupt files)

Everything is a function of the arguments: image i of a class and split has its
own numpy generator seeded by (seed, split, class, i).
"""

from __future__ import annotations

import colorsys
import concurrent.futures
import dataclasses
import io
import json
import math
import multiprocessing
import os
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "hexagon", "bars", "crescent")
# Hues in [0, 1): ten well separated colours of the HSV wheel (0, 36, 72, ... 324 degrees).
HUES = tuple(i / 10 for i in range(10))
# Each the name of the sector of the 12-colour RGB wheel (30-degree sectors centred on red 0, orange 30,
# yellow 60, chartreuse 90, green 120, spring green 150, cyan 180, azure 210, blue 240, violet 270,
# magenta 300, rose 330) that holds its hue.
HUE_NAMES = ("red", "orange", "yellow", "green", "spring green", "cyan", "azure", "blue", "magenta", "rose")
TEXTURES = ("solid", "stripes", "checker", "dots")
MAX_CLASSES = len(SHAPES) * len(HUES) * len(TEXTURES)
# Bump when the files change for the same arguments (the images, or the class names in words.txt): the
# synthetic source then writes a new folder, so that no cached folder keeps the old files.
GENERATOR_VERSION = 2

_SUPERSAMPLE = 2  # the mask is sampled 2x2 per pixel and averaged: smooth edges
_JPEG_QUALITY = 90
INFO_FILE = "synthetic_info.json"


def synthetic_wnid(k: int) -> str:
  """The fake WordNet id of synthetic class k ('n90000000', 'n90000001', ...)."""
  return f"n9{k:07d}"


def class_factors(k: int) -> tuple[str, int, str]:
  """(shape, hue index, texture) of synthetic class k.

  The first 100 classes use every (shape, hue) pair once, arranged so that
  classes 0..9 already differ in both shape and hue; later blocks of 100 repeat
  the pairs with another texture. All MAX_CLASSES combinations are distinct.
  """
  if not 0 <= k < MAX_CLASSES:
    raise ValueError(f"synthetic class {k} outside [0, {MAX_CLASSES})")
  s, h, t = len(SHAPES), len(HUES), len(TEXTURES)
  j, r = k % (s * h), k // (s * h)
  return SHAPES[j % s], (j // s + j) % h, TEXTURES[(j + r) % t]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
  return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Inside-test of a shape of radius ~1 in its own frame (u, v)."""
  if shape == "circle":
    return u * u + v * v < 1.0
  if shape == "square":
    return np.maximum(abs(u), abs(v)) < 0.8
  if shape == "triangle":  # equilateral, circumradius 1
    return (v > -0.5) & (v < 1.0 - math.sqrt(3) * abs(u))
  if shape == "cross":
    return ((abs(u) < 0.3) & (abs(v) < 1.0)) | ((abs(v) < 0.3) & (abs(u) < 1.0))
  if shape == "ring":
    r2 = u * u + v * v
    return (r2 < 1.0) & (r2 > 0.36)
  if shape == "star":  # five points, inner radius 0.45
    return np.hypot(u, v) < 0.45 + 0.55 * np.abs(np.cos(2.5 * np.arctan2(v, u))) ** 3
  if shape == "diamond":
    return abs(u) / 0.7 + abs(v) < 1.0
  if shape == "hexagon":  # flat top and bottom, circumradius 1
    au, av = abs(u), abs(v)
    return (av < 0.87) & (math.sqrt(3) * au + av < math.sqrt(3))
  if shape == "bars":  # three parallel bars
    return (abs(u) < 0.9) & (abs(v) < 0.9) & (np.abs(((v + 0.9) / 0.6) % 1.0 - 0.5) < 0.3)
  if shape == "crescent":
    return (u * u + v * v < 1.0) & ((u - 0.45) ** 2 + v * v > 0.5625)
  raise ValueError(f"unknown synthetic shape {shape!r}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, freq: float, phase: float) -> np.ndarray:
  """1 where the fill takes its second tone; textures live in the shape's frame."""
  if texture == "solid":
    return np.zeros_like(u, dtype=bool)
  if texture == "stripes":
    return np.sin(freq * u + phase) > 0
  if texture == "checker":
    return (np.sin(freq * u + phase) > 0) ^ (np.sin(freq * v + phase) > 0)
  if texture == "dots":
    return (
      np.hypot(((u * freq / (2 * math.pi) + phase) % 1.0) - 0.5, ((v * freq / (2 * math.pi) + phase) % 1.0) - 0.5)
      < 0.25
    )
  raise ValueError(f"unknown synthetic texture {texture!r}")


def render_image(k: int, rng: np.random.Generator, image_size: int = 64) -> tuple[np.ndarray, tuple[int, ...]]:
  """Renders one image of synthetic class k: uint8 [image_size, image_size, 3] and its box.

  The box (x0, y0, x1, y1) bounds the shape, as Tiny ImageNet's annotations do.
  """
  shape, hue_index, texture = class_factors(k)
  scale = rng.uniform(0.35, 0.65)
  cx, cy = rng.uniform(-1 + scale * 0.8, 1 - scale * 0.8, size=2)
  theta = rng.uniform(0, 2 * math.pi)
  c, s = math.cos(theta) / scale, math.sin(theta) / scale

  def frame(n):  # pixel centres in [-1, 1] -> the shape's own frame (u, v)
    coords = (np.arange(n, dtype=np.float32) + 0.5) * (2 / n) - 1
    x, y = coords[None, :], coords[:, None]
    return x, y, c * (x - cx) + s * (y - cy), c * (y - cy) - s * (x - cx)

  # Coverage of each pixel by the shape, from a 2x2 supersampled mask: smooth edges.
  n = image_size * _SUPERSAMPLE
  inside = _shape_mask(shape, *frame(n)[2:])
  cover = inside[0::2, 0::2].astype(np.float32)
  cover += inside[1::2, 0::2]
  cover += inside[0::2, 1::2]
  cover += inside[1::2, 1::2]
  cover *= 0.25
  x, y, u, v = frame(image_size)
  second = _texture(texture, u, v, freq=rng.uniform(5.0, 8.0), phase=rng.uniform(0, 2 * math.pi))

  # Foreground: the class hue with a small jitter; the texture's second tone is
  # a darker, less saturated version of the same hue, so hue and texture stay
  # independent factors.
  hue = HUES[hue_index] + rng.uniform(-0.025, 0.025)
  sat, val = rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)
  tone1, tone2 = _hsv(hue, sat, val), _hsv(hue, sat * 0.6, val * 0.45)
  fill = np.where(second[..., None], tone2, tone1)

  # Background: a random low-saturation colour with a linear gradient.
  bg = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.3), rng.uniform(0.2, 0.9))
  gdir = rng.uniform(0, 2 * math.pi)
  grad = (math.cos(gdir) * x + math.sin(gdir) * y) * np.float32(rng.uniform(0.0, 0.15))
  background = bg + grad[..., None]

  a = cover[..., None]
  img = a * fill + (1 - a) * background
  # Uniform pixel noise (cheaper to draw than Gaussian; the amount is what matters).
  img += (rng.random(img.shape, dtype=np.float32) - 0.5) * np.float32(rng.uniform(0.03, 0.15))
  img = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)

  ys, xs = np.nonzero(cover > 0)
  box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())) if len(xs) else (0, 0, 0, 0)
  return img, box


def _encode(img: np.ndarray, grayscale: bool) -> bytes:
  pil = Image.fromarray(img)
  if grayscale:  # stored as a one-channel JPEG, like ~2% of the real data
    pil = pil.convert("L")
  buf = io.BytesIO()
  pil.save(buf, format="JPEG", quality=_JPEG_QUALITY)
  return buf.getvalue()


def _corrupt(data: bytes, which: int) -> bytes:
  """Alternates two kinds of damage: a truncated JPEG and bytes that are no image."""
  if which % 2 == 0:
    return data[: len(data) // 3]
  return b"this is not a JPEG file\n" * 4


@dataclasses.dataclass(frozen=True)
class _ClassJob:
  """Everything needed to write the images of one class (train and val)."""

  root: str
  k: int
  seed: int
  image_size: int
  train_gray: tuple[bool, ...]
  train_corrupt: tuple[int, ...]  # -1: intact, else which kind of damage
  val_numbers: tuple[int, ...]  # j of val_<j>.JPEG for each of the class's val images
  val_gray: tuple[bool, ...]


def _write_class(job: _ClassJob) -> tuple[str, dict[int, str]]:
  """Writes one class's images; returns its boxes file and its val annotation lines by number."""
  root, w = Path(job.root), synthetic_wnid(job.k)
  img_dir = root / "train" / w / "images"
  img_dir.mkdir(parents=True, exist_ok=True)
  boxes = []
  for i, (gray, damage) in enumerate(zip(job.train_gray, job.train_corrupt)):
    img, box = render_image(job.k, np.random.default_rng([job.seed, 0, job.k, i]), job.image_size)
    data = _encode(img, gray)
    if damage >= 0:
      data = _corrupt(data, damage)
    name = f"{w}_{i}.JPEG"
    (img_dir / name).write_bytes(data)
    boxes.append(f"{name}\t" + "\t".join(map(str, box)) + "\n")
  annotations = {}
  for i, (j, gray) in enumerate(zip(job.val_numbers, job.val_gray)):
    img, box = render_image(job.k, np.random.default_rng([job.seed, 1, job.k, i]), job.image_size)
    name = f"val_{j}.JPEG"
    (root / "val" / "images" / name).write_bytes(_encode(img, gray))
    annotations[j] = f"{name}\t{w}\t" + "\t".join(map(str, box)) + "\n"
  return "".join(boxes), annotations


def write_synthetic_tiny_imagenet(
  root: str | os.PathLike,
  num_classes: int = 10,
  train_per_class: int = 20,
  test_per_class: int = 5,
  image_size: int = 64,
  seed: int = 0,
  grayscale_fraction: float = 0.0,
  corrupt_files: int = 0,
  *,
  num_workers: int = 1,
) -> Path:
  """Writes a synthetic data set in Tiny ImageNet's layout under `root` and returns `root`.

  Args:
    root: the folder to create (plays the role of tiny-imagenet-200/).
    num_classes: number of classes, at most MAX_CLASSES (400).
    train_per_class: images per class in train/.
    test_per_class: images per class in val/ (the protocol's test data).
    image_size: side of the square images.
    seed: everything drawn (image content, grayscale and corrupt files) follows from it.
    grayscale_fraction: fraction of images (per split, chosen from the seed)
      saved as one-channel JPEGs.
    corrupt_files: number of train images (chosen from the seed) written damaged
      (truncated or not an image), to exercise the readers' error handling;
      their paths are listed in synthetic_info.json.
    num_workers: processes that render classes in parallel (the files do not
      depend on it).
  """
  if not 1 <= num_classes <= MAX_CLASSES:
    raise ValueError(f"num_classes={num_classes} must be in [1, {MAX_CLASSES}]")
  if train_per_class < 0 or test_per_class < 0:
    raise ValueError(f"train_per_class={train_per_class} and test_per_class={test_per_class} must be >= 0")
  if not 0.0 <= grayscale_fraction <= 1.0:
    raise ValueError(f"grayscale_fraction={grayscale_fraction} must be in [0, 1]")
  n_train, n_val = num_classes * train_per_class, num_classes * test_per_class
  if not 0 <= corrupt_files <= n_train:
    raise ValueError(f"corrupt_files={corrupt_files} must be in [0, {n_train}] (the number of train images)")

  root = Path(root)
  if root.exists() and any(root.iterdir()):  # never mix two data sets in one folder
    raise FileExistsError(f"{root} is not empty: write the synthetic data set into a new folder")
  wnids = [synthetic_wnid(k) for k in range(num_classes)]
  pick = np.random.default_rng([seed, 7])
  train_gray = np.zeros(n_train, bool)
  train_gray[pick.permutation(n_train)[: int(round(grayscale_fraction * n_train))]] = True
  val_gray = np.zeros(n_val, bool)
  val_gray[pick.permutation(n_val)[: int(round(grayscale_fraction * n_val))]] = True
  train_corrupt = np.full(n_train, -1)
  train_corrupt[np.sort(pick.permutation(n_train)[:corrupt_files])] = np.arange(corrupt_files)
  # val/: classes interleaved in a seeded order, as in the real val folder;
  # val_position[k * test_per_class + i] is the j of image i of class k's file val_<j>.JPEG.
  val_position = np.argsort(np.random.default_rng([seed, 11]).permutation(n_val))

  (root / "val" / "images").mkdir(parents=True, exist_ok=True)
  (root / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
  words = []
  for k, w in enumerate(wnids):
    shape, hue_index, texture = class_factors(k)
    words.append(f"{w}\t{HUE_NAMES[hue_index]} {texture} {shape}\n")
  (root / "words.txt").write_text("".join(words))

  jobs = []
  for k in range(num_classes):
    tr = slice(k * train_per_class, (k + 1) * train_per_class)
    va = val_position[k * test_per_class : (k + 1) * test_per_class]
    jobs.append(
      _ClassJob(
        str(root),
        k,
        seed,
        image_size,
        tuple(train_gray[tr].tolist()),
        tuple(train_corrupt[tr].tolist()),
        tuple(va.tolist()),
        tuple(val_gray[va].tolist()),
      )
    )
  num_workers = max(1, min(num_workers, num_classes))
  if num_workers > 1:
    # spawn, not fork: the caller may already run JAX's threads.
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
      results = list(pool.map(_write_class, jobs))
  else:
    results = [_write_class(job) for job in jobs]

  annotations = {}
  for k, (boxes, lines) in enumerate(results):
    (root / "train" / wnids[k] / f"{wnids[k]}_boxes.txt").write_text(boxes)
    annotations.update(lines)
  (root / "val" / "val_annotations.txt").write_text("".join(annotations[j] for j in range(n_val)))

  corrupt_paths = [
    f"train/{wnids[f // train_per_class]}/images/{wnids[f // train_per_class]}_{f % train_per_class}.JPEG"
    for f in np.flatnonzero(train_corrupt >= 0).tolist()
  ]
  info = {
    "num_classes": num_classes,
    "train_per_class": train_per_class,
    "test_per_class": test_per_class,
    "image_size": image_size,
    "seed": seed,
    "grayscale_fraction": grayscale_fraction,
    "corrupt_files": corrupt_paths,
    "grayscale_files": int(train_gray.sum() + val_gray.sum()),
    "classes": {
      w: {"shape": f[0], "hue": HUE_NAMES[f[1]], "texture": f[2]}
      for w, f in ((w, class_factors(k)) for k, w in enumerate(wnids))
    },
  }
  (root / INFO_FILE).write_text(json.dumps(info, indent=1))
  return root
