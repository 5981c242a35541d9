"""The `jsim-predict` command line, over the library in jsim.predict.

  jsim-predict --workdir=W a.jpg b.png                          # P(same) and the decision
  jsim-predict --workdir=W --query=q.jpg --gallery=DIR [--top=10] [--html=out.html] [--sheet=out.png]

argparse, not absl's flags as in jsim.main: main needs absl for ml_collections'
config_flags (--config=FILE and --config.x.y overrides); this command has no config,
takes positional image paths, and answers bad usage in one line with exit status 2.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from jsim import interrupts, workdir as wd
from jsim.predict.gallery import Match, _listing
from jsim.predict.images import _PROG, _first_line, prepare_image
from jsim.predict.similarity import BACKENDS, Similarity

# ----------------------------------------------------------------------------- outputs


def _thumbnail(path: str | Path, side: int = 160) -> Image.Image:
  with Image.open(path) as im:
    im = im.convert("RGB")
    im.thumbnail((side, side), Image.BILINEAR)
    return im.copy()


def _data_uri(im: Image.Image) -> str:
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _rgb(color: tuple[int, int, int]) -> str:
  return "#%02x%02x%02x" % color


def write_html(out: str | Path, query: str | Path, matches: Sequence[Match], threshold: float | None) -> Path:
  """A self-contained page: the query and its matches as inlined thumbnails, with P(same).

  Borders as in jsim-predict's sheet: the query blue, a match orange above the threshold (the
  model says "same"), gray below; green and red stay for the ground truth of the evaluation figures.
  """
  from jsim.evaluate import figures

  out = Path(out)
  t = 0.5 if threshold is None else threshold
  # The matches' common folder is said once; each caption names the file below it, broken only at a '/'.
  folder = Path(os.path.commonpath([str(Path(m.path).parent) for m in matches])) if matches else None

  def card(path, css: str, caption: str) -> str:
    uri = html.escape(Path(path).resolve().as_uri())
    return (
      f'<figure class="{css}"><a href="{uri}" title="{html.escape(str(path))}">'
      f'<img src="{_data_uri(_thumbnail(path))}"></a><figcaption>{caption}</figcaption></figure>'
    )

  def name(path) -> str:
    return name_folder((Path(path).relative_to(folder) if folder is not None else Path(path)).as_posix())

  cards = [
    card(m.path, "same" if m.probability > t else "diff", f"{rank}. p = {m.probability:.4f}<br>{name(m.path)}")
    for rank, m in enumerate(matches, 1)
  ]
  in_folder = f" in {name_folder(folder)}" if folder is not None else ""
  thr = f"the validation threshold {t:.3f}" if threshold is not None else "0.5"
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>jsim search: {html.escape(Path(query).name)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
img {{ width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated; background: #eee; }}
figure {{ display: inline-block; margin: 6px; padding: 4px; border: 4px solid #ccc; width: 140px;
          vertical-align: top; font-size: 11px; }}
.path {{ font-family: monospace; }}
.path span {{ display: inline-block; max-width: 100%; overflow-wrap: anywhere; }}
figure.query {{ border-color: {_rgb(figures.QUERY_COLOR)}; width: auto; max-width: calc(100% - 28px); }}
figure.same {{ border-color: {_rgb(figures.ABOVE_COLOR)}; }}
figure.diff {{ border-color: {_rgb(figures.BELOW_COLOR)}; }}
</style></head><body>
<h1>Images most similar to the query</h1>
<p>P(same kind of object) by the similarity net: blue the query; orange above {thr} (the model says "the
same kind"), gray below. Click an image to open the file.</p>
{card(query, "query", f"query<br>{name_folder(query)}")}
<hr>
<p>Best matches{in_folder}:</p>
{chr(10).join(cards)}
</body></html>
"""
  wd.write_file(out, lambda tmp: Path(tmp).write_text(page))  # (whole or not at all)
  return out


