"""Preprocessing and augmentation, each against an independent per-image reference.

References: torch.nn.functional.interpolate (bilinear, align_corners=False) for
resizing, slicing for crops, np.flip for flips, torchvision's functional rotate
(bilinear, fill=0) for rotations and torchvision's adjust_* for colour jitter.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from jsim.data import augment as aug
from conftest import parametrize_fast_first

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # mean / std that leave pixel space as it is
BILINEAR = TF.InterpolationMode.BILINEAR


def _images(n: int = 4, size: int = 64, seed: int = 0) -> np.ndarray:
  """Random uint8 images with some gray pixels (hue's r == g == b branch) and saturated ones."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  x[:, :5] = x[:, :5, :, :1]  # gray rows
  x[:, 5:8] = rng.choice(np.array([0, 255], np.uint8), (n, 3, size, 3))
  return x


def _torch(x: np.ndarray) -> torch.Tensor:
  """[B, H, W, 3] uint8 or [0, 1] float -> float [B, 3, H, W] in [0, 1]."""
  t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
  return t.float() / 255 if x.dtype == np.uint8 else t.float()


def _numpy(t: torch.Tensor) -> np.ndarray:
  return t.permute(0, 2, 3, 1).numpy()


def _resize(t: torch.Tensor, out: int) -> torch.Tensor:
  return torch.nn.functional.interpolate(
    t, size=(out, out), mode="bilinear", align_corners=False, antialias=out < t.shape[-1]
  )


def _cfg(enabled=aug.TRANSFORMS, prob=1.0, **kw):
  cfg = aug.default_augment_config()
  cfg.enabled = tuple(enabled)
  cfg.prob = prob
  for k, v in kw.items():
    cfg[k] = v
  return cfg


B = 8  # every call through a shared compiled function uses this batch size


@functools.cache
def _applier(out: int, hue: float = 0.1, order: str = "paper"):
  """apply_params with the full config, compiled once per (out, hue) for the whole file.

  The parameters (which transforms fire, factors, offsets, angle) are runtime arrays,
  so one compilation serves every single-transform test. Images go in as float32 in
  [0, 1] (uint8 / 255, the same division apply_params does), so float test images share it.
  """
  cfg = _cfg(hue=hue, order=order)
  return jax.jit(lambda x, params, mean, std: aug.apply_params(x, params, mean, std, out, cfg))


def _apply(x, params, out, mean=ZERO, std=ONE, hue=0.1, order="paper"):
  assert len(x) == B
  x = x.astype(np.float32) / np.float32(255) if x.dtype == np.uint8 else x.astype(np.float32)
  fn = _applier(out, hue, order)
  return np.asarray(fn(x, params, jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)))


def _one_param(params, i):
  return {k: np.asarray(v[i]) for k, v in params.items()}


# --------------------------------------------------------------------------- config


def test_default_config():
  cfg = aug.default_augment_config()
  assert cfg.prob == 0.5 and cfg.crop_size == 56
  assert (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) == (0.1, 0.1, 0.1, 0.1)
  assert cfg.max_rotation == pytest.approx(math.pi / 3)
  assert set(cfg.enabled) == {"jitter", "crop", "flip", "rotation"}
  assert cfg.order == "paper"  # the source's order: the rotation turns the cropped window
  assert aug.IMAGENET_MEAN == (0.485, 0.456, 0.406) and aug.IMAGENET_STD == (0.229, 0.224, 0.225)


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("enabled", ("crop", "blur"), "blur"),
    ("prob", 1.5, "prob"),
    ("crop_size", 65, "crop_size"),
    ("hue", 0.7, "hue"),
    ("brightness", -0.1, "brightness"),
    ("order", "rotation_first", "order"),
  ],
)
def test_bad_config(field, value, match):
  cfg = aug.default_augment_config()
  cfg[field] = value
  with pytest.raises(ValueError, match=match):
    aug.sample_params(jax.random.key(0), 2, cfg, (64, 64))


