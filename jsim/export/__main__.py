"""python -m jsim.export --workdir=W [--out=D] [--overwrite]: the ONNX files of a trained workdir."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

_PROG = "python -m jsim.export"


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, not usage + error
    print(f"{_PROG}: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def _quiet_libraries() -> None:
  import logging

  logging.getLogger().setLevel(logging.ERROR)
  try:
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    pass


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
  p = _Parser(
    prog=_PROG,
    description="Export a trained jsim workdir to ONNX: embed.onnx (uint8 images -> "
    "embeddings), similarity.onnx (two embeddings -> P(same)) and meta.json.",
  )
  p.add_argument("--workdir", required=True, help="a workdir trained by python -m jsim.main")
  p.add_argument("--out", help="output folder (default: W/onnx, the one jsim-predict --backend=onnx uses)")
  p.add_argument("--overwrite", action="store_true", help="replace an export of another workdir in --out")
  p.add_argument("--verbose", action="store_true", help="keep library log messages")
  args = p.parse_args(argv)

  from jsim import export, interrupts

  if not args.verbose:
    _quiet_libraries()
  try:
    meta = export.export(args.workdir, args.out, overwrite=args.overwrite)
  except (ValueError, OSError) as e:  # ExportError, the workdir's records, FileNotFound, Permission, NoSpace, ...
    print(f"{_PROG}: {_first_line(e)}", file=sys.stderr)
    return 1
  except (KeyboardInterrupt, interrupts.Interrupted) as e:  # (the temporary files are removed on the way out)
    name = getattr(e, "name", "SIGINT")
    print(f"{_PROG}: stopped by {name}; no export was written, rerun the same command", file=sys.stderr)
    return getattr(e, "exit_code", 130)
  out = Path(args.out) if args.out else Path(args.workdir) / export.DEFAULT_DIR
  print(export.export_summary(meta, out))
  return 0


if __name__ == "__main__":
  from jsim import interrupts

  interrupts.install()  # SIGTERM too: one line and the temporary files removed, not a silent kill
  interrupts.exit_now(main())  # (no interpreter teardown: XLA's threads are not torn down under Python)
