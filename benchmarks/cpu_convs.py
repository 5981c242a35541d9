"""jsim on a CPU against torch eager, float32, side by side; conv_impl=auto against xla.

    # the measurement, one model per run (quiet machine, 2-core AMD EPYC; wall time each, mostly XLA
    # compilation: 8 jsim programs per model; the figures are in BENCHMARKS.md):
    python benchmarks/cpu_convs.py --models resnet50 --out runs/bench/cpu_convs_resnet50            # 3 min 38 s
    python benchmarks/cpu_convs.py --models vgg16 --out runs/bench/cpu_convs_vgg16                  # 6 min 03 s
    python benchmarks/cpu_convs.py --models efficientnet_lite0 --out runs/bench/cpu_convs_lite0     # 3 min 40 s
    # the per-shape table behind jsim.models.layers.choose_impl:
    python benchmarks/cpu_convs.py --layers --out runs/bench/cpu_conv_layers                        # 51 s
    # where the stage-1 step's time goes (JAX profiler; per model and case, by forward/backward and layer kind):
    python benchmarks/cpu_convs.py --profile --models resnet50,vgg16,efficientnet_lite0 --cases 64:16,224:16 \
        --steps 3 --out runs/bench/cpu_step_profile
    # every conv of ResNet50 against torch's, per shape: forward, input gradient, kernel gradient:
    python benchmarks/cpu_convs.py --vs_torch --cases 64:16,64:64,224:16 --steps 3 --rounds 3 \
        --out runs/bench/cpu_convs_vs_torch                                                           # 1 min 17 s
    # a check that it runs (took 21 min wall, 3 min CPU, under load average 18):
    python benchmarks/cpu_convs.py --models resnet_tiny,vgg_tiny,efficientnet_lite0 --cases 32:8 --impl_cases 32:8 \
        --impls xla,matmul --steps 1 --rounds 1 --warmup 1 --out /tmp/cpu_convs_check

For each --models x --cases (input px:batch):
  * train images/s: the real stage-1 step (Stage1Plan: uint8 64x64 images gathered on the device,
    the protocol's augmentation, the resize to the input size, forward + backward, Nesterov SGD,
    BatchNorm updates), random labels;
  * forward images/s: the jitted backbone on a ready float32 NHWC batch (train=False);
with model.conv_impl=auto, and with each of --impls at the cases of --impl_cases. torch eager (torchvision
resnet50 / vgg16, timm for the EfficientNet-Lites) runs first, in a subprocess before JAX starts: float32,
channels_last, SGD with Nesterov momentum 0.8, random labels (constant labels would make its CPU steps
10-30x slower from denormals), forward under no_grad in eval mode, on ready tensors (so torch's train
figure has no augmentation: jsim's does). Timings exclude the first --warmup steps (compilation);
each figure is the best of --rounds rounds of --steps steps. Writes <out>.json and <out>.md.
Run it on a quiet machine and report `uptime`'s load average with it.

--profile instead traces --steps real stage-1 steps (conv_impl=auto) with the JAX profiler and sums the time of
each XLA:CPU instruction by what it computes (the compiled program's metadata: forward or backward, the Flax
module, the JAX primitive): augmentation and resize, the convs' arithmetic and their data movement, BatchNorm,
max-pooling, the rest of the model, the optimizer; with the slowest instructions.

--layers instead times, per conv shape of ResNet50 and VGG16 at 64 and 224 px and of EfficientNet-Lite0 at
64 px, interleaved (each candidate in turn, every round): the forward of XLA's conv and of the other
lowering; the backward alone (input and kernel gradients, the forward dead code) of XLA's transposes,
im2col's and, for depthwise convs, the hand-written VJP and the shifted sum's own autodiff; and forward +
backward of XLA's conv, of the single lowering the CPU rule picked before the per-direction split (`old`)
and of the (forward, backward) pair jsim.models.layers.choose_impl picks now (`new`).

--vs_torch instead times every distinct conv shape of ResNet50 (torchvision's v1.5) at --cases, each as jsim
runs it under conv_impl=auto and as torch eager does (F.conv2d and aten.convolution_backward, channels_last,
in the torch subprocess): the forward, the input gradient alone and the kernel gradient alone, best of --rounds
rounds of --steps calls (jsim's three interleaved); and the sums over the network (each shape times its count,
without the stem's input gradient, which no training step computes): where the convs of a training step stand
against torch's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "benchmarks")):
  if p not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, p)

NUM_CLASSES = 180
# jsim model name -> torch constructor, "module:function" or "timm:<timm name>".
TORCH_MODELS = {
  "resnet50": "torchvision.models:resnet50",
  "vgg16": "torchvision.models:vgg16",
  "efficientnet_lite0": "timm:efficientnet_lite0",
}


def _csv(text: str, cast=str) -> list:
  return [cast(t) for t in text.split(",") if t.strip()]


def _cases(text: str) -> list[tuple[int, int]]:
  out = []
  for item in _csv(text):
    px, sep, batch = item.partition(":")
    if not sep:
      raise SystemExit(f"--cases: expected px:batch items such as 64:16, got {item!r}")
    out.append((int(px), int(batch)))
  return out


def _best_rate(step, items: int, warmup: int, steps: int, rounds: int, sync) -> tuple[float, float]:
  """(warm-up seconds, best items/s over `rounds` rounds of `steps` calls of step(i))."""
  t0 = time.perf_counter()
  out = None
  for i in range(warmup):
    out = step(i)
  sync(out)
  warm = time.perf_counter() - t0
  best = 0.0
  for r in range(rounds):
    t0 = time.perf_counter()
    for i in range(steps):
      out = step(warmup + r * steps + i)
    sync(out)
    best = max(best, items * steps / (time.perf_counter() - t0))
  return warm, best


# ---------------------------------------------------------------------------
# torch eager (a subprocess of this script: `--torch_worker`).


def torch_worker(args) -> None:
  import importlib

  import torch

  torch.manual_seed(0)
  print(json.dumps({"version": f"torch {torch.__version__}, {torch.get_num_threads()} threads"}), flush=True)
  if args.vs_torch:
    return torch_convs(args)
  for name in _csv(args.models):
    if name not in TORCH_MODELS:
      print(json.dumps({"model": name, "error": "no torch reference for this model"}), flush=True)
      continue
    where, fn = TORCH_MODELS[name].split(":")
    try:
      if where == "timm":
        import timm

        build = lambda: timm.create_model(fn, num_classes=NUM_CLASSES)
      else:
        build = lambda: getattr(importlib.import_module(where), fn)(num_classes=NUM_CLASSES)
      build()
    except Exception as e:  # noqa: BLE001 - a measurement script: report and go on
      print(json.dumps({"model": name, "error": f"{type(e).__name__}: {e}"[:300]}), flush=True)
      continue
    for px, batch in _cases(args.cases):
      model = build().to(memory_format=torch.channels_last)
      x = torch.randn(batch, 3, px, px).to(memory_format=torch.channels_last)
      y = torch.randint(0, NUM_CLASSES, (batch,))
      opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.8, nesterov=True)
      lossf = torch.nn.CrossEntropyLoss()

      def train(_):
        loss = lossf(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

      model.train()
      warm, rate = _best_rate(train, batch, args.warmup, args.steps, args.rounds, lambda _: None)
      print(json.dumps({"model": name, "px": px, "batch": batch, "mode": "train", "img_s": rate, "warmup_s": warm}))
      model.eval()

      def forward(_):
        with torch.no_grad():
          return model(x)

      warm, rate = _best_rate(forward, batch, args.warmup, args.steps, args.rounds, lambda _: None)
      print(json.dumps({"model": name, "px": px, "batch": batch, "mode": "forward", "img_s": rate, "warmup_s": warm}))
      sys.stdout.flush()


def run_torch(args) -> dict:
  cmd = [sys.executable, __file__, "--torch_worker", "--models", args.models, "--cases", args.cases]
  cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--rounds", str(args.rounds)]
  cmd += ["--vs_torch"] if args.vs_torch else []
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  out = {"rows": [r for r in lines if "model" in r or "conv" in r], "seconds": round(time.perf_counter() - t0, 1)}
  out["version"] = next((r["version"] for r in lines if "version" in r), "torch did not start")
  if proc.returncode:
    out["error"] = f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}"
  return out


# ---------------------------------------------------------------------------
# jsim.


def stage1_step(model_name: str, px: int, batch: int, conv_impl: str, mesh):
  """step(i) -> the state's step counter after the real Stage1Plan step on batch i (benchmark.py's fake
  data, random labels); and a function that gives the step's compiled XLA program as text."""
  from benchmark import _base_config, _fake_data
  from jsim import parallel
  from jsim.train import classifier, loop
  from jsim.train.state import TrainState

  ns = argparse.Namespace(dtype="float32", image_size=64, input_size=px, embed_batch=batch, pair_batch=batch)
  config = _base_config(ns, model_name, batch)
  config.model.conv_impl = conv_impl
  model = classifier.build_classifier(config, NUM_CLASSES)
  tx = classifier.make_optimizer(config.classifier)
  state = parallel.put_replicated(
    TrainState.create(classifier.initial_variables(config, model, NUM_CLASSES, px), tx), mesh
  )
  data = _fake_data(ns, np.random.default_rng(0), max(256, 2 * batch))
  plan = classifier.Stage1Plan(config, data, model, tx, mesh)
  plan.begin_epoch(1)
  full = sum(1 for size in plan.batch_sizes if size == plan.batch_size)
  box = {"state": state, "sums": loop.zero_sums()}

  def step(i):
    box["state"], box["sums"] = plan.train_step(box["state"], 1, i % full, box["sums"])
    return box["state"].step

  def hlo_text() -> str:
    import jax.numpy as jnp

    sums = parallel.ensure_replicated(box["sums"], mesh)
    args = (box["state"], {"images": plan.images, "labels": plan.labels}, plan._order, jnp.int32(0), sums)
    return plan._gathered_step.lower(*args, plan.batch_size).compile().as_text()

  return step, hlo_text


