"""The embedded default: every stage on synthetic data that needs no download.

Command (the README's first command runs it through `make demo`):

  python -m jsim.main --config=configs/demo.py --workdir=runs/demo

Data: 40 procedurally drawn classes (a shape x a colour/texture per class, with
random position, scale, rotation, background and noise; real JPEGs in the Tiny
ImageNet layout, written once into the cache); 32 seen, 8 unseen classes.
Model: a tiny bottleneck ResNet (same code as ResNet50) trained from scratch at
64x64, then the similarity net on |x1 - x2| of its embeddings, then the
five-case evaluation. About a minute on 2 CPU cores (51 s measured on a quiet
machine, 3 min 34 s on a busy shared one; see the README); a second run skips every
finished stage and takes seconds.

Expected result (seed 0, measured 2026-12-01): stage-1 test accuracy 53.4 % on the
640 test images of the 32 seen classes; the five-case table, printed at the end and
in runs/demo/report.md, 87.4 % overall, 87.8 % on seen (cases 1-2) and 92.4 % on
unseen pairs (cases 4-5), AUC 0.935.
"""

from jsim import configs


def get_config():
  c = configs.base_config()
  c.stage = "all"
  c.data.source = "synthetic"
  c.data.synthetic.update(num_classes=40, train_per_class=60, test_per_class=20, seed=0)
  c.data.num_seen_classes = 32
  c.model.name = "resnet_tiny"
  c.model.init = "random"
  c.model.dtype = "float32"

  cl = c.classifier
  cl.input_size = 64
  cl.batch_size = 32
  cl.learning_rate = 0.05
  cl.num_epochs = 16
  cl.log_every_steps = 10

  s = c.similarity
  s.num_epochs = 15
  s.train_per_ordered_class_pair = 10
  s.train_similar_per_class = 310  # balanced: 32 * 31 * 10 = 32 * 310
  s.val_per_ordered_class_pair = 6
  s.val_similar_per_class = 186
  s.log_every_steps = 20

  e = c.evaluation
  e.test_per_ordered_class_pair = 50
  e.test_similar_per_class = 1950  # balanced: 40 * 39 * 50 = 40 * 1950
  e.chunk_size = 8192
  return c
