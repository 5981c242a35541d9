"""Stage 1 of the protocol for VGG16: the classifier Mc on the 180 seen classes.

  pip install 'jsim[torch]'   # torchvision, for the ImageNet weights (once)
  python -m jsim.main --config=configs/vgg_cls.py --workdir=runs/vgg16 \
      --config.data.root=/path/to/tiny-imagenet-200

Exactly configs/protocol.py:model=vgg16,stage=classifier (every value is set there):
torchvision's IMAGENET1K_V1 weights with a new 180-way head, 224x224 input, batch 64,
lr 0.01 with Nesterov momentum 0.8, the halving rule (alpha 0.02), 30 epochs at most;
the best validation epoch's checkpoint is tested on the seen classes' test images.
Stage 2 and the evaluation follow in the same workdir with
`--config=configs/protocol.py:model=vgg16` (the finished stage 1 is skipped).

Cost: 30 epochs of 63,000 images at 224 px, estimated well under an hour on one GPU
(configs/metric.py gives the estimate; no GPU run is measured yet); on a CPU hours an
epoch, so add --config.classifier.input_size=64 there. Published result: test accuracy 67.96 % on
the seen classes (configs/protocol.py's docstring, jsim/published.py); no jsim run on
the real data is recorded yet (RESULTS.md).
"""

import importlib.util
from pathlib import Path


def get_config():
  path = Path(__file__).with_name("protocol.py")
  spec = importlib.util.spec_from_file_location("jsim_protocol_config", path)
  protocol = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(protocol)
  return protocol.get_config("model=vgg16,stage=classifier")
