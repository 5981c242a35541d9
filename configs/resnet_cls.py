"""Stage 1 with ResNet50, the protocol's setting (PROTOCOL.md, "Stage 1").

Command (downloads Tiny ImageNet into ~/.cache/jsim unless data.root/zip_path is given):

  python -m jsim.main --config=configs/resnet_cls.py --workdir=runs/resnet50 \
      --config.data.root=/path/to/tiny-imagenet-200

Batch 64, lr 0.01, Nesterov momentum 0.8, halving rule with alpha 0.02, 224x224
input, torchvision's ImageNet weights with a new 180-way head.
Published result: stage-1 test accuracy 69.51 % on the 9,000 seen-class val images.

A run small enough for 2 CPU cores (synthetic data, random init, ~1-2 minutes):

  python -m jsim.main --config=configs/resnet_cls.py --workdir=/tmp/jsim_small \
      --config.data.source=synthetic --config.data.num_seen_classes=32 \
      --config.model.name=resnet_tiny --config.model.init=random \
      --config.classifier.input_size=64 --config.classifier.num_epochs=2
"""

from jsim import configs


def get_config():
  c = configs.base_config()
  c.stage = "classifier"
  c.model.name = "resnet50"
  return c
