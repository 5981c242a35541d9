"""Every number the source publishes, in one place (percent, as the source gives them).

The report (jsim.evaluate.report), the figures and the configs' docstrings take their
published figures from here; tests/test_report.py checks the configs quote these.

seen / unseen: the source's section 6 gives the accuracy on cases 1-2 for both
backbones (87.55 % ResNet50, 83.61 % VGG16: the two cases weighted by their pair
counts); the abstract rounds ResNet50's to 87.5 % and gives 73.8 % on unseen classes
(cases 4-5). The source gives no unseen summary for VGG16 (its cases 4-5 weighted the
same way would be 80.72 %) and no AUC for either backbone.
"""

from __future__ import annotations

from typing import Any

PUBLISHED: dict[str, dict[str, Any]] = {
  "resnet50": {
    "stage1_test_accuracy": 69.51,
    "stage2_val_accuracy": 96.3,
    "test_accuracy": 86.51,
    "case_accuracy": {1: 83.36, 2: 92.22, 3: 84.27, 4: 74.25, 5: 69.56},
    "seen_accuracy": 87.55,  # section 6 (the abstract: 87.5)
    "unseen_accuracy": 73.8,  # the abstract
  },
  "vgg16": {
    "stage1_test_accuracy": 67.96,
    "stage2_val_accuracy": 91.2,
    "test_accuracy": 82.54,
    "case_accuracy": {1: 83.40, 2: 83.85, 3: 73.47, 4: 83.00, 5: 56.89},
    "seen_accuracy": 83.61,  # section 6
    "unseen_accuracy": None,  # not given
  },
}
BACKBONE_TITLES = {"resnet50": "ResNet50", "vgg16": "VGG16"}


def published(backbone: str) -> dict[str, Any] | None:
  """The source's numbers (percent) for a backbone, None for one it did not use."""
  return PUBLISHED.get(backbone)


def all_values() -> set[float]:
  """Every published number (percent), for checking that a text quotes only these."""
  out: set[float] = set()
  for numbers in PUBLISHED.values():
    for v in numbers.values():
      if isinstance(v, dict):
        out.update(v.values())
      elif v is not None:
        out.add(v)
  return out
