"""One image's scores: mask IoU/Dice at full resolution and, when boxes are known, matched box scores.

Conventions (quoted by the report and docs/metrics.md):
- A missing or fully unparsable prediction (`pred_mask=None`) is never skipped: it scores 0 on every
  metric and is counted as invalid (`valid=False`). For the cumulative IoU it adds intersection 0 and
  union |gt|.
- A prediction whose text had some invalid objects is scored on its valid objects; the number of rejected
  objects is recorded in `invalid_objects` (the image still counts as valid).
- Box scores exist only when ground-truth boxes are given (`gt_boxes` not None); `pred_boxes=None` with
  ground-truth boxes means the prediction has no boxes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from metrics import boxes as box_metrics
from metrics import masks as mask_metrics


@dataclasses.dataclass(frozen=True)
class ImageScore:
    image_id: str
    prompt: str
    iou: float
    dice: float
    intersection: int
    union: int
    box_miou: float | None
    box_acc50: float | None
    box_acc75: float | None
    valid: bool
    n_pred: int | None  # predicted objects (boxes); None when boxes are not known
    n_gt: int | None
    invalid_objects: int

    def to_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = tuple(field.name for field in dataclasses.fields(ImageScore))


def score_image(
    pred_mask: np.ndarray | None,
    gt_mask: np.ndarray,
    prompt: str,
    image_id: str,
    pred_boxes=None,
    gt_boxes=None,
    invalid_objects: int = 0,
    empty: float = 1.0,
) -> ImageScore:
    """Score one prediction against its ground truth (see the module docstring for the conventions)."""
    gt_mask = np.asarray(gt_mask)
    has_boxes = gt_boxes is not None
    n_gt = len(gt_boxes) if has_boxes else None
    if pred_mask is None:
        zero = 0.0 if has_boxes else None
        gt_area = int(np.count_nonzero(gt_mask))
        return ImageScore(
            image_id, prompt, 0.0, 0.0, 0, gt_area, zero, zero, zero, False,
            0 if has_boxes else None, n_gt, int(invalid_objects),
        )  # fmt: skip
    intersection, union = mask_metrics.intersection_union(pred_mask, gt_mask)
    if has_boxes:
        pred_boxes = () if pred_boxes is None else pred_boxes
        boxes = box_metrics.box_scores(pred_boxes, gt_boxes, empty=empty)
        box_values: tuple[float | None, ...] = (boxes.miou, boxes.acc50, boxes.acc75)
        n_pred: int | None = len(pred_boxes)
    else:
        box_values, n_pred = (None, None, None), None
    return ImageScore(
        image_id=image_id,
        prompt=prompt,
        iou=mask_metrics.iou(pred_mask, gt_mask, empty=empty),
        dice=mask_metrics.dice(pred_mask, gt_mask, empty=empty),
        intersection=intersection,
        union=union,
        box_miou=box_values[0],
        box_acc50=box_values[1],
        box_acc75=box_values[2],
        valid=True,
        n_pred=n_pred,
        n_gt=n_gt,
        invalid_objects=int(invalid_objects),
    )
