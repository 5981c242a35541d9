"""The published protocol (PROTOCOL.md) for one backbone: every stage, or one of them.

  python -m jsim.main --config=configs/protocol.py:model=resnet50 --workdir=runs/resnet50 \
      --config.data.root=/path/to/tiny-imagenet-200

runs all stages (each finished one is skipped, an interrupted one resumed). One stage:
`:model=vgg16,stage=classifier` (stage: classifier | embed | similarity | evaluate | all),
in the same workdir. Without data.root/zip_path the official zip is downloaded into
~/.cache/jsim.

Protocol values, set below so that they can be read here:
  stage 1 (Mc)  backbone from torchvision's ImageNet weights with a new 180-way head;
                224x224 input; batch 64, lr 0.01, Nesterov momentum 0.8, halving rule
                with alpha 0.02; 30 epochs at most.
  stage 2 (Ms)  |x1 - x2| -> D -> D/2 -> D/4 -> 2, dropout 0.25; batch 256, lr 0.005,
                momentum 0.8, alpha 0.01; 10 pairs per ordered pair of seen classes +
                1,790 similar pairs per class, new each epoch (644,400); 6 + 1,074 fixed
                validation pairs (386,640).
  evaluation    50 pairs per ordered pair of classes + 9,950 similar per class: 3,980,000
                sampled test pairs in five seen/unseen cases (evaluation.mode=exhaustive:
                all ~50 million distinct pairs).

Published results                      ResNet50 (model=resnet50)   VGG16 (model=vgg16)
  stage 1 test accuracy (seen classes)   69.51 %                     67.96 %
  stage 2 best validation accuracy       96.3 %                      91.2 %
  five-case test accuracy                86.51 %                     82.54 %
  cases 1-5                              83.36 / 92.22 / 84.27 /     83.40 / 83.85 / 73.47 /
                                         74.25 / 69.56 %             83.00 / 56.89 %
  seen pairs (cases 1-2, section 6)      87.55 %                     83.61 %
  (all of them from jsim/published.py, which the report uses)

A run small enough for 2 CPU cores (synthetic data, random init, ~1-2 minutes):

  python -m jsim.main --config=configs/protocol.py:stage=classifier --workdir=/tmp/jsim_small \
      --config.data.source=synthetic --config.data.num_seen_classes=32 \
      --config.model.name=resnet_tiny --config.model.init=random \
      --config.classifier.input_size=64 --config.classifier.num_epochs=2
"""

from jsim import configs

BACKBONES = ("resnet50", "vgg16")


def _parse(arg: str | None) -> dict[str, str]:
  """'model=vgg16,stage=classifier' -> {'model': 'vgg16', 'stage': 'classifier'}."""
  out = {"model": "resnet50", "stage": "all"}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in out:
      raise ValueError(
        f"configs/protocol.py:{arg}: expected 'model=<{'|'.join(BACKBONES)}>,stage=<stage>', got {item!r}"
      )
    out[key] = value
  if out["model"] not in BACKBONES:
    raise ValueError(f"configs/protocol.py:{arg}: model={out['model']!r}, expected one of {BACKBONES}")
  return out


def get_config(arg: str | None = None):
  args = _parse(arg)
  c = configs.base_config()
  c.stage = args["stage"]
  c.model.name = args["model"]
  c.model.init = "torchvision"
  c.model.weights = "IMAGENET1K_V1"

  cl = c.classifier
  cl.input_size = 224
  cl.batch_size, cl.learning_rate, cl.momentum, cl.nesterov, cl.alpha = 64, 0.01, 0.8, True, 0.02
  cl.num_epochs = 30

  s = c.similarity
  s.feature, s.hidden, s.dropout = "l1", (), 0.25
  s.batch_size, s.learning_rate, s.momentum, s.nesterov, s.alpha = 256, 0.005, 0.8, True, 0.01
  s.train_per_ordered_class_pair, s.train_similar_per_class = 10, 1790
  s.val_per_ordered_class_pair, s.val_similar_per_class = 6, 1074

  e = c.evaluation
  e.mode = "sampled"
  e.test_per_ordered_class_pair, e.test_similar_per_class = 50, 9950
  return c