def jsim_train(model_name: str, px: int, batch: int, conv_impl: str, args, mesh) -> dict:
  """Stage-1 train images/s of the real Stage1Plan step."""
  import jax

  step, _ = stage1_step(model_name, px, batch, conv_impl, mesh)
  warm, rate = _best_rate(step, batch, args.warmup, args.steps, args.rounds, jax.block_until_ready)
  return {"warmup_s": warm, "img_s": rate}


def jsim_forward(model_name: str, px: int, batch: int, conv_impl: str, args) -> dict:
  import jax
  import jax.numpy as jnp
  from jsim import models

  model = models.build(model_name, num_classes=NUM_CLASSES, dtype=jnp.float32, conv_impl=conv_impl)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, px, px, 3), dtype=np.float32))
  variables = jax.jit(lambda k: model.init({"params": k, "dropout": k}, x[:1], train=False))(jax.random.PRNGKey(0))
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  warm, rate = _best_rate(
    lambda _: fwd(variables, x), batch, args.warmup, args.steps, args.rounds, jax.block_until_ready
  )
  return {"warmup_s": warm, "img_s": rate}


def run_models(args) -> dict:
  import jax
  from jax.sharding import Mesh
  from jsim import models, parallel

  torch_result = {"rows": [], "skipped": True} if args.no_torch else run_torch(args)
  for r in torch_result["rows"]:
    print("  torch:", json.dumps(r), flush=True)
  if torch_result.get("error"):
    print("  torch failed:", torch_result["error"], flush=True)
  mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))
  impl_cases = set(_cases(args.impl_cases))
  rows = []
  for name in _csv(args.models):
    if name not in models.available():
      print(f"  jsim: no model {name!r} (available: {', '.join(models.available())}); skipped", flush=True)
      continue
    for px, batch in _cases(args.cases):
      impls = ["auto"] + [i for i in _csv(args.impls) if i != "auto" and (px, batch) in impl_cases]
      for mode in ("train", "forward"):
        row = {"model": name, "px": px, "batch": batch, "mode": mode}
        for impl in impls:
          r = (
            jsim_train(name, px, batch, impl, args, mesh)
            if mode == "train"
            else jsim_forward(name, px, batch, impl, args)
          )
          row[f"jsim_{impl}"], row[f"warmup_{impl}"] = r["img_s"], round(r["warmup_s"], 1)
          print(f"  jsim {name} {px} px b{batch} {mode} conv_impl={impl}: {r['img_s']:.1f} img/s", flush=True)
        torch_row = [
          t
          for t in torch_result["rows"]
          if (t.get("model"), t.get("px"), t.get("batch"), t.get("mode")) == (name, px, batch, mode)
        ]
        row["torch"] = torch_row[0]["img_s"] if torch_row else None
        rows.append(row)
  return {"torch": torch_result, "rows": rows}