def test_bad_inputs():
  cfg = aug.default_augment_config()
  with pytest.raises(ValueError, match="shape"):
    aug.preprocess(np.zeros((2, 64, 64), np.uint8), aug.IMAGENET_MEAN, aug.IMAGENET_STD, 224)
  with pytest.raises(ValueError, match="3 values"):
    aug.augment(jax.random.key(0), np.zeros((2, 64, 64, 3), np.uint8), (0.5, 0.5), ONE, 64, cfg)


def test_enabled_as_string():
  cfg = aug.default_augment_config().to_dict()
  cfg.update(enabled="flip, crop", prob=1.0)
  p = aug.sample_params(jax.random.key(0), B, cfg)
  assert p["flip"].all() and p["crop"].all()
  assert not p["jitter"].any() and not p["rotation"].any()


# --------------------------------------------------------------------------- preprocess


@pytest.mark.parametrize("out", [224, 64, 32])
def test_preprocess_matches_torch(out):
  x = _images()
  got = np.asarray(jax.jit(lambda im: aug.preprocess(im, aug.IMAGENET_MEAN, aug.IMAGENET_STD, out))(x))
  assert got.shape == (4, out, out, 3) and got.dtype == np.float32
  ref = _numpy(_resize(TF.normalize(_torch(x), aug.IMAGENET_MEAN, aug.IMAGENET_STD), out))
  np.testing.assert_allclose(got, ref, atol=2e-5)


def test_preprocess_explicit_formula():
  # Half-pixel bilinear 4 -> 8 written out by hand on one channel.
  x = np.zeros((1, 4, 4, 3), np.uint8)
  x[0, :, :, 0] = np.array([0, 51, 102, 255], np.uint8)[None, :]  # varies along x only
  got = np.asarray(aug.preprocess(x, ZERO, ONE, 8))[0, 3, :, 0]
  src = np.clip((np.arange(8) + 0.5) * 4 / 8 - 0.5, 0, 3)
  ref = np.interp(src, np.arange(4), np.array([0, 51, 102, 255]) / 255)
  np.testing.assert_allclose(got, ref, atol=1e-6)


@parametrize_fast_first("out", [224, 64, 32])
def test_prob_zero_equals_preprocess(out):
  x = _images()
  cfg = _cfg(prob=0.0)
  pre = jax.jit(lambda im: aug.preprocess(im, aug.IMAGENET_MEAN, aug.IMAGENET_STD, out))(x)
  got = jax.jit(lambda k, im: aug.augment(k, im, aug.IMAGENET_MEAN, aug.IMAGENET_STD, out, cfg))(jax.random.key(3), x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(pre))


# --------------------------------------------------------------------------- geometry


def test_flip():
  x = _images(B)
  params = aug.sample_params(jax.random.key(1), B, _cfg(["flip"]))
  assert np.asarray(params["flip"]).all()
  np.testing.assert_allclose(_apply(x, params, 64), np.flip(x, axis=2) / 255.0, atol=1e-6)
  # At 224 the flip commutes with the (symmetric) half-pixel resize.
  pre = np.asarray(aug.preprocess(x, ZERO, ONE, 224))
  np.testing.assert_allclose(_apply(x, params, 224), np.flip(pre, axis=2), atol=1e-5)


def test_crop():
  x = _images(B)
  params = aug.sample_params(jax.random.key(2), B, _cfg(["crop"]))
  got = _apply(x, params, 224, aug.IMAGENET_MEAN, aug.IMAGENET_STD)
  offsets = set()
  for i in range(B):
    p = _one_param(params, i)
    cy, cx = int(p["crop_y"]), int(p["crop_x"])
    assert p["crop"] and 0 <= cy <= 8 and 0 <= cx <= 8
    offsets.add((cy, cx))
    window = x[i : i + 1, cy : cy + 56, cx : cx + 56]
    ref = _numpy(_resize(TF.normalize(_torch(window), aug.IMAGENET_MEAN, aug.IMAGENET_STD), 224))
    np.testing.assert_allclose(got[i], ref[0], atol=2e-5)
  assert len(offsets) > 1


