"""Per-image scoring conventions and aggregate statistics, checked against numpy computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from metrics import aggregate, scoring


def square(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_score_image_valid_prediction_with_boxes():
    gt, pred = square(20, 0, 0, 10), square(20, 0, 5, 10)
    score = scoring.score_image(pred, gt, "segment crack", "a", pred_boxes=[[5, 0, 15, 10]], gt_boxes=[[0, 0, 10, 10]])
    assert (score.intersection, score.union) == (50, 150)
    assert score.iou == pytest.approx(1 / 3) and score.dice == pytest.approx(0.5)
    assert score.box_miou == pytest.approx(1 / 3) and score.box_acc50 == 0.0
    assert score.valid and score.n_pred == 1 and score.n_gt == 1 and score.invalid_objects == 0


def test_score_image_invalid_prediction_scores_zero_and_counts_gt_in_union():
    gt = square(20, 2, 2, 4)
    score = scoring.score_image(None, gt, "p", "a", gt_boxes=[[2, 2, 6, 6]], invalid_objects=2)
    assert not score.valid and score.iou == score.dice == score.box_miou == score.box_acc50 == 0.0
    assert (score.intersection, score.union) == (0, 16) and score.invalid_objects == 2
    # Even with an empty ground truth, a missing prediction is never a free 1.
    assert scoring.score_image(None, np.zeros((3, 3)), "p", "b").iou == 0.0


def test_score_image_partially_invalid_text_and_empty_conventions():
    empty = np.zeros((8, 8), bool)
    score = scoring.score_image(empty, empty, "p", "a", pred_boxes=[], gt_boxes=[], invalid_objects=1)
    assert score.valid and score.iou == score.dice == score.box_miou == 1.0 and score.invalid_objects == 1
    zero = scoring.score_image(empty, empty, "p", "a", empty=0.0)
    assert zero.iou == 0.0 and zero.box_miou is None and zero.n_pred is None
    missed = scoring.score_image(empty, square(8, 0, 0, 2), "p", "a", pred_boxes=None, gt_boxes=[[0, 0, 2, 2]])
    assert missed.box_miou == 0.0 and missed.n_pred == 0


def make_scores(seed: int) -> list[scoring.ImageScore]:
    rng = np.random.default_rng(seed)
    scores = []
    for index in range(30):
        gt = rng.random((12, 12)) < rng.uniform(0, 0.5)
        pred = None if index % 7 == 3 else rng.random((12, 12)) < rng.uniform(0, 0.5)
        has_boxes = index % 2 == 0
        scores.append(
            scoring.score_image(
                pred, gt, ["segment crack", "segment taping area"][index % 3 == 0], f"img{index}",
                pred_boxes=[[0, 0, 5, 5 + index % 4]] if has_boxes else None,
                gt_boxes=[[0, 0, 6, 6]] if has_boxes else None,
                invalid_objects=index % 5 == 0,
            )
        )  # fmt: skip
    return scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summary_matches_numpy(seed):
    scores = make_scores(seed)
    summary = aggregate.summarize(scores)
    assert list(summary["per_prompt"]) == ["segment crack", "segment taping area"]
    groups = {"overall": scores} | {p: [s for s in scores if s.prompt == p] for p in summary["per_prompt"]}
    for name, group in groups.items():
        stats = summary["overall"] if name == "overall" else summary["per_prompt"][name]
        assert tuple(stats) == aggregate.STAT_KEYS
        ious = np.array([s.iou for s in group])
        assert stats["count"] == len(group)
        assert stats["invalid"] == sum(1 for s in group if not s.valid) > 0
        assert stats["invalid_objects"] == sum(s.invalid_objects for s in group)
        assert stats["miou"] == pytest.approx(ious.mean())
        assert stats["mdice"] == pytest.approx(np.mean([s.dice for s in group]))
        ciou = sum(s.intersection for s in group) / sum(s.union for s in group)
        assert stats["ciou"] == pytest.approx(ciou)
        assert stats["std"] == pytest.approx(ious.std())
        assert (stats["min"], stats["max"]) == (ious.min(), ious.max())
        assert [stats["p10"], stats["p50"], stats["p90"]] == pytest.approx(np.percentile(ious, [10, 50, 90]))
        boxed = [s for s in group if s.box_miou is not None]
        assert stats["box_count"] == len(boxed) < len(group)
        assert stats["box_miou"] == pytest.approx(np.mean([s.box_miou for s in boxed]))
        assert stats["box_acc75"] == pytest.approx(np.mean([s.box_acc75 for s in boxed]))
    assert aggregate.summarize(scores) == summary  # deterministic


def test_summary_edge_cases():
    empty = aggregate.summarize([])
    assert empty["overall"]["count"] == 0 and empty["overall"]["miou"] is None and empty["per_prompt"] == {}
    blank = np.zeros((4, 4), bool)
    all_empty = [scoring.score_image(blank, blank, "p", "a"), scoring.score_image(None, blank, "p", "b")]
    stats = aggregate.summarize(all_empty)["overall"]
    # Every union is 0: cIoU falls back to the mean IoU (1 for the empty pair, 0 for the invalid one).
    assert stats["ciou"] == stats["miou"] == 0.5 and stats["invalid"] == 1
    assert stats["box_miou"] is None and stats["box_count"] == 0