def markdown_models(result: dict, impls: list[str]) -> list[str]:
  others = [i for i in impls if i != "auto"]
  lines = [
    "| model | px | batch | mode | torch eager img/s | jsim auto img/s | jsim/torch |"
    + "".join(f" jsim {i} img/s | auto/{i} |" for i in others),
    "|---|---:|---:|---|---:|---:|---:|" + "---:|---:|" * len(others),
  ]
  f = lambda v, d=1: "-" if v is None else f"{v:,.{d}f}"
  for r in result["rows"]:
    a, t = r.get("jsim_auto"), r.get("torch")
    cells = [f(a / t, 2) if a and t else "-"]
    for i in others:
      o = r.get(f"jsim_{i}")
      cells += [f(o), f(a / o, 2) if a and o else "-"]
    lines.append(
      f"| {r['model']} | {r['px']} | {r['batch']} | {r['mode']} | {f(t)} | {f(a)} | " + " | ".join(cells) + " |"
    )
  return lines


# ---------------------------------------------------------------------------
# --profile: where a training step's time goes.

# (category, test on (op_name, primitive, module)); the first that matches names an XLA instruction.
# Instructions without JAX metadata (layout copies XLA inserts) are "unattributed".
PROFILE_CATEGORIES = [
  ("augmentation, resize, batch gather", lambda op, prim, mod: "jvp(" not in op),
  ("BatchNorm", lambda op, prim, mod: "bn" in mod or "norm" in mod),
  ("conv arithmetic (XLA conv, dots)", lambda op, prim, mod: prim in ("conv_general_dilated", "dot_general")),
  ("conv data movement (im2col patches, shifted sums, pads)", lambda op, prim, mod: "conv" in mod),
  ("max-pool", lambda op, prim, mod: "pool" in op),
  ("rest of the model (activations, residual adds, head, loss)", lambda op, prim, mod: True),
]


