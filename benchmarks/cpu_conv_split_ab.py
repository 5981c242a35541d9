"""A whole fwd+bwd step on a CPU with the conv lowering before and after the per-direction split, interleaved.

    python benchmarks/cpu_conv_split_ab.py efficientnet_lite0,resnet50 3 4       # models, steps, rounds
    python benchmarks/cpu_conv_split_ab.py resnet50 3 4 nonew le4 le8 stem_xla   # variants of the rule
    python benchmarks/cpu_conv_split_ab.py resnet50,vgg16 2 4 notaps taps        # XLA's backward, the taps, where tuned
    python benchmarks/cpu_conv_split_ab.py resnet50 1 3 notaps px224             # at 224 px
    python benchmarks/cpu_conv_split_ab.py resnet50 2 3 tapsle8 b64              # batch 64; taps up to 8x8 too

64 px (pxN: N px), batch 16 (bN: N), float32, train=True (BatchNorm batch statistics, dropout),
cross-entropy on random labels, grad of the params (no optimizer, no augmentation). `old`: choose_impl's
CPU rule before the split, one lowering and its own autodiff (layers.conv and layers.choose_impl swapped
while it is traced); `new`: the committed rule; `new_<word>`: the committed rule changed as VARIANTS says
(leT, notaps, taps, tapsle8, stem_xla). Each candidate in turn every round (best of the rounds), so that all see
the same load: report `uptime`'s load average with the ratios. Prints per model the best ms of each, and
each candidate's loss and largest gradient difference from `old`'s.
"""

import contextlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from cpu_convs import _old_choice  # noqa: E402
from jsim import models  # noqa: E402
from jsim.models import layers  # noqa: E402


@contextlib.contextmanager
def old_lowering():
  """The lowering before the per-direction split: choose_impl's old rule, one lowering, its own autodiff."""
  conv, choose = layers.conv, layers.choose_impl

  def old_choose(platform, conv_impl, **shape):
    assert platform == "cpu" and conv_impl == "auto"
    return _old_choice(**shape)

  def old_conv(x, kernel, *, strides, padding, groups, lowering, grad_lowering=None):
    return layers._conv(x, kernel, tuple(strides), tuple(tuple(p) for p in padding), groups, lowering)

  layers.conv, layers.choose_impl = old_conv, old_choose
  try:
    yield
  finally:
    layers.conv, layers.choose_impl = conv, choose


@contextlib.contextmanager
def rule_variant(adjust):
  """The committed rule with its (forward, backward) pair changed by adjust(fwd, bwd, shape) while a model is traced."""
  choose = layers.choose_impl

  def patched(platform, conv_impl, **shape):
    return adjust(*choose(platform, conv_impl, **shape), shape)

  layers.choose_impl = patched
  try:
    yield
  finally:
    layers.choose_impl = choose


# Variants of the committed rule by command-line word (leT: T in the word): adjust(fwd, bwd, shape).
VARIANTS = {
  # XLA's backward for kxk convs with an output larger than T x T where the rule picks im2col's
  "le": lambda t: (
    lambda fwd, bwd, shape: (fwd, "xla") if (fwd, bwd) == ("xla", "im2col") and max(shape["out_hw"]) > t else (fwd, bwd)
  ),
  # XLA's own backward, or the per-tap kernel gradient, where the rule leaves it to the host's record (tuned)
  "notaps": lambda fwd, bwd, shape: (fwd, "xla") if bwd == "tuned" else (fwd, bwd),
  "taps": lambda fwd, bwd, shape: (fwd, "taps") if bwd == "tuned" else (fwd, bwd),
  # taps instead of im2col's backward after XLA's forward (outputs larger than the kernel, up to 8x8)
  "tapsle8": lambda fwd, bwd, shape: (fwd, "taps") if (fwd, bwd) == ("xla", "im2col") else (fwd, bwd),
  # XLA's backward for the convs of fewer than 8 input channels (the stems)
  "stem_xla": lambda fwd, bwd, shape: (fwd, "xla") if shape["in_features"] < 8 and fwd == "xla" else (fwd, bwd),
}


def build(name, px, batch):
  model = models.build(name, num_classes=180, dtype=jnp.float32, conv_impl="auto")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, px, px, 3), dtype=np.float32))
  y = jnp.asarray(rng.integers(0, 180, batch))
  variables = jax.jit(lambda k: model.init({"params": k, "dropout": k}, x[:1], train=False))(jax.random.PRNGKey(0))

  def loss(params, stats):
    (logits, _), new = model.apply(
      {"params": params, "batch_stats": stats},
      x,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": jax.random.PRNGKey(1)},
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  return lambda: step(variables["params"], variables.get("batch_stats", {}))


if len(sys.argv) < 2:
  raise SystemExit(__doc__)
steps, rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3, int(sys.argv[3]) if len(sys.argv) > 3 else 5
px = next((int(a[2:]) for a in sys.argv[4:] if a.startswith("px")), 64)
batch = next((int(a[1:]) for a in sys.argv[4:] if a.startswith("b") and a[1:].isdigit()), 16)
for name in sys.argv[1].split(","):
  fns = {}
  with old_lowering():
    fns["old"] = build(name, px, batch)
    jax.block_until_ready(fns["old"]())
  if "nonew" not in sys.argv[4:]:
    fns["new"] = build(name, px, batch)
    jax.block_until_ready(fns["new"]())
  for word in sys.argv[4:]:
    if word.startswith("le"):
      adjust = VARIANTS["le"](int(word[2:]))
    elif word in VARIANTS:
      adjust = VARIANTS[word]
    else:
      continue
    with rule_variant(adjust):
      fns[f"new_{word}"] = build(name, px, batch)
      jax.block_until_ready(fns[f"new_{word}"]())
  (lo, go), *others = [f() for f in fns.values()]
  diff = {  # each candidate's largest gradient difference from old's
    k: max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(go), jax.tree.leaves(g)))
    for k, (_, g) in zip(list(fns)[1:], others)
  }
  best = {k: 1e9 for k in fns}
  load0 = os.getloadavg()
  for _ in range(rounds):
    for k, f in fns.items():
      t0 = time.perf_counter()
      for _ in range(steps):
        out = f()
      jax.block_until_ready(out)
      best[k] = min(best[k], (time.perf_counter() - t0) / steps)
  print(
    json.dumps(
      dict(
        model=name,
        px=px,
        batch=batch,
        ms={k: round(v * 1e3, 1) for k, v in best.items()},
        loss={k: float(l[0]) for k, (l, _) in zip(fns, [(lo, go), *others])},
        max_grad_diff=diff,
        load_before=load0,
        load_after=os.getloadavg(),
        steps=steps,
        rounds=rounds,
      )
    ),
    flush=True,
  )
