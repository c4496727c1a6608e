"""SAM box prompting on a tiny random-weight SAM built from segment-anything's own modules: the real code
path (checkpoint loading, one image embedding, batched box prompts, best-IoU choice, clean-up), not real
masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vae
from converters import sam, synthetic
from converters.convert import ConvertConfig, convert
from converters.geometry import box_mask
from paliseg import images, records
from paliseg.cli import main as cli


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "tiny_sam.pth"
    torch.save(sam.build_sam("tiny").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def segmenter(checkpoint) -> sam.BoxSegmenter:
    return sam.BoxSegmenter(sam.load_sam(checkpoint, "tiny", "cpu"))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)


BOXES = [(5.0, 4.0, 40.0, 30.0), (30.5, 10.0, 79.0, 47.0), (0.0, 0.0, 80.0, 48.0)]


def test_checkpoint_loads_into_the_architecture(checkpoint, tmp_path):
    model = sam.load_sam(checkpoint, "tiny", "cpu")
    saved = torch.load(checkpoint, weights_only=True)
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    partial = {k: v for k, v in saved.items() if not k.startswith("mask_decoder.iou_prediction_head")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial.pth: not a SAM tiny checkpoint .*iou_prediction_head"):
        sam.load_sam(tmp_path / "partial.pth", "tiny", "cpu")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.pth: not a SAM tiny checkpoint"):
        sam.load_sam(tmp_path / "junk.pth", "tiny", "cpu")
    with pytest.raises(FileNotFoundError, match=r"nothing\.pth: SAM checkpoint not found"):
        sam.load_sam(tmp_path / "nothing.pth", "tiny")


def test_one_embedding_for_all_boxes_gives_the_per_box_masks(segmenter, image, monkeypatch):
    calls = []
    original = segmenter.predictor.set_image
    monkeypatch.setattr(segmenter.predictor, "set_image", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    batched = segmenter.masks_for_boxes(image, BOXES)
    assert len(calls) == 1 and batched.shape == (3, 48, 80) and batched.dtype == bool
    one_by_one = np.stack([segmenter.masks_for_boxes(image, [box])[0] for box in BOXES])
    assert len(calls) == 4
    assert np.array_equal(batched, one_by_one)
    for mask, box in zip(batched, BOXES):
        assert not np.any(mask & ~box_mask(box, 80, 48))  # clipped to its box
    assert segmenter.masks_for_boxes(image, []).shape == (0, 48, 80)


def test_the_mask_with_the_best_predicted_iou_is_kept(segmenter, image, monkeypatch):
    candidates = torch.zeros((2, 3, 48, 80), dtype=torch.bool)
    candidates[:, 0, 0:10, 0:10] = True
    candidates[:, 1, 10:30, 10:30] = True
    candidates[:, 2, 20:40, 40:70] = True
    scores = torch.tensor([[0.1, 0.2, 0.9], [0.8, 0.3, 0.1]])

    def predict(point_coords, point_labels, boxes, multimask_output):
        assert point_coords is None and multimask_output and boxes.shape == (2, 4)
        return candidates, scores, None

    monkeypatch.setattr(segmenter.predictor, "predict_torch", predict)
    chosen = segmenter.masks_for_boxes(image, [(0, 0, 80, 48), (0, 0, 80, 48)])
    assert np.array_equal(chosen[0], candidates[0, 2].numpy())
    assert np.array_equal(chosen[1], candidates[1, 0].numpy())


def test_clean_mask_clips_drops_specks_and_fills_holes():
    mask = np.zeros((100, 100), bool)
    mask[20:80, 20:80] = True
    mask[45:47, 45:47] = False  # a 4-pixel hole
    mask[5, 5] = mask[90:92, 90:92] = True  # outside the box
    mask[25, 75] = False
    mask[22:24, 70:72] = False  # a 4-pixel hole in the corner region
    speck = np.zeros_like(mask)
    speck[82:84, 50:52] = True  # a 4-pixel speck inside the box but apart from the object
    box = (10.0, 10.0, 85.0, 85.0)
    cleaned = sam.clean_mask(mask | speck, box)
    expected = np.zeros_like(mask)
    expected[20:80, 20:80] = True
    assert np.array_equal(cleaned, expected)  # 0.2% of the 75x75 box is 11 px: specks and holes of 4 go


def box_only_export(tmp_path: Path) -> Path:
    root = tmp_path / "boxes"
    synthetic.write_synthetic_coco(
        root, n_train=3, n_valid=0, seed=2, config=synthetic.ShapesConfig(64, ("rectangle", "ellipse"), (1, 3)),
        box_only=True,
    )  # fmt: skip
    (root / "valid" / "_annotations.coco.json").unlink()
    return root


def test_convert_with_tiny_sam_end_to_end(checkpoint, tmp_path, capsys):
    root = box_only_export(tmp_path)
    vae_path = vae.write_random_npz(tmp_path / "vae.npz")
    code = cli.main(
        [
            "convert",
            str(root),
            "--out",
            str(tmp_path / "out"),
            "--vae",
            str(vae_path),
            "--sam-checkpoint",
            str(checkpoint),
            "--sam-model",
            "tiny",
            "--sam-device",
            "cpu",
            "--json",
        ]
    )
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["settings"]["box_masks"] == "sam" and summary["settings"]["sam_model"] == "tiny"
    origins = []
    for record in records.read_records(records.annotations_path(tmp_path / "out", "train")):
        mask = images.read_mask(record.mask_path)
        boxes = np.logical_or.reduce(
            [box_mask(o["box"], 64, 64) for o in record.extra["objects"]] or [np.zeros((64, 64), bool)]
        )
        assert not np.any(mask & ~boxes)
        origins += [o["mask_from"] for o in record.extra["objects"]]
    assert set(origins) <= {"box_sam", "box_fill"}
    assert origins.count("box_fill") == summary["warnings"].get("sam_empty_mask", 0)
    assert cli.main(["validate", str(tmp_path / "out")]) == 0

    with pytest.raises(ValueError, match="--box-masks sam needs --sam-checkpoint"):
        convert(ConvertConfig([root], tmp_path / "o2", vae=vae_path, box_masks="sam"))