def name_folder(path) -> str:
  """A path for a caption, HTML-escaped, that a line breaks after a '/', and inside a name only where the name
  alone is wider than the line (never at a '-' where the name would fit on the next line).

  Each name (with its '/') is an inline-block, which a line takes whole or moves to the next line whole.
  """
  parts = str(path).split("/")
  names = [f"<span>{html.escape(p)}/</span>" for p in parts[:-1]] + [f"<span>{html.escape(parts[-1])}</span>"]
  return '<span class="path">' + "<wbr>".join(names) + "</span>"


def short_name(name: str, n: int = 20) -> str:
  """A file name cut in the middle to n characters, its extension kept ('a_long_pho...to_2.jpeg')."""
  if len(name) <= n:
    return name
  stem, dot, ext = name.rpartition(".")
  if not dot or len(ext) > 5:
    stem, ext = name, ""
  keep = n - len(ext) - (1 if ext else 0) - 1
  head = (keep + 1) // 2
  return stem[:head] + "\u2026" + stem[len(stem) - (keep - head) :] + (f".{ext}" if ext else "")


def write_sheet(
  out: str | Path, query: str | Path, matches: Sequence[Match], threshold: float | None, columns: int = 6
) -> Path:
  """A PNG sheet: the query (blue border) and its matches (orange above the threshold, gray below),
  with a legend; the colours of jsim.evaluate.figures, where green and red mean the ground truth."""
  from matplotlib.figure import Figure
  from jsim.evaluate import figures

  t = 0.5 if threshold is None else threshold
  cells = [(query, f"query\n{short_name(Path(query).name)}", figures.QUERY_COLOR)] + [
    (
      m.path,
      f"{i}: p={m.probability:.3f}\n{short_name(Path(m.path).name)}",
      figures.ABOVE_COLOR if m.probability > t else figures.BELOW_COLOR,
    )
    for i, m in enumerate(matches, 1)
  ]
  cols = min(columns, len(cells))
  rows = math.ceil(len(cells) / cols)
  fig = Figure(figsize=(1.6 * cols, 2.0 * rows + 0.4))
  axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
  for ax, (path, title, color) in zip(axes, cells):
    img = np.asarray(_thumbnail(path, 128))
    width = max(2, max(img.shape[:2]) // 24)
    bordered = np.empty((img.shape[0] + 2 * width, img.shape[1] + 2 * width, 3), np.uint8)
    bordered[...] = color
    bordered[width:-width, width:-width] = img
    ax.imshow(bordered)
    ax.set_title(title, fontsize=7)
  for ax in axes:
    ax.axis("off")
  where = f"the validation threshold {t:.3f}" if threshold is not None else "0.5"
  fig.legend(
    handles=figures.legend_patches(
      [(figures.QUERY_COLOR, "query"), (figures.ABOVE_COLOR, f"P(same) above {where}"), (figures.BELOW_COLOR, "below")]
    ),
    loc="lower center",
    ncol=3,
    fontsize=7,
    frameon=False,
    borderaxespad=0.2,
  )
  fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1))
  return figures._save(fig, out)


SHEET_FORMATS = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


def check_output_path(flag: str, path: str | Path, suffixes: Sequence[str]) -> None:
  """ValueError in one line if `path` cannot be written (checked before any search runs)."""
  p = Path(path)
  if p.suffix.lower() not in suffixes:
    raise ValueError(f"{flag}={path}: expected a file name ending in {' or '.join(suffixes)}")
  if p.is_dir():
    raise ValueError(f"{flag}={path} is a directory; give a file name")
  parent = p.parent
  existing = parent
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise ValueError(f"{flag}={path}: {existing} is a file, not a directory")
  if existing != parent:  # (a typo in the folder must not make a new tree of folders)
    raise ValueError(f"{flag}={path}: the folder {parent} does not exist; create it first or name another")
  if not os.access(parent, os.W_OK):
    raise ValueError(f"{flag}={path}: cannot write in {parent}")


