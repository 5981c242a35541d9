"""CUB-200-2011 (200 bird species, 11,788 images): metric learning on the field's split.

  python -m jsim.main --config=configs/cub200.py:loss=multi_similarity --workdir=runs/cub_ms \
      --config.data.root=/path/to/folder/with/CUB_200_2011.tgz     # or the unpacked folder

Or from TFDS's caltech_birds2011 prepared as array_record (both its splits, re-split
by class): configs/cub200.py:loss=multi_similarity,format=tfds --config.data.tfds_data_dir=DIR.
Without data.root the official archive is downloaded (data.caltech.edu, md5-checked)
into ~/.cache/jsim/downloads and unpacked once. Split as the field does: classes 1-100
seen (training), 101-200 unseen; a fifth of each seen class is held out as seen test
images so that the five cases have seen pairs (data.seen_test_fraction; the published
figures train on all images of the seen classes and retrieve among the unseen ones).
ResNet50 from torchvision's weights, images decoded at 256 px, random 224 px crops,
512-d embedding head, batch 64 of 16 classes x 4, 30 epochs at most; stage 2 and the
five cases then run on those embeddings (loss=cross_entropy: the two-stage protocol).

Compare stage1/result.json's test figures and report.json's unseen retrieval (P@1,
MAP@R) with "A Metric Learning Reality Check" (Musgrave et al., ECCV 2020), Table 4:
BN-Inception, 512-d, MAP@R roughly 0.23-0.27 and P@1 roughly 0.64-0.68 on CUB-200 for the
losses here. jsim has not run this config (no data or GPU in the building sessions).
Expected cost, estimated: 5,000 training images an epoch, about 10 s of an H100 an epoch.
"""

from jsim import configs


def get_config(arg: str | None = None):
  c = configs.metric_benchmark_config(arg, "cub200", 100, "configs/cub200.py")
  e = c.evaluation
  e.test_per_ordered_class_pair, e.test_similar_per_class = 10, 10 * 199
  return c
