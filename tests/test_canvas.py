"""Canvases: layout, overlays where the masks are, thin structures kept visible, and `paliseg visualize`
on a real Roboflow cracks image with its polygon mask."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from metrics import canvas, masks
from paliseg import files, images, tokens
from paliseg.cli import main as cli

GAP = 6  # pixels between panels


def panel_geometry(canvas_image: Image.Image, image: Image.Image, panel_height: int) -> tuple[int, int, int]:
    """(top, panel width, panel height) found by locating the unchanged original in the first panel."""
    scale = min(panel_height / image.height, 2 * panel_height / image.width)
    size = (round(image.width * scale), round(image.height * scale))
    base = np.asarray(image.convert("RGB").resize(size, Image.LANCZOS))
    pixels = np.asarray(canvas_image)
    for top in range(0, 80):
        if np.array_equal(pixels[top : top + size[1], : size[0]], base):
            return top, size[0], size[1]
    raise AssertionError("the first panel does not show the original image")


def panel(canvas_image: Image.Image, geometry, index: int) -> np.ndarray:
    top, width, height = geometry
    left = index * (width + GAP)
    return np.asarray(canvas_image, dtype=np.int32)[top : top + height, left : left + width]


def greenish(pixels: np.ndarray) -> np.ndarray:
    return (pixels[..., 1] > pixels[..., 0] + 40) & (pixels[..., 1] > pixels[..., 2] + 40)


def orangeish(pixels: np.ndarray) -> np.ndarray:
    return (pixels[..., 0] > pixels[..., 1] + 40) & (pixels[..., 0] > pixels[..., 2] + 60)


def grey_image(width: int, height: int) -> Image.Image:
    ramp = np.linspace(90, 170, width, dtype=np.uint8)[None, :].repeat(height, 0)
    return Image.fromarray(np.stack([ramp] * 3, -1), "RGB")


def test_canvas_layout_and_overlays_where_the_masks_are():
    image = grey_image(300, 200)
    gt = np.zeros((200, 300), bool)
    gt[50:100, 60:160] = True
    pred = np.roll(gt, 30, axis=1)
    result = canvas.make_canvas(image, gt, pred, "prompt: segment box\nIoU 0.5", panel_height=200)
    geometry = panel_geometry(result, image, 200)
    assert geometry[1:] == (300, 200) and result.width == 3 * 300 + 2 * GAP
    original, truth, prediction = (panel(result, geometry, i) for i in range(3))
    assert greenish(truth[gt]).all() and not greenish(truth[~gt]).any()
    assert np.array_equal(truth[~gt], original[~gt])  # nothing drawn outside the mask (no boxes given)
    assert orangeish(prediction[pred]).all() and not orangeish(prediction[~pred]).any()


def test_thin_crack_stays_visible_when_the_image_is_shrunk():
    """A 1-pixel-wide diagonal line in a 1600x1200 image, drawn on 300-pixel-high panels (4x smaller)."""
    image = grey_image(1600, 1200)
    crack = np.zeros((1200, 1600), bool)
    rows = np.arange(100, 1100)
    crack[rows, rows + 200] = True
    result = canvas.make_canvas(image, crack, None, "thin", panel_height=300)
    geometry = panel_geometry(result, image, 300)
    truth = panel(result, geometry, 1)
    drawn = greenish(truth)
    expected = np.zeros(drawn.shape, bool)
    expected[(rows * 0.25).astype(int), ((rows + 200) * 0.25).astype(int)] = True
    assert drawn[expected].mean() > 0.95  # every part of the crack shows up
    assert not (drawn & ~ndimage.binary_dilation(expected, iterations=2)).any()  # and nothing else


def test_boxes_drawn_and_no_prediction_panel():
    image = grey_image(200, 100)
    result = canvas.make_canvas(image, None, None, "gt boxes only", gt_boxes=[(20, 20, 120, 80)], gt_labels=["crack"],
                                panel_height=100)  # fmt: skip
    geometry = panel_geometry(result, image, 100)
    truth, missing = panel(result, geometry, 1), panel(result, geometry, 2)
    assert greenish(truth[60:79, 20:22]).all() and greenish(truth[79, 30:110]).all()  # left and bottom edges
    assert not greenish(truth[30:70, 30:110]).any()  # inside the box is untouched
    saturation = missing.max(-1) - missing.min(-1)
    assert (saturation < 10).mean() > 0.9 and (missing.min(-1) < 150).any()  # greyed image with dark-red text


def test_canvas_rejects_mask_of_wrong_size():
    with pytest.raises(ValueError, match="ground-truth mask has shape"):
        canvas.make_canvas(grey_image(20, 10), np.zeros((20, 10), bool), None, "x")


def test_grid_places_canvases_in_rows():
    tiles = [Image.new("RGB", (50, 30), colour) for colour in ("red", "green", "blue")]
    grid = canvas.make_grid(tiles, columns=2, gap=4)
    assert grid.size == (2 * 50 + 3 * 4, 2 * 30 + 3 * 4)
    pixels = np.asarray(grid)
    assert tuple(pixels[4, 4]) == (255, 0, 0) and tuple(pixels[4 + 30 + 4, 4]) == (0, 0, 255)
    assert tuple(pixels[-2, -2]) == (230, 230, 230)  # empty cell stays background
    with pytest.raises(ValueError):
        canvas.make_grid([])


@pytest.fixture(scope="module")
def cracks_record(roboflow_dir, tmp_path_factory):
    """One real cracks valid image, its union polygon mask (pycocotools annToMask) and a 1-record JSONL."""
    from pycocotools.coco import COCO

    split = roboflow_dir / "cracks" / "valid"
    coco = COCO(str(split / "_annotations.coco.json"))
    image_id = next(i for i in sorted(coco.imgs) if coco.getAnnIds(imgIds=[i]))
    info, annotations = coco.imgs[image_id], coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    mask = np.zeros((info["height"], info["width"]), bool)
    for annotation in annotations:
        mask |= coco.annToMask(annotation) > 0
    boxes = [(x, y, x + w, y + h) for x, y, w, h in (a["bbox"] for a in annotations)]
    size = (info["width"], info["height"])
    objects = [tokens.SegObject(tokens.box_to_locs(b, *size), (0,) * 16, "crack") for b in boxes]

    root = tmp_path_factory.mktemp("cracks")
    stem = info["file_name"].rsplit(".", 1)[0]
    shutil.copy(split / info["file_name"], root / info["file_name"])
    files.write_mask(root / "masks" / f"{stem}.segment_crack.png", mask)
    suffix = tokens.format_suffix(tokens.sort_objects(objects))
    mask_path = f"masks/{stem}.segment_crack.png"
    record = {"image": info["file_name"], "prefix": "segment crack", "suffix": suffix, "mask": mask_path}
    (root / "data.jsonl").write_text(json.dumps(record) + "\n")
    return root, info, mask, boxes


def test_visualize_real_cracks_image_ground_truth_only(cracks_record, tmp_path, capsys):
    root, info, mask, _ = cracks_record
    assert cli.main(["visualize", "--data", str(root / "data.jsonl"), "--out", str(tmp_path), "--grid", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    (path,) = result["canvases"]
    assert path.endswith(".segment_crack.png") and result["scores"] == [None]
    with Image.open(path) as drawn:
        drawn = drawn.convert("RGB")
    image = images.read_image(root / info["file_name"])
    geometry = panel_geometry(drawn, image, 400)
    assert drawn.width == 3 * geometry[1] + 2 * GAP
    truth = panel(drawn, geometry, 1)
    shrunk = canvas._shrink_mask(mask, (geometry[1], geometry[2]))
    assert greenish(truth[shrunk]).mean() > 0.95
    assert greenish(truth[~ndimage.binary_dilation(shrunk, iterations=3)]).mean() < 0.05  # only box lines/labels
    assert (tmp_path / "grid.png").is_file()


def test_visualize_scores_a_prediction_folder_and_a_predictions_jsonl(cracks_record, tmp_path, capsys):
    root, info, mask, boxes = cracks_record
    shifted = np.roll(mask, 12, axis=0)
    mask_name = f"{info['file_name'].rsplit('.', 1)[0]}.segment_crack.png"
    files.write_mask(tmp_path / "pred" / mask_name, shifted)
    args = ["visualize", "--data", str(root / "data.jsonl"), "--json", "--panel-height", "320"]
    assert cli.main([*args, "--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "a")]) == 0
    result = json.loads(capsys.readouterr().out)
    (score,) = result["scores"]
    assert score["iou"] == pytest.approx(masks.iou(shifted, mask)) and score["valid"]
    assert score["box_miou"] is None  # a mask folder has no boxes to score
    with Image.open(result["canvases"][0]) as drawn:
        drawn = drawn.convert("RGB")
    geometry = panel_geometry(drawn, images.read_image(root / info["file_name"]), 320)
    prediction = panel(drawn, geometry, 2)
    assert orangeish(prediction[canvas._shrink_mask(shifted, (geometry[1], geometry[2]))]).mean() > 0.95

    objects = [tokens.SegObject(tokens.box_to_locs(b, info["width"], info["height"]), None, "crack") for b in boxes]
    prediction_record = {"image": info["file_name"], "prefix": "segment crack", "suffix": tokens.format_suffix(objects),
                         "mask": f"pred/{mask_name}"}  # fmt: skip
    (tmp_path / "predictions.jsonl").write_text(json.dumps(prediction_record) + "\n")
    assert cli.main([*args, "--pred", str(tmp_path / "predictions.jsonl"), "--out", str(tmp_path / "b")]) == 0
    (score,) = json.loads(capsys.readouterr().out)["scores"]
    assert score["iou"] == pytest.approx(masks.iou(shifted, mask))
    assert score["box_miou"] == 1.0 and score["n_pred"] == score["n_gt"] == len(boxes)  # same boxes as the GT

    without_mask = {k: v for k, v in prediction_record.items() if k != "mask"}
    (tmp_path / "boxes.jsonl").write_text(json.dumps(without_mask) + "\n")
    assert cli.main([*args, "--pred", str(tmp_path / "boxes.jsonl"), "--out", str(tmp_path / "e")]) == 0
    assert json.loads(capsys.readouterr().out)["scores"] == [None]  # drawn (boxes), but no mask to score

    (tmp_path / "other.jsonl").write_text(json.dumps(prediction_record | {"prefix": "segment wall"}) + "\n")
    assert cli.main([*args, "--pred", str(tmp_path / "other.jsonl"), "--out", str(tmp_path / "c")]) == 0
    (score,) = json.loads(capsys.readouterr().out)["scores"]
    assert score["iou"] == 0.0 and not score["valid"]  # no prediction for this record: invalid

    files.write_mask(tmp_path / "small" / mask_name, shifted[::2, ::2])
    assert cli.main([*args, "--pred", str(tmp_path / "small"), "--out", str(tmp_path / "d")]) == 1
    assert "data.jsonl:1: predicted mask is" in capsys.readouterr().err


def test_box_captions_carry_the_confidence_when_known():
    assert canvas.labelled(["crack", "crack", "crack"], [0.912, None]) == ["crack 0.91", "crack", "crack"]
    assert canvas.labelled(["", "crack"], [0.5, 0.25]) == ["0.50", "crack 0.25"]
