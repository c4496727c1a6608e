"""Box overlap with optimal one-to-one matching.

Conventions (quoted by the report and docs/metrics.md):
- Boxes are pixel (x1, y1, x2, y2) with continuous coordinates: area = (x2 - x1) * (y2 - y1).
- Predicted and ground-truth boxes are paired one to one by the Hungarian algorithm
  (`scipy.optimize.linear_sum_assignment`), maximising the total IoU.
- Per-image box mIoU = (sum of the matched pairs' IoU) / max(n_pred, n_gt): an unmatched box on either
  side counts 0, so both a missed object and an extra false box cost.
- Box accuracy at t = (number of matched pairs with IoU >= t) / max(n_pred, n_gt), for t = 0.5 and 0.75.
- No predicted and no ground-truth box scores `empty` (1.0 by default) on all three.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment


def _as_boxes(boxes: Sequence[Sequence[float]] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4))
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{name} boxes must have shape (N, 4), got {array.shape}")
    return array


def iou_matrix(a_xyxy, b_xyxy) -> np.ndarray:
    """IoU of every box of `a` with every box of `b`, shape (len(a), len(b)); degenerate boxes give 0."""
    a, b = _as_boxes(a_xyxy, "first"), _as_boxes(b_xyxy, "second")
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    intersection = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)

    def area(boxes: np.ndarray) -> np.ndarray:
        return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)

    union = area(a)[:, None] + area(b)[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def match(pred_xyxy, gt_xyxy) -> list[tuple[int, int, float]]:
    """Optimal one-to-one pairs (pred index, gt index, IoU), maximising the summed IoU.

    Pairs with IoU 0 are dropped: they are no better than leaving both boxes unmatched.
    """
    ious = iou_matrix(pred_xyxy, gt_xyxy)
    if ious.size == 0:
        return []
    rows, cols = linear_sum_assignment(ious, maximize=True)
    return [(int(i), int(j), float(ious[i, j])) for i, j in zip(rows, cols) if ious[i, j] > 0]


@dataclasses.dataclass(frozen=True)
class BoxScores:
    miou: float
    acc50: float
    acc75: float


def box_scores(pred_xyxy, gt_xyxy, empty: float = 1.0) -> BoxScores:
    """Per-image box mIoU and accuracy at IoU 0.5 / 0.75 (see the module docstring)."""
    n_pred, n_gt = len(_as_boxes(pred_xyxy, "predicted")), len(_as_boxes(gt_xyxy, "ground-truth"))
    if n_pred == 0 and n_gt == 0:
        return BoxScores(float(empty), float(empty), float(empty))
    pairs = match(pred_xyxy, gt_xyxy)
    denominator = max(n_pred, n_gt)
    ious = np.array([iou for _, _, iou in pairs])
    return BoxScores(
        miou=float(ious.sum() / denominator),
        acc50=float(np.count_nonzero(ious >= 0.5) / denominator),
        acc75=float(np.count_nonzero(ious >= 0.75) / denominator),
    )
