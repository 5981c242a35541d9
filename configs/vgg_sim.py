"""Stage 2 on VGG16 embeddings, the protocol's setting (PROTOCOL.md, "Stage 2").

Command (after configs/vgg_cls.py finished in the same workdir; embeddings of
the best stage-1 checkpoint are computed first if missing or stale):

  python -m jsim.main --config=configs/vgg_sim.py --workdir=runs/vgg16 \
      --config.data.root=/path/to/tiny-imagenet-200

Ms: |x1 - x2| -> 4096 -> 2048 -> 1024 -> 2, dropout 0.25, He init; batch 256,
lr 0.005, Nesterov momentum 0.8, alpha 0.01; 644,400 fresh training pairs per epoch,
386,640 fixed validation pairs. Other pair features: --config.similarity.feature=l1+prod.
Published result: best validation accuracy 91.2 %.
"""

from jsim import configs


def get_config():
  c = configs.base_config()
  c.stage = "similarity"
  c.model.name = "vgg16"
  return c