UNNAMED_CONV = "transpose(jvp(?))/kernel gradient/conv_general_dilated"


def _categorise(op_name: str) -> str:
  """'forward: <category>' / 'backward: <category>' / a category outside the model, for an op_name such as
  jit(gathered_train_step)/transpose(jvp(ResNet))/layer2_0/conv2/dot_general."""
  if not op_name:
    return "unattributed (layout copies)"
  parts = op_name.split("/")
  prim, mod = parts[-1], (parts[-2] if len(parts) > 2 else "")
  if "jvp(" not in op_name:
    return "outside the model: " + (
      "optimizer, loss sums, RNG"
      if not ("vmap" in op_name or "_resize" in op_name or prim == "gather")
      else PROFILE_CATEGORIES[0][0]
    )
  direction = "backward" if "transpose(" in op_name else "forward"
  return direction + ": " + next(name for name, test in PROFILE_CATEGORIES[1:] if test(op_name, prim, mod))


def _op_names(hlo_text: str) -> dict[str, str]:
  """{instruction name: JAX op_name} of a compiled HLO module. A fusion XLA made without metadata of its
  own (XLA:CPU's library fusions) takes the op_name of its fused computation's root, or of the first
  instruction in it that has one; one around a convolution that has none (XLA:CPU's rewrite of a kernel
  gradient as a convolution over the batch) UNNAMED_CONV."""
  import re

  line_re = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+) = [^\n]*$", re.M)
  meta_re = re.compile(r'op_name="([^"]*)"')
  calls_re = re.compile(r"calls=%?([\w.\-]+)")
  computations, current = {}, None  # computation name -> op_name found in it (the root's first)
  names, calls = {}, {}
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+) .*\{$", line)
    if head and " = " not in line:
      current = head.group(1)
      continue
    m = line_re.match(line)
    if not m:
      continue
    meta = meta_re.search(line)
    names[m.group(2)] = meta.group(1) if meta else ""
    call = calls_re.search(line)
    if call:
      calls[m.group(2)] = call.group(1)
    if meta and current is not None and (m.group(1) or current not in computations):
      computations[current] = meta.group(1)
    elif not meta and current is not None and " convolution(" in line:  # XLA's own (a kernel gradient's)
      computations.setdefault(current, UNNAMED_CONV)
  for name, op in names.items():
    if not op and name in calls:
      names[name] = computations.get(calls[name], "")
  return names


def profile_step(step, hlo_text: str, steps: int, trace_dir: str) -> dict:
  """Time per category of a jitted step's XLA:CPU instructions, from a JAX profiler trace of `steps` calls.

  XLA:CPU records each executed instruction (thunk) as an event on the thread that ran it; the compiled
  HLO's metadata maps its name to the JAX op (forward or backward, Flax module, primitive). Thunks that
  ran concurrently on the two threads both count, so the categories may add up to more than the wall time.
  """
  import collections
  import glob
  import shutil

  import jax
  from jax.profiler import ProfileData

  op_names = _op_names(hlo_text)
  shutil.rmtree(trace_dir, ignore_errors=True)
  jax.profiler.start_trace(trace_dir)
  t0 = time.perf_counter()
  for i in range(steps):
    out = step(i)
  jax.block_until_ready(out)
  wall = time.perf_counter() - t0
  jax.profiler.stop_trace()
  by_category, by_op = collections.Counter(), collections.Counter()
  for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
    for plane in ProfileData.from_file(path).planes:
      for line in plane.lines:
        if not line.name.startswith(("tf_XLAEigen", "tf_XLAPjRtCpuClient")):
          continue
        for ev in line.events:
          if ev.name not in op_names:  # the executor's own spans, "end: ..." markers
            continue
          by_category[_categorise(op_names[ev.name])] += ev.duration_ns
          by_op[(ev.name, op_names[ev.name])] += ev.duration_ns
  ms = lambda ns: round(ns / 1e6 / steps, 2)
  return {
    "wall_ms": round(1e3 * wall / steps, 1),
    "thunk_ms": ms(sum(by_category.values())),
    "categories": {k: ms(v) for k, v in by_category.most_common()},
    "top_ops": [[name, op, ms(v)] for (name, op), v in by_op.most_common(12)],
  }


def run_profile(args) -> dict:
  import jax
  from jax.sharding import Mesh
  from jsim import parallel

  mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))
  rows = []
  for name in _csv(args.models):
    for px, batch in _cases(args.cases):
      step, hlo_text = stage1_step(name, px, batch, "auto", mesh)
      for i in range(args.warmup):
        jax.block_until_ready(step(i))
      row = {"model": name, "px": px, "batch": batch, **profile_step(step, hlo_text(), args.steps, "/tmp/jsim_profile")}
      print("  " + json.dumps(row), flush=True)
      rows.append(row)
  return {"rows": rows}


