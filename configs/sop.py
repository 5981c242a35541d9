"""Stanford Online Products (22,634 products, 120,053 images): stage 1 and retrieval only.

  python -m jsim.main --config=configs/sop.py:loss=multi_similarity --workdir=runs/sop_ms \
      --config.data.root=/path/to/folder/with/Stanford_Online_Products.zip   # or the unpacked folder
  python -m jsim.main --config=configs/sop.py:loss=multi_similarity,format=tfds --workdir=runs/sop_ms_tfds \
      --config.data.tfds_data_dir=/path/to/tensorflow_datasets   # TFDS's stanford_online_products, array_record

Seen: the 11,318 classes of Ebay_train.txt; unseen: the 11,316 of Ebay_test.txt. With
2-12 images a class, stage 1 uses batches of 32 classes x 2 (sampler_m=2). The protocol's
pair sets grow with the square of the class count (11,318 classes: 1.3e9 dissimilar
pairs), so this config stops after stage 1 (stage=classifier): stage1/result.json has
P@1, R-precision and MAP@R of the held-out seen images.

Compare with "A Metric Learning Reality Check" (Musgrave et al., ECCV 2020), Table 4:
BN-Inception, 512-d, MAP@R roughly 0.41-0.48 and P@1 roughly 0.69-0.79 on SOP (see the table for each loss).
jsim has not run this config. Expected cost, estimated: about 1.5 min of an H100 an epoch.
"""

from jsim import configs


def get_config(arg: str | None = None):
  c = configs.metric_benchmark_config(arg, "sop", 11318, "configs/sop.py")
  c.stage = "classifier"
  c.classifier.sampler_m = 2
  return c
