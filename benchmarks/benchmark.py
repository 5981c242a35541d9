"""jsim's throughput against the torchvision reference, side by side on one device.

    python benchmarks/benchmark.py --out runs/bench/h100          # the full run (GPU)
    python benchmarks/benchmark.py --out /tmp/bench_cpu --steps 2 --warmup 1 \
        --batches 8 --input_size 64 --num_images 256 --embed_batch 32 \
        --num_embeddings 1800 --eval_pairs 65536 --eval_chunk 16384   # a short CPU run

Measures, with synthetic data already on the device:
  * stage-1 train images/s for each --models x --batches: the real Stage1Plan step
    (uint8 64x64 images gathered by index, the protocol's augmentation, the resize to
    --input_size, forward + backward, Nesterov SGD, BatchNorm updates, metric sums);
  * embedding images/s: jsim.train.batching.embed_images (gather, preprocess, resize,
    forward, copy back to the host) at --embed_batch;
  * stage-2 pairs/s: the real SimilarityPlan step on --num_embeddings random D-dim
    embeddings of 180 classes (ResNet50-sized Ms: D=2048 -> 1024 -> 512 -> 2);
  * evaluator pairs/s: jsim.evaluate.pairwise.evaluate_pairs with that Ms on 200 x 50
    test embeddings and the protocol's sampled test pairs (first --eval_pairs of them);
and, in the same run and before JAX touches the device, the torchvision reference
(--torch_anchor, run as a subprocess with COMPILE=1 unless --no_torch_compile: torch
eager training per batch, eager inference at the largest batch, torch.compile training
at the largest batch), at the same resolution, batches and step counts.

Prints a table with the jsim/torch ratios and the targets, and writes <out>.json and
<out>.md, after every row too (marked partial until the end: a run stopped by a time limit keeps
its rows). Timings exclude compilation (the first --warmup steps), which is reported apart.
An absolute figure holds only for the device named in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, str(REPO))
DEFAULT_ANCHOR = REPO.parent / "shared" / "bench" / "torch_anchor.py"
NUM_CLASSES = 180

# REFERENCE.md's targets: (what, ratio or absolute figure).
TARGETS = {
  "resnet50_train": ("jsim / torch.compile, ResNet50 train", 1.10),
  "vgg16_train": ("jsim / torch eager, VGG16 train", 1.25),
  "embed": ("jsim embedding / torch eager inference", 1.7),
  "evaluator": ("evaluator pairs/s, ResNet50 Ms (D=2048)", 25e6),
}


def _csv(text: str, cast=str) -> list:
  return [cast(t) for t in text.split(",") if t.strip()]


# ---------------------------------------------------------------------------
# The torchvision reference (a subprocess, before JAX claims the GPU's memory).


def run_torch_anchor(
  anchor: Path,
  python: str,
  models: list[str],
  batches: list[int],
  *,
  steps: int,
  warmup: int,
  resolution: int,
  compile_: bool,
  timeout: float,
) -> dict:
  """Rows printed by the anchor script (one JSON dict per line), or an 'error'."""
  if not anchor.exists():
    return {"rows": [], "error": f"{anchor}: not found (pass --torch_anchor)"}
  env = dict(
    os.environ,
    STEPS=str(steps),
    WARM=str(warmup),
    RES=str(resolution),
    BATCHES=",".join(map(str, batches)),
    COMPILE="1" if compile_ else "0",
  )
  t0 = time.perf_counter()
  try:
    proc = subprocess.run([python, str(anchor), *models], capture_output=True, text=True, env=env, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    proc = types.SimpleNamespace(returncode=f"timeout after {timeout:.0f} s", stdout=out, stderr="")
  rows = []
  for line in proc.stdout.splitlines():
    line = line.strip()
    if line.startswith("{"):
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  out = {"rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
  if proc.returncode != 0:
    out["error"] = f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}"
  try:
    version = subprocess.run(
      [
        python,
        "-c",
        "import torch, torchvision; print(torch.__version__, "
        "torchvision.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() "
        "else 'cpu')",
      ],
      capture_output=True,
      text=True,
      timeout=120,
    ).stdout.strip()
    out["versions"] = version
  except (OSError, subprocess.TimeoutExpired):
    pass
  return out


def torch_figure(rows: list[dict], framework: str, model: str, mode: str, batch: int | None = None) -> float | None:
  for r in rows:
    if (
      r.get("framework") == framework
      and r.get("model") == model
      and r.get("mode") == mode
      and (batch is None or r.get("batch") == batch)
      and "img_s" in r
    ):
      return float(r["img_s"])
  return None


# ---------------------------------------------------------------------------
# jsim's measurements.


def _timed(fn, warmup: int, steps: int) -> tuple[float, float]:
  """(seconds of the first `warmup` calls incl. compilation, seconds of the next `steps`)."""
  import jax

  t0 = time.perf_counter()
  out = None
  for i in range(warmup):
    out = fn(i)
  jax.block_until_ready(out)
  t1 = time.perf_counter()
  for i in range(warmup, warmup + steps):
    out = fn(i)
  jax.block_until_ready(out)
  return t1 - t0, time.perf_counter() - t1


def _base_config(args, model_name: str, batch: int):
  from jsim import configs

  c = configs.base_config()
  c.model.name = model_name
  c.model.init = "random"
  c.model.dtype = args.dtype
  c.data.image_size = args.image_size
  c.classifier.batch_size = batch
  c.classifier.eval_batch_size = batch
  c.classifier.input_size = args.input_size
  c.classifier.augment.crop_size = args.image_size * 7 // 8  # 56 of 64, as the protocol
  c.embed.batch_size = args.embed_batch
  c.similarity.batch_size = args.pair_batch
  return c


def _fake_data(args, rng: np.random.Generator, num_images: int):
  """What Stage1Plan reads of jsim.data.prepare.Prepared: random uint8 images and labels."""
  from jsim.data import augment

  images = rng.integers(0, 256, (num_images, args.image_size, args.image_size, 3), dtype=np.uint8)
  return types.SimpleNamespace(
    train_set=types.SimpleNamespace(images=images),
    train_idx=np.arange(num_images),
    val_idx=np.arange(min(num_images, 64)),
    train_head_labels=rng.integers(0, NUM_CLASSES, num_images).astype(np.int32),
    mean=augment.IMAGENET_MEAN,
    std=augment.IMAGENET_STD,
  )


def bench_stage1(args, model_name: str, batch: int, mesh, rng) -> tuple[dict, object, object, object]:
  """Stage-1 train images/s; also returns (model, trained state, data) for the embedding."""
  import jax
  from jsim import parallel
  from jsim import models
  from jsim.train import classifier
  from jsim.train.state import TrainState

  config = _base_config(args, model_name, batch)
  model = classifier.build_classifier(config, NUM_CLASSES)
  tx = classifier.make_optimizer(config.classifier)
  variables = classifier.initial_variables(config, model, NUM_CLASSES, args.input_size)
  state = parallel.put_replicated(TrainState.create(variables, tx), mesh)
  del variables
  data = _fake_data(args, rng, max(args.num_images, batch))
  plan = classifier.Stage1Plan(config, data, model, tx, mesh)
  compile_s, sec, state = _time_plan(plan, state, args)
  out = {
    "workload": f"{model_name} train",
    "batch": batch,
    "img_s": batch * args.steps / sec,
    "warmup_s": round(compile_s, 1),
    "compute_dtype": str(jax.numpy.dtype(models.compute_dtype(args.dtype))),
  }
  return out, model, state, data


def _time_plan(plan, state, args):
  """(warm-up seconds, timed seconds, state) of the plan's real train step over epoch 1's full batches."""
  from jsim.train import loop

  plan.begin_epoch(1)
  full = sum(1 for size in plan.batch_sizes if size == plan.batch_size)  # the remainder batch compiles apart
  box = {"state": state, "sums": loop.zero_sums()}

  def step(i):
    box["state"], box["sums"] = plan.train_step(box["state"], 1, i % full, box["sums"])
    return box["state"].step

  compile_s, sec = _timed(step, args.warmup, args.steps)
  return compile_s, sec, box["state"]


def bench_embed(args, model_name: str, model, state, data, mesh) -> dict:
  """Embedding images/s through embed_images (indices in, float32 embeddings on the host out)."""
  from jsim import parallel
  from jsim.train import batching as embed

  images = parallel.put_replicated(data.train_set.images, mesh)
  n = data.train_set.images.shape[0]
  fn = embed.make_embed_fn(model, data.mean, data.std, args.input_size, mesh)
  b = args.embed_batch
  kw = dict(mean=data.mean, std=data.std, input_size=args.input_size, batch_size=b, mesh=mesh, embed_fn=fn)
  variables = state.variables
  # The real path: batches of indices in, float32 embeddings back on the host.
  idx = lambda count, offset: (np.arange(count) + offset) % n
  t0 = time.perf_counter()
  embed.embed_images(model, variables, images, idx(b * args.warmup, 0), **kw)
  t1 = time.perf_counter()
  e = embed.embed_images(model, variables, images, idx(b * args.steps, b * args.warmup), **kw)
  sec = time.perf_counter() - t1
  assert e.shape[0] == b * args.steps and np.isfinite(e).all()
  return {
    "workload": f"{model_name} embedding",
    "batch": b,
    "img_s": b * args.steps / sec,
    "warmup_s": round(t1 - t0, 1),
    "dim": int(e.shape[1]),
  }


def bench_stage2(args, mesh, rng) -> tuple[dict, object, object]:
  """Stage-2 train pairs/s; also returns (Ms, its params) for the evaluator."""
  from jsim import parallel
  from jsim.train import schedule, similarity

  config = _base_config(args, "resnet50", 64)
  # Few validation pairs (not measured), so that a reduced run's small classes can still
  # give the protocol's 644,400 training pairs without colliding with them.
  config.similarity.val_per_ordered_class_pair = 1
  config.similarity.val_similar_per_class = 2
  dim = args.dim
  per_class = max(args.num_embeddings // NUM_CLASSES, 2)
  labels = np.repeat(np.arange(NUM_CLASSES), per_class).astype(np.int32)
  emb = rng.standard_normal((labels.size, dim), dtype=np.float32)
  model = similarity.build_similarity(config, dim)
  tx = schedule.optimizer_from(config.similarity)
  state = parallel.put_replicated(similarity.init_state(config, model, dim, tx), mesh)
  plan = similarity.SimilarityPlan(config, emb, labels, model, tx, mesh)
  compile_s, sec, state = _time_plan(plan, state, args)
  return (
    {
      "workload": f"stage 2 train (D={dim})",
      "batch": args.pair_batch,
      "pairs_s": args.pair_batch * args.steps / sec,
      "warmup_s": round(compile_s, 1),
      "embeddings": int(labels.size),
      "pairs_per_epoch": int(sum(plan.batch_sizes)),
    },
    model,
    state.params,
  )


def bench_evaluator(args, model, params, mesh, rng) -> dict:
  """Evaluator pairs/s: evaluate_pairs on sampled test pairs, the second of two identical calls."""
  import jax
  from jsim import parallel
  from jsim.data import pairs as pairs_lib
  from jsim.evaluate import pairwise
  from jsim.models.similarity import make_prob_fn

  labels = np.repeat(np.arange(200), 50).astype(np.int32)  # the val folder: 200 classes x 50
  seen = np.arange(200) < NUM_CLASSES
  emb = parallel.put_replicated(rng.standard_normal((labels.size, args.dim), dtype=np.float32), mesh)
  pairs, same, case = pairs_lib.sample_test_pairs(jax.random.key(0), pairs_lib.build_class_index(labels, 200), seen)
  perm = jax.random.permutation(jax.random.key(1), pairs.shape[0])[: args.eval_pairs]
  test = (pairs[perm], same[perm], case[perm])
  prob_fn = make_prob_fn(model)
  kw = dict(chunk_size=args.eval_chunk, mesh=mesh)
  t0 = time.perf_counter()
  pairwise.evaluate_pairs(prob_fn, params, emb, labels, seen, test, **kw)  # compiles
  t1 = time.perf_counter()
  res = pairwise.evaluate_pairs(prob_fn, params, emb, labels, seen, test, **kw)
  sec = time.perf_counter() - t1
  return {
    "workload": f"evaluator (D={args.dim})",
    "batch": args.eval_chunk,
    "pairs_s": res.num_pairs / sec,
    "warmup_s": round(t1 - t0, 1),
    "pairs": res.num_pairs,
  }


# ---------------------------------------------------------------------------
# Putting it together.


def device_description() -> dict:
  import jax

  d = jax.devices()[0]
  out = {
    "platform": d.platform,
    "device_kind": d.device_kind,
    "device_count": jax.device_count(),
    "process_count": jax.process_count(),
    "jax": jax.__version__,
    "python": platform.python_version(),
  }
  if d.platform == "cpu":
    out["cpu_cores"] = os.cpu_count()
    try:
      for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
          out["cpu_model"] = line.split(":", 1)[1].strip()
          break
    except OSError:
      pass
  return out


def _ratio(a: float | None, b: float | None) -> float | None:
  return round(a / b, 3) if a and b else None


def compare(jsim_rows: list[dict], torch_rows: list[dict]) -> list[dict]:
  """Each jsim row with its torch figures, ratios and target."""
  out = []
  for r in jsim_rows:
    r = dict(r)
    w = r["workload"]
    if w.endswith(" train") and not w.startswith("stage 2"):
      model = w.split()[0]
      r["torch_eager"] = torch_figure(torch_rows, "torch-eager", model, "train", r["batch"])
      r["torch_compile"] = torch_figure(torch_rows, "torch-compile", model, "train", r["batch"])
      r["vs_eager"] = _ratio(r["img_s"], r["torch_eager"])
      r["vs_compile"] = _ratio(r["img_s"], r["torch_compile"])
      if model == "resnet50":
        r["target"] = "vs_compile >= 1.10"
        r["meets_target"] = None if r["vs_compile"] is None else r["vs_compile"] >= 1.10
      elif model == "vgg16":
        r["target"] = "vs_eager >= 1.25"
        r["meets_target"] = None if r["vs_eager"] is None else r["vs_eager"] >= 1.25
    elif w.endswith(" embedding"):
      model = w.split()[0]
      r["torch_eager"] = torch_figure(torch_rows, "torch-eager", model, "infer")
      r["vs_eager"] = _ratio(r["img_s"], r["torch_eager"])
      r["target"] = "vs_eager >= 1.7 (torch: inference at its largest batch)"
      r["meets_target"] = None if r["vs_eager"] is None else r["vs_eager"] >= 1.7
    elif w.startswith("evaluator"):
      r["target"] = ">= 25M pairs/s"
      r["meets_target"] = r["pairs_s"] >= 25e6
    out.append(r)
  return out


def _fmt(v, digits=0) -> str:
  if v is None:
    return "-"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, float):
    return f"{v:,.{digits}f}" if digits else f"{v:,.0f}"
  return str(v)


def markdown(result: dict) -> str:
  dev = result["device"]
  name = dev["device_kind"] + (
    f" ({dev.get('cpu_model', '')}, {dev.get('cpu_cores')} cores)" if dev["platform"] == "cpu" else ""
  )
  lines = [
    "# jsim benchmark",
    "",
    f"Device: {name}, jsim on {dev['devices_used']} of {dev['device_count']} device(s); jax {dev['jax']}, python {dev['python']}; "
    f"torch: {result['torch'].get('versions', 'not run')}.",
    f"Settings: {json.dumps(result['settings'])}",
    "",
  ]
  if not result.get("complete", True):
    lines += ["**Partial**: the run has not finished (or was stopped); these are the rows it had finished.", ""]
  if result.get("reduced"):
    lines += [
      f"**Reduced run** ({result['reduced']}): not comparable with the GPU targets (column 'met' left empty).",
      "",
    ]
  lines += [
    "| workload | batch | jsim /s | torch eager | torch.compile | jsim/eager | jsim/compile | target | met |",
    "|---|---:|---:|---:|---:|---:|---:|---|---|",
  ]
  for r in result["rows"]:
    speed = r.get("img_s", r.get("pairs_s"))
    unit = "img" if "img_s" in r else "pairs"
    lines.append(
      f"| {r['workload']} | {r['batch']} | {_fmt(speed)} {unit} | {_fmt(r.get('torch_eager'))} | "
      f"{_fmt(r.get('torch_compile'))} | {_fmt(r.get('vs_eager'), 2)} | {_fmt(r.get('vs_compile'), 2)} | "
      f"{r.get('target', '')} | {_fmt(r.get('meets_target'))} |"
    )
  if result["torch"].get("error"):
    lines += ["", f"torch reference: {result['torch']['error']}"]
  lines += [
    "",
    "Warm-up (compilation) seconds: "
    + ", ".join(f"{r['workload']} b{r['batch']}: {r['warmup_s']}" for r in result["rows"]),
  ]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(
    description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
  )
  ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
  ap.add_argument("--models", default="resnet50,vgg16")
  ap.add_argument("--batches", default="64,256", help="stage-1 train batches")
  ap.add_argument("--steps", type=int, default=30, help="timed steps per case")
  ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation included)")
  ap.add_argument("--input_size", type=int, default=224, help="network input side (the protocol: 224)")
  ap.add_argument("--image_size", type=int, default=64, help="side of the stored uint8 images (Tiny ImageNet: 64)")
  ap.add_argument("--num_images", type=int, default=8192, help="device-resident images the steps draw from")
  ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="model.dtype")
  ap.add_argument("--embed_batch", type=int, default=256)
  ap.add_argument("--pair_batch", type=int, default=256, help="stage-2 batch")
  ap.add_argument("--dim", type=int, default=2048, help="embedding width for stage 2 and the evaluator")
  ap.add_argument("--num_embeddings", type=int, default=90_000, help="stage-2 train embeddings (T180: 90,000)")
  ap.add_argument("--eval_pairs", type=int, default=3_980_000, help="evaluator pairs (protocol: 3,980,000)")
  ap.add_argument("--eval_chunk", type=int, default=65536)
  ap.add_argument("--num_devices", type=int, default=1, help="devices jsim uses (0: all); the torch reference uses one")
  ap.add_argument(
    "--only", default="stage1,embed,stage2,evaluator", help="jsim parts to run (embed needs stage1 of the same model)"
  )
  ap.add_argument("--torch_anchor", default=str(DEFAULT_ANCHOR), help="path of torch_anchor.py")
  ap.add_argument("--torch_python", default=sys.executable, help="interpreter for the torch reference")
  ap.add_argument("--no_torch", action="store_true", help="skip the torch reference")
  ap.add_argument("--no_torch_compile", action="store_true", help="torch eager only (no COMPILE=1)")
  ap.add_argument("--torch_timeout", type=float, default=1800)
  args = ap.parse_args(argv)
  models, batches, parts = _csv(args.models), _csv(args.batches, int), set(_csv(args.only))
  unknown = parts - {"stage1", "embed", "stage2", "evaluator"}
  if unknown:
    ap.error(f"--only: unknown parts {sorted(unknown)}")
  if "embed" in parts and "stage1" not in parts:
    ap.error("--only: embed reuses stage1's model and images; include stage1")

  # The reference first: once JAX starts on a GPU it holds most of its memory.
  torch_result = {"rows": [], "skipped": True}
  if not args.no_torch:
    print(f"torch reference: {args.torch_anchor} {' '.join(models)} ...", flush=True)
    torch_result = run_torch_anchor(
      Path(args.torch_anchor),
      args.torch_python,
      models,
      batches,
      steps=args.steps,
      warmup=args.warmup,
      resolution=args.input_size,
      compile_=not args.no_torch_compile,
      timeout=args.torch_timeout,
    )
    for r in torch_result["rows"]:
      print("  torch:", json.dumps(r), flush=True)
    if torch_result.get("error"):
      print("  torch reference failed:", torch_result["error"], flush=True)

  import jax
  from jax.sharding import Mesh
  from jsim import parallel

  parallel.maybe_initialize_distributed()
  devices = jax.devices()[: args.num_devices] if args.num_devices > 0 else jax.devices()
  mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
  dev = device_description()
  dev["devices_used"] = len(devices)
  print(f"jsim on {dev['device_kind']} x{len(devices)} of {dev['device_count']} ({dev['platform']})", flush=True)
  rng = np.random.default_rng(0)
  rows = []
  reduced = []
  if args.input_size != 224:
    reduced.append(f"input {args.input_size} px instead of 224")
  if args.steps < 20:
    reduced.append(f"{args.steps} timed steps")
  if dev["platform"] == "cpu":
    reduced.append("CPU")
  if args.eval_pairs < 3_980_000:
    reduced.append(f"{args.eval_pairs:,} evaluator pairs")

  out = None
  if args.out and parallel.is_main_process():
    out = Path(args.out)
    if out.suffix in (".json", ".md"):
      out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)

  def write(complete: bool) -> str:
    """The result so far, as markdown; also <out>.json and <out>.md (after every row: a run stopped by a
    time limit keeps the rows it finished)."""
    compared = compare(rows, torch_result["rows"])
    if reduced:  # ratios are still shown, but a reduced run says nothing about the targets
      for r in compared:
        r["meets_target"] = None
    result = {
      "device": dev,
      "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
      "torch": torch_result,
      "rows": compared,
      "reduced": ", ".join(reduced),
      "complete": complete,
      "targets": {k: {"what": w, "value": v} for k, (w, v) in TARGETS.items()},
      "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    md = markdown(result)
    if out is not None:
      from jsim import workdir as wd

      for suffix, text in ((".json", json.dumps(result, indent=1, default=str)), (".md", md)):
        wd.write_file(out.with_suffix(suffix), lambda tmp, text=text: Path(tmp).write_text(text))
    return md

  def record(row):
    rows.append(row)
    speed = row.get("img_s", row.get("pairs_s"))
    print(
      f"  jsim: {row['workload']:<28} batch {row['batch']:>6}: {speed:>14,.1f} "
      f"{'img' if 'img_s' in row else 'pairs'}/s (warm-up {row['warmup_s']} s)",
      flush=True,
    )
    write(complete=False)

  for name in models:
    if "stage1" not in parts:
      break
    for i, b in enumerate(batches):
      row, model, state, data = bench_stage1(args, name, b, mesh, rng)
      record(row)
      if "embed" in parts and i == len(batches) - 1:
        record(bench_embed(args, name, model, state, data, mesh))
      del state, model
  if parts & {"stage2", "evaluator"}:
    row, smodel, sparams = bench_stage2(args, mesh, rng)
    if "stage2" in parts:
      record(row)
    if "evaluator" in parts:
      record(bench_evaluator(args, smodel, sparams, mesh, rng))

  print("\n" + write(complete=True), flush=True)
  if out is not None:
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
