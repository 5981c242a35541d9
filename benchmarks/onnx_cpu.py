"""Embedding on a CPU: jsim/XLA vs its ONNX export on onnxruntime vs torch eager, in one run.

    python benchmarks/onnx_cpu.py --out runs/bench/onnx_cpu                       # embedding table
    python benchmarks/onnx_cpu.py --out runs/bench/onnx_cpu --workdir W --gallery_size 1000  # + predict latency

Embedding images/s for each --models x --sizes, random weights, batch --batch:
  * jsim-xla: the function predict and the embeddings stage run (uint8 64x64 images ->
    augment.preprocess with the resize to the input size -> model.apply), jitted, float32
    and bfloat16 (model dtype);
  * onnxruntime: jsim.export's embed graph of the same model (uint8 64x64 in, the same
    preprocessing inside), float32; onnxruntime's CPU provider has no bfloat16 Conv, so
    that cell is checked (a one-Conv bf16 graph is offered to it) and reported;
  * torch eager: the reference's own infer_case (/work/shared/bench/torch_anchor.py;
    torchvision model, channels_last, no_grad, float32 and bf16 autocast), fed float tensors
    already at the input size (no decode, no resize: that favours torch).
Cases are interleaved over --rounds (each round measures every case once) and the median
is reported, so that load from other processes on a shared machine hits all alike.

With --workdir (a trained workdir), the predict latency through the real command line,
wall time of the whole process (start, imports, restore/session, decode, embed, score):
two images, and a gallery of --gallery_size JPEGs (embedded, then again from the cache),
for --backend=jax and --backend=onnx (its export made first, timed apart).

Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
# The reference beside the checkout (main) or two levels up (a worktree under wt/).
DEFAULT_ANCHOR = next(
  (
    p
    for p in (
      REPO.parent / "shared" / "bench" / "torch_anchor.py",
      REPO.parents[1] / "shared" / "bench" / "torch_anchor.py",
    )
    if p.exists()
  ),
  REPO.parent / "shared" / "bench" / "torch_anchor.py",
)
IMAGE_SIZE = 64  # Tiny ImageNet's
THREADS = 0  # --threads


def _csv(text: str, cast=str) -> list:
  return [cast(t) for t in text.split(",") if t.strip()]


def cpu_name() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
  except OSError:
    pass
  return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def timed(fn, batch: int, steps: int) -> float:
  """images/s of `steps` calls of fn after one warm-up call."""
  fn()
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  return batch * steps / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- the cases


def jsim_case(name: str, size: int, batch: int, dtype: str):
  import jax
  import jax.numpy as jnp

  from jsim import models
  from jsim.data import augment

  model = models.build(name, num_classes=180, dtype=jnp.bfloat16 if dtype == "bf16" else jnp.float32)
  variables = jax.jit(lambda k: model.init({"params": k, "dropout": k}, jnp.zeros((1, size, size, 3)), train=False))(
    jax.random.key(0)
  )
  mean, std = (0.48, 0.45, 0.40), (0.23, 0.22, 0.22)

  @jax.jit
  def embed(variables, images):  # as predict's Backbone and jsim.evaluate.embed
    x = augment.preprocess(images, mean, std, size).astype(model.dtype)
    return model.apply(variables, x, train=False)[1].astype(jnp.float32)

  images = jax.device_put(np.random.default_rng(0).integers(0, 256, (batch, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))
  t0 = time.perf_counter()
  embed(variables, images).block_until_ready()
  compile_s = time.perf_counter() - t0
  return (lambda: embed(variables, images).block_until_ready()), {"compile_s": round(compile_s, 1)}


def onnx_case(name: str, size: int, batch: int):
  import jax
  import jax.numpy as jnp
  import onnxruntime as ort

  from jsim import models
  from jsim.export import graph

  model = models.build(name, num_classes=180)
  variables = jax.jit(lambda k: model.init({"params": k, "dropout": k}, jnp.zeros((1, size, size, 3)), train=False))(
    jax.random.key(0)
  )
  t0 = time.perf_counter()
  proto = graph.embed_graph([graph.Member(model, variables, (0.48, 0.45, 0.40), (0.23, 0.22, 0.22), size)], IMAGE_SIZE)
  data = proto.SerializeToString()
  export_s = time.perf_counter() - t0
  options = ort.SessionOptions()
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  if THREADS:
    options.intra_op_num_threads = THREADS
  t0 = time.perf_counter()
  sess = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
  session_s = time.perf_counter() - t0
  images = np.random.default_rng(0).integers(0, 256, (batch, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  return (lambda: sess.run(None, {"images": images})), {
    "export_s": round(export_s, 1),
    "session_s": round(session_s, 1),
    "graph_mib": round(len(data) / 2**20, 1),
  }


def onnx_bf16_supported() -> str:
  """What onnxruntime's CPU provider says to a single bfloat16 Conv."""
  import onnx
  import onnxruntime as ort
  from onnx import TensorProto, helper

  w = helper.make_tensor("w", TensorProto.BFLOAT16, [4, 3, 3, 3], vals=np.zeros(4 * 27, np.uint16).tobytes(), raw=True)
  node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
  g = helper.make_graph(
    [node],
    "bf16",
    [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1, 3, 8, 8])],
    [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, None)],
    initializer=[w],
  )
  m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
  m.ir_version = 9
  try:
    ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return "supported"
  except Exception as e:  # noqa: BLE001 - recorded
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:240]}"
  finally:
    del onnx


