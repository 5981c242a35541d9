"""Which convolution lowering jsim compiles on this machine's backend, checked in the compiled program.

    python benchmarks/conv_path.py                                   # resnet50 and efficientnet_lite0
    python benchmarks/conv_path.py --models vgg16 --input_size 224

For each model, jits the gradient of its forward with `conv_impl=auto` and with `conv_impl=xla` and
compares the two programs: off a CPU, `auto` must be exactly XLA's conv (jsim.models.layers.choose_impl),
so the lowered StableHLO texts must be equal. Also counts the cuDNN convolution calls in the compiled
program (0 on a CPU). Exits 1 where auto is not XLA's conv on a GPU or TPU. tests/test_layers.py checks
the same choice by pretending the platform; this runs it on the real one.

Seen on one NVIDIA H200 (2026-12-04; jax 0.11.2, CUDA 13), with this comparison on the gradient of the
logits alone: auto == xla (lowered and compiled texts equal) for both models, 158 (ResNet50) and 146
(EfficientNet-Lite0) cuDNN convolution calls in the compiled gradient at 64 px, batch 4.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, str(REPO))


def programs(name: str, conv_impl: str, input_size: int, batch: int) -> tuple[str, str, float]:
  """(lowered StableHLO, compiled HLO, compile seconds) of the gradient of `name`'s mean outputs."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jsim import models

  model = models.build(name, num_classes=10, conv_impl=conv_impl)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, input_size, input_size, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x, train=False)

  def loss(params, x):
    outputs = model.apply({**variables, "params": params}, x, train=False)  # (logits, embedding)
    return sum(jnp.mean(o) for o in jax.tree.leaves(outputs))

  t0 = time.perf_counter()
  lowered = jax.jit(jax.grad(loss)).lower(variables["params"], x)
  compiled = lowered.compile()
  return lowered.as_text(), compiled.as_text(), time.perf_counter() - t0


def main(argv=None) -> int:
  import jax

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="resnet50,efficientnet_lite0")
  ap.add_argument("--input_size", type=int, default=64)
  ap.add_argument("--batch", type=int, default=4)
  args = ap.parse_args(argv)

  backend = jax.default_backend()
  print(f"backend {backend}: {jax.devices()}")
  ok = True
  for name in args.models.split(","):
    auto_lowered, auto_compiled, auto_s = programs(name, "auto", args.input_size, args.batch)
    xla_lowered, xla_compiled, xla_s = programs(name, "xla", args.input_size, args.batch)
    same = auto_lowered == xla_lowered
    print(
      f"{name}: auto == xla (lowered): {same}; compiled texts equal: {auto_compiled == xla_compiled}; "
      f"cuDNN conv calls auto / xla: {auto_compiled.count('__cudnn$conv')} / {xla_compiled.count('__cudnn$conv')}; "
      f"compiled in {auto_s:.1f} / {xla_s:.1f} s"
    )
    if backend != "cpu":
      ok = ok and same
  if backend == "cpu":
    print("on a CPU, auto chooses a lowering per shape (jsim.models.layers.choose_impl)")
  else:
    print(f"auto {'is' if ok else 'is NOT'} XLA's conv on {backend}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