def markdown_profile(result: dict) -> list[str]:
  lines = []
  for r in result["rows"]:
    lines += [
      f"**{r['model']}, {r['px']} px, batch {r['batch']}**: {r['wall_ms']} ms per step wall, "
      f"{r['thunk_ms']} ms of XLA instructions (both threads)",
      "",
      "| where | ms per step | share |",
      "|---|---:|---:|",
    ]
    lines += [f"| {k} | {v} | {100 * v / r['thunk_ms']:.0f} % |" for k, v in r["categories"].items()]
    lines += [
      "",
      "Slowest instructions: " + "; ".join(f"`{op.split('/', 1)[-1]}` {v} ms" for _, op, v in r["top_ops"][:6]),
      "",
    ]
  return lines


# ---------------------------------------------------------------------------
# --layers: the per-shape table.

# (batch, input side, in, out, kernel, stride, groups): the convs of ResNet50 (stem, each stage's 3x3 and 1x1s,
# the strided ones) and VGG16 at 64 and 224 px, and EfficientNet-Lite0's stem and depthwise convs at 64 px.
LAYER_SHAPES = [
  (16, 64, 3, 64, 7, 2, 1),
  (16, 16, 64, 64, 3, 1, 1),
  (16, 16, 128, 128, 3, 2, 1),
  (16, 8, 128, 128, 3, 1, 1),
  (16, 4, 256, 256, 3, 1, 1),
  (16, 4, 512, 512, 3, 2, 1),
  (16, 2, 512, 512, 3, 1, 1),
  (64, 2, 512, 512, 3, 1, 1),
  (16, 16, 64, 256, 1, 1, 1),
  (16, 8, 256, 512, 1, 2, 1),
  (16, 2, 2048, 512, 1, 1, 1),
  (16, 64, 64, 64, 3, 1, 1),
  (16, 8, 512, 512, 3, 1, 1),
  (16, 4, 512, 512, 3, 1, 1),
  (16, 224, 3, 64, 7, 2, 1),
  (16, 56, 64, 64, 3, 1, 1),
  (16, 56, 64, 256, 1, 1, 1),
  (16, 14, 256, 256, 3, 1, 1),
  (16, 7, 512, 512, 3, 1, 1),
  (16, 28, 256, 256, 3, 1, 1),
  (16, 64, 3, 32, 3, 2, 1),
  (16, 32, 32, 32, 3, 1, 32),
  (16, 32, 96, 96, 3, 2, 96),
  (16, 16, 144, 144, 3, 1, 144),
  (16, 16, 144, 144, 5, 2, 144),
  (16, 8, 240, 240, 5, 1, 240),
  (16, 8, 240, 240, 3, 2, 240),
  (16, 4, 480, 480, 3, 1, 480),
  (16, 4, 672, 672, 5, 2, 672),
  (16, 2, 1152, 1152, 5, 1, 1152),
]


