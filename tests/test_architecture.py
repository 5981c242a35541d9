"""The layering: no import cycle between jsim's parts nor between its modules, evaluators that import no trainer,
a stage-1 run that loads neither the evaluation code, TFDS nor matplotlib, and a short path from the command
line to the first step."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import jsim_env

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "jsim"
SUBPACKAGES = ("data", "models", "losses", "train", "evaluate", "predict", "workdir")
# Evaluators take a predict/score function; they never import a trainer.
TRAINERS = ("jsim.train.classifier", "jsim.train.similarity", "jsim.train.loop", "jsim.train.embeddings")
EVALUATORS = ("jsim.evaluate.pairwise", "jsim.evaluate.retrieval", "jsim.evaluate.report", "jsim.evaluate.figures")


def _module_name(path: Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
  """Every jsim module `path` imports, at module level or inside functions."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("jsim")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jsim") and not node.level:
      out |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
  return out


def _part(module: str) -> str | None:
  """jsim.train.loop -> 'train'; jsim.run -> 'run' (a top-level module is its own part)."""
  parts = module.split(".")
  if parts[0] != "jsim" or len(parts) < 2:
    return None
  if parts[1] in SUBPACKAGES or (PACKAGE / f"{parts[1]}.py").exists():
    return parts[1]
  return None


def _graph() -> dict[str, dict[str, set[str]]]:
  """part -> imported part -> the modules that make the edge."""
  graph: dict[str, dict[str, set[str]]] = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    name = _module_name(path)
    src = _part(name) or "jsim"
    for imported in _imports(path):
      dst = _part(imported)
      if dst and dst != src:
        graph.setdefault(src, {}).setdefault(dst, set()).add(f"{name} -> {imported}")
  return graph


def _cycle(graph) -> list[str] | None:
  """A cycle of `graph` (node -> the nodes it imports) as [a, b, ..., a], by depth-first search; None if none."""
  state: dict[str, int] = {}

  def visit(node: str, path: list[str]) -> list[str] | None:
    state[node] = 1
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt) :] + [node, nxt] if nxt in path else [node, nxt]
      if not state.get(nxt):
        found = visit(nxt, path + [node])
        if found:
          return found
    state[node] = 2
    return None

  for node in sorted(graph):
    if not state.get(node):
      found = visit(node, [])
      if found:
        return found
  return None


def test_no_import_cycle_between_parts():
  graph = _graph()
  assert graph["train"].get("data") and graph["evaluate"].get("train")  # not empty by accident
  cycle = _cycle(graph)
  if cycle:
    edges = [sorted(graph[a][b])[0] for a, b in zip(cycle, cycle[1:]) if b in graph.get(a, {})]
    raise AssertionError(f"import cycle {' -> '.join(cycle)}: {edges}")


def test_evaluators_import_no_trainer():
  for module in EVALUATORS:
    path = PACKAGE / (module.split(".", 1)[1].replace(".", "/") + ".py")
    trainers = sorted(m for m in _imports(path) if m.startswith(TRAINERS))
    assert not trainers, f"{module} imports {trainers}"


def test_stage1_loads_no_evaluation_tfds_or_matplotlib():
  # What `python -m jsim.main --config=configs/tiny.py --config.stage=classifier` imports up to
  # its first step: the command line, the config and its checks, the stage and its data.
  code = f"""
import importlib.util, json, sys
from jsim import main, run, validate
spec = importlib.util.spec_from_file_location("tiny", {str(REPO / "configs" / "tiny.py")!r})
tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)
config = tiny.get_config()
config.stage = "classifier"
validate.check_config(config)
run.STAGES["classifier"].function
from jsim.data import prepare, sources, streaming, synthetic, tiny_imagenet
from jsim.train import loop, metrics_writer
print(json.dumps(sorted(sys.modules)))
"""
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  loaded = json.loads(proc.stdout.strip().splitlines()[-1])
  assert "jsim.train.classifier" in loaded and "jsim.data.prepare" in loaded  # it did import the stage
  unwanted = [
    m
    for m in loaded
    if m.split(".")[0] in ("tensorflow_datasets", "tensorflow", "matplotlib")
    or m == "jsim.evaluate"
    or m.startswith("jsim.evaluate.")
  ]
  assert not unwanted, unwanted


def _module_graph() -> dict[str, set[str]]:
  """jsim module -> the jsim modules it imports (at module level or inside functions). `from P import m`
  counts as importing the module P.m where there is one (not P's __init__, which Python runs first)."""
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        out |= {a.name for a in node.names if a.name in modules}
      elif isinstance(node, ast.ImportFrom) and node.module in modules and not node.level:
        for a in node.names:
          out.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module)
    graph[name] = out - {name}
  return graph


def test_no_import_cycle_between_modules():
  graph = _module_graph()
  assert "jsim.train.step" in graph["jsim.train.classifier"]  # not empty by accident
  cycle = _cycle(graph)
  assert cycle is None, f"import cycle {' -> '.join(cycle)}"


def test_test_modules_share_helpers_through_conftest_only():
  """A helper two test modules use lives in conftest.py: a test module that imports another runs that module's
  top level (its imports and skips) and ties the two files together."""
  tests = sorted((REPO / "tests").glob("test_*.py"))
  names = {p.stem for p in tests}
  assert "test_architecture" in names and len(names) > 30  # the folder read is the test folder
  imported = {}
  for path in tests:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        modules = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        modules = [node.module]
      else:
        continue
      imported.setdefault(path.name, []).extend(m for m in modules if m.split(".")[0] in names)
  assert {k: v for k, v in imported.items() if v} == {}


# The jsim functions on the call stack when a stage-1 run first enters its step (jsim/train/step.py, as
# jax traces it): what a reader follows from the command line to the step.
_PATH_TO_STEP = r"""
import json, os, sys
root = os.path.join(os.getcwd(), "jsim") + os.sep
step_file = os.path.join(root, "train", "step.py")

def profile(frame, event, arg):
  if event == "call" and frame.f_code.co_filename == step_file and frame.f_code.co_name.endswith("train_step"):
    stack = []
    while frame is not None:
      if frame.f_code.co_filename.startswith(root):
        stack.append([os.path.relpath(frame.f_code.co_filename, os.getcwd()), frame.f_code.co_qualname])
      frame = frame.f_back
    print(json.dumps(stack[::-1]), flush=True)
    os._exit(0)

sys.argv = ["jsim", *sys.argv[1:]]
sys.setprofile(profile)
from jsim import main
main.entry_point()
"""


def test_the_path_from_the_command_line_to_the_first_step_is_short(tmp_path, jsim_cache):
  # A reader follows at most 15 functions in at most 8 files to the step.
  command = ["--config=configs/tiny.py", "--config.stage=classifier", f"--workdir={tmp_path / 'w'}"]
  proc = subprocess.run(
    [sys.executable, "-c", _PATH_TO_STEP, *command], cwd=REPO, env=jsim_env(jsim_cache), capture_output=True, text=True
  )
  assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]
  path = [tuple(frame) for frame in json.loads(proc.stdout.strip().splitlines()[-1])]
  text = " -> ".join(f"{file}:{function}" for file, function in path)
  assert path[0] == ("jsim/main.py", "entry_point") and path[-1][0] == "jsim/train/step.py", text
  assert ("jsim/train/classifier.py", "train_classifier") in path and ("jsim/train/loop.py", "fit") in path, text
  assert len(path) <= 15 and len({file for file, _ in path}) <= 8, text
