"""The smallest complete run: every stage in well under a minute of compute on CPU.

Used by the tests (and handy for trying a change end to end):

  python -m jsim.main --config=configs/tiny.py --workdir=/tmp/jsim_tiny

8 synthetic classes (6 seen, 2 unseen) at 32x32, a tiny ResNet, 2 + 3 epochs.
Expected result: it finishes and prints the five-case table; the numbers mean
little at this size.
"""

from jsim import configs


def get_config():
  c = configs.base_config()
  c.stage = "all"
  c.data.source = "synthetic"
  c.data.image_size = 32
  c.data.synthetic.update(
    num_classes=8, train_per_class=10, test_per_class=4, image_size=32, seed=0, grayscale_fraction=0.1
  )
  c.data.num_seen_classes = 6
  c.data.num_workers = 1
  c.model.name = "resnet_tiny"
  c.model.init = "random"
  c.model.dtype = "float32"

  cl = c.classifier
  cl.input_size = 32
  cl.batch_size = 6  # 7 equal batches of the 42 train images (no 2-image BatchNorm batch)
  cl.eval_batch_size = 16
  cl.learning_rate = 0.01
  cl.num_epochs = 2
  cl.log_every_steps = 2
  cl.augment.crop_size = 28

  c.embed.batch_size = 16
  s = c.similarity
  s.batch_size = 16
  s.num_epochs = 3
  s.train_per_ordered_class_pair = 2
  s.train_similar_per_class = 10
  s.val_per_ordered_class_pair = 1
  s.val_similar_per_class = 5
  s.log_every_steps = 2

  e = c.evaluation
  e.test_per_ordered_class_pair = 2
  e.test_similar_per_class = 14
  e.chunk_size = 64
  e.retrieval_examples = 2
  e.augmentation_examples = 0  # (its compile would add seconds to every run in the tests; tiny_workdir turns it on)
  c.sweep.features = ("l1", "prod")
  return c
