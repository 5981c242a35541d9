"""Research sandbox: Ms on the concatenated ResNet50 and VGG16 embeddings (PROTOCOL.md, "future work").

VGG16 was better on similar unseen pairs (case 4), ResNet50 elsewhere; an
ensemble feeds |x1 - x2| of [ResNet50 embedding, VGG16 embedding] (6144-d) to Ms.

Both backbones must have finished stage 1 with the same data and seed
(configs/protocol.py:model=resnet50,stage=classifier in runs/resnet50, :model=vgg16,stage=classifier
in runs/vgg16). The
ensemble's stage 2 and report live in their own workdir, a copy of the ResNet50
one without its stage 2:

  cp -r runs/resnet50 runs/ensemble
  rm -rf runs/ensemble/stage2 runs/ensemble/sweep runs/ensemble/report.* runs/ensemble/figures
  python -m jsim.main --config=configs/ensemble_sim.py --workdir=runs/ensemble \
      --config.data.root=/path/to/tiny-imagenet-200

Stage 1 and the ResNet50 embeddings are found finished in the copy and skipped;
stage 2 trains on the concatenation, then the five-case evaluation runs.
`jsim-predict --workdir=runs/ensemble ...` restores both classifiers.
"""

from jsim import configs


def get_config():
  c = configs.base_config()  # the protocol's values (configs/protocol.py sets them visibly)
  c.stage = "all"
  c.model.name = "resnet50"
  c.similarity.ensemble_workdirs = ("runs/vgg16",)
  return c
