"""What a user sees first: help, the config printout, the dry run, stage=prepare,
messages that name the next step, a quiet console with a summary, progress lines, and
what TensorBoard reads from the event files.

The command-line cases run the real `python -m jsim.main`; the TensorBoard checks read
the tiny run's event files with TensorBoard's own EventAccumulator.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TINY_RUN, config_module, jsim_env, run_jsim, tiny_config

TINY = "--config=configs/tiny.py"
STAGES = ("prepare", "classifier", "embed", "similarity", "evaluate", "all", "sweep")


def _one_line_refusal(proc, expect: str) -> str:
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  lines = [line for line in out.splitlines() if line.strip()]
  assert expect in lines[-1], out[-3000:]
  return lines[-1]


# --- help, the config, the dry run ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0_and_says_what_a_user_needs(flag):
  proc = subprocess.run(
    [sys.executable, "-m", "jsim.main", flag], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert out.startswith("usage: python -m jsim.main --config=")
  for stage in STAGES:
    assert re.search(rf"^  {stage}\s+\S", out, re.M), stage
  for path in sorted((REPO / "configs").glob("*.py")):
    line = next(x for x in out.splitlines() if f"configs/{path.name}" in x)
    assert len(line.split(path.name, 1)[1].strip()) > 10, line  # a description, not just the name
  assert "--config.classifier.num_epochs=5" in out and "--print_config" in out and "--dry_run" in out
  assert "Everything else is" not in out  # not the module's developer docstring


def test_help_of_the_console_script_names_it():
  code = "import sys; sys.argv[0] = 'jsim'; from jsim.main import entry_point; entry_point()"
  proc = subprocess.run([sys.executable, "-c", code, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.startswith("usage: jsim --config="), proc.stdout + proc.stderr


def test_print_config_lists_every_key_with_defaults(tmp_path, jsim_main):
  proc = jsim_main([TINY, "--config.classifier.num_epochs=7", "--print_config"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [x for x in proc.stdout.splitlines() if x and not x.startswith("#")]
  from jsim import console, workdir as wd

  keys = [k for k, _ in console._leaves(wd.config_to_dict(tiny_config()))]
  assert [x.split(" = ")[0].strip() for x in lines] == keys
  by_key = {x.split(" = ")[0].strip(): x for x in lines}
  assert re.search(r"= 7\s+\(default 30\)$", by_key["classifier.num_epochs"])  # the override, and the default
  assert re.search(r"= 6\s+\(default 64\)$", by_key["classifier.batch_size"])  # set by the config file
  assert by_key["classifier.momentum"].endswith("= 0.8")  # a default in force
  assert not list(tmp_path.iterdir())


def _tree(folder) -> dict:
  """Every file and folder below `folder` with its size and mtime (to see that nothing changed)."""
  return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_dry_run_checks_everything_and_writes_nothing(tmp_path, jsim_cache):
  w, cache = tmp_path / "w", tmp_path / "cache"
  proc = run_jsim(
    [TINY, f"--workdir={w}", "--dry_run", "--config.classifier.input_size=224"],
    cache,  # a new cache: the dry run neither generates the synthetic images nor decodes them there
    timeout=300,
    JAX_LOG_COMPILES="1",
  )
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  assert "split:  6 seen / 2 unseen classes; 42 stage-1 train, 18 validation, 32 test images" in out
  assert re.search(r"^  classifier\s+to run \(2 epochs\)$", proc.stdout, re.M)
  assert re.search(r"^  evaluate\s+to run", proc.stdout, re.M)
  assert "hint:   classifier.input_size=224 on a CPU" in out and "--config.classifier.input_size=64" in out
  assert proc.stdout.rstrip().endswith("dry run OK")
  assert "Compiling jit(train_step)" not in out and "Compiling jit(init)" not in out
  assert re.search(r"^cache:  the run draws the synthetic images into .* and decodes them into the cache", out, re.M)
  assert not w.exists() and not cache.exists()
  # A value that the run would refuse: the same one line, exit 1.
  proc = run_jsim([TINY, f"--workdir={w}", "--dry_run", "--config.model.init=torchvision"], jsim_cache, timeout=300)
  _one_line_refusal(proc, "add --config.model.init=random")
  assert not w.exists()


def test_dry_run_leaves_an_existing_workdir_and_cache_untouched(tmp_path):
  cache, w = tmp_path / "cache", tmp_path / "w"
  proc = run_jsim([TINY, f"--workdir={w}", "--config.stage=prepare"], cache, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  before = (_tree(w), _tree(cache))
  proc = run_jsim([TINY, f"--workdir={w}", "--dry_run"], cache, timeout=300)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  assert "(recorded in split.json)" in proc.stdout and "cache:  decoded already" in proc.stdout
  assert (_tree(w), _tree(cache)) == before


def test_dry_run_of_the_design_card_command_on_a_folder(tmp_path):
  """configs/resnet_cls.py on a data folder: the layout and a sample read, the cache and the weights
  download announced with their sizes, nothing decoded into the cache or downloaded."""
  from jsim.data import synthetic

  root = synthetic.write_synthetic_tiny_imagenet(tmp_path / "tiny-imagenet-200", num_classes=8, train_per_class=10)
  cache, w, torch_home = tmp_path / "cache", tmp_path / "w", tmp_path / "torch"
  args = ["--config=configs/resnet_cls.py", f"--workdir={w}", f"--config.data.root={root}", "--dry_run"]
  proc = run_jsim([*args, "--config.data.num_seen_classes=6"], cache, timeout=300, TORCH_HOME=str(torch_home))
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  assert re.search(
    r"^cache:  the run decodes the images into \S+ \(1 MB; .* GB free\); the dry run decoded 18", out, re.M
  )
  assert re.search(
    r"^weights: torchvision's ResNet50_Weights.IMAGENET1K_V1: not in its cache, stage 1 downloads it from "
    r"https://download.pytorch.org/models/resnet50-\w+.pth \(103 MB\) into .*; [\d.]+ GB free$",
    out,
    re.M,
  )
  assert re.search(r"^  classifier\s+to run \(30 epochs\)$", out, re.M)
  assert not cache.exists() and not w.exists() and not torch_home.exists()
  # A file the run could not decode is found by the sample, before anything runs.
  bad = sorted((root / "train").glob("*/images/*.JPEG"))[0]
  bad.write_bytes(b"not a jpeg")
  proc = run_jsim([*args, "--config.data.num_seen_classes=6"], cache, timeout=300, TORCH_HOME=str(torch_home))
  _one_line_refusal(proc, f"{bad.name}: cannot decode this image")


def test_prepare_stage_writes_split_and_statistics_only(tmp_path, jsim_cache):
  w = tmp_path / "w"
  proc = run_jsim([TINY, f"--workdir={w}", "--config.stage=prepare"], jsim_cache, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(p.name for p in w.iterdir()) == ["config.json", "preprocessing.json", "split.json"]
  assert json.loads((w / "split.json").read_text())["counts"] == {
    "seen_classes": 6,
    "unseen_classes": 2,
    "train": 42,
    "val": 18,
    "test": 32,
  }
  assert len(json.loads((w / "preprocessing.json").read_text())["mean"]) == 3
  line = next(x for x in proc.stderr.splitlines() if "prepared" in x)
  assert re.search(
    r"prepared \S+ in \d+\.\d s: 6 seen / 2 unseen classes; 42 stage-1 train, 18 validation, "
    r"32 test images; mean \(",
    line,
  ), line
  assert re.search(r"^  prepare\s+\S+ s\s+6 seen / 2 unseen classes", proc.stdout, re.M), proc.stdout


# --- messages that lead somewhere ----------------------------------------------------------------------------------


def test_evaluate_on_an_empty_workdir_names_the_first_missing_stage(tmp_path, jsim_main):
  w = tmp_path / "w"
  proc = jsim_main([TINY, f"--workdir={w}", "--config.stage=evaluate"])
  line = _one_line_refusal(
    proc,
    "stage 1 has not finished (stage 'evaluate' needs it); run --config.stage=classifier first, or --config.stage=all",
  )
  assert "embed" not in line
  assert not w.exists()


def test_first_missing_stage(tmp_path):
  from jsim import run

  (tmp_path / "stage1").mkdir()
  (tmp_path / "stage1" / "result.json").write_text('{"best_step": 1}')
  assert run.first_missing_stage("evaluate", tmp_path) == "embed"
  assert run.first_missing_stage("similarity", tmp_path) is None
  (tmp_path / "embeddings").mkdir()
  (tmp_path / "embeddings" / "meta.json").write_text("{}")
  assert run.first_missing_stage("evaluate", tmp_path) == "similarity"
  assert run.first_missing_stage("all", tmp_path / "nothing") is None


@pytest.mark.parametrize(
  "key, value, message",
  [
    (
      "model.init",
      "torchvision",
      "torchvision has no weights for model.name='resnet_tiny' (only for resnet50, "
      "vgg16); add --config.model.init=random",
    ),
    (
      "data.root",
      "/data/tiny-imagenet-200",
      "data.root='/data/tiny-imagenet-200' is set, but "
      "data.source='synthetic' (this config draws its own images) would "
      "ignore it; add --config.data.source=auto",
    ),
    ("data.zip_path", "t.zip", "data.zip_path='t.zip' is set, but data.source='synthetic'"),
  ],
)
def test_settings_that_would_be_ignored_or_fail_later_are_refused(key, value, message):
  from jsim import validate

  config = tiny_config()
  group, name = key.split(".")
  config[group][name] = value
  with pytest.raises(ValueError) as e:
    validate.check_config(config)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_cpu_hint_for_224_pixels():
  from jsim import run

  config = tiny_config()
  assert run.cpu_hints(config) == []
  config.classifier.input_size = 224
  (hint,) = run.cpu_hints(config)
  assert "--config.classifier.input_size=64" in hint and "\n" not in hint


# --- the console ---------------------------------------------------------------------------------------------------


def test_finished_run_says_what_it_skips_and_sums_up(tiny_workdir, trained, tmp_path):
  """A second run of a finished workdir (the second `make demo`): every stage skipped with a reason, the
  evaluation too, a summary; then a changed evaluation setting redoes the evaluation and says why."""
  w = tmp_path / "w"
  shutil.copytree(tiny_workdir, w)
  same = [*TINY_RUN, f"--workdir={w}"]  # what trained ran
  proc = run_jsim(same, trained.cache, timeout=300)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  assert re.search(r"stage 1 already finished \(2 epochs, test accuracy \d+\.\d %\): skipped", out), out
  assert "embeddings are current" in out and "stage 2 already finished (3 epochs" in out
  assert "evaluation is current" in out and "Five-case" not in out
  assert "{" not in out  # no raw dicts
  for stage in ("classifier", "embed", "similarity", "evaluate"):
    assert re.search(rf"^  {stage}\s+\d+\.\d s\s+\S", proc.stdout, re.M), proc.stdout
  assert f"report:  {w / 'report.md'}" in proc.stdout and f"figures: {w / 'figures'}/" in proc.stdout
  own = [line for line in out.splitlines() if str(w) not in line]  # (the workdir's path is as long as it is)
  assert all(len(line) < 140 for line in own), max(own, key=len)

  proc = run_jsim([*same, "--config.stage=evaluate", "--config.evaluation.num_bins=500"], trained.cache, timeout=300)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  assert "evaluation: redone, report.json is replaced (config.evaluation changed)" in out
  assert json.loads((w / "report.json").read_text())["num_bins"] == 500


def test_epoch_line_is_short_and_aligned():
  from jsim import console

  row = {
    "epoch": 3,
    "step": 126,
    "lr": 0.05,
    "train_loss": 2.2612,
    "train_accuracy": 0.2493,
    "val_loss": 1.874,
    "val_accuracy": 0.3229,
    "items_per_s": 308200.0,
    "halved": True,
  }
  line = console.epoch_line("stage 1", row, 16)
  assert line == (
    "stage 1 epoch  3/16  loss 2.261  acc  24.9 % | val loss 1.874  acc  32.3 % | lr 0.05  "
    "308k/s  -> lr halved to 0.025"
  )
  assert len(console.epoch_line("stage 1", dict(row, epoch=12, halved=False), 16)) == len(line.split("  ->")[0])
  # The rule met after the last epoch halves nothing that trains: said as what a continued stage would do.
  last = console.epoch_line("stage 1", dict(row, epoch=16), 16)
  assert "halved" not in last and last.endswith("308k/s  (a continued stage would start at lr 0.025)")
  # A metric-learning stage 1 has no validation loss: its line names the figures it has.
  metric = dict(row, train_accuracy=0.066, val_loss=None, val_accuracy=0.001, val_precision_at_1=0.0156, halved=False)
  assert console.epoch_line("stage 1", metric, 9) == (
    "stage 1 epoch 3/9  loss 2.261  P@1   6.6 % | val MAP@R   0.1 %  P@1   1.6 % | lr 0.05  308k/s"
  )


def test_log_filter_drops_library_chatter_and_repeats():
  from jsim import console

  f = console._QuietFilter()

  def record(name, path, line, level=logging.INFO, msg="m"):
    return logging.LogRecord(name, level, path, line, msg, None, None)

  data = "/x/jsim/data/tiny_imagenet.py"
  assert f.filter(record("absl", data, 450)) and not f.filter(record("absl", data, 450))  # once a run
  assert f.filter(record("absl", data, 455))
  assert not f.filter(
    record("jax._src.xla_bridge", "/x/jax/_src/xla_bridge.py", 848, msg="Unable to initialize backend 'tpu'")
  )
  assert not f.filter(record("absl", "/x/orbax/checkpoint/x.py", 1))
  assert f.filter(record("jax._src.xla_bridge", "/x/jax/_src/xla_bridge.py", 9, logging.WARNING))
  assert f.filter(record("absl", "/x/jsim/train/loop.py", 1))


def test_progress_in_a_log_is_plain_lines_with_rate_and_eta(monkeypatch):
  import jax
  import jax.numpy as jnp

  from jsim import progress

  step = jax.jit(lambda x: x * 2 + 1)  # (new here: its first call compiles, the later ones do not)
  monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
  monkeypatch.setattr(progress, "COMPILE_NOTE_S", 0.0)  # a quiet machine compiles x * 2 + 1 in under 0.05 s
  ones = jnp.ones(3)  # (made before any bar opens: nothing but the steps compiles while one is open)
  stream = io.StringIO()
  bar = progress.Progress(100, "stage 1 epoch 1/2", "img", announce=True, stream=stream, terminal=False)
  assert stream.getvalue() == ""  # nothing compiles yet
  step(ones).block_until_ready()
  bar.update(10)  # the compiled first step: not counted in the rate
  bar.update(10)
  bar.set_postfix("loss 1.2345")
  bar.update(10)
  bar.close()
  text = stream.getvalue()
  assert "\r" not in text
  lines = text.splitlines()
  assert lines[0] == "stage 1 epoch 1/2:   0% 0/100 img, compiling"
  assert re.fullmatch(r"stage 1 epoch 1/2:  30% 30/100 img, \S+ img/s, ETA \d+:\d\d, loss 1\.2345", lines[-2])
  assert re.fullmatch(
    r"stage 1 epoch 1/2:  30% 30/100 img, stopped after \S+ s \(\S+ s of it compiling\), loss 1\.2345", lines[-1]
  )  # (closed short of its total: an interrupt or an error, never 'done')
  assert bar.rate() > 0  # without the first update
  # A later epoch: the step is compiled, so no line says 'compiling' and the rate counts from the start.
  stream = io.StringIO()
  bar = progress.Progress(100, "stage 1 epoch 2/2", "img", announce=True, stream=stream, terminal=False)
  step(ones).block_until_ready()
  bar.update(50)
  bar.update(50)
  bar.close()
  lines = stream.getvalue().splitlines()
  assert "compil" not in stream.getvalue(), lines
  assert re.fullmatch(r"stage 1 epoch 2/2:  50% 50/100 img, \S+ img/s, ETA \d+:\d\d", lines[0])
  assert re.fullmatch(r"stage 1 epoch 2/2: 100% 100/100 img, done in \S+ s", lines[-1])
  # An announced step that ends before the first periodic line still says it is done, not only 'compiling'.
  stream = io.StringIO()
  monkeypatch.setattr(progress, "PLAIN_EVERY_S", 1e9)
  with progress.Progress(100, "test pairs", "pair", announce=True, stream=stream, terminal=False) as bar:
    jax.jit(lambda x: x - 1)(ones).block_until_ready()
    bar.update(60)
    bar.update(40)
  first, last = stream.getvalue().splitlines()
  assert first == "test pairs:   0% 0/100 pair, compiling"
  assert re.fullmatch(r"test pairs: 100% 100/100 pair, done in \S+ s \(\S+ s of it compiling\)", last)
  # A short step without `announce` says nothing in a log.
  stream = io.StringIO()
  with progress.Progress(5, "stage 1 validation", "img", stream=stream, terminal=False) as bar:
    bar.update(5)
  assert stream.getvalue() == ""


def test_progress_stopped_before_its_first_step_says_nothing_more_in_a_log():
  """A Ctrl-C while the model's init compiles stops the epoch loop before its first step: its bar, which
  compiled nothing, prints no line (never 'done in 0.0 s') before the stop message."""
  from jsim import progress

  stream = io.StringIO()
  with pytest.raises(KeyboardInterrupt):
    with progress.Progress(42, "stage 1 epoch 1/2", "img", announce=True, stream=stream, terminal=False):
      raise KeyboardInterrupt
  assert stream.getvalue() == ""


def test_progress_on_a_terminal_says_compiling_only_while_it_compiles():
  import jax
  import jax.numpy as jnp

  from jsim import progress

  step = jax.jit(lambda x: x * 3)
  stream = io.StringIO()
  bar = progress.Progress(100, "stage 2 epoch 1/3", "pair", stream=stream, terminal=True)
  assert "compiling" not in stream.getvalue()
  step(jnp.ones(3)).block_until_ready()
  assert "compiling" in stream.getvalue()
  bar.update(50)
  bar.update(25)
  bar._bar.refresh()
  drawn = stream.getvalue().split("\r")
  assert re.search(r"pair/s, ETA \d+:\d\d", drawn[-1]) and "compiling" not in drawn[-1]
  assert all("compiling" not in x for x in drawn if " 50/100 " in x or " 75/100 " in x)  # (not left over)
  bar.close()
  stream = io.StringIO()  # the next epoch: compiled already
  with progress.Progress(100, "stage 2 epoch 2/3", "pair", stream=stream, terminal=True) as bar:
    step(jnp.ones(3)).block_until_ready()
    bar.update(50)
  assert "compiling" not in stream.getvalue()


# --- TensorBoard ---------------------------------------------------------------------------------------------------


def _events(run_dir):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  ea = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
  ea.Reload()
  return ea


def _hparams(ea) -> dict:
  from tensorboard.plugins.hparams import plugin_data_pb2

  content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
  info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
  return {k: (v.number_value if v.HasField("number_value") else v.string_value) for k, v in info.hparams.items()}


def test_tensorboard_reads_the_stages_and_the_evaluation(tiny_workdir):
  w = tiny_workdir
  for stage in ("stage1", "stage2"):
    ea = _events(w / stage / "tb")
    rows = [json.loads(x) for x in (w / stage / "metrics.jsonl").read_text().splitlines()]
    scalars = ea.Tags()["scalars"]
    for tag in ("val/accuracy", "val/loss", "train/accuracy", "learning_rate", "learning_rate_halved"):
      assert [e.step for e in ea.Scalars(tag)] == [r["step"] for r in rows], (stage, tag)  # steps, not epochs
    assert [e.value for e in ea.Scalars("val/accuracy")] == pytest.approx([r["val_accuracy"] for r in rows])
    assert [e.value for e in ea.Scalars("learning_rate")] == pytest.approx([r["lr"] for r in rows])
    steps = [e.step for e in ea.Scalars("train/loss")]
    assert steps and max(steps) <= rows[-1]["step"]
    assert "epoch/val_accuracy" not in scalars
    hp = _hparams(ea)
    assert hp["classifier.batch_size"] == 6 and hp["model.name"] == "resnet_tiny"
    config = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(config)["similarity"]["num_epochs"] == 3
  ea = _events(w / "stage1" / "tb")
  result = json.loads((w / "stage1" / "result.json").read_text())
  # One event file a run (and the augmentation figure's own, jsim.train.classifier.write_augmentation_figure).
  assert len([p for p in (w / "stage1" / "tb").glob("events.out.tfevents.*") if "augmentations" not in p.name]) == 1
  (test,) = ea.Scalars("test/accuracy")
  assert test.step == result["best_step"] and test.value == pytest.approx(result["test_accuracy"])
  (images,) = ea.Images("augmentations")  # augmented training images
  assert images.width > 0 and images.height > 0

  ea = _events(w / "evaluation" / "tb")
  report = json.loads((w / "report.json").read_text())
  for case in report["cases"]:
    values = ea.Scalars(f"test/accuracy_case{case['case']}")
    assert values[-1].value == pytest.approx(case["accuracy_at_0.5"])
  assert ea.Scalars("test/auc_all")[-1].value == pytest.approx(report["auc"]["overall"], abs=1e-6)
  assert ea.Scalars("test/accuracy_unseen")[-1].value == pytest.approx(report["accuracy_at_0.5"]["unseen"])
  assert set(ea.PluginTagToContent("pr_curves")) == {"test/pr_all", "test/pr_seen", "test/pr_unseen"}
  table = ea.Tensors("test/five_case_table/text_summary")[-1].tensor_proto.string_val[0].decode()
  assert "| 1. similar, seen class |" in table
  assert {"figures/roc", "figures/stage1_curves", "figures/retrieval_unseen"} <= set(ea.Tags()["images"])
  assert _hparams(ea)["evaluation.num_bins"] == report["num_bins"]


# --- figures -------------------------------------------------------------------------------------------------------


def test_retrieval_sheet_queries_and_names(jsim_cache):
  import numpy as np
  from jsim.data import sources
  from jsim.evaluate import evaluation

  labels = np.repeat([3, 5, 7], [4, 2, 6])
  picks = evaluation._one_query_per_class(labels, 3, seed=0)
  assert sorted(labels[picks]) == [3, 5, 7]  # each class once
  picks = evaluation._one_query_per_class(labels, 7, seed=1)
  assert len(set(picks)) == 7 and np.bincount(labels[picks]).max() <= 3
  config = tiny_config()
  config.data.cache_dir = str(jsim_cache)
  root = sources.ensure_synthetic(config.data)
  ids = tuple((root / "wnids.txt").read_text().split()[:2]) + ("nope",)
  names = sources.class_names(config.data, ids)
  words = dict(line.split("\t") for line in (root / "words.txt").read_text().splitlines())
  assert names == [words[ids[0]].split(",")[0], words[ids[1]].split(",")[0], "nope"]
  assert names[0] != ids[0]


# --- the Makefile --------------------------------------------------------------------------------------------------


def test_make_installs_once_and_has_help(tmp_path):
  import os

  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").symlink_to(sys.executable)
  (venv / ".installed").touch()

  def make(*args):
    proc = subprocess.run(
      ["make", "--no-print-directory", *args, f"VENV={venv}"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout

  assert "pip" not in make("-n", "demo")  # installed: the second `make demo` goes straight to the run
  assert f"{venv}/bin/python -m jsim.main --config=configs/demo.py --workdir=runs/demo" in make("-n", "demo")
  assert f"{venv}/bin/python configs/demo.py runs/demo" in make("-n", "demo")  # then the paths to try
  os.utime(venv / ".installed", (0, 0))  # older than pyproject.toml: install again
  assert "pip install" in make("-n", "demo")
  text = make("help")
  assert "make demo" in text and "make test" in text


@pytest.mark.parametrize(
  "argv,expect",
  [
    (["--workdir=runs/x"], "jsim: --config is missing: add --config=configs/FILE.py"),
    (["--config="], "jsim: --config is missing: add --config=configs/FILE.py"),
    ([f"--config={REPO}/configs/demo.py"], "jsim: --workdir is missing: add --workdir=DIR"),
  ],
)
def test_a_missing_flag_is_one_line_saying_what_to_add(argv, expect, capsys):
  from jsim import main

  with pytest.raises(SystemExit) as exit_:
    main.parse_flags(["jsim", *argv])
  err = capsys.readouterr().err
  assert exit_.value.code == 2
  assert err.count("\n") == 1 and err.startswith(expect), err
  assert re.search(r", e\.g\. jsim --config=\S+\.py --workdir=runs/\w+$", err.strip()), err  # an example to copy
  assert "FATAL" not in err and "Command line: flags only" not in err


def test_the_demo_prints_the_paths_of_its_images(tmp_path):
  """`python configs/demo.py` (the end of `make demo`): the test images of the demo's own synthetic set, even
  when other synthetic sets share the cache, and jsim-predict commands on them."""
  from jsim.data import synthetic

  cache = tmp_path / "cache"
  demo = config_module("demo")

  def run(*args):
    return subprocess.run(
      [sys.executable, "configs/demo.py", *args], cwd=REPO, env=jsim_env(cache), capture_output=True, text=True
    )

  assert "does not exist yet: run make demo first" in run().stdout
  (cache / "synthetic-0000000000000000" / "val" / "images").mkdir(parents=True)  # another set (configs/tiny.py's)
  # The demo's own set, written where the demo's run writes it (its images are not needed here).
  images = run("--images").stdout.strip()
  root = synthetic.write_synthetic_tiny_imagenet(tmp_path / "s", num_classes=40, train_per_class=0, test_per_class=20)
  shutil.copytree(root, cache / images.split("/")[-3])
  assert images.startswith(str(cache / "synthetic-")) and images.endswith("/val/images")
  out = run("runs/x").stdout
  assert f"  IMAGES={images}" in out
  for a, b, _ in demo.EXAMPLES:
    assert f"  jsim-predict --workdir=runs/x $IMAGES/{a} $IMAGES/{b}" in out
  assert "jsim-predict --workdir=runs/x --query=$IMAGES/val_0.JPEG --gallery=$IMAGES --top=8" in out
  assert "# cyan checker ring / cyan checker ring: one unseen class" in out  # the names of their classes


def test_summary_and_data_report_say_what_a_user_can_use(tmp_path):
  """No tensorboard hint where no stage wrote event files (stage=prepare); PIL's modes said in words."""
  from jsim import console
  from jsim.data import tiny_imagenet

  (tmp_path / "split.json").write_text("{}")
  lines = console.summary_lines(tmp_path, [("prepare", 1.0, "6 seen / 2 unseen classes")])
  assert not any("tensorboard" in line for line in lines)
  (tmp_path / "stage1" / "tb").mkdir(parents=True)
  assert console.summary_lines(tmp_path, [])[-1] == f"tensorboard --logdir {tmp_path}   (pip install tensorboard)"
  assert tiny_imagenet._mode_text("L", 64) == "64 grayscale images"
  assert tiny_imagenet._mode_text("CMYK", 1) == "1 CMYK image"