def resnet50_convs(px: int, batch: int) -> dict[tuple, int]:
  """{(batch, side, in, out, kernel, stride): count} of torchvision's resnet50 (v1.5: the stride on the 3x3)."""
  convs: dict[tuple, int] = {}

  def add(side, cin, cout, k, s):
    key = (batch, side, cin, cout, k, s)
    convs[key] = convs.get(key, 0) + 1

  add(px, 3, 64, 7, 2)
  side, cin = px // 4, 64
  for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
    for b in range(blocks):
      s = stride if b == 0 else 1
      add(side, cin, width, 1, 1)
      add(side, width, width, 3, s)
      if b == 0:
        add(side, cin, 4 * width, 1, s)
      side = -(-side // s)
      add(side, width, 4 * width, 1, 1)
      cin = 4 * width
  return convs


def _conv_padding(k: int) -> int:
  return (k - 1) // 2  # torchvision's: "SAME"-like for odd kernels, also at stride 2


def torch_convs(args) -> None:
  import torch
  import torch.nn.functional as F

  for px, batch in _cases(args.cases):
    for n, side, cin, cout, k, s in resnet50_convs(px, batch):
      p, cl = _conv_padding(k), torch.channels_last
      x = torch.randn(n, cin, side, side).to(memory_format=cl)
      w = (torch.randn(cout, cin, k, k) / np.sqrt(k * k * cin)).to(memory_format=cl)
      g = F.conv2d(x, w, stride=s, padding=p)
      g = torch.randn_like(g).to(memory_format=cl)

      def grads(mask):
        return lambda _: torch.ops.aten.convolution_backward(
          g, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, mask
        )

      calls = {
        "fwd": lambda _: F.conv2d(x, w, stride=s, padding=p),
        "dx": grads([True, False, False]),
        "dk": grads([False, True, False]),
      }
      ms = {}
      for name, fn in calls.items():
        with torch.no_grad():
          _, rate = _best_rate(fn, 1, args.warmup, args.steps, args.rounds, lambda _: None)
        ms[name] = round(1e3 / rate, 3)
      print(json.dumps({"conv": [n, side, cin, cout, k, s], "ms": ms}), flush=True)


def run_vs_torch(args) -> dict:
  import functools

  import jax
  import jax.numpy as jnp
  from jsim.models import conv_tuning, layers

  torch_result = run_torch(args)
  if torch_result.get("error"):
    print("  torch failed:", torch_result["error"], flush=True)
  theirs = {tuple(r["conv"]): r["ms"] for r in torch_result["rows"] if "conv" in r}
  rows = []
  for px, batch in _cases(args.cases):
    for (n, side, cin, cout, k, s), count in resnet50_convs(px, batch).items():
      pad = ((_conv_padding(k),) * 2,) * 2
      out_side = (side + 2 * _conv_padding(k) - k) // s + 1
      pair = layers.choose_impl(
        "cpu", "auto", kernel_size=(k, k), in_features=cin, groups=1, out_hw=(out_side, out_side)
      )
      conv = functools.partial(
        layers.conv, strides=(s, s), padding=pad, groups=1, lowering=pair[0], grad_lowering=pair[1]
      )
      rng = np.random.default_rng(0)
      x = jnp.asarray(rng.standard_normal((n, side, side, cin), dtype=np.float32))
      w = jnp.asarray(rng.standard_normal((k, k, cin, cout), dtype=np.float32) / np.sqrt(k * k * cin))
      g = jnp.asarray(rng.standard_normal((n, out_side, out_side, cout), dtype=np.float32))
      fns = {  # one gradient alone: XLA drops the other (dead code)
        "fwd": jax.jit(lambda x, w, g: conv(x, w)),
        "dx": jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)),
        "dk": jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)),
      }
      ms = conv_tuning.interleaved_ms(fns, (x, w, g), args.steps, args.rounds)
      row = dict(px=px, conv=[n, side, cin, cout, k, s], count=count, pair="/".join(pair), jsim=ms)
      row["torch"] = theirs.get((n, side, cin, cout, k, s))
      print("  " + json.dumps(row), flush=True)
      rows.append(row)
  return {"torch": {k: v for k, v in torch_result.items() if k != "rows"}, "rows": rows}


