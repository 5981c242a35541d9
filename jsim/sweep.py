"""One config over several seeds and a small grid of values, each run in its own workdir under ROOT.

  python -m jsim.sweep --config=configs/metric.py:loss=multi_similarity,size=cpu --workdir=runs/ms \
      --seeds=0,1,2 --grid=classifier.learning_rate=1e-4,1e-3 [--grid=KEY=V1,V2 ...] [--config.KEY=VALUE ...]
  python -m jsim.evaluate.compare runs/ms/* --table=runs/ms/table.md    # mean +/- std over the seeds

Every combination of the grid's values (the product of the --grid flags) runs once per seed, as
`python -m jsim.main --config=... --workdir=ROOT/NAME --config.seed=S --config.KEY=V ...` (the run
function itself, in a child process: its checks, resume, signals and one-line errors), one after the
other. NAME is made of the values, e.g. `classifier.learning_rate=1e-4,seed=0`. A run whose stages have
all finished is skipped without starting; an interrupted one resumes where it stopped. --config.KEY=VALUE
flags go to every run unchanged (not into the names). Every run's config is built and checked before
the first one starts, so a bad key or value is one line, not a failure hours later. ROOT/sweep.json
records each run: its name, seed, values, command, status and wall time (sweeps that share ROOT at the
same time, over other grids or seeds, keep each other's runs in it).

A SIGTERM or Ctrl-C stops the running child at its next step with a checkpoint (as jsim.main does) and
the sweep with it: rerun the same command to continue. A run that fails (e.g. a NaN loss) is reported,
the others still run, and the sweep exits 1.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from jsim import interrupts

SWEEP_FILE = "sweep.json"
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+=-]")


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  seed: int
  values: tuple[tuple[str, str], ...]  # (config key, value as given), the grid's

  def overrides(self) -> list[str]:
    return [f"--config.seed={self.seed}", *(f"--config.{k}={v}" for k, v in self.values)]


def split_values(text: str) -> list[str]:
  """'1e-4,1e-3' -> ['1e-4', '1e-3']; commas inside brackets stay: '(64,32),()' -> ['(64,32)', '()']."""
  out, depth, current = [], 0, ""
  for ch in text:
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      out.append(current)
      current = ""
    else:
      current += ch
  out.append(current)
  return out


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
  """['classifier.learning_rate=1e-4,1e-3', ...] -> [(key, values)]; ValueError, one line, naming the item."""
  grid, seen = [], set()
  for item in items:
    key, sep, values = item.partition("=")
    key = key.strip().removeprefix("config.")
    where = f"--grid={item}"
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
      raise ValueError(
        f"{where}: expected KEY=VALUE1,VALUE2,... with KEY a config key such as classifier.learning_rate"
      )
    if key == "seed":
      raise ValueError(f"{where}: give the seeds with --seeds=0,1,2, not in the grid")
    if key in seen:
      raise ValueError(f"{where}: {key} is in the grid twice; give all its values in one --grid")
    values = [v.strip() for v in split_values(values)]
    if not values or any(not v for v in values):
      raise ValueError(f"{where}: an empty value; expected KEY=VALUE1,VALUE2,...")
    if len(set(values)) < len(values):
      raise ValueError(f"{where}: a value is given twice")
    seen.add(key)
    grid.append((key, values))
  return grid


def parse_seeds(text: str) -> list[int]:
  """'0,1,2' -> [0, 1, 2]; ValueError, one line, for anything else."""
  try:
    seeds = [int(s) for s in text.split(",")]
  except ValueError:
    raise ValueError(f"--seeds={text}: expected integers separated by commas, e.g. --seeds=0,1,2") from None
  if len(set(seeds)) < len(seeds) or any(s < 0 for s in seeds):
    raise ValueError(f"--seeds={text}: expected distinct integers >= 0")
  return seeds


def run_name(values: Sequence[tuple[str, str]], seed: int) -> str:
  """The workdir name of a run: its grid values and seed, e.g. 'classifier.learning_rate=1e-4,seed=0'."""
  return ",".join(_NAME_CHARS.sub("_", f"{k}={v}") for k, v in (*values, ("seed", seed)))


def plan_runs(grid: list[tuple[str, list[str]]], seeds: list[int]) -> list[Run]:
  """Every combination of the grid's values, each for every seed (seeds innermost: a method's seeds
  finish together)."""
  keys = [k for k, _ in grid]
  runs = []
  for combo in itertools.product(*(values for _, values in grid)):
    values = tuple(zip(keys, combo))
    runs += [Run(run_name(values, s), s, values) for s in seeds]
  names = [r.name for r in runs]
  clash = next((n for n in names if names.count(n) > 1), None)
  if clash:
    raise ValueError(f"two runs would share the workdir name {clash!r}: give values that differ in letters or digits")
  return runs


def build_config(config_arg: str, overrides: Sequence[str]):
  """The config jsim.main would run with --config=config_arg and these --config.KEY=VALUE overrides
  (absl's and ml_collections' own parsing); ValueError, one line, for a bad file, key or value."""
  from absl import flags
  from ml_collections import config_flags

  from jsim import main

  argv = ["jsim.sweep", f"--config={config_arg}", *overrides]
  problem = main.config_file_problem(argv)
  if problem:
    raise ValueError(problem)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  try:
    fv(argv)
  except (AttributeError, KeyError) as e:
    text = str(e.args[0]) if e.args else str(e)
    raise ValueError(
      main.unknown_override(argv) or f"a --config override names a key the config lacks ({text})"
    ) from None
  except flags.Error as e:
    raise ValueError(str(e).splitlines()[0]) from None
  return fv.config


def is_finished(config, workdir: Path) -> bool:
  """Whether every stage config.stage runs is finished (or current) in workdir: what jsim.main would skip."""
  from jsim import plan, run

  if not (workdir / "config.json").is_file():
    return False
  stages = run.chain(config.stage)
  return all(plan.stage_status(config, workdir, s).endswith("skipped") for s in stages)


def read_records(root: Path) -> dict:
  """ROOT/sweep.json's runs by name ({} where there is none, or it is unreadable: it is then rewritten)."""
  from jsim import workdir as wd

  path = Path(root) / SWEEP_FILE
  try:
    return {r["name"]: r for r in wd.read_json(path)["runs"]} if path.is_file() else {}
  except (ValueError, KeyError, TypeError):
    return {}


