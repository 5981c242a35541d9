"""configs/protocol.py:model=...,stage=...: the published protocol for either backbone."""

from __future__ import annotations


import pytest

from jsim import configs, validate

from conftest import config_module as _load


@pytest.mark.parametrize(
  "arg,stage,model",
  [
    (None, "all", "resnet50"),
    ("", "all", "resnet50"),
    ("model=vgg16", "all", "vgg16"),
    ("model=vgg16,stage=classifier", "classifier", "vgg16"),
    ("stage=evaluate,model=resnet50", "evaluate", "resnet50"),
  ],
)
def test_protocol_config_is_the_schema_with_stage_and_backbone(arg, stage, model):
  c = _load("protocol").get_config(arg)
  assert (c.stage, c.model.name) == (stage, model)
  # The protocol's values, as PROTOCOL.md gives them.
  assert (c.classifier.batch_size, c.classifier.learning_rate, c.classifier.momentum, c.classifier.alpha) == (
    64,
    0.01,
    0.8,
    0.02,
  )
  assert (c.similarity.batch_size, c.similarity.learning_rate, c.similarity.alpha, c.similarity.dropout) == (
    256,
    0.005,
    0.01,
    0.25,
  )
  assert (
    c.similarity.train_per_ordered_class_pair,
    c.similarity.train_similar_per_class,
    c.similarity.val_per_ordered_class_pair,
    c.similarity.val_similar_per_class,
  ) == (10, 1790, 6, 1074)
  assert (c.evaluation.test_per_ordered_class_pair, c.evaluation.test_similar_per_class) == (50, 9950)
  # Everything else is the schema's default (what the six per-stage files gave).
  base = configs.base_config()
  base.stage, base.model.name = stage, model
  assert c.to_dict() == base.to_dict()
  validate.check_config(c)


@pytest.mark.parametrize("arg", ["model=vgg", "backbone=vgg16", "vgg16"])
def test_protocol_config_refuses_a_bad_argument(arg):
  with pytest.raises(ValueError, match=r"configs/protocol.py:"):
    _load("protocol").get_config(arg)


def test_docstring_gives_both_backbones_published_results():
  doc = _load("protocol").__doc__
  for number in ("69.51", "67.96", "96.3", "91.2", "86.51", "82.54"):
    assert number in doc


@pytest.mark.parametrize(
  "name,source,seen", [("cub200", "cub200", 100), ("cars196", "cars196", 98), ("sop", "sop", 11318)]
)
def test_benchmark_configs_read_the_archive_or_tfds(name, source, seen):
  module = _load(name)
  for fmt in ("archive", "tfds"):
    c = module.get_config(f"loss=contrastive,format={fmt}")
    assert (c.data.source, c.data.benchmark_format, c.data.num_seen_classes) == (source, fmt, seen)
    assert c.classifier.loss == "contrastive" and c.data.seen_classes == "first"
    validate.check_config(c)
  with pytest.raises(ValueError, match=rf"configs/{name}.py:format=zip: format='zip', expected one of archive, tfds"):
    module.get_config("format=zip")
  c = module.get_config("format=tfds")
  c.data.root = "/data/cub"
  with pytest.raises(ValueError, match="data.root='/data/cub' is set, but data.benchmark_format='tfds' reads"):
    validate.check_config(c)
  c = module.get_config()
  c.data.benchmark_format = "tfrecord"
  with pytest.raises(ValueError, match="data.benchmark_format"):
    validate.check_config(c)


@pytest.mark.parametrize("name,model,published", [("resnet_cls", "resnet50", "69.51"), ("vgg_cls", "vgg16", "67.96")])
def test_the_design_cards_stage1_configs_are_the_protocols_stage1(name, model, published, jsim_main):
  """configs/resnet_cls.py and vgg_cls.py: configs/protocol.py:model=...,stage=classifier, through the CLI."""
  c = _load(name).get_config()
  assert c.to_dict() == _load("protocol").get_config(f"model={model},stage=classifier").to_dict()
  doc = _load(name).__doc__
  assert f"--config=configs/{name}.py --workdir=runs/{model}" in doc and published in doc
  proc = jsim_main([f"--config=configs/{name}.py", "--print_config"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  by_key = {x.split(" = ")[0].strip(): x.split(" = ")[1] for x in proc.stdout.splitlines() if " = " in x}
  assert by_key["stage"].startswith("'classifier'") and by_key["model.name"].startswith(f"'{model}'")
  assert by_key["model.init"] == "'torchvision'" and by_key["classifier.input_size"] == "224"