def test_rotation_matches_torchvision():
  # At out_size == H the fused sampler evaluates the rotation at the pixel centres, as
  # torchvision's rotate does: equal everywhere, the fill border included.
  x = _images(B)
  params = aug.sample_params(jax.random.key(4), B, _cfg(["rotation"]))
  got = _apply(x, params, 64)
  angles = np.asarray(params["angle"])
  assert np.all(np.abs(angles) <= math.pi / 3) and np.ptp(angles) > 0.1
  for i in range(B):
    ref = TF.rotate(_torch(x[i : i + 1]), math.degrees(angles[i]), interpolation=BILINEAR, fill=[0.0])
    np.testing.assert_allclose(got[i], _numpy(ref)[0], atol=2e-5)
  # Corners are uncovered for |angle| > ~3 degrees: black in pixel space.
  big = np.abs(angles) > 0.1
  assert big.any() and np.all(got[big][:, 0, 0] == 0)


def test_rotation_fill_is_zero_before_normalisation():
  x = _images(B)
  params = aug.sample_params(jax.random.key(5), B, _cfg(["rotation"]))
  params["angle"] = jnp.full((B,), math.pi / 4, jnp.float32)
  got = _apply(x, params, 64, aug.IMAGENET_MEAN, aug.IMAGENET_STD)
  fill = -np.asarray(aug.IMAGENET_MEAN) / np.asarray(aug.IMAGENET_STD)
  np.testing.assert_allclose(got[:, 0, 0], np.broadcast_to(fill, (B, 3)), atol=1e-6)


def _affine_images(n: int, seed: int) -> np.ndarray:
  # Bilinear interpolation reproduces an affine image exactly, so a single fused
  # resampling and the chain of three reference resamplings must agree inside the image.
  rng = np.random.default_rng(seed)
  i, j = np.meshgrid(np.arange(64) - 31.5, np.arange(64) - 31.5, indexing="ij")
  a = rng.uniform(-1, 1, (n, 1, 1, 3, 2)) * 0.006
  return (0.5 + a[..., 0] * i[None, :, :, None] + a[..., 1] * j[None, :, :, None]).astype(np.float32)


def _reference_chain(t: torch.Tensor, p: dict, out: int, order: str) -> torch.Tensor:
  """The documented sequence of image operations for `order`, with torchvision."""
  cy, cx = int(p["crop_y"]), int(p["crop_x"])
  rotate = functools.partial(TF.rotate, angle=math.degrees(p["angle"]), interpolation=BILINEAR, fill=[0.0])
  if order == "rotate_first":  # rotate the whole image, flip, crop, resize
    t = rotate(t)
    if p["flip"]:
      t = torch.flip(t, dims=[-1])
    return _resize(t[..., cy : cy + 56, cx : cx + 56], out)
  t = t[..., cy : cy + 56, cx : cx + 56]  # the paper's: crop, flip, rotate the window, resize
  if p["flip"]:
    t = torch.flip(t, dims=[-1])
  return _resize(rotate(t), out)


@pytest.mark.parametrize("order", aug.ORDERS)
@parametrize_fast_first("out", [64, 224])
def test_crop_flip_rotation_composed(out, order):
  x = _affine_images(B, seed=out)
  params = aug.sample_params(jax.random.key(out), B, _cfg(["crop", "flip", "rotation"]))
  params["flip"] = jnp.arange(B) % 2 == 0  # both flip states
  got = _apply(x, params, out, order=order)

  n_outside = 0
  for i in range(B):
    p = _one_param(params, i)
    ref = _numpy(_reference_chain(_torch(x[i : i + 1]), p, out, order))[0]
    # Compare where the reference never touched the fill (its result for a ones image is 1);
    # within about a pixel of the rotated border the two resampling chains blend the fill differently.
    ones = _numpy(_reference_chain(torch.ones(1, 3, 64, 64), p, out, order))[0]
    inside = ones > 1 - 1e-5
    assert inside.mean() > 0.3
    np.testing.assert_allclose(got[i][inside], ref[inside], atol=1e-4)
    # Where the reference is pure fill, so is the fused result (black in pixel space).
    outside = ones < 1e-7
    assert np.all(got[i][outside] == 0)
    n_outside += outside.sum()
  assert n_outside > 0


