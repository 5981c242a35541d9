"""Cost of stage 1's on-device augmentation + normalisation + 64->224 resize per batch.

    python benchmarks/augment.py [--batches 64,256] [--out-size 224] [--steps 20]

Times the jitted `augment` (all four transforms on, probability 0.5) and, for
comparison, the plain `preprocess` (normalise + resize) on random uint8 64x64
images already on the device, on whatever device JAX uses (the CPU here unless
a GPU is present). Compilation is excluded; each figure is the median of --steps.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from jsim.data import augment


def _median_seconds(fn, steps: int) -> float:
  jax.block_until_ready(fn(0))
  times = []
  for i in range(1, steps + 1):
    t = time.perf_counter()
    jax.block_until_ready(fn(i))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batches", default="64,256")
  ap.add_argument("--out-size", type=int, default=224)
  ap.add_argument("--steps", type=int, default=20)
  args = ap.parse_args()
  cfg = augment.default_augment_config()
  mean, std = augment.IMAGENET_MEAN, augment.IMAGENET_STD
  device = jax.devices()[0].device_kind
  aug = jax.jit(lambda k, x: augment.augment(k, x, mean, std, args.out_size, cfg))
  pre = jax.jit(lambda x: augment.preprocess(x, mean, std, args.out_size))
  for batch in (int(b) for b in args.batches.split(",")):
    images = jax.device_put(np.random.default_rng(0).integers(0, 256, (batch, 64, 64, 3), np.uint8))
    key = jax.random.PRNGKey(0)
    t_aug = _median_seconds(lambda i: aug(jax.random.fold_in(key, i), images), args.steps)
    t_pre = _median_seconds(lambda i: pre(images), args.steps)
    print(
      json.dumps(
        {
          "device": device,
          "batch": batch,
          "out_size": args.out_size,
          "augment_ms": round(t_aug * 1e3, 3),
          "augment_images_per_s": round(batch / t_aug),
          "preprocess_ms": round(t_pre * 1e3, 3),
          "preprocess_images_per_s": round(batch / t_pre),
        }
      ),
      flush=True,
    )


if __name__ == "__main__":
  main()
