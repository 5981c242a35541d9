"""The workdir is the contract between stages.

    W/config.json                 the resolved config of the last successful run, the finished stages' settings
                                  as they were trained (for the record)
    W/split.json                  classes and image ids of every split
    W/preprocessing.json          image size, input size, normalisation statistics
    W/stage1/  config.json, checkpoints/, metrics.jsonl, tb/, result.json
    W/embeddings/  embeddings.npz, meta.json
    W/stage2/  config.json, checkpoints/, metrics.jsonl, tb/, result.json
    W/report.json, report.md, evaluation.npz, figures/, evaluation/   (the evaluation: EVALUATION_OUTPUTS)
    W/onnx/, W/predict_cache/      predict's export and gallery caches

A stage's config.json records the settings that define its outputs; a later run
with different ones is refused (another architecture, split, ...), while settings
that only extend or observe a run (more epochs, logging, the learning rate a resumed
run continues at: identity._FREE_KEYS) may change. A finished stage is not retrained by
such a change: the line that skips it names the values it was trained with instead
(`not_applied`), and report.json and W/config.json record those (`trained_config`).
`result.json` marks a finished stage, which is never redone unless
config.overwrite is set; overwriting a stage also removes what was derived from it
(`stages._DERIVED`: for stage 1 the embeddings, stage 2, the sweep, the evaluation and predict's
caches; for stage 2 the evaluation and the export), which would otherwise be read
although stale. result.json carries a `run_id`, new each time a stage finishes, that
derived outputs record (report.json, the export) and readers check (`report_problem`),
so that a retrained stage is never read through what an earlier one left. Derived array
files (the embeddings, the feature cache, evaluation.npz) are recorded with their SHA-256
(`file_digests`), which their readers check (`changed_file`): a file changed in place is
never read as current.

Every file is written to a temporary name, synced and renamed, so a killed run (or a
power loss) leaves either the old file or the new one, never half of one; a full disk
is `NoSpace`, one line naming the file, with the temporary file removed.

One run at a time: `locked` holds an fcntl lock on W/.jsim.lock (the kernel drops it
when the process dies, so a SIGKILL leaves no stale lock). A stage is claimed (its
config.json written, stale outputs removed) only once its inputs are loaded, and
`drop_unused` removes what a failed or refused run made without doing any work (a
claim without a checkpoint, a split drawn for nothing, a workdir it created), so the
corrected command is not refused as "another configuration".

config.overwrite and preemption: W/overwrite.json records the overwrite run in
progress (a fingerprint of its config) and the stages it has replaced; its verbatim
rerun (a requeue) resumes those instead of replacing them again. It is removed when
the run completes, so the next overwrite run replaces again.

The modules: `layout` (the names above), `io` (atomic writes, NoSpace, read_json), `identity` (a stage's
recorded settings against a run's), `stages` (claim, finish and read a stage; overwrite; drop_unused),
`lock` (one run at a time), `records` (a trained workdir's records, its report), `digests` (content
digests of files and checkpoints, the split check). Everything is imported from here:
`from jsim import workdir as wd`.
"""

from __future__ import annotations

from jsim.workdir.digests import (
  changed_file,
  check_split,
  checkpoint_identity,
  file_digest,
  file_digests,
  split_digest,
)
from jsim.workdir.identity import check_recorded, not_applied, not_applied_text, trained_config
from jsim.workdir.io import (
  TMP_SUFFIX,
  NoSpace,
  ReadOnly,
  config_to_dict,
  default_cache_dir,
  is_no_space,
  is_read_only,
  no_space,
  read_json,
  read_only,
  write_file,
  write_npy,
  write_json,
)
from jsim.workdir.layout import (
  EMBEDDINGS,
  EVALUATION_OUTPUTS,
  LOCK_FILE,
  OVERWRITE_FILE,
  PREDICT_CACHES,
  REPORT_FILE,
  RESULT_FILE,
  STAGE1,
  STAGE2,
)
from jsim.workdir.lock import WorkdirInUse, locked
from jsim.workdir.records import (
  REPORT_KEYS,
  StageRecords,
  WorkdirRecords,
  read_records,
  read_report,
  report_problem,
  stage1_records,
  stage2_records,
)
from jsim.workdir.stages import (
  begin_overwrite,
  check_stage,
  claim_stage,
  drop_unused,
  end_overwrite,
  finish_stage,
  mark_replaced,
  replaces,
  stage_result,
  start_run,
)

__all__ = [
  "EMBEDDINGS",
  "EVALUATION_OUTPUTS",
  "LOCK_FILE",
  "OVERWRITE_FILE",
  "PREDICT_CACHES",
  "REPORT_FILE",
  "REPORT_KEYS",
  "RESULT_FILE",
  "STAGE1",
  "STAGE2",
  "TMP_SUFFIX",
  "NoSpace",
  "ReadOnly",
  "StageRecords",
  "WorkdirInUse",
  "WorkdirRecords",
  "begin_overwrite",
  "changed_file",
  "check_recorded",
  "check_split",
  "check_stage",
  "checkpoint_identity",
  "claim_stage",
  "config_to_dict",
  "default_cache_dir",
  "drop_unused",
  "end_overwrite",
  "file_digest",
  "file_digests",
  "finish_stage",
  "is_no_space",
  "is_read_only",
  "locked",
  "mark_replaced",
  "no_space",
  "not_applied",
  "not_applied_text",
  "read_json",
  "read_only",
  "read_records",
  "read_report",
  "replaces",
  "report_problem",
  "split_digest",
  "stage1_records",
  "stage2_records",
  "stage_result",
  "start_run",
  "trained_config",
  "write_file",
  "write_npy",
  "write_json",
]