@pytest.mark.parametrize("order", aug.ORDERS)
def test_flip_rotation_exact(order):
  # Without a crop (and at out_size == H) the chain has one resampling, so the fused result
  # equals torchvision's flip + rotate everywhere, border included, in the order's sequence.
  x = _images(B)
  params = aug.sample_params(jax.random.key(21), B, _cfg(["flip", "rotation"]))
  params["flip"] = jnp.arange(B) % 2 == 0
  got = _apply(x, params, 64, order=order)
  for i in range(B):
    p = _one_param(params, i)
    t = _torch(x[i : i + 1])
    rotate = functools.partial(TF.rotate, angle=math.degrees(p["angle"]), interpolation=BILINEAR, fill=[0.0])
    flip = (lambda u: torch.flip(u, dims=[-1])) if p["flip"] else (lambda u: u)
    ref = rotate(flip(t)) if order == "paper" else flip(rotate(t))
    np.testing.assert_allclose(got[i], _numpy(ref)[0], atol=2e-5)


def _fill_fraction(order: str | None, n: int = 512) -> float:
  """Mean fraction of the output (crop and rotation both fire, out 64) that is fill; None: the default order."""
  cfg = _cfg(["crop", "rotation"])
  if order is not None:
    cfg.order = order
  ones = jnp.ones((n, 64, 64, 3), jnp.float32)
  got = jax.jit(lambda k: aug.augment(k, ones, ZERO, ONE, 64, cfg))(jax.random.key(22))
  return float(1.0 - jnp.mean(got))


def test_black_fill_fraction_by_order():
  # The audit's figures: rotating the cropped 56x56 window (the paper's order) leaves about
  # 13.8 % of it black on average over angles ~ U[-pi/3, pi/3]; rotating the 64x64 image
  # before cropping, 5.7 %. (Those are torchvision's two-resampling chain, 13.6 % / 5.75 % here;
  # the exact continuous geometry gives 13.0 % / 5.4 %, which the single fused resampling
  # follows: 13.1 % / 5.4 % measured with this seed.)
  paper, rotate_first, default = _fill_fraction("paper"), _fill_fraction("rotate_first"), _fill_fraction(None)
  assert 0.125 < paper < 0.145, paper
  assert 0.048 < rotate_first < 0.062, rotate_first
  assert default == paper  # the paper's order is the default


@pytest.mark.parametrize("order", aug.ORDERS)
def test_crop_flip_composed_exact(order):
  # Without rotation there is no fill: the fused result equals slice -> flip -> resize ('paper')
  # or flip -> slice -> resize ('rotate_first') everywhere.
  x = _images(B)
  params = aug.sample_params(jax.random.key(7), B, _cfg(["crop", "flip"]))
  got = _apply(x, params, 224, order=order)
  for i in range(B):
    p = _one_param(params, i)
    cy, cx = int(p["crop_y"]), int(p["crop_x"])
    if order == "paper":
      window = np.flip(x[i : i + 1, cy : cy + 56, cx : cx + 56], axis=2)
    else:
      window = np.flip(x[i : i + 1], axis=2)[:, cy : cy + 56, cx : cx + 56]
    np.testing.assert_allclose(got[i], _numpy(_resize(_torch(window), 224))[0], atol=2e-6)


