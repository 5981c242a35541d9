"""Two-stage protocol against end-to-end metric learning, on Tiny ImageNet's splits and five cases.

  python -m jsim.main --config=configs/metric.py:loss=multi_similarity --workdir=runs/ms_resnet50 \
      --config.data.root=/path/to/tiny-imagenet-200
  python -m jsim.main --config=configs/metric.py:loss=proxy_anchor,size=cpu --workdir=runs/pa_cpu \
      --config.data.root=/path/to/tiny-imagenet-200

loss: cross_entropy (the protocol's stage 1) | contrastive | triplet | multi_similarity |
proxy_anchor | normalized_softmax | arcface | pair_ms (jsim.losses). Every run has the
same splits (seed 0), the same stage 2 (Ms on |e1 - e2| of the embeddings; add
--config.similarity.model=distance to score pairs by the calibrated cosine distance
instead) and the same five-case evaluation, so their report.json files form one table
(report.json: five cases, seen/unseen, AUC; retrieval P@1 / R-precision / MAP@R / NMI).
Judge unseen classes by the balanced mean of cases 4 and 5 and the unseen AUC, not by
the pair-weighted "unseen (4-5)" accuracy, which case 4 dominates (199,000 vs 19,000).

size=gpu (default): ResNet50 from torchvision's weights at 224 px, batch 64 as m=4 images
  of 16 classes, a 512-d L2-normalised embedding head, the protocol's SGD (lr 0.01,
  Nesterov 0.8, halving rule) with proxies / class weights at 10x (untuned); 30 epochs at most.
  Expected cost, estimated (no GPU measured yet): about 1-1.5 min per epoch of 63,000
  images on one H100/H200 in bf16 plus the validation MAP@R (18,900 images), i.e. well
  under an hour for stage 1, as for the protocol's cross-entropy (configs/protocol.py).
size=cpu: the CPU-sized comparison: resnet_tiny from scratch at 64 px, batch 64, 9 epochs
  (the two-stage reference point on the real data: 64.06 % overall, 69.58 % unseen at 0.5,
  unseen recall@1 21.6 %), stage 2 cut to 5 epochs. Expected cost on 2 CPU cores,
  from benchmarks/metric_step.py (loaded machine): cross-entropy about 600 images/s,
  metric losses 250-400 images/s, i.e. 2-4 min per epoch, 20-40 min for stage 1, plus
  about 10 min for stages 2-3: one method does not fit a total budget of an hour for five
  (lower classifier.num_epochs to share one).
"""

from jsim import configs

SIZES = ("gpu", "cpu")


def get_config(arg: str | None = None):
  args = configs.parse_args(arg, {"loss": "multi_similarity", "size": "gpu"}, "configs/metric.py")
  if args["size"] not in SIZES:
    raise ValueError(f"configs/metric.py:{arg}: size={args['size']!r}, expected one of {SIZES}")
  c = configs.base_config()
  c.stage = "all"
  c.model.name = "resnet50"
  if args["size"] == "cpu":
    c.model.name = "resnet_tiny"
    c.model.init = "random"
    c.model.dtype = "float32"
    c.classifier.input_size = 64
    c.classifier.num_epochs = 9
    c.classifier.learning_rate = 0.05
    c.similarity.num_epochs = 5
  configs.use_metric_loss(c, args["loss"], embedding_dim=512 if args["size"] == "gpu" else 128)
  return c
