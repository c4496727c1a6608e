"""Mask and box metrics against independent oracles: pycocotools for mask IoU, brute force for matching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pycocotools import mask as coco_mask

from metrics import boxes, masks


def coco_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """pycocotools' IoU of two binary masks via RLE (the COCO evaluator's own code path)."""
    rle_pred = coco_mask.encode(np.asfortranarray(pred.astype(np.uint8)))
    rle_gt = coco_mask.encode(np.asfortranarray(gt.astype(np.uint8)))
    return float(coco_mask.iou([rle_pred], [rle_gt], [0])[0, 0])


ONE_PIXEL = np.pad(np.ones((1, 1), bool), ((2, 2), (3, 1)))

mask_pairs = st.tuples(st.integers(1, 24), st.integers(1, 24), st.floats(0.0, 1.0), st.integers(0, 2**31)).map(
    lambda t: tuple(np.random.default_rng(t[3]).random((2, t[0], t[1])) < t[2])
)


@pytest.mark.oracle
@settings(max_examples=200, deadline=None)
@given(mask_pairs)
def test_mask_iou_matches_pycocotools_on_random_masks(pair):
    pred, gt = pair
    if not pred.any() and not gt.any():
        assert masks.iou(pred, gt) == 1.0  # pycocotools gives 0 here; our convention is documented
    else:
        assert masks.iou(pred, gt) == pytest.approx(coco_iou(pred, gt), abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(bool, hnp.array_shapes(min_dims=2, max_dims=2, max_side=16)), st.data())
def test_dice_is_the_iou_transform(gt, data):
    pred = data.draw(hnp.arrays(bool, gt.shape))
    iou, dice = masks.iou(pred, gt), masks.dice(pred, gt)
    # Dice = 2 IoU / (1 + IoU) for any pair of sets (and 1 = 1 for both empty).
    assert dice == pytest.approx(2 * iou / (1 + iou), abs=1e-12)
    intersection, union = masks.intersection_union(pred, gt)
    assert intersection == np.count_nonzero(pred & gt) and union == np.count_nonzero(pred | gt)


@pytest.mark.oracle
@pytest.mark.parametrize(
    "name, pred, gt",
    [
        ("one pixel hit", ONE_PIXEL, ONE_PIXEL),
        ("one pixel miss", ONE_PIXEL, np.roll(ONE_PIXEL, 1, axis=1)),
        ("full vs full", np.ones((7, 9), bool), np.ones((7, 9), bool)),
        ("full vs one pixel", np.ones((5, 5), bool), ONE_PIXEL),
        ("empty pred", np.zeros((6, 6), bool), np.ones((6, 6), bool)),
        ("empty gt", np.ones((6, 6), bool), np.zeros((6, 6), bool)),
        ("disjoint", np.eye(6, dtype=bool), ~np.eye(6, dtype=bool)),
        ("1x1", np.ones((1, 1), bool), np.ones((1, 1), bool)),
    ],
)
def test_mask_iou_edge_cases_match_pycocotools(name, pred, gt):
    assert masks.iou(pred, gt) == pytest.approx(coco_iou(pred, gt), abs=1e-12), name


def test_mask_conventions():
    empty = np.zeros((4, 5), bool)
    assert masks.iou(empty, empty) == 1.0 and masks.dice(empty, empty) == 1.0
    assert masks.iou(empty, empty, empty=0.0) == 0.0 and masks.dice(empty, empty, empty=0.5) == 0.5
    assert masks.iou(None, empty) == 0.0 and masks.dice(None, np.ones((4, 5))) == 0.0
    # uint8 0/255 masks (as read from PNGs) are treated as boolean.
    assert masks.iou(np.full((2, 2), 255, np.uint8), np.ones((2, 2), bool)) == 1.0
    assert masks.dice(np.array([[1, 1, 0, 0]]), np.array([[0, 1, 1, 0]])) == pytest.approx(0.5)


def test_mask_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"5x4 \(WxH\) but ground truth is 4x5"):
        masks.iou(np.zeros((4, 5)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="2-D"):
        masks.iou(np.zeros((4, 5, 3)), np.zeros((4, 5, 3)))


def test_box_iou_matrix_known_values():
    a = [[0, 0, 10, 10], [5, 5, 15, 15]]
    b = [[0, 0, 10, 10], [0, 0, 5, 5], [20, 20, 30, 30], [3, 3, 3, 9]]
    m = boxes.iou_matrix(a, b)
    assert m.shape == (2, 4)
    np.testing.assert_allclose(m[0], [1.0, 0.25, 0.0, 0.0])
    np.testing.assert_allclose(m[1], [25 / 175, 0.0, 0.0, 0.0])
    assert boxes.iou_matrix([], b).shape == (0, 4) and boxes.iou_matrix(a, np.zeros((0, 4))).shape == (2, 0)
    with pytest.raises(ValueError, match="shape"):
        boxes.iou_matrix([1, 2, 3, 4], b)


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 50, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(1, 30, (n, 2))], axis=1)


def brute_force_best_total(pred: np.ndarray, gt: np.ndarray) -> float:
    ious = boxes.iou_matrix(pred, gt)
    small, large = (pred, gt) if len(pred) <= len(gt) else (gt, pred)
    transpose = small is gt
    best = 0.0
    for perm in itertools.permutations(range(len(large)), len(small)):
        total = sum((ious[p, i] if transpose else ious[i, p]) for i, p in enumerate(perm))
        best = max(best, total)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_box_matching_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    pred, gt = random_boxes(rng, int(rng.integers(0, 5))), random_boxes(rng, int(rng.integers(0, 5)))
    pairs = boxes.match(pred, gt)
    assert len({i for i, _, _ in pairs}) == len(pairs) == len({j for _, j, _ in pairs})  # one to one
    assert sum(iou for _, _, iou in pairs) == pytest.approx(brute_force_best_total(pred, gt), abs=1e-9)
    scores = boxes.box_scores(pred, gt)
    if len(pred) == len(gt) == 0:
        assert scores == boxes.BoxScores(1.0, 1.0, 1.0)
    else:
        denominator = max(len(pred), len(gt))
        assert scores.miou == pytest.approx(brute_force_best_total(pred, gt) / denominator)
        assert scores.acc50 == sum(iou >= 0.5 for _, _, iou in pairs) / denominator
        assert 0 <= scores.acc75 <= scores.acc50 <= 1


def test_box_scores_penalise_missed_and_extra_boxes():
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert boxes.box_scores(gt, gt) == boxes.BoxScores(1.0, 1.0, 1.0)
    missed = boxes.box_scores(gt[:1], gt)
    assert missed == boxes.BoxScores(0.5, 0.5, 0.5)
    extra = boxes.box_scores(gt + [[50, 50, 60, 60]], gt)
    assert extra.miou == pytest.approx(2 / 3) and extra.acc50 == pytest.approx(2 / 3)
    shifted = boxes.box_scores([[0, 0, 10, 10], [22, 20, 32, 30]], gt)  # second IoU = 80/120
    assert shifted.miou == pytest.approx((1 + 80 / 120) / 2)
    assert shifted.acc50 == 1.0 and shifted.acc75 == 0.5
    assert boxes.box_scores([], gt) == boxes.BoxScores(0.0, 0.0, 0.0)
    assert boxes.box_scores(gt, []) == boxes.BoxScores(0.0, 0.0, 0.0)
    assert boxes.box_scores([], [], empty=0.0) == boxes.BoxScores(0.0, 0.0, 0.0)
