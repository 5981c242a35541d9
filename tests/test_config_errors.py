"""Bad configurations are refused before anything is compiled: one clear line, non-zero exit, no traceback.

The command-line cases run jsim's command line (flag parsing included) in this process
(conftest's jsim_main), where a stage or, for a check that needs no data, the data's
preparation that starts fails the test: "before anything is compiled" is checked, not
assumed. One case runs the real `python -m jsim.main` with four devices, where
JAX_LOG_COMPILES=1 makes every XLA compilation visible in its output.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import forbid_stages, run_jsim, tiny_config, xla_flags

TINY = ["--config=configs/tiny.py"]


# What the stages compile: the model's init, its training and evaluation steps, the embedding.
STAGE_FUNCTIONS = (
  "jit(init)",
  "jit(train_step)",
  "jit(gathered_train_step)",
  "jit(eval_step)",
  "jit(gathered_eval_step)",
  "jit(embed_step)",
  "jit(chunk_sums)",
  "jit(<lambda>)",
)


def _one_line_at_the_end(proc, expect: str) -> str:
  """Asserts a refusal: exit 1, no traceback, the expected text on one line, at the end."""
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  assert expect in out, out[-3000:]
  # The message is one line, at the end (absl adds a line on --helpshort after its own).
  tail = [line for line in out.splitlines() if line.strip()][-2:]
  line = next((line for line in tail if expect in line), None)
  assert line is not None, tail
  return line


def _refused(proc, *, expect: str, data_check: bool = False) -> str:
  """Asserts a refusal of a real process: as _one_line_at_the_end, and nothing compiled.

  data_check: the refusal needed the data (and possibly drawing the validation pairs, a
  few small jitted ops); still, nothing of a stage may have been compiled.
  """
  line = _one_line_at_the_end(proc, expect)
  compiled = re.findall(r"Compiling (jit\([^)]*\))", proc.stdout + proc.stderr)
  if data_check:
    assert not set(compiled) & set(STAGE_FUNCTIONS), compiled
  else:
    assert not compiled, compiled
  return line


@pytest.fixture
def refused(jsim_main, monkeypatch, tmp_path):
  """refused(args, expect=..., data_check=False): jsim with configs/tiny.py and `args` in this process,
  asserted refused (_one_line_at_the_end) before a stage started (with data_check, the data may be
  prepared: the refusal needed it; else not even that); returns the line."""

  def call(args: list[str], *, expect: str, data_check: bool = False) -> str:
    forbid_stages(monkeypatch, data=data_check)
    return _one_line_at_the_end(jsim_main([*TINY, f"--workdir={tmp_path / 'w'}", *args]), expect)

  return call


# --- command line: flags that ml_collections refuses ---------------------------------------------------------------


def test_unknown_key_names_the_key_and_suggests_the_right_one(refused, tmp_path):
  last = refused(["--config.classifier.learning_rte=0.1"], expect="--config.classifier.learning_rte")
  assert "has no key 'learning_rte'" in last and "did you mean 'classifier.learning_rate'" in last
  assert not (tmp_path / "w").exists()  # refused before the workdir is touched


def test_unknown_group_lists_the_keys(refused):
  last = refused(["--config.trainer.epochs=3"], expect="the config has no key 'trainer'")
  assert "classifier" in last and "similarity" in last


def test_wrong_type_names_the_flag(refused):
  refused(["--config.classifier.batch_size=abc"], expect="--config.classifier.batch_size=abc")


@pytest.mark.parametrize(
  "args, expect, code",
  [
    (["--workdirr=w"], "unknown flag --workdirr; did you mean --workdir? (see --help)", 2),
    (
      ["--config.classifier.num_epochs=abc"],
      "--config.classifier.num_epochs=abc: expected an integer (the config has 2)",
      1,
    ),
    (["--config.overwrite=maybe"], "--config.overwrite=maybe: expected True or False (the config has False)", 1),
    (["--dry_run=maybe"], "--dry_run=maybe: expected True or False", 1),
    (["--config.similarity.hidden=(1,"], "--config.similarity.hidden=(1,: expected a tuple (the config has", 1),
  ],
)
def test_what_the_flag_parser_refuses_is_one_line(jsim_main, tmp_path, args, expect, code):
  """absl's own refusals (an unknown flag, a value not of its flag's type) are jsim's one line too, not its
  two-line "FATAL Flags parsing error"."""
  proc = jsim_main(["--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}", *args])
  assert proc.returncode == code, proc.stderr
  assert proc.stderr.startswith(f"jsim: {expect}") and proc.stderr.count("\n") == 1, proc.stderr
  assert "FATAL" not in proc.stderr and not (tmp_path / "w").exists()


@pytest.mark.parametrize(
  "config, expect",
  [
    ("configs/demo.py:foo", "--config=configs/demo.py:foo: configs/demo.py takes no ':ARGUMENT'; use "),
    (
      "configs/protocol.py:model=resnet51",
      "configs/protocol.py:model=resnet51: model='resnet51', expected one of ('resnet50', 'vgg16')",
    ),
    (  # refused by what the config calls (configs.use_metric_loss): the value and what is expected, not its source
      "configs/metric.py:loss=foo",
      "--config=configs/metric.py:loss=foo: loss='foo': expected cross_entropy or one of arcface, contrastive, ",
    ),
  ],
)
def test_a_wrong_config_argument_is_the_configs_own_line(jsim_main, tmp_path, config, expect):
  proc = jsim_main([f"--config={config}", f"--workdir={tmp_path / 'w'}"])
  assert proc.returncode == 1 and proc.stderr.startswith(f"jsim: {expect}"), proc.stderr
  assert proc.stderr.count("\n") == 1 and "Error" not in proc.stderr, proc.stderr


# --- command line: well-typed but impossible values -------------------------------------------------------------


def test_batch_not_divisible_by_the_devices(jsim_cache, tmp_path):
  # A real process (four devices), which also shows the one-line refusal end to end: the entry point, its exit.
  proc = run_jsim(
    [*TINY, f"--workdir={tmp_path / 'w'}", "--config.classifier.batch_size=6"],
    jsim_cache,
    timeout=300,
    JAX_LOG_COMPILES="1",
    XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"),
  )
  _refused(proc, expect="jsim: classifier.batch_size=6 is not divisible by the 4 devices")


def test_nonpositive_learning_rate(refused):
  refused(["--config.similarity.learning_rate=0"], expect="jsim: similarity.learning_rate=0.0: must be > 0")


def test_more_seen_classes_than_classes(refused):
  refused(["--config.data.num_seen_classes=9"], expect="jsim: data.num_seen_classes=9 is more than the 8 classes")


def test_tuple_field_with_a_string(refused):
  # ml_collections takes any literal into a tuple field: validate must catch it.
  refused(["--config.similarity.hidden=abc"], expect="jsim: similarity.hidden=('abc',): expected positive integers")


# --- command line: pair counts that the data cannot supply (checked once the data is known) ----------------------


def test_class_with_two_images_cannot_give_training_pairs(refused):
  # 2 train images per class: the one similar pair of a class is a validation pair.
  refused(
    ["--config.data.synthetic.train_per_class=2"],
    expect="the validation pairs take all 1 distinct pairs of class",
    data_check=True,
  )


def test_too_many_validation_pairs(refused):
  # 10 images per class = 45 distinct pairs; 1000 validation draws take every one of them.
  last = refused(
    ["--config.similarity.val_similar_per_class=1000"],
    expect="jsim: similarity.val_similar_per_class=1000: the validation pairs take all 45",
    data_check=True,
  )
  assert "(10 images)" in last


def test_test_class_with_one_image(refused):
  refused(
    ["--config.data.synthetic.test_per_class=1"],
    expect="has 1 test image(s): evaluation.test_similar_per_class=14",
    data_check=True,
  )


# --- in process: the checks themselves -------------------------------------------------------------------------


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("classifier.learning_rate", -1.0, "classifier.learning_rate=-1.0: must be > 0"),
    ("classifier.momentum", 1.0, "classifier.momentum=1.0: must be in [0, 1)"),
    ("classifier.num_epochs", 0, "classifier.num_epochs=0: must be > 0"),
    ("similarity.dropout", 1.0, "similarity.dropout=1.0: must be in [0, 1)"),
    ("similarity.hidden", (64, 0), "similarity.hidden=(64, 0): expected positive integers"),
    ("similarity.hidden", (64.5,), "similarity.hidden=(64.5,): expected positive integers"),
    ("similarity.train_similar_per_class", 0, "similarity.train_similar_per_class=0: must be > 0"),
    ("data.num_seen_classes", 9, "data.num_seen_classes=9 is more than the 8 classes"),
    ("data.val_fraction", 1.0, "data.val_fraction=1.0: must be in (0, 1)"),
    ("evaluation.mode", "all", "evaluation.mode='all': expected one of 'sampled', 'exhaustive'"),
    ("model.name", "resnet18", "model.name='resnet18': expected one of"),
  ],
)
def test_check_config_names_key_and_value(key, value, message):
  from jsim import validate

  config = tiny_config()
  group, name = key.split(".")
  with config.unlocked(), config[group].ignore_type():
    config[group][name] = value
  with pytest.raises(ValueError) as e:
    validate.check_config(config)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_untyped_field_with_a_string():
  from jsim import validate

  config = tiny_config()
  with config.unlocked(), config.data.ignore_type():
    config.data.num_workers = "four"
  with pytest.raises(ValueError, match=r"data.num_workers='four': expected a number"):
    validate.check_config(config)


def test_the_tiny_config_is_valid():
  from jsim import validate

  config = tiny_config()
  validate.check_config(config)
  labels = np.repeat(np.array([0, 1, 2, 4, 5, 7]), 10)  # T180 of the tiny data: 6 classes x 10 images
  validate.check_pair_supply(config, labels)
  validate.check_test_pairs(config, np.repeat(np.arange(8), 4))


def test_pair_supply_limits():
  """Distinct pairs: a class of n images has n(n-1)/2, two classes n_a * n_b (drawn with replacement)."""
  from jsim import validate

  config = tiny_config()  # 5 validation pairs per class, 1 per ordered class pair; 3 epochs
  with pytest.raises(ValueError, match=r"class 3 has 1 stage-2 \(T180\) image"):
    validate.check_pair_supply(config, np.array([0, 0, 3, 5, 5]))
  # 20 draws take at most 20 of a class's 45 distinct pairs: 16 redraws almost surely avoid them.
  config.similarity.val_similar_per_class = 20
  validate.check_pair_supply(config, np.repeat(np.arange(6), 10))
  # 40 draws take ~60%: 0.6^17 per training draw, 180 draws over 3 epochs -> refused as unreliable.
  config.similarity.val_similar_per_class = 40
  with pytest.raises(ValueError, match=r"training pairs, redrawn 16 times when they hit one, would still hit"):
    validate.check_pair_supply(config, np.repeat(np.arange(6), 10))
  # Dissimilar pairs: 2 x 200 draws cover all 10 x 10 pairs of two classes.
  config.similarity.val_similar_per_class = 5
  config.similarity.val_per_ordered_class_pair = 200
  with pytest.raises(ValueError, match=r"val_per_ordered_class_pair=200: the validation pairs take all 100 distinct"):
    validate.check_pair_supply(config, np.repeat(np.arange(6), 10))
  # The same counts are fine with 50 images per class (2,500 pairs between two classes).
  validate.check_pair_supply(config, np.repeat(np.arange(6), 50))


def test_test_pair_limits():
  from jsim import validate

  config = tiny_config()
  with pytest.raises(ValueError, match=r"class 'c' has 0 test image\(s\)"):
    validate.check_test_pairs(config, np.array([0, 0, 1, 1]), ("a", "b", "c"))
  config.evaluation.mode = "exhaustive"  # no sampling: one image of a class is fine
  validate.check_test_pairs(config, np.array([0, 0, 1, 2]), ("a", "b", "c"))
  with pytest.raises(ValueError, match=r"needs 2 to 65536 test images"):
    validate.check_test_pairs(config, np.array([0]), ("a",))
