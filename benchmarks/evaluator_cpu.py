"""Throughput of the streaming pair evaluator with a ResNet-sized Ms (D=2048) on this machine.

    python benchmarks/evaluator_cpu.py [--pairs 2000000] [--chunk 65536] [--dtype float32]

Random embeddings and an untrained SimilarityMLP (2048 -> 1024 -> 512 -> 2): the speed
does not depend on the weights. Pairs are the protocol's sampled test pairs (200 classes
x 50 images, truncated to --pairs), so the gathers and the per-case accumulation are
exercised as in a real evaluation. The first chunk (compilation) is timed separately.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jsim.data import pairs as pairs_lib  # noqa: E402
from jsim.evaluate import pairwise  # noqa: E402
from jsim.models import similarity  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--pairs", type=int, default=2_000_000)
  ap.add_argument("--chunk", type=int, default=65536)
  ap.add_argument("--dim", type=int, default=2048)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = ap.parse_args()

  labels = np.repeat(np.arange(200), 50).astype(np.int32)
  seen = np.arange(200) < 180
  emb = jax.random.normal(jax.random.key(0), (labels.size, args.dim), jnp.float32)
  model = similarity.SimilarityMLP(dtype=jnp.dtype(args.dtype))
  params = jax.jit(model.init)(jax.random.key(1), emb[:2], emb[:2])["params"]
  prob_fn = similarity.make_prob_fn(model)
  ci = pairs_lib.build_class_index(labels)
  pairs, same, case = pairs_lib.sample_test_pairs(jax.random.key(2), ci, seen)
  perm = jax.random.permutation(jax.random.key(3), pairs.shape[0])[: args.pairs]
  test = (pairs[perm], same[perm], case[perm])

  # One chunk alone: compilation + one chunk. The full run compiles once more (the pairs
  # array has another shape), so steady state = (n - chunk) / (full - one chunk).
  one = tuple(x[: args.chunk] for x in test)
  t0 = time.perf_counter()
  pairwise.evaluate_pairs(prob_fn, params, emb, labels, seen, one, chunk_size=args.chunk)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  res = pairwise.evaluate_pairs(prob_fn, params, emb, labels, seen, test, chunk_size=args.chunk)
  sec = time.perf_counter() - t0
  n = res.num_pairs
  steady = (n - args.chunk) / max(sec - first, 1e-9)
  flops = 2 * steady * (args.dim * args.dim // 2 + args.dim // 2 * args.dim // 4 + args.dim // 4 * 2)
  print(
    f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, cores: {os.cpu_count()}, "
    f"D={args.dim}, dtype={args.dtype}, chunk={args.chunk}"
  )
  print(
    f"{n:,} pairs in {sec:.2f} s incl. compile ({n / sec:,.0f} pairs/s); compile + 1 chunk {first:.2f} s; "
    f"steady state {steady:,.0f} pairs/s ({flops / 1e9:.1f} GFLOP/s)"
  )
  print(
    f"at that rate: protocol test set (3,980,000 pairs) {3_980_000 / steady:.0f} s, "
    f"exhaustive (49,995,000) {49_995_000 / steady / 60:.1f} min"
  )


if __name__ == "__main__":
  main()
