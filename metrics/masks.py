"""Mask overlap at the ground truth's full resolution.

Conventions (quoted by the report and docs/metrics.md):
- Masks are compared pixel for pixel; prediction and ground truth must have the same height and width
  (a prediction is never resized to fit, so a size mismatch is a bug upstream and raises).
- When both prediction and ground truth are empty there is nothing to get wrong: the score is `empty`
  (1.0 by default, configurable). One empty and the other not scores 0.
"""

from __future__ import annotations

import numpy as np


def _as_bool(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} mask must be 2-D (H, W), got shape {mask.shape}")
    return mask > 0 if mask.dtype != bool else mask


def _checked(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = _as_bool(pred, "predicted"), _as_bool(gt, "ground-truth")
    if pred.shape != gt.shape:
        raise ValueError(
            f"predicted mask is {pred.shape[1]}x{pred.shape[0]} (WxH) but ground truth is "
            f"{gt.shape[1]}x{gt.shape[0]}; masks are scored at the ground truth's full resolution"
        )
    return pred, gt


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Pixel counts |pred & gt| and |pred | gt| (summed over images they give the cumulative IoU)."""
    pred, gt = _checked(pred, gt)
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def iou(pred: np.ndarray | None, gt: np.ndarray, empty: float = 1.0) -> float:
    """Intersection over union; `pred=None` (invalid prediction) -> 0, both empty -> `empty`."""
    if pred is None:
        return 0.0
    intersection, union = intersection_union(pred, gt)
    return float(empty) if union == 0 else intersection / union


def dice(pred: np.ndarray | None, gt: np.ndarray, empty: float = 1.0) -> float:
    """2|pred & gt| / (|pred| + |gt|); `pred=None` -> 0, both empty -> `empty`."""
    if pred is None:
        return 0.0
    pred, gt = _checked(pred, gt)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))
    return float(empty) if total == 0 else 2.0 * int(np.count_nonzero(pred & gt)) / total
