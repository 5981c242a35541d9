"""Stage 1 with VGG16, the protocol's setting (PROTOCOL.md, "Stage 1").

Command:

  python -m jsim.main --config=configs/vgg_cls.py --workdir=runs/vgg16 \
      --config.data.root=/path/to/tiny-imagenet-200

Batch 64, lr 0.01, Nesterov momentum 0.8, alpha 0.02, 224x224 input, torchvision's
ImageNet weights with a new 180-way head.
Published result: stage-1 test accuracy 67.96 % on the 9,000 seen-class val images.
"""

from jsim import configs


def get_config():
  c = configs.base_config()
  c.stage = "classifier"
  c.model.name = "vgg16"
  return c
