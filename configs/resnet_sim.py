"""Stage 2 on ResNet50 embeddings, the protocol's setting (PROTOCOL.md, "Stage 2").

Command (after configs/resnet_cls.py finished in the same workdir; embeddings of
the best stage-1 checkpoint are computed first if missing or stale):

  python -m jsim.main --config=configs/resnet_sim.py --workdir=runs/resnet50 \
      --config.data.root=/path/to/tiny-imagenet-200

Ms: |x1 - x2| -> 2048 -> 1024 -> 512 -> 2, dropout 0.25, He init; batch 256,
lr 0.005, Nesterov momentum 0.8, alpha 0.01; 644,400 fresh training pairs per epoch,
386,640 fixed validation pairs. Other pair features: --config.similarity.feature=l1+prod.
Published result: best validation accuracy 96.3 %.
"""

from jsim import configs


def get_config():
  c = configs.base_config()
  c.stage = "similarity"
  c.model.name = "resnet50"
  return c
