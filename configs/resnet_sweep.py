"""Research sandbox: several pair features for Ms on the same ResNet50 embeddings.

Command (after stage 1 finished in the workdir):

  python -m jsim.main --config=configs/resnet_sweep.py --workdir=runs/resnet50 \
      --config.data.root=/path/to/tiny-imagenet-200 \
      [--config.sweep.features="('l1', 'sq', 'l1+prod')"]

Each feature trains its own Ms in W/sweep/<feature>/ (resumable, like stage 2) and
is evaluated on the same test pairs; the comparison table goes to
W/sweep/comparison.md and .json. The protocol's own choice is 'l1'
(published: 86.51 % test accuracy).
"""

from jsim import configs


def get_config():
  c = configs.base_config()  # the protocol's values (configs/protocol.py sets them visibly)
  c.stage = "sweep"
  c.model.name = "resnet50"
  c.sweep.features = ("l1", "sq", "prod", "cos", "l1+prod", "l1+sq")
  return c
