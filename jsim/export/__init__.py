"""ONNX export of a trained workdir: run the model anywhere onnxruntime runs.

    python -m jsim.export --workdir=W --out=D

writes, from the best stage-1 and stage-2 checkpoints (every ensemble member's too):

    D/embed.onnx        uint8 images [N, S, S, 3] -> float32 embeddings [N, E]; S is the data's
                        image size (W/preprocessing.json), and the /255, the resize to the
                        classifier's input size and the normalisation are inside, as evaluation does
    D/similarity.onnx   (e1 [N, E], e2 [N, E]) float32 -> P(same) [N]
    D/meta.json         image_size, input_size, embedding_dim, class_names (the seen classes' ids),
                        threshold (W/report.json's val_threshold, when that report evaluated these
                        stages), the stage ids, the fingerprint of the checkpoints it came from
                        (their content checksums), and the SHA-256 of each graph file

N is dynamic. The graphs compute in float32 whatever dtype training used. Without --out
the export goes to W/onnx, the folder `jsim-predict --backend=onnx` uses (and fills on
first use). A folder is only overwritten when it holds an export (complete or not) of the
same workdir, or with --overwrite an export of another; an export is used only when its
graphs have the recorded digests (a changed graph is refused; a copy, `cp -r` or `touch`,
is fine) and the checkpoints it came from are still those (`problem` says why not). Files
are written under temporary names and renamed: an interrupted export leaves no half file,
and its rerun removes the temporaries a killed one left.

This module reads only JSON (onnx, onnxruntime and JAX load when a graph is built or run).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from pathlib import Path
from typing import Any

from jsim import workdir as wd

EMBED_FILE, SIMILARITY_FILE, META_FILE = "embed.onnx", "similarity.onnx", "meta.json"
DEFAULT_DIR = "onnx"  # W/onnx: predict's cache of the export
FORMAT = 2  # 2: graphs verified by SHA-256, checkpoints by their content checksum
INSTALL_HINT = "pip install onnx onnxruntime (or the project's extra: pip install 'jsim[export]')"


class ExportError(ValueError):
  """A refused export or an unusable export folder (one line for the user)."""


class MissingPackage(ExportError):
  """onnx or onnxruntime is not installed."""


class ReadOnlyFolder(ExportError):
  """The folder that would hold the export cannot be written (a read-only workdir)."""


@contextlib.contextmanager
def locked(out: Path):
  """An exclusive lock on exporting into `out` (a file beside it): concurrent predicts export once.

  ReadOnlyFolder when the folder cannot be written (nothing can be exported there)."""
  lock = out.parent / f".{out.name}.lock"
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock, "a")
  except OSError as e:
    if wd.is_read_only(e):
      raise ReadOnlyFolder(f"{out.parent} is read-only: cannot export into {out}; give another --out") from None
    if wd.is_no_space(e):
      raise wd.no_space(lock) from None
    raise
  with f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _file_digests(out: Path) -> dict:
  return {
    f: {"size": (out / f).stat().st_size, "sha256": wd.file_digest(out / f)} for f in (EMBED_FILE, SIMILARITY_FILE)
  }


def fingerprint(records) -> dict:
  """What the export depends on, from the workdir's records (JSON only: the checkpoints' recorded checksums)."""
  members = []
  for rec in records.members:
    result = wd.read_json(rec.workdir / wd.STAGE1 / wd.RESULT_FILE)
    members.append(
      {
        "workdir": str(rec.workdir.resolve()),
        "model": rec.model_name,
        "stage1_step": rec.stage1_step,
        "stage1_run_id": result.get("run_id"),
        "checkpoint": wd.checkpoint_identity(rec.workdir / wd.STAGE1, rec.stage1_step),
        "image_size": rec.image_size,
        "input_size": int(rec.config["classifier"]["input_size"]),
        "embedding_dim": rec.embedding_dim,
        "mean": list(rec.mean),
        "std": list(rec.std),
      }
    )
  stage2 = wd.read_json(records.workdir / wd.STAGE2 / wd.RESULT_FILE)
  step = stage2.get("best_step")
  return {
    "members": members,
    "stage2": {
      "step": step,
      "run_id": stage2.get("run_id"),
      "checkpoint": None if step is None else wd.checkpoint_identity(records.workdir / wd.STAGE2, int(step)),
      "feature": records.stage2.get("similarity", {}).get("feature", "l1"),
      "hidden": list(records.stage2.get("similarity", {}).get("hidden", []) or []),
    },
    "format": FORMAT,
  }


def _recorded_meta(out: Path) -> dict | None:
  """D/meta.json when it is a jsim export's (of any format), without checking the graphs; else None."""
  try:
    meta = wd.read_json(out / META_FILE)
  except (OSError, ValueError):
    return None
  return meta if isinstance(meta, dict) and isinstance(meta.get("format"), int) and "workdir" in meta else None


