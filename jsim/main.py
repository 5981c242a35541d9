"""Command line: flags only. Everything else is `jsim.run.run(config, workdir)`.

  python -m jsim.main --config=configs/protocol.py:model=resnet50,stage=classifier --workdir=runs/resnet50 \
      [--config.classifier.num_epochs=5 ...]

`--help` prints jsim.console.help_text() (the stages, the configs, overrides).
"""

from __future__ import annotations

if __name__ == "__main__":  # handlers first: a signal while the libraries import is one line too
  from jsim import interrupts

  interrupts.install_while_importing()

import difflib
import importlib.util
import os
import re
import sys
import traceback
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from jsim import interrupts

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for split, checkpoints, metrics and reports.")
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_bool("print_config", False, "Print the resolved config (every key, its value and default) and stop.")
flags.DEFINE_bool(
  "dry_run", False, "Check the config, the data, the workdir, packages, weights and disk space; write nothing; stop."
)


def _config_arg(argv: list[str]) -> tuple[str, str] | None:
  """(path, argument) of --config=PATH[:ARG], or None."""
  for i, arg in enumerate(argv):
    m = re.fullmatch(r"--?config(?:=(.*))?", arg)
    if m:
      path = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else "")
      path, _, arg = path.partition(":")
      return path, arg
  return None


def _loaded_config(argv: list[str]):
  """The config that --config names, loaded (to check the file, and to explain a bad override)."""
  found = _config_arg(argv)
  if found is None:
    return None
  path, arg = found
  spec = importlib.util.spec_from_file_location("_jsim_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def config_file_problem(argv: list[str]) -> str | None:
  """One line for a config file that is missing, does not parse, or fails (a key the base config
  lacks, a wrong type): naming the file, and the line where it failed. None if it loads."""
  found = _config_arg(argv)
  if found is None or not found[0]:
    return None  # absl says that --config is required
  path = found[0]
  if not Path(path).is_file():
    return f"--config={path}: no such file"
  try:
    _loaded_config(argv)
  except SyntaxError as e:
    return f"{path}:{e.lineno}: not valid Python ({e.msg})"
  except Exception as e:  # noqa: BLE001 - whatever the file raises, it is reported as one line
    frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == Path(path).resolve()]
    where = f"{path}:{frames[-1].lineno}" if frames else path
    code = f" ({frames[-1].line.strip()})" if frames and frames[-1].line else ""
    text = str(e.args[0]) if e.args else str(e)
    if isinstance(e, ValueError) and re.match(rf"(\S*/)?{re.escape(Path(path).name)}:", text):
      return text.splitlines()[0]  # the config's own message, which names it and its argument
    if isinstance(e, ValueError):  # a value refused (by the file or what it calls): its message names it
      return f"--config={path}:{found[1]}: {text.splitlines()[0]}" if found[1] else f"{where}: {text.splitlines()[0]}"
    if found[1] and isinstance(e, TypeError) and frames == [] and "positional argument" in text:
      return f"--config={path}:{found[1]}: {path} takes no ':ARGUMENT'; use --config={path}"
    m = re.search(r'Key "([^"]+)" does not exist', text)
    if m:
      close = re.search(r'Did you mean "([^"]+)"', text)
      hint = f"; did you mean {close.group(1)!r}?" if close else ""
      return (
        f"{where}{code}: the config has no key {m.group(1)!r} (a config file sets keys of "
        f"jsim.configs.base_config, it cannot add any){hint}"
      )
    return f"{where}{code}: {type(e).__name__}: {text.splitlines()[0] if text else ''}"
  return None


