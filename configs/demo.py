"""The embedded default: every stage on synthetic data that needs no download.

Command (the README's first command runs it through `make demo`):

  python -m jsim.main --config=configs/demo.py --workdir=runs/demo

Data: 40 procedurally drawn classes (a shape x a colour/texture per class, 4 classes
to each of 10 colours, with random position, scale, rotation, background and noise;
real JPEGs in the Tiny ImageNet layout, written once into the cache); 32 seen, 8
unseen classes. Model: a tiny bottleneck ResNet (same code as ResNet50) trained from
scratch at 64x64, then the similarity net on |x1 - x2| of its embeddings, then the
five-case evaluation. 2 min 27 s of CPU time, a few minutes on 2 CPU cores (on a fresh clone
on 2026-12-03, under nice -n 19 beside other jobs at load 7-9: 5 min 52 s; see the README); a
second run skips every finished stage and takes 5 s of CPU time.

Expected result (seed 0, measured 2026-12-04, float32 on a CPU, with the convolution layer
jsim.models.layers and its per-direction gradients, the per-tap kernel gradient included; the digits
move with the float rounding of the libraries and of that layer: 53.4 % / 87.4 % on 2026-12-01,
56.7 % / 87.8 % earlier on 2026-12-03 with XLA's own convolutions, 58.6 % / 86.5 % later that day,
before the synthetic data's generator version 2 and a reinstalled environment, 63.9 % / 88.4 % before
the per-direction gradients, 58.9 % / 87.8 % before the per-tap kernel gradient): stage-1 test
accuracy 58.4 % on the 640 test images of the 32 seen classes; the five-case table, printed at the
end and in runs/demo/report.md, 86.2 % overall, 87.0 % on seen (cases 1-2) and 87.8 % on unseen pairs
(cases 4-5), AUC 0.925 (the same digits on a fresh clone on a 2-core AMD EPYC Zen 3, 2026-12-05). The same
code on another CPU (a 2-core AMD EPYC Zen 4 with AVX-512, 2026-12-05,
the same digits in two runs): 58.4 %; 87.6 % overall, 88.3 % seen, 90.4 % unseen, AUC 0.935.

`python configs/demo.py [WORKDIR]` (what `make demo` runs at the end) prints the folder
of the demo's test images and jsim-predict commands to try on them (README, step 2);
`python configs/demo.py --images` prints the folder only.
"""

import sys
from pathlib import Path

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


# Pairs of the demo's test images and what the demo model says of them (README, step 2): right, right, wrong.
EXAMPLES = (
  ("val_16.JPEG", "val_21.JPEG", "one unseen class"),
  ("val_16.JPEG", "val_17.JPEG", "two unseen classes"),
  ("val_1.JPEG", "val_3.JPEG", "a seen and an unseen class of one colour: the model says 'same', wrongly"),
)
QUERIES = (
  ("val_577.JPEG", "it finds its class"),
  ("val_0.JPEG", "it finds its colour and texture more than its class"),
)


def images_folder() -> Path:
  """The demo's test images (val/images of its synthetic set in the data cache), whichever sets exist there."""
  from jsim.data import sources

  return sources.synthetic_root(get_config().data) / "val" / "images"


def examples_text(workdir: str = "runs/demo") -> str:
  """What `make demo` prints at the end: where the test images are and commands to ask the model about them."""
  from jsim.data import sources

  images = images_folder()
  if not images.is_dir():
    return f"{images} does not exist yet: run make demo first\n"
  annotations = images.parent / "val_annotations.txt"
  label = {line.split("\t")[0]: line.split("\t")[1] for line in annotations.open()}
  name = dict(zip(label.values(), sources.class_names(get_config().data, tuple(label.values()))))
  lines = [
    f"The demo's test images are in {images}/ (their classes: {annotations.name} beside images/, the",
    "class names: words.txt beside val/). Ask the demo model about them (README, step 2; in the activated .venv):",
    f"  IMAGES={images}",
  ]
  for a, b, what in EXAMPLES:
    lines += [
      f"  # {name[label[a]]} / {name[label[b]]}: {what}",
      f"  jsim-predict --workdir={workdir} $IMAGES/{a} $IMAGES/{b}",
    ]
  for q, what in QUERIES:
    lines += [
      f"  # a {name[label[q]]} among all {len(label)} test images: {what}",
      f"  jsim-predict --workdir={workdir} --query=$IMAGES/{q} --gallery=$IMAGES --top=8",
    ]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python configs/demo.py [--images] [WORKDIR]
  args = sys.argv[1:]
  if args[:1] == ["--images"]:
    print(images_folder())
  else:
    print(examples_text(*args[:1]), end="")