def read_meta(out: str | os.PathLike) -> dict | None:
  """D/meta.json, or None when D holds no complete export whose graphs have the recorded digests."""
  out = Path(out)
  meta = _recorded_meta(out)
  if meta is None or meta.get("format") != FORMAT:
    return None
  files = meta.get("files")
  try:  # the graphs written with this meta (content, not times: a copy or a touch is the same export)
    if not isinstance(files, dict) or any((out / f).stat().st_size != files.get(f, {}).get("size") for f in files):
      return None
    if files != _file_digests(out):
      return None
  except (OSError, AttributeError):
    return None
  return meta


def _ours(name: str) -> bool:
  """Whether a file name is one an export writes: its three files and their temporary names."""
  return any(
    name == f or (name.startswith(f + ".") and name.endswith(wd.TMP_SUFFIX))
    for f in (META_FILE, EMBED_FILE, SIMILARITY_FILE)
  )


def _remove_leftovers(out: Path) -> None:
  """Removes the temporary files of an export that was killed (the caller holds the lock: no other process is
  writing them; this one's, named by its pid, are written next)."""
  mine = f".{os.getpid()}{wd.TMP_SUFFIX}"
  for p in out.iterdir() if out.is_dir() else ():
    if not p.is_dir() and _ours(p.name) and p.name.endswith(wd.TMP_SUFFIX) and not p.name.endswith(mine):
      p.unlink(missing_ok=True)


def problem(out: str | os.PathLike, records) -> str | None:
  """Why the export in `out` cannot serve this workdir (None: it is current)."""
  out, workdir = Path(out), records.workdir
  meta = read_meta(out)
  if meta is None:
    recorded = _recorded_meta(out)
    if recorded is not None and recorded.get("format") == FORMAT:
      return f"{out}: its graphs are not those its {META_FILE} records (changed, damaged or half-written)"
    return f"{out} holds no jsim ONNX export ({META_FILE}, {EMBED_FILE}, {SIMILARITY_FILE})"
  if meta.get("workdir") != str(workdir.resolve()):
    return f"{out} was exported from workdir {meta.get('workdir')}, not {workdir.resolve()}"
  if meta.get("fingerprint") != fingerprint(records):
    return (
      f"{out} is stale: the checkpoints of {workdir} changed since it was exported "
      f"(stage ids then: {json.dumps(meta.get('stage_ids'))})"
    )
  return None


def _check_out(out: Path, workdir: Path, overwrite: bool) -> None:
  """Refuses an --out that holds something else than an export (complete, damaged or interrupted) of this
  workdir, or with --overwrite of any workdir."""
  if out.exists() and not out.is_dir():
    raise ExportError(f"--out {out}: not a folder")
  if not out.exists():
    return
  others = sorted(p.name for p in out.iterdir() if not _ours(p.name))
  if others:
    raise ExportError(
      f"--out {out}: a non-empty folder that holds no jsim export; choose a new or empty --out "
      f"(it holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
    )
  meta = _recorded_meta(out)
  if overwrite or meta is None:  # (no meta.json: an interrupted export, never usable; it is completed)
    return
  if meta.get("workdir") != str(workdir.resolve()):
    raise ExportError(
      f"--out {out} holds an export of workdir {meta.get('workdir')}; choose another --out "
      "(or --overwrite to replace it)"
    )


def require_onnx() -> None:
  try:
    import onnx  # noqa: F401
  except ImportError:
    raise MissingPackage(f"the ONNX export needs the onnx package; {INSTALL_HINT}") from None


def restore(records) -> tuple[list, Any, Any]:
  """(graph members, stage-2 model, its params) of a workdir's best checkpoints, by the one restore path
  (classifier.restore_classifier for every ensemble member, calibration.restore_scorer for stage 2).

  The stage-2 model is Ms, or for similarity.model=distance the distance's name ('l2' | 'cosine')
  with the calibration's {'scale', 'bias'} as its params."""
  from jsim import configs, parallel
  from jsim.export import graph
  from jsim.train import calibration, classifier, similarity

  mesh = parallel.make_mesh()
  members = []
  for rec in records.members:
    config = configs.config_from_dict(rec.config)
    model, state = classifier.restore_classifier(config, rec.workdir, mesh)
    if int(state.step) != rec.stage1_step or model.embedding_dim != rec.embedding_dim:
      raise ExportError(
        f"{rec.workdir / wd.STAGE1}: the best checkpoint (step {int(state.step)}, "
        f"{model.embedding_dim}-d) is not the one the embeddings record (step {rec.stage1_step}, "
        f"{rec.embedding_dim}-d); rerun the stages"
      )
    members.append(graph.Member(model, state.variables, rec.mean, rec.std, int(config.classifier.input_size)))
  config = configs.config_from_dict({**records.members[0].config, "similarity": records.stage2["similarity"]})
  dim = sum(int(m.model.embedding_dim) for m in members)
  if calibration.uses_distance(config):
    _, params = calibration.restore_scorer(config, records.workdir, mesh, dim=dim)
    return members, str(config.similarity.distance), params
  model, state = similarity.restore_similarity(config, records.workdir, mesh, dim=dim)
  return members, model, state.params