def markdown_vs_torch(result: dict) -> list[str]:
  parts = ("fwd", "dx", "dk")
  lines = [
    "| px | batch | input | in->out | kernel/stride | count | jsim's pair | jsim fwd / dx / dk ms | "
    "torch fwd / dx / dk ms | jsim / torch (fwd+dx+dk) |",
    "|---:|---:|---:|---|---|---:|---|---:|---:|---:|",
  ]
  totals: dict[tuple, dict] = {}
  for r in result["rows"]:
    n, side, cin, cout, k, s = r["conv"]
    mine, theirs = r["jsim"], r["torch"] or {}
    tot = totals.setdefault((r["px"], n), {f"{who} {p}": 0.0 for who in ("jsim", "torch") for p in parts})
    for p in parts if cin > 3 else ("fwd", "dk"):  # (no step computes the image's gradient)
      tot[f"jsim {p}"] += r["count"] * mine[p]
      tot[f"torch {p}"] += r["count"] * theirs.get(p, float("nan"))
    ratio = sum(mine.values()) / sum(theirs.values()) if theirs else float("nan")
    lines.append(
      f"| {r['px']} | {n} | {side} | {cin}->{cout} | {k}/{s} | {r['count']} | {r['pair']} | "
      + " / ".join(f"{mine[p]:.2f}" for p in parts)
      + " | "
      + " / ".join(f"{theirs.get(p, float('nan')):.2f}" for p in parts)
      + f" | {ratio:.2f} |"
    )
  lines += ["", "Sums over the network (each shape times its count; the stem's dx left out), ms:", ""]
  lines += ["| px | batch | | fwd | dx | dk | all |", "|---:|---:|---|---:|---:|---:|---:|"]
  for (px, n), tot in totals.items():
    for who in ("jsim", "torch"):
      vals = [tot[f"{who} {p}"] for p in parts]
      lines.append(f"| {px} | {n} | {who} | " + " | ".join(f"{v:,.1f}" for v in vals) + f" | {sum(vals):,.1f} |")
  return lines


def run_layers(args) -> dict:
  """Per shape, interleaved: the forward of each lowering, the backward alone (input and kernel gradients,
  the forward dead code) of each gradient formulation, and forward + backward of the pair choose_impl
  picks on a CPU against XLA's conv in both directions and the single lowering it picked before the split
  (`old`: the fastest forward-and-autodiff lowering of the old table)."""
  import functools

  import jax
  import jax.numpy as jnp
  from jsim.models import conv_tuning, layers

  only = set(_csv(args.layer_rows, int)) if args.layer_rows else None
  rows = []
  for index, (n, h, cin, cout, k, s, groups) in enumerate(LAYER_SHAPES):
    if only is not None and index not in only:
      continue
    padding = layers.explicit_padding("SAME", (h, h), (k, k), (s, s))
    out_side = (h + sum(padding[0]) - k) // s + 1
    shape = dict(kernel_size=(k, k), in_features=cin, groups=groups, out_hw=(out_side, out_side))
    chosen = layers.choose_impl("cpu", "auto", **shape)
    old = _old_choice(**shape)
    depthwise = groups == cin > 1
    fwd_cands = ["xla", "shifted" if depthwise else "dot" if k == 1 else "im2col"]
    bwd_cands = ["xla", "im2col"] + (["shifted"] if depthwise else ["taps"] if groups == 1 and k > 1 else [])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, h, cin), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, cin // groups, cout), dtype=np.float32) / np.sqrt(k * k * cin / groups))
    g = jnp.asarray(rng.standard_normal((n, out_side, out_side, cout), dtype=np.float32))
    conv = lambda lo, glo=None: functools.partial(
      layers.conv, strides=(s, s), padding=padding, groups=groups, lowering=lo, grad_lowering=glo
    )
    fns = {f"fwd {lo}": jax.jit(lambda x, w, g, f=conv(lo): f(x, w)) for lo in fwd_cands}
    for glo in bwd_cands:  # the forward lowering differs, so the custom_vjp runs and the forward is dead code
      f = conv("im2col" if glo == "xla" else "xla", glo)
      fns[f"bwd {glo}"] = jax.jit(lambda x, w, g, f=f: jax.vjp(f, x, w)[1](g))
    if depthwise:  # the depthwise shifted sum's own autodiff, the backward before _depthwise_vjp
      f = lambda x, w: layers._conv(x, w, (s, s), padding, groups, "shifted")
      fns["bwd shifted_autodiff"] = jax.jit(lambda x, w, g, f=f: jax.vjp(f, x, w)[1](g))
    pairs = {"xla": ("xla", "xla"), "old": old, "new": chosen}
    for name, (lo, glo) in pairs.items():
      f = (
        conv(lo, glo)
        if name != "old" or lo != "shifted"
        else (lambda x, w: layers._conv(x, w, (s, s), padding, groups, lo))
      )
      fns[f"fwd+bwd {name}"] = jax.jit(lambda x, w, g, f=f: (lambda y, vjp: (y, vjp(g)))(*jax.vjp(f, x, w)))
    ms = conv_tuning.interleaved_ms(fns, (x, w, g), args.steps, args.rounds)
    row = dict(batch=n, side=h, **{"in": cin, "out": cout}, kernel=k, stride=s, groups=groups, out_side=out_side)
    row.update(old="/".join(old), new="/".join(chosen), ms=ms)
    print("  " + json.dumps(row), flush=True)
    rows.append(row)
  return {"rows": rows}


