"""What checkpoint checksums cost: save and restore of a ResNet50 stage-1 state, with and without them.

    python benchmarks/checkpoint_checksum.py [--repeats 5] [--dir /tmp/ckpt_bench] [--out runs/bench/checksum]

The state is stage 1's TrainState for ResNet50 with the 180-class head (parameters,
BatchNorm statistics, Nesterov momentum, step: ~188 MB of float32), with random values,
placed on the default device like a training run's. Times, median of --repeats:
  * save: jsim.checkpoint.StageCheckpoints.save (synchronous orbax save + the checksum),
    and the checksum alone (state_digest, which copies the state to the host first);
  * restore: StageCheckpoints.restore (orbax restore + verification), and the check alone.
The cost of the checksum is reported as a share of the save and restore it is part of.
A figure holds only for the device (and disk) named in the output.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def resnet50_state():
  from jsim import configs, models
  from jsim.train import classifier
  from jsim.train.state import TrainState

  config = configs.base_config()
  model = models.build("resnet50", num_classes=180, dtype=jnp.float32)
  tx = classifier.make_optimizer(config.classifier)

  def create():
    x = jnp.zeros((1, 224, 224, 3), jnp.float32)
    key = jax.random.PRNGKey(0)
    return TrainState.create(model.init({"params": key, "dropout": key}, x, train=False), tx)

  shapes = jax.eval_shape(create)
  rng = np.random.default_rng(0)
  return jax.tree.map(
    lambda s: jax.device_put(
      rng.standard_normal(s.shape).astype(s.dtype)
      if jnp.issubdtype(s.dtype, jnp.floating)
      else np.zeros(s.shape, s.dtype)
    ),
    shapes,
  )


def device_name() -> str:
  d = jax.devices()[0]
  if d.platform == "cpu":
    model = next(
      (
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
      ),
      platform.processor(),
    )
    import os

    return f"CPU: {model}, {os.cpu_count()} cores"
  return f"{d.platform.upper()}: {d.device_kind}"


def timed(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder)")
  parser.add_argument("--out", default=None, help="write <out>.json")
  args = parser.parse_args()
  from jsim.checkpoint import StageCheckpoints, abstract_like, meta_digest, state_digest

  state = resnet50_state()
  jax.block_until_ready(state)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"))
  shutil.rmtree(root, ignore_errors=True)
  ckpts = StageCheckpoints(root / "checkpoints", keep=2)
  meta = {"epoch": 1, "batch_in_epoch": 0, "rows": [{"epoch": 1, "lr": 0.01}] * 30}
  step = [0]

  def save():
    step[0] += 1
    ckpts.save(step[0], state, meta)

  save()  # warm-up (orbax's first save sets up its handlers)
  digest = timed(lambda: (state_digest(state), meta_digest(meta)), args.repeats)
  saving = timed(save, args.repeats)
  abstract = abstract_like(state)
  latest = ckpts.latest_step()
  ckpts.restore(latest, abstract)  # warm-up
  restoring = timed(lambda: jax.block_until_ready(ckpts.restore(latest, abstract)[0]), args.repeats)
  restored, _ = ckpts.restore(latest, abstract)
  checking = timed(lambda: state_digest(restored), args.repeats)
  ckpts.close()
  shutil.rmtree(root, ignore_errors=True)

  out = {
    "device": device_name(),
    "state_mb": nbytes / 1e6,
    "repeats": args.repeats,
    "save_s": saving,
    "save_checksum_s": digest,
    "restore_s": restoring,
    "restore_check_s": checking,
    "checksum_gb_per_s": nbytes / 1e9 / digest,
  }
  print(f"ResNet50 stage-1 state, {nbytes / 1e6:.0f} MB, on {out['device']} (median of {args.repeats})")
  print(f"  save    {saving:7.3f} s, of which the checksum {digest:6.3f} s ({digest / saving:.0%})")
  print(f"  restore {restoring:7.3f} s, of which the check    {checking:6.3f} s ({checking / restoring:.0%})")
  print(f"  SHA-256 over the arrays: {out['checksum_gb_per_s']:.2f} GB/s (device-to-host copy included)")
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
