"""Cars196 (196 car models, 16,185 images): metric learning on the field's split.

  python -m jsim.main --config=configs/cars196.py:loss=multi_similarity --workdir=runs/cars_ms \
      --config.data.root=/path/to/folder/with/car_ims.tgz+cars_annos.mat   # or the unpacked folder
  python -m jsim.main --config=configs/cars196.py:loss=multi_similarity,format=tfds --workdir=runs/cars196_ms_tfds \
      --config.data.tfds_data_dir=/path/to/tensorflow_datasets   # TFDS's cars196, array_record

The official layout: car_ims.tgz (car_ims/000001.jpg ...) and cars_annos.mat (the
'annotations' struct: relative_im_path, class). Without data.root both are downloaded
from ai.stanford.edu (md5-checked; that site has been unreliable: copy them by hand if
it fails). Classes 1-98 seen, 99-196 unseen; otherwise as configs/cub200.py.

Compare with "A Metric Learning Reality Check" (Musgrave et al., ECCV 2020), Table 4:
BN-Inception, 512-d, MAP@R roughly 0.23-0.28 and P@1 roughly 0.75-0.85 on Cars196 (see the table for each loss).
jsim has not run this config. Expected cost, estimated: about 15 s of an H100 an epoch.
"""

from jsim import configs


def get_config(arg: str | None = None):
  c = configs.metric_benchmark_config(arg, "cars196", 98, "configs/cars196.py")
  e = c.evaluation
  e.test_per_ordered_class_pair, e.test_similar_per_class = 10, 10 * 195
  return c