def _old_choice(kernel_size, in_features, groups, out_hw) -> tuple[str, str]:
  """choose_impl's CPU rule before the per-direction split (one lowering, its autodiff backward)."""
  if groups > 1 and groups == in_features:
    lo = "shifted"
  elif groups != 1:
    lo = "xla"
  elif tuple(kernel_size) == (1, 1):
    lo = "dot"
  else:
    lo = "im2col" if out_hw[0] <= kernel_size[0] and out_hw[1] <= kernel_size[1] else "xla"
  return lo, lo


def markdown_layers(result: dict) -> list[str]:
  lines = [
    "| batch | input | in->out | kernel/stride | groups | output | fwd ms: xla / other | bwd ms: xla / im2col / taps or shifted (autodiff) | "
    "old pick | new pick | fwd+bwd ms: xla / old / new |",
    "|---:|---:|---|---|---:|---:|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    ms = r["ms"]
    other = next(k for k in ms if k.startswith("fwd ") and k != "fwd xla")
    bwd = f"{ms['bwd xla']} / {ms['bwd im2col']}"
    if "bwd shifted" in ms:
      bwd += f" / {ms['bwd shifted']} ({ms['bwd shifted_autodiff']})"
    if "bwd taps" in ms:
      bwd += f" / {ms['bwd taps']}"
    lines.append(
      f"| {r['batch']} | {r['side']} | {r['in']}->{r['out']} | {r['kernel']}/{r['stride']} | {r['groups']} | {r['out_side']} | "
      f"{ms['fwd xla']} / {other[4:]} {ms[other]} | {bwd} | {r['old']} | {r['new']} | "
      f"{ms['fwd+bwd xla']} / {ms['fwd+bwd old']} / {ms['fwd+bwd new']} |"
    )
  return lines


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(
    description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
  )
  ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
  ap.add_argument("--models", default="resnet50,vgg16", help="jsim model names (efficientnet_lite0 once registered)")
  ap.add_argument("--cases", default="64:16,64:64,224:16", help="input px:batch, comma-separated")
  ap.add_argument("--impls", default="xla", help="conv_impl values measured besides auto (xla, matmul)")
  ap.add_argument("--impl_cases", default="64:16", help="the cases at which --impls are measured too")
  ap.add_argument("--steps", type=int, default=2, help="timed steps per round")
  ap.add_argument("--rounds", type=int, default=2, help="rounds; the best round counts")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation included)")
  ap.add_argument("--no_torch", action="store_true", help="skip torch")
  ap.add_argument("--layers", action="store_true", help="the per-shape conv table instead of the models")
  ap.add_argument(
    "--profile", action="store_true", help="where the stage-1 step's time goes (JAX profiler), per model and case"
  )
  ap.add_argument(
    "--layer_rows", default="", help="--layers: only these rows of LAYER_SHAPES (0-based, comma-separated)"
  )
  ap.add_argument(
    "--vs_torch", action="store_true", help="every conv shape of ResNet50 at --cases, jsim's against torch's"
  )
  ap.add_argument("--torch_worker", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.torch_worker:
    torch_worker(args)
    return 0
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  t0 = time.perf_counter()
  load = os.getloadavg()
  title, run, markdown = (
    ("per-shape table", run_layers, markdown_layers)
    if args.layers
    else ("ResNet50's convs against torch's", run_vs_torch, markdown_vs_torch)
    if args.vs_torch
    else ("step profile", run_profile, markdown_profile)
    if args.profile
    else ("models", run_models, lambda result: markdown_models(result, ["auto"] + _csv(args.impls)))
  )
  result = run(args)
  lines = markdown(result)
  result.update(
    device=f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores",
    jax=jax.__version__,
    load_before=[round(v, 2) for v in load],
    load_after=[round(v, 2) for v in os.getloadavg()],
    wall_s=round(time.perf_counter() - t0, 1),
    settings={k: v for k, v in vars(args).items() if k not in ("out", "torch_worker")},
    time=time.strftime("%Y-%m-%d %H:%M:%S"),
  )
  head = [
    f"# jsim CPU convs ({title})",
    "",
    f"{result['device']}; jax {result['jax']}; {result.get('torch', {}).get('version', '')}; "
    f"load average {result['load_before']} before, {result['load_after']} after; {result['wall_s']} s in all.",
    f"Settings: {json.dumps(result['settings'])}",
    "",
  ]
  md = "\n".join(head + lines) + "\n"
  print("\n" + md, flush=True)
  if args.out:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text(md)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