# ----------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, not usage + error
    print(f"{_PROG}: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(
    prog=_PROG,
    description="Compare two images, or rank a folder against a query image, with a trained jsim workdir.",
    epilog="examples:\n  jsim-predict --workdir=W a.jpg b.png\n"
    "  jsim-predict --workdir=W --query=q.jpg --gallery=photos/ --top=10 --html=out.html",
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("images", nargs="*", help="two images to compare")
  p.add_argument("--workdir", required=True, help="a workdir trained by python -m jsim.main")
  p.add_argument("--query", help="query image for a gallery search")
  p.add_argument("--gallery", help="folder of images to rank (recursive)")
  p.add_argument("--top", type=int, default=10, help="how many matches to show (0: all; default 10)")
  p.add_argument("--html", help="write an HTML page of the query and its matches")
  p.add_argument("--sheet", help="write a PNG sheet of the query and its matches")
  p.add_argument("--no_cache", "--no-cache", action="store_true", help="embed the gallery again, ignore the cache")
  p.add_argument("--json", action="store_true", help="print the result as JSON")
  p.add_argument(
    "--backend",
    choices=BACKENDS,
    default="auto",
    help="jax: the checkpoints through XLA; onnx: their ONNX export through onnxruntime (exported "
    "to W/onnx on first use); auto (default): onnx on a CPU when onnxruntime is installed",
  )
  p.add_argument("--onnx_dir", "--onnx-dir", help="use this export (python -m jsim.export --out=D) instead of W/onnx")
  p.add_argument("--verbose", action="store_true", help="keep library log messages")
  return p


def _quiet_libraries() -> None:
  import logging

  logging.getLogger().setLevel(logging.ERROR)
  for name in ("jax", "absl", "orbax"):
    logging.getLogger(name).setLevel(logging.ERROR)
  try:
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    pass


def _yes(b: bool) -> str:
  return "yes" if b else "no"


def _run_pair(sim: Similarity, names: Sequence[str], images: Sequence[np.ndarray], as_json: bool) -> None:
  a, b = names
  p = sim.probability(*images)
  t = sim.threshold
  if as_json:
    print(
      json.dumps(
        {
          "a": a,
          "b": b,
          "probability": p,
          "same_at_0.5": sim.is_same(p),
          "val_threshold": t,
          "same_at_val_threshold": None if t is None else sim.is_same(p, t),
        }
      )
    )
    return
  print(f"P(same) = {p:.4f}   ({a} vs {b})")
  print(f"same kind of object at p > 0.5: {_yes(sim.is_same(p))}")
  if t is not None:
    print(f"same kind of object at p > {t:.3f} (validation threshold): {_yes(sim.is_same(p, t))}")


def _run_search(sim: Similarity, args, query: np.ndarray) -> None:
  gallery = sim.gallery(args.gallery, use_cache=not args.no_cache, progress=not args.json)
  where = f" (cache {gallery.cache_path})" if gallery.cache_path else " (no cache)"
  print(
    f"{_PROG}: gallery {args.gallery}: {len(gallery.files)} images, {gallery.reused} from the cache, "
    f"{gallery.embedded} embedded{where}",
    file=sys.stderr,
  )
  if gallery.skipped:
    print(
      f"{_PROG}: warning: skipped {len(gallery.skipped)} unreadable file(s), first: {gallery.skipped[0][1]}",
      file=sys.stderr,
    )
  matches = sim.rank(query, gallery, args.top, query_path=args.query)
  t = sim.threshold
  if args.html:
    write_html(args.html, args.query, matches, t)
  if args.sheet:
    write_sheet(args.sheet, args.query, matches, t)
  if args.json:
    print(
      json.dumps(
        {
          "query": args.query,
          "gallery": args.gallery,
          "val_threshold": t,
          "results": [{"rank": i, "probability": m.probability, "path": m.path} for i, m in enumerate(matches, 1)],
          "cache": {"reused": gallery.reused, "embedded": gallery.embedded, "skipped": [f for f, _ in gallery.skipped]},
        }
      )
    )
    return
  thr = 0.5 if t is None else t
  query = Path(args.query).resolve()
  others = sum((gallery.root / f).resolve() != query for f in gallery.files)
  each = (
    f"each of the {others:,} image{'s' if others != 1 else ''} in {args.gallery} besides the query"
    if others < len(gallery.files)
    else f"each of {others:,} image{'s' if others != 1 else ''} in {args.gallery}"
  )
  print(
    f"query: {args.query}; P(same) with {each}; 'same' at p > {thr:.3f}"
    + (" (validation threshold)" if t is not None else "")
  )
  print(f"{'rank':>4}  {'P(same)':>7}  same  file")
  for i, m in enumerate(matches, 1):
    print(f"{i:>4}  {m.probability:7.4f}  {_yes(sim.is_same(m.probability, thr)):<4}  {m.path}")
  for what, path in (("html", args.html), ("sheet", args.sheet)):
    if path:
      print(f"{what}: {path}")


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (0 ok, 1 bad input, 2 bad usage)."""
  parser = _parser()
  args = parser.parse_args(argv)
  search = args.query is not None or args.gallery is not None
  if search and (args.query is None or args.gallery is None):
    parser.error("a search needs both --query and --gallery")
  if search and args.images:
    parser.error(f"give either two images or --query/--gallery, not both (got {' '.join(args.images)})")
  if not search and len(args.images) != 2:
    parser.error(f"expected two images to compare (or --query and --gallery), got {len(args.images)}")
  if not search and (args.html or args.sheet):
    parser.error("--html and --sheet go with --query/--gallery")
  if args.top < 0:
    parser.error(f"--top={args.top}: must be >= 0 (0 shows every match)")
  if not args.verbose:
    _quiet_libraries()
  try:
    # Cheap checks first (JSON records, the input images, the gallery listing): a bad
    # command fails before JAX and the checkpoints load.
    if args.html:
      check_output_path("--html", args.html, (".html", ".htm"))
    if args.sheet:
      check_output_path("--sheet", args.sheet, SHEET_FORMATS)
    records = wd.read_records(args.workdir)
    names = [args.query] if search else args.images
    images = [prepare_image(name, records.image_size) for name in names]
    if search:
      _listing(args.gallery)
    if args.onnx_dir and args.backend == "jax":
      parser.error("--onnx_dir goes with --backend=onnx or auto")
    sim = Similarity.from_records(records, backend=args.backend, onnx_dir=args.onnx_dir)
    for note in records.notes:  # (a stale report's threshold is not used; said once the model is there)
      print(f"{_PROG}: warning: {note}", file=sys.stderr)
    if getattr(sim, "exported_now", False):
      print(
        f"{_PROG}: exported the model to {sim.onnx.folder} for the ONNX backend (once; --backend=jax skips it)",
        file=sys.stderr,
      )
    if search:
      _run_search(sim, args, images[0])
    else:
      _run_pair(sim, names, images, as_json=args.json)
  except (ValueError, OSError) as e:  # OSError: FileNotFound, NotADirectory, Permission, ...
    print(f"{_PROG}: {_first_line(e)}", file=sys.stderr)
    return 1
  except (KeyboardInterrupt, interrupts.Interrupted) as e:
    print(f"{_PROG}: stopped by {getattr(e, 'name', 'SIGINT')}", file=sys.stderr)
    return getattr(e, "exit_code", 130)
  return 0


def entry_point() -> None:
  # SIGTERM as SIGINT: one line and 128 + the signal; then no interpreter teardown, where onnxruntime's and
  # XLA's threads die under a Python that is finalising (a segmentation fault after the line).
  interrupts.install()
  try:
    code = main()
  except (KeyboardInterrupt, interrupts.Interrupted) as e:  # (while the libraries import, or parsing)
    print(f"{_PROG}: stopped by {getattr(e, 'name', 'SIGINT')}", file=sys.stderr)
    code = getattr(e, "exit_code", 130)
  interrupts.exit_now(code)


if __name__ == "__main__":
  entry_point()