def unknown_override(argv: list[str]) -> str | None:
  """'--config.a.b: ...' for the first override whose key the config lacks, else None."""
  try:
    config = _loaded_config(argv)
  except Exception:  # noqa: BLE001 - a broken config file: let the original error speak
    return None
  if config is None:
    return None
  for arg in argv:
    m = re.match(r"--?(?:no)?config\.([^=]+)", arg)
    if not m:
      continue
    node, walked = config, []
    for part in m.group(1).split("."):
      if not hasattr(node, "keys") or part not in node:
        where = f"config.{'.'.join(walked)}" if walked else "the config"
        known = list(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(part, known, n=1)
        hint = (
          f"; did you mean {'.'.join(walked + close)!r}?"
          if close
          else (f"; it has {', '.join(sorted(known))}" if known else f" ({where} is a value, not a group)")
        )
        return f"--config.{m.group(1)}: {where} has no key {part!r}{hint}"
      node, walked = node[part], walked + [part]
  return None


def _prog(argv0: str) -> str:
  return "jsim" if Path(argv0).name == "jsim" else "python -m jsim.main"


def _refuse(message: str, code: int = 1):
  """One line on stderr, 'jsim: ...' like every other refusal, and the exit status."""
  print(f"jsim: {message}", file=sys.stderr)
  sys.exit(code)


def _missing_flag(flag: str, argv: list[str]) -> str:
  """The line for a missing --config or --workdir: what to add, with an example."""
  found = _config_arg(argv)
  config = f"{found[0]}{':' + found[1] if found[1] else ''}" if found and found[0] else "configs/demo.py"
  example = f"{_prog(argv[0])} --config={config} --workdir=runs/{Path(config.partition(':')[0]).stem}"
  if flag == "config":
    what = "add --config=configs/FILE.py (the experiment; --help lists them)"
  else:
    what = "add --workdir=DIR (a new folder, or an earlier run's to continue it)"
  return f"--{flag} is missing: {what}, e.g. {example}"


def _type_name(value) -> str:
  return {bool: "True or False", int: "an integer", float: "a number", str: "a string"}.get(
    type(value), f"a {type(value).__name__}"
  )


def _flag_error(error: Exception, argv: list[str]) -> tuple[str, int]:
  """The line and exit status for what absl's flag parser refused: an unknown flag (usage, 2) or a value
  that does not parse as its flag's type (1, as every refused config value)."""
  text = " ".join(str(error).split())
  if isinstance(error, flags.UnrecognizedFlagError):
    close = re.search(r"Did you mean: ([^?]+?) ?\?", text)
    hint = f"; did you mean --{close.group(1).split(',')[0].strip()}?" if close else ""
    return f"unknown flag --{error.flagname}{hint} (see --help)", 2
  m = re.fullmatch(r"flag (--\S+?=.*?): (.*)", text)
  if not m:
    return f"{text} (see --help)", 2
  flag, why = m.groups()
  key = re.match(r"--config\.([^=]+)=", flag)
  config = None
  try:
    config = _loaded_config(argv) if key else None
  except Exception:  # noqa: BLE001 - (it loaded once already; without it the line has no default to show)
    pass
  if config is not None:
    node = config
    for part in key.group(1).split("."):
      node = node[part]
    detail = "" if type(node) in (bool, int, float, str) else f"; {why}"  # (a tuple's says how to quote)
    return f"{flag}: expected {_type_name(node)} (the config has {node!r}{detail})", 1
  if "Non-boolean argument" in why:
    why = "expected True or False"
  return f"{flag}: {why}", 1


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error (not a usage dump or a traceback) for a missing
  flag, a bad config file or key."""
  if any(a in ("-h", "--help", "-help", "--helpshort", "-?") for a in argv[1:]):
    from jsim import console

    print(console.help_text(_prog(argv[0])), end="")
    sys.exit(0)
  found = _config_arg(argv)
  if found is None or not found[0]:
    _refuse(_missing_flag("config", argv), 2)
  problem = config_file_problem(argv)
  if problem:
    _refuse(problem)
  try:
    rest = FLAGS(argv)  # (not app.parse_flags_with_usage: its "FATAL Flags parsing error" is two lines)
  except (AttributeError, KeyError) as e:  # what ml_collections raises for a key the config lacks
    text = str(e.args[0]) if e.args else str(e)
    _refuse(unknown_override(argv) or f"a --config override names a key the config lacks ({text.splitlines()[0]})")
  except flags.Error as e:
    _refuse(*_flag_error(e, argv))
  if len(rest) > 1:
    _refuse(f"unexpected arguments: {' '.join(rest[1:])} (flags are --name=value; see --help)", 2)
  if not FLAGS.workdir and not FLAGS.print_config:
    _refuse(_missing_flag("workdir", argv), 2)
  return rest


def main(argv):
  del argv  # (parse_flags refused any left over)
  from jsim import console, run  # after flag parsing: keeps --help fast

  if FLAGS.print_config:
    console.print_config(FLAGS.config)
    return
  console.setup_logging()
  try:
    if FLAGS.dry_run:
      from jsim import plan

      plan.dry_run(FLAGS.config, FLAGS.workdir)
      return
    run.run(FLAGS.config, FLAGS.workdir)  # (it prints the summary under interrupts.install_after_run)
  except run.EXPECTED_ERRORS as e:
    logging.flush()
    print(f"jsim: {e}", file=sys.stderr)
    from jsim.checkpoint import DamagedCheckpoint

    if isinstance(e, DamagedCheckpoint):  # tensorstore's failed reads complain at interpreter exit: skip it
      sys.stderr.flush()
      sys.stdout.flush()
      os._exit(run.exit_code(e))
    sys.exit(run.exit_code(e))
  except OSError as e:  # a full disk or a read-only workdir where no writer said so itself: still one line
    from jsim import workdir as wd

    if isinstance(e, wd.ReadOnly):
      message = e
    elif wd.is_read_only(e):
      message = wd.read_only(e.filename or FLAGS.workdir, e)
    elif wd.is_no_space(e):
      message = wd.no_space(e.filename or FLAGS.workdir)
    else:
      raise
    logging.flush()
    print(f"jsim: {message}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:  # a second Ctrl-C (the first one saves a checkpoint and stops)
    logging.flush()
    print("jsim: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
    sys.exit(130)


def _close_progress_bars() -> None:
  """Closes the bars an exception left open, so that they do not print after the message (at exit)."""
  tqdm = sys.modules.get("tqdm")
  for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
    bar.close()


def entry_point():
  interrupts.install()
  try:
    app.run(main, flags_parser=parse_flags)
  except interrupts.Interrupted as e:  # outside a training stage (those stop at a step, with a checkpoint)
    interrupts.exiting(e.exit_code)
    logging.flush()
    _close_progress_bars()
    print(
      f"jsim: stopped by {e.name}; finished stages and saved checkpoints are kept, rerun the same command to continue",
      file=sys.stderr,
    )
    interrupts.exit_now(e.exit_code)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    interrupts.exiting(code)
    if isinstance(e.code, str):  # (what sys.exit would print)
      print(e.code, file=sys.stderr)
    # No interpreter teardown: a signal during it would kill with no line (Python restores the default
    # handlers), and orbax's and tensorstore's threads print tracebacks when torn down after a Ctrl-C.
    interrupts.exit_now(code)


if __name__ == "__main__":
  entry_point()