def test_disabled_transforms_are_identity():
  # A config with only rotation enabled (the others not traced) gives what the full
  # config gives with the others off.
  x = _images(B)
  key = jax.random.key(8)
  only = _cfg(["rotation"])
  got = np.asarray(jax.jit(lambda k, im: aug.augment(k, im, ZERO, ONE, 64, only))(key, x))
  # Not bit-identical: with fewer ops XLA folds the constant grid into the rotation differently.
  np.testing.assert_allclose(got, _apply(x, aug.sample_params(key, B, only), 64), atol=2e-5)


# --------------------------------------------------------------------------- colour


_ADJUST = {
  "brightness": TF.adjust_brightness,
  "contrast": TF.adjust_contrast,
  "saturation": TF.adjust_saturation,
  "hue": TF.adjust_hue,
}


@pytest.mark.parametrize("op", aug.JITTER_OPS)
def test_jitter_component(op):
  x = _images(B)
  strengths = {o: (0.4 if o == op else 0.0) for o in aug.JITTER_OPS}
  params = aug.sample_params(jax.random.key(9), B, _cfg(["jitter"], **strengths))
  # With hue's strength 0 the hue step is skipped (as ColorJitter does): compile that variant.
  got = _apply(x, params, 64, hue=0.1 if op == "hue" else 0.0)
  factors = np.asarray(params[op])
  if op == "hue":
    assert np.all(np.abs(factors) <= 0.4)
  else:
    assert np.all((factors >= 0.6) & (factors <= 1.4))
  assert np.ptp(factors) > 0.05
  for i in range(B):
    ref = _ADJUST[op](_torch(x[i : i + 1]), float(factors[i]))
    np.testing.assert_allclose(got[i], _numpy(ref)[0], atol=2e-5)


def test_jitter_random_order():
  x = _images(B)
  cfg = _cfg(["jitter"], brightness=0.3, contrast=0.3, saturation=0.3, hue=0.2)
  orders = set()
  for seed in (10, 11):
    params = aug.sample_params(jax.random.key(seed), B, cfg)
    got = _apply(x, params, 64)
    for i in range(B):
      p = _one_param(params, i)
      orders.add(tuple(p["jitter_order"]))
      t = _torch(x[i : i + 1])
      for op in p["jitter_order"]:
        name = aug.JITTER_OPS[op]
        t = _ADJUST[name](t, float(p[name]))
      np.testing.assert_allclose(got[i], _numpy(t)[0], atol=3e-5)
  assert all(sorted(o) == [0, 1, 2, 3] for o in orders) and len(orders) > 4


def test_jitter_then_geometry():
  # Colour acts on the source, before the resampling: jitter + flip = flip of the jittered image.
  x = _images(B)
  params = aug.sample_params(jax.random.key(12), B, _cfg(["jitter", "flip"]))
  jittered = dict(params, flip=jnp.zeros(B, bool))
  np.testing.assert_allclose(_apply(x, params, 64), np.flip(_apply(x, jittered, 64), axis=2), atol=1e-6)


# --------------------------------------------------------------------------- randomness


def test_probabilities_and_ranges():
  n = 20000
  cfg = aug.default_augment_config()
  p = {k: np.asarray(v) for k, v in aug.sample_params(jax.random.key(11), n, cfg).items()}
  fired = np.stack([p[t] for t in aug.TRANSFORMS], 1).astype(float)
  # Each about half the time (4 sigma = 0.014), pairwise independent.
  np.testing.assert_allclose(fired.mean(0), 0.5, atol=0.02)
  for a, b in itertools.combinations(range(4), 2):
    assert abs((fired[:, a] * fired[:, b]).mean() - 0.25) < 0.02
  assert abs(fired.sum(1).mean() - 2.0) < 0.05
  for name in ("brightness", "contrast", "saturation"):
    assert p[name].min() >= 0.9 and p[name].max() <= 1.1
    assert abs(p[name].mean() - 1.0) < 0.005
  assert np.abs(p["hue"]).max() <= 0.1 and abs(p["hue"].mean()) < 0.005
  assert np.abs(p["angle"]).max() <= math.pi / 3
  np.testing.assert_allclose(p["angle"].var(), (math.pi / 3) ** 2 / 3, rtol=0.05)
  for k in ("crop_y", "crop_x"):
    counts = np.bincount(p[k], minlength=9)
    assert len(counts) == 9  # offsets 0..8 only
    np.testing.assert_allclose(counts / n, 1 / 9, atol=0.012)
  perms = [tuple(o) for o in p["jitter_order"]]
  counts = np.array([perms.count(q) for q in itertools.permutations(range(4))])
  assert counts.min() > 0 and np.abs(counts / n - 1 / 24).max() < 0.012