def export_records(records, out: str | os.PathLike, *, overwrite: bool = False, cache: bool = False) -> dict:
  """Restores a workdir (its `workdir.read_records`) and writes its export into `out`; returns the meta.

  cache: `out` is the workdir's own W/onnx, replaced whatever it holds.
  """
  import onnx

  from jsim.export import graph
  from jsim.models.similarity import SimilarityMLP

  out = Path(out)
  if not cache:
    _check_out(out, records.workdir, overwrite)  # before the checkpoints load
  members, ms, params = restore(records)
  dim = sum(int(m.model.embedding_dim) for m in members)
  doc = f"jsim export of {records.workdir.resolve()}"
  if isinstance(ms, str):  # similarity.model=distance
    similarity, feature = graph.distance_graph(params, ms, dim, doc=doc), f"distance:{ms}"
  elif isinstance(ms, SimilarityMLP):
    similarity, feature = graph.similarity_graph(params, ms.feature, dim, doc=doc), ms.feature
  else:
    raise ExportError(f"no ONNX graph for the similarity model {type(ms).__name__} of {records.workdir}")
  embed = graph.embed_graph(members, image_size=records.image_size, doc=doc)
  stage_ids = {}
  for name in (wd.STAGE1, wd.STAGE2):
    result = wd.read_json(records.workdir / name / wd.RESULT_FILE)
    stage_ids[name] = {"best_step": result.get("best_step"), "run_id": result.get("run_id")}
  split = wd.read_json(records.workdir / "split.json")
  input_sizes = [m.input_size for m in members]
  meta = {
    "format": FORMAT,
    "export_id": uuid.uuid4().hex,
    "workdir": str(records.workdir.resolve()),
    "image_size": records.image_size,
    "input_size": input_sizes[0] if len(set(input_sizes)) == 1 else input_sizes,
    "embedding_dim": dim,
    "class_names": list(split.get("seen_classes", [])),
    "threshold": records.threshold,
    "stage_ids": stage_ids,
    "models": [rec.model_name for rec in records.members],
    "feature": feature,
    "dtype": "float32",
    "opset": graph.OPSET,
    "inputs": {"embed": [graph.IMAGES], "similarity": [graph.E1, graph.E2]},
    "outputs": {"embed": graph.EMBEDDINGS, "similarity": graph.P_SAME},
    "fingerprint": fingerprint(records),
  }
  out.mkdir(parents=True, exist_ok=True)
  _remove_leftovers(out)
  if (out / META_FILE).exists():
    (out / META_FILE).unlink()  # the folder holds no valid export until every file is new
  for name, proto in ((EMBED_FILE, embed), (SIMILARITY_FILE, similarity)):
    wd.write_file(out / name, lambda tmp, proto=proto: onnx.save_model(proto, str(tmp)))
  meta["files"] = _file_digests(out)
  wd.write_json(out / META_FILE, meta)
  return meta


def export(workdir: str | os.PathLike, out: str | os.PathLike | None = None, *, overwrite: bool = False) -> dict:
  """Exports a trained workdir (default folder W/onnx); returns the meta written."""
  require_onnx()
  records = wd.read_records(workdir)
  cache = out is None  # W/onnx is the workdir's own: replaced whatever it holds
  out = records.workdir / DEFAULT_DIR if cache else Path(out)
  if not cache:
    _check_out(out, records.workdir, overwrite)  # refused before the checkpoints load, and before the lock
  with locked(out):
    return export_records(records, out, overwrite=overwrite, cache=cache)


def export_summary(meta: dict, out: Path) -> str:
  sizes = ", ".join(f"{f} {(out / f).stat().st_size / 2**20:.1f} MiB" for f in (EMBED_FILE, SIMILARITY_FILE))
  return (
    f"exported {'+'.join(meta['models'])} ({meta['embedding_dim']}-d embeddings, {meta['image_size']} px "
    f"uint8 input) to {out}: {sizes}"
  )


__all__ = [
  "ExportError",
  "MissingPackage",
  "ReadOnlyFolder",
  "export",
  "export_records",
  "fingerprint",
  "problem",
  "read_meta",
]
