"""Stage-1 train images/s with each metric-learning loss beside the protocol's cross-entropy, one run, one device.

    python benchmarks/metric_step.py --out runs/bench/metric_h100                # ResNet50, 224 px (GPU)
    python benchmarks/metric_step.py --out /tmp/metric_cpu --model resnet_tiny --input_size 64 \
        --batch 32 --steps 4 --warmup 1 --num_images 256                        # a short CPU run

Every row is the real jitted step on synthetic uint8 64x64 images already on the device
(gather, augmentation, resize to --input_size, forward + backward, SGD, BatchNorm):
ClassifierPlan's for cross_entropy, MetricPlan's (m-per-class batches, embedding head
of --embedding_dim, the loss and its parameters) for the others, so the ratio to
cross_entropy is the cost of the loss, the head and the sampler. Timings exclude the
first --warmup steps (compilation), reported apart. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark as bench  # noqa: E402  (jsim's benchmark helpers: timing, fake data, device)

LOSSES = (
  "cross_entropy",
  "contrastive",
  "triplet",
  "multi_similarity",
  "proxy_anchor",
  "normalized_softmax",
  "arcface",
  "pair_ms",
)


def run(args) -> dict:
  from jsim import parallel
  from jsim.train import classifier, loop
  from jsim.train.state import TrainState

  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  data = bench._fake_data(args, rng, max(args.num_images, args.batch))
  rows = []
  for name in args.losses:
    config = bench._base_config(args, args.model, args.batch)
    config.classifier.loss = name
    config.classifier.embedding_dim = args.embedding_dim if name != "cross_entropy" else 0
    config.classifier.sampler_m = args.m
    model = classifier.build_classifier(config, bench.NUM_CLASSES)
    tx = classifier.make_optimizer(config.classifier)
    variables = classifier.initial_variables(config, model, bench.NUM_CLASSES, args.input_size)
    state = parallel.put_replicated(TrainState.create(variables, tx), mesh)
    plan = classifier.Stage1Plan(config, data, model, tx, mesh)
    plan.begin_epoch(1)
    # full-size batches only (cross_entropy's last one may be short: another compilation)
    full = plan.num_batches(1) - (1 if getattr(plan, "batch_sizes", [args.batch])[-1] != args.batch else 0)
    box = {"state": state, "sums": loop.zero_sums()}

    def step(i):
      box["state"], box["sums"] = plan.train_step(box["state"], 1, i % full, box["sums"])
      return box["state"].step

    compile_s, sec = bench._timed(step, args.warmup, args.steps)
    rows.append({"loss": name, "img_s": args.batch * args.steps / sec, "warmup_s": round(compile_s, 1)})
    print(json.dumps(rows[-1]), flush=True)
  base = rows[0]["img_s"] if rows and rows[0]["loss"] == "cross_entropy" else None
  for r in rows:
    r["vs_cross_entropy"] = round(r["img_s"] / base, 3) if base else None
  return {"device": bench.device_description(), "args": vars(args), "rows": rows}


def markdown(result: dict) -> str:
  a, d = result["args"], result["device"]
  lines = [
    f"Stage-1 train step, {a['model']} at {a['input_size']} px, batch {a['batch']} (m={a['m']}), "
    f"embedding head {a['embedding_dim']}, {a['steps']} timed steps; device: {d.get('device_kind')} "
    f"x{d.get('device_count')} {d.get('cpu_model', '')}",
    "",
    "| loss | images/s | vs cross_entropy | warm-up (compile) s |",
    "|---|---:|---:|---:|",
  ]
  for r in result["rows"]:
    lines.append(f"| {r['loss']} | {r['img_s']:.1f} | {r['vs_cross_entropy']} | {r['warmup_s']} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True)
  p.add_argument("--model", default="resnet50")
  p.add_argument("--losses", default=",".join(LOSSES), type=lambda s: [x for x in s.split(",") if x])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--m", type=int, default=4)
  p.add_argument("--embedding_dim", type=int, default=512)
  p.add_argument("--input_size", type=int, default=224)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--num_images", type=int, default=2048)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--dtype", default="auto")
  # benchmark._base_config reads these too
  p.add_argument("--embed_batch", type=int, default=256)
  p.add_argument("--pair_batch", type=int, default=256)
  args = p.parse_args(argv)
  result = run(args)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(result, indent=1))
  out.with_suffix(".md").write_text(markdown(result))
  print(markdown(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