def load_anchor(path: Path):
  spec = importlib.util.spec_from_file_location("torch_anchor", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def torch_case(anchor, name: str, size: int, batch: int, steps: int, autocast: bool) -> float:
  anchor.RES, anchor.STEPS, anchor.WARM, anchor.AUTOCAST = size, steps, 1, autocast
  return float(anchor.infer_case(name, batch)["img_s"])


# ----------------------------------------------------------------------------- predict latency


def _run(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
  t0 = time.perf_counter()
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
  dt = time.perf_counter() - t0
  if r.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")
  return dt, r


def make_gallery(folder: Path, n: int) -> Path:
  from PIL import Image

  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    # Smooth random images (blurred noise), saved as JPEG like the data set's files.
    small = rng.integers(0, 256, (8, 8, 3), np.uint8)
    Image.fromarray(small).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).save(
      folder / f"img_{i:04d}.jpg", quality=90
    )
  return folder


def predict_latency(workdir: Path, gallery_size: int, scratch: Path) -> list[dict]:
  py = sys.executable
  gal = make_gallery(scratch / "gallery", gallery_size)
  a, b = gal / "img_0000.jpg", gal / "img_0001.jpg"
  shutil.rmtree(workdir / "onnx", ignore_errors=True)
  rows = []
  t, _ = _run([py, "-m", "jsim.export", f"--workdir={workdir}"])
  rows.append({"case": "python -m jsim.export (once)", "backend": "onnx", "s": round(t, 2)})
  for backend in ("jax", "onnx"):
    pair = [py, "-m", "jsim.predict", f"--workdir={workdir}", f"--backend={backend}", str(a), str(b)]
    times = [_run(pair)[0] for _ in range(3)]
    rows.append({"case": "two images", "backend": backend, "s": round(min(times), 2)})
    search = [
      py,
      "-m",
      "jsim.predict",
      f"--workdir={workdir}",
      f"--backend={backend}",
      f"--query={a}",
      f"--gallery={gal}",
      "--top=5",
      "--json",
    ]
    t, _ = _run(search + ["--no_cache"])
    rows.append({"case": f"gallery of {gallery_size}, embedded", "backend": backend, "s": round(t, 2)})
    _run(search)  # fills the cache
    t, r = _run(search)
    assert json.loads(r.stdout)["cache"]["embedded"] == 0
    rows.append({"case": f"gallery of {gallery_size}, from the cache", "backend": backend, "s": round(t, 2)})
  return rows


# ----------------------------------------------------------------------------- main


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
  p.add_argument("--models", default="resnet50,vgg16")
  p.add_argument("--sizes", default="64,224", help="input sizes (the images are 64 px; larger ones are resized)")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=3, help="timed calls per measurement (after one warm-up)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--torch_anchor", default=str(DEFAULT_ANCHOR))
  p.add_argument("--workdir", help="a trained workdir: also measure jsim-predict's latency")
  p.add_argument("--gallery_size", type=int, default=1000)
  p.add_argument(
    "--threads",
    type=int,
    default=0,
    help="threads for each framework (0: their defaults, all cores); 1 is steadier on a shared machine",
  )
  args = p.parse_args()
  if args.threads:  # before JAX loads
    # XLA has no thread-count flag: single-threaded Eigen is what it offers (used for --threads=1).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  import jax
  import onnxruntime
  import torch

  global THREADS
  THREADS = args.threads
  if args.threads:
    torch.set_num_threads(args.threads)
  info = {
    "device": cpu_name(),
    "jax": jax.__version__,
    "onnxruntime": onnxruntime.__version__,
    "torch": torch.__version__,
    "threads": args.threads or "default",
    "batch": args.batch,
    "steps": args.steps,
    "rounds": args.rounds,
    "load_before": os.getloadavg()[0],
    "onnx_bf16": onnx_bf16_supported(),
  }
  print(json.dumps(info), flush=True)
  anchor = load_anchor(Path(args.torch_anchor))
  rows = []
  for name in _csv(args.models):
    for size in _csv(args.sizes, int):
      runners, extra = {}, {}
      for dtype in ("float32", "bf16"):
        runners[("jsim-xla", dtype)], extra[("jsim-xla", dtype)] = jsim_case(name, size, args.batch, dtype)
      runners[("onnxruntime", "float32")], extra[("onnxruntime", "float32")] = onnx_case(name, size, args.batch)
      for dtype in ("float32", "bf16"):
        runners[("torch-eager", dtype)] = None
        extra[("torch-eager", dtype)] = {}
      samples = {k: [] for k in runners}
      for _ in range(args.rounds):
        for (fw, dtype), fn in runners.items():
          if fw == "torch-eager":
            v = torch_case(anchor, name, size, args.batch, args.steps, autocast=dtype == "bf16")
          else:
            v = timed(fn, args.batch, args.steps)
          samples[(fw, dtype)].append(v)
      for (fw, dtype), vals in samples.items():
        row = {
          "model": name,
          "input_size": size,
          "framework": fw,
          "dtype": dtype,
          "img_s": round(statistics.median(vals), 1),
          "samples": [round(v, 1) for v in vals],
          **extra[(fw, dtype)],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
      del runners
  latency = []
  if args.workdir:
    latency = predict_latency(Path(args.workdir), args.gallery_size, out.parent / (out.name + "_scratch"))
    for row in latency:
      print(json.dumps(row), flush=True)
  info["load_after"] = os.getloadavg()[0]
  result = {"info": info, "embedding": rows, "predict": latency}
  out.with_suffix(".json").write_text(json.dumps(result, indent=1))
  out.with_suffix(".md").write_text(markdown(result))
  print(markdown(result))


def markdown(result: dict) -> str:
  info = result["info"]
  lines = [
    f"Device: {info['device']}; jax {info['jax']}, onnxruntime {info['onnxruntime']}, torch {info['torch']}; "
    f"threads {info.get('threads', 'default')}, batch {info['batch']}, median of {info['rounds']} interleaved rounds of {info['steps']} calls; "
    f"load average {info['load_before']:.1f} before, {info.get('load_after', 0):.1f} after.",
    "",
    "| model | input | jsim/XLA f32 | jsim/XLA bf16 | onnxruntime f32 | torch eager f32 | torch eager bf16 "
    "| ONNX / torch f32 | ONNX / XLA f32 |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  by = {(r["model"], r["input_size"], r["framework"], r["dtype"]): r["img_s"] for r in result["embedding"]}
  for model, size in sorted({(r["model"], r["input_size"]) for r in result["embedding"]}):
    g = lambda fw, dt: by.get((model, size, fw, dt))
    o, t, x = g("onnxruntime", "float32"), g("torch-eager", "float32"), g("jsim-xla", "float32")
    lines.append(
      f"| {model} | {size} | {x} | {g('jsim-xla', 'bf16')} | {o} | {t} | {g('torch-eager', 'bf16')} "
      f"| {o / t:.2f} | {o / x:.2f} |"
    )
  lines += ["", f"onnxruntime bfloat16: {info['onnx_bf16']}"]
  if result["predict"]:
    lines += ["", "| jsim-predict | backend | wall time (s) |", "|---|---|---:|"]
    lines += [f"| {r['case']} | {r['backend']} | {r['s']} |" for r in result["predict"]]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
