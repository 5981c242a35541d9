"""Evaluation of the VGG16 pipeline: restores both stages' best checkpoints and
writes report.json, report.md and figures/ into the workdir (PROTOCOL.md, "Evaluation").

Command (after configs/vgg_sim.py finished in the same workdir):

  python -m jsim.main --config=configs/vgg_eval.py --workdir=runs/vgg16 \
      --config.data.root=/path/to/tiny-imagenet-200

The protocol's 3,980,000 sampled test pairs in five cases; every distinct pair
(about 50 million) with --config.evaluation.mode=exhaustive.
Published result: test accuracy 82.54 %; cases 1-5: 83.40 / 83.85 / 73.47 / 83.00 / 56.89 %.

The whole protocol for VGG16 in one command (each finished stage is skipped):

  python -m jsim.main --config=configs/vgg_eval.py --config.stage=all --workdir=runs/vgg16 \
      --config.data.root=/path/to/tiny-imagenet-200
"""

from jsim import configs


def get_config():
  c = configs.base_config()
  c.stage = "evaluate"
  c.model.name = "vgg16"
  return c