def write_record(root: Path, header: dict, entry: dict) -> dict:
  """Puts one run's `entry` into ROOT/sweep.json (over that run's earlier entry, keeping the fields it lacks)
  and returns it as written. Under a lock, re-reading the file first: sweeps that share ROOT at the same time
  (other grids or seeds) keep each other's runs. The header (config, extra flags) is the last writer's; each
  run's own is in its command."""
  import fcntl

  from jsim import workdir as wd

  with open(Path(root) / f".{SWEEP_FILE}.lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # (released when the file closes)
    records = read_records(root)
    records[entry["name"]] = {**records.get(entry["name"], {}), **entry}
    wd.write_json(Path(root) / SWEEP_FILE, {**header, "runs": list(records.values())})
  return records[entry["name"]]


def sweep(
  config_arg: str, root: str | Path, seeds: list[int] | None, grid: list[tuple[str, list[str]]], extra: Sequence[str]
) -> int:
  """Runs the sweep (see the module doc); returns the exit status."""
  from jsim import validate

  root = Path(root)
  if root.exists() and not root.is_dir():
    raise ValueError(f"--workdir={root} is a file, not a folder")
  if seeds is None:
    seeds = [int(build_config(config_arg, extra).seed)]
  runs = plan_runs(grid, seeds)
  configs = {}
  for r in runs:  # all of them first: a bad value fails now, not after hours of runs
    try:
      configs[r.name] = build_config(config_arg, [*r.overrides(), *extra])
      validate.check_config(configs[r.name])
    except ValueError as e:
      raise ValueError(f"run {r.name}: {e}") from None
  root.mkdir(parents=True, exist_ok=True)
  records = read_records(root)

  def record(r: Run, status: str, command: list[str], wall: float | None = None) -> None:
    entry = {"name": r.name, "seed": r.seed, "values": dict(r.values), "command": command, "status": status}
    if wall is not None:
      entry["wall_s"] = round(wall, 1)
    records[r.name] = write_record(root, {"config": config_arg, "extra": list(extra)}, entry)

  failed = []
  with interrupts.ForwardToChild() as forward:
    for i, r in enumerate(runs, 1):
      workdir = root / r.name
      command = [sys.executable, "-m", "jsim.main", f"--config={config_arg}", f"--workdir={workdir}"]
      command += [*r.overrides(), *extra]
      if is_finished(configs[r.name], workdir):
        print(f"jsim.sweep: [{i}/{len(runs)}] {r.name}: finished, skipped", flush=True)
        if records.get(r.name, {}).get("status") != "finished":
          record(r, "finished", command)
        continue
      print(f"jsim.sweep: [{i}/{len(runs)}] {r.name}: {' '.join(command[1:])}", flush=True)
      record(r, "running", command)
      start = time.perf_counter()
      forward.child = subprocess.Popen(command, start_new_session=True)
      code = forward.child.wait()
      forward.child = None
      wall = time.perf_counter() - start
      if forward.signal_name is not None or (code == 0 and not is_finished(configs[r.name], workdir)):
        record(r, "interrupted", command, wall)
        print(
          f"jsim.sweep: stopped by {forward.signal_name or 'the run'} in {r.name}; rerun the same command to continue",
          file=sys.stderr,
        )
        return 0 if code == 0 else code
      record(r, "finished" if code == 0 else f"failed (exit {code})", command, wall)
      if code:
        failed.append(r.name)
  if failed:
    print(f"jsim.sweep: {len(failed)} of {len(runs)} runs failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  print(f"jsim.sweep: {len(runs)} runs finished in {root}", flush=True)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  import argparse

  parser = argparse.ArgumentParser(
    prog="python -m jsim.sweep",
    description="Runs a config over several seeds and a grid of values, one workdir per run under --workdir.",
    epilog="Other --config.KEY=VALUE flags go to every run. Then: python -m jsim.evaluate.compare ROOT/* --table=T.md",
  )
  parser.add_argument("--config", required=True, help="the config file, as for jsim.main (configs/x.py[:arg])")
  parser.add_argument("--workdir", required=True, help="the folder that holds one workdir per run")
  parser.add_argument("--seeds", default=None, help="seeds, e.g. 0,1,2 (default: the config's seed)")
  parser.add_argument(
    "--grid", action="append", default=[], help="KEY=V1,V2,...: a config key and its values (repeatable: product)"
  )
  args, extra = parser.parse_known_args(argv)
  bad = [a for a in extra if not re.match(r"--config\.[^=]+=", a)]
  if bad:
    parser.error(f"unexpected argument {bad[0]!r} (other than --config.KEY=VALUE)")
  try:
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    grid = parse_grid(args.grid)
    for a in extra:
      key = a.removeprefix("--config.").partition("=")[0]
      if key == "seed" or key in dict(grid):
        raise ValueError(f"{a}: {key} is set by the sweep ({'--seeds' if key == 'seed' else '--grid'}); leave it out")
    return sweep(args.config, args.workdir, seeds, grid, extra)
  except (ValueError, OSError) as e:
    print(f"jsim.sweep: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