def test_prob_one_and_disabled():
  p = aug.sample_params(jax.random.key(12), B, _cfg(["crop", "rotation"], prob=1.0))
  assert p["crop"].all() and p["rotation"].all()
  assert not p["flip"].any() and not p["jitter"].any()


_TRACES = []


@jax.jit
def _augment_step(key, images):
  _TRACES.append(1)  # runs at trace time only
  return aug.augment(key, images, aug.IMAGENET_MEAN, aug.IMAGENET_STD, 96, aug.default_augment_config())


def test_determinism():
  x = np.repeat(_images(1), B, axis=0)  # B copies of one image
  a = np.asarray(_augment_step(jax.random.key(13), x))
  np.testing.assert_array_equal(a, np.asarray(_augment_step(jax.random.key(13), x)))
  assert not np.allclose(a, np.asarray(_augment_step(jax.random.key(14), x)))
  # Per-image randomness: the copies are augmented differently.
  assert len({a[i].tobytes() for i in range(B)}) > B // 2
  # Image i's parameters come from jax.random.split(key, B)[i] alone.
  cfg = aug.default_augment_config()
  whole = aug.sample_params(jax.random.key(13), B, cfg)
  spec = aug._spec(cfg, (64, 64))
  alone = aug._sample_one(jax.random.split(jax.random.key(13), B)[5], aug._dynamic(spec), (64, 64), 56)
  for k in whole:  # floats to rounding: jitted and eager arithmetic may contract differently
    np.testing.assert_allclose(np.asarray(whole[k][5]), np.asarray(alone[k]), rtol=1e-6, atol=1e-7)


def test_jit_compiles_once():
  a = _augment_step(jax.random.key(0), _images(B))
  b = _augment_step(jax.random.key(1), _images(B, seed=1))
  assert len(_TRACES) == 1  # whatever ran first, one trace for one batch shape
  assert a.shape == b.shape == (B, 96, 96, 3) and a.dtype == jnp.float32


# --------------------------------------------------------------------------- statistics


def test_channel_stats():
  rng = np.random.default_rng(15)
  x = rng.integers(0, 256, (23, 8, 9, 3), dtype=np.uint8)
  x[..., 2] //= 4  # channels differ
  mean, std = aug.channel_stats(x, chunk=5)  # chunks do not divide N
  ref = x.reshape(-1, 3).astype(np.float64) / 255
  np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-12)
  np.testing.assert_allclose(std, ref.std(0), rtol=1e-12)
  assert len(mean) == len(std) == 3 and all(isinstance(v, float) for v in mean + std)
  with pytest.raises(ValueError, match="uint8"):
    aug.channel_stats(x.astype(np.float32))
  with pytest.raises(ValueError, match="no images"):
    aug.channel_stats(x[:0])


def test_channel_stats_large_is_exact():
  # A constant set of 63,000-image size in pixels (as a broadcast view: no memory) is exact.
  x = np.broadcast_to(np.array([10, 200, 255], np.uint8), (63000, 64, 64, 3))
  mean, std = aug.channel_stats(np.asarray(x))
  np.testing.assert_allclose(mean, np.array([10, 200, 255]) / 255, rtol=1e-15)
  np.testing.assert_allclose(std, 0.0, atol=1e-12)
