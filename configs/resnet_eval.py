"""Evaluation of the ResNet50 pipeline: restores both stages' best checkpoints and
writes report.json, report.md and figures/ into the workdir (PROTOCOL.md, "Evaluation").

Command (after configs/resnet_sim.py finished in the same workdir):

  python -m jsim.main --config=configs/resnet_eval.py --workdir=runs/resnet50 \
      --config.data.root=/path/to/tiny-imagenet-200

The protocol's 3,980,000 sampled test pairs in five cases; every distinct pair
(about 50 million) with --config.evaluation.mode=exhaustive.
Published result: test accuracy 86.51 %; cases 1-5: 83.36 / 92.22 / 84.27 / 74.25 / 69.56 %.

The whole protocol for ResNet50 in one command (each finished stage is skipped):

  python -m jsim.main --config=configs/resnet_eval.py --config.stage=all --workdir=runs/resnet50 \
      --config.data.root=/path/to/tiny-imagenet-200
"""

from jsim import configs


def get_config():
  c = configs.base_config()
  c.stage = "evaluate"
  c.model.name = "resnet50"
  return c
