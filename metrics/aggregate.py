"""Aggregate per-image scores, overall and per prompt.

Conventions (quoted by the report and docs/metrics.md):
- mIoU / mDice are means of the per-image scores (invalid predictions included, as 0).
- cIoU (cumulative IoU) is the sum of intersections over the sum of unions, so large objects weigh more;
  when every union is 0 (all ground truths and predictions empty) it falls back to the mean IoU.
- std is the population standard deviation of the per-image IoU; min, max and P10/P50/P90 (numpy's
  linear interpolation) are of the per-image IoU too.
- Box statistics are means over the images that have box information only (None when none has).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from metrics.scoring import ImageScore

STAT_KEYS = (
    "count", "invalid", "invalid_objects", "miou", "mdice", "ciou", "std", "min", "max", "p10", "p50", "p90",
    "box_count", "box_miou", "box_acc50", "box_acc75",
)  # fmt: skip


def _stats(scores: list[ImageScore]) -> dict[str, Any]:
    ious = np.array([s.iou for s in scores], dtype=np.float64)
    dices = np.array([s.dice for s in scores], dtype=np.float64)
    with_boxes = [s for s in scores if s.box_miou is not None]
    union = sum(s.union for s in scores)
    stats: dict[str, Any] = {
        "count": len(scores),
        "invalid": sum(not s.valid for s in scores),
        "invalid_objects": sum(s.invalid_objects for s in scores),
        "box_count": len(with_boxes),
    }
    if not scores:
        return {key: stats.get(key) for key in STAT_KEYS}
    p10, p50, p90 = np.percentile(ious, [10, 50, 90])
    stats |= {
        "miou": float(ious.mean()),
        "mdice": float(dices.mean()),
        "ciou": sum(s.intersection for s in scores) / union if union else float(ious.mean()),
        "std": float(ious.std()),
        "min": float(ious.min()),
        "max": float(ious.max()),
        "p10": float(p10),
        "p50": float(p50),
        "p90": float(p90),
    }
    for key in ("box_miou", "box_acc50", "box_acc75"):
        stats[key] = float(np.mean([getattr(s, key) for s in with_boxes])) if with_boxes else None
    return {key: stats[key] for key in STAT_KEYS}


def summarize(scores: Iterable[ImageScore]) -> dict[str, Any]:
    """{"overall": stats, "per_prompt": {prompt: stats}} with the keys of `STAT_KEYS`; prompts sorted."""
    scores = list(scores)
    prompts = sorted({s.prompt for s in scores})
    return {
        "overall": _stats(scores),
        "per_prompt": {p: _stats([s for s in scores if s.prompt == p]) for p in prompts},
    }
