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
(five cases, seen/unseen, AUC; retrieval P@1 / R-precision / MAP@R / NMI):
`python -m jsim.evaluate.compare runs/ce runs/pa ... --out=roc.png --table=comparison.md`.
Judge unseen classes by the balanced mean of cases 4 and 5 and the unseen AUC, not by
the pair-weighted "unseen (4-5)" accuracy, which case 4 dominates (199,000 vs 19,000).

size=gpu (default): ResNet50 from torchvision's weights at 224 px, batch 64 as m=4 images
  of 16 classes, a 512-d L2-normalised embedding head, the protocol's SGD (lr 0.01,
  Nesterov 0.8, halving rule) with proxies / class weights at 10x (untuned: loss_learning_rate follows
  a --config.classifier.learning_rate override); 30 epochs at most. Other optimizers and schedules:
  --config.classifier.optimizer=adam --config.classifier.schedule=plateau (README); seeds and a grid:
  python -m jsim.sweep --config=configs/metric.py:loss=proxy_anchor,size=cpu --workdir=runs/pa --seeds=0,1,2
  --grid=classifier.learning_rate=0.01,0.05, then python -m jsim.evaluate.compare runs/pa/* --table=pa.md.
  Expected cost, estimated (no GPU measured yet): a plain Flax ResNet50 step trains about
  4,900 images/s at batch 64 on one H200 (a reference figure, not a jsim measurement) and
  every loss here costs within 10 % of cross-entropy's step (BENCHMARKS.md, CPU), so 15-30 s
  per epoch of 63,000 images plus the validation MAP@R (27,000 images): well under an hour
  for 30 epochs, as for the protocol's cross-entropy (configs/protocol.py).
size=cpu: the CPU-sized comparison: resnet_tiny from scratch at 64 px, batch 64, 9 epochs,
  stage 2 cut to 5 epochs. Measured on 2 CPU cores (RESULTS.md): 14-17 min per method, 81
  min for cross_entropy, pair_ms, contrastive, multi_similarity and proxy_anchor. Expected
  result (seed 0, Ms on |e1 - e2|), balanced mean of cases 4-5 / unseen AUC:
  cross_entropy 64.1 % / 0.702, proxy_anchor 62.8 % / 0.678, pair_ms 59.0 % / 0.628,
  contrastive 58.4 % / 0.620, multi_similarity 50.6 % / 0.508 (untuned: it barely learns
  at this rate).
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
