"""Photos as phones take them: EXIF orientation and every image kind through the one reader
(`paliseg.images`), `paliseg convert` (COCO files of the stored or the displayed frame), `paliseg score`,
the canvases and `paliseg predict`. Every image is made here."""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

import vae
from converters import geometry
from converters.convert import ConvertConfig, convert
from converters.sources import IssueLog, SourceImage, SourceObject
from metrics import canvas
from paliseg import files, images, records, tokens
from paliseg.cli import main as cli

ORIENTATIONS = range(1, 9)


def picture(width: int, height: int) -> np.ndarray:
    """An RGB picture no turn or mirror leaves unchanged: smooth gradients (JPEG keeps them) in each channel."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack(
        [xs * 255 // (width - 1), ys * 255 // (height - 1), (xs + 2 * ys) * 255 // (width + 2 * height)], -1
    ).astype(np.uint8)


def save_tagged(path: Path, image: Image.Image, orientation: int, **options) -> Path:
    """Save with an EXIF orientation tag, the way a phone stores a photo taken sideways."""
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, exif=exif, **options)
    return path


def exif_transposed(path: Path, mode: str) -> np.ndarray:
    """What PIL's own exif_transpose shows: the reference every check of the frame compares with."""
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert(mode))


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory) -> Path:
    return vae.write_random_npz(tmp_path_factory.mktemp("vae") / "vae.npz", seed=0)


# --- the reader ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_reader_shows_every_orientation_as_exif_transpose_does(tmp_path, orientation):
    path = save_tagged(tmp_path / "photo.jpg", Image.fromarray(picture(40, 24)), orientation, quality=95)
    header = images.read_header(path)
    assert header.stored_size == (40, 24) and header.orientation == orientation
    assert header.displayed_size == ((24, 40) if orientation >= 5 else (40, 24))
    read = images.read_image(path)
    assert read.mode == "RGB" and read.size == header.displayed_size
    np.testing.assert_array_equal(np.asarray(read), exif_transposed(path, "RGB"))
    # A PIL image handed over directly is turned the same way; one already turned is not turned twice.
    with Image.open(path) as opened:
        np.testing.assert_array_equal(np.asarray(images.as_displayed_rgb(opened)), np.asarray(read))
    np.testing.assert_array_equal(np.asarray(images.as_displayed_rgb(read)), np.asarray(read))

    mask = np.zeros((24, 40), bool)
    mask[2:9, 3:30] = True
    mask[9:20, 3:12] = True
    mask_path = save_tagged(
        tmp_path / "mask.png", Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)), orientation
    )
    np.testing.assert_array_equal(images.read_mask(mask_path), exif_transposed(mask_path, "L") > 127)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_geometry_turns_points_boxes_and_masks_as_exif_transpose_turns_pixels(tmp_path, orientation):
    width, height = 40, 24
    ring = (4, 3, 30, 3, 30, 10, 14, 10, 14, 20, 4, 20)  # an L: rasterised the same in every frame
    stored = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([list(ring)], height, width))).astype(bool)
    rendered = save_tagged(tmp_path / "m.png", Image.fromarray(np.where(stored, 255, 0).astype(np.uint8)), orientation)
    expected = exif_transposed(rendered, "L") > 127
    np.testing.assert_array_equal(geometry.displayed_mask(stored, orientation), expected)

    shown_w, shown_h = images.displayed_size((width, height), orientation)
    turned = [
        c for x, y in zip(ring[::2], ring[1::2]) for c in geometry.displayed_point(x, y, orientation, width, height)
    ]
    drawn = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([turned], shown_h, shown_w))).astype(bool)
    np.testing.assert_array_equal(drawn, expected)
    box = (2.3, 1.6, 17.5, 11.2)  # a box mask (pixel centres inside) turns with its box
    np.testing.assert_array_equal(
        geometry.box_mask(geometry.displayed_box(box, orientation, width, height), shown_w, shown_h),
        geometry.displayed_mask(geometry.box_mask(box, width, height), orientation),
    )

    log = IssueLog()
    polygon = geometry.polygon_object("crack", [ring], width, height, "a:1", log)
    boxed = SourceObject("crack", box, None, "a:2")
    moved = geometry.to_displayed_frame(
        SourceImage(rendered, "m.png", width, height, [polygon, boxed], "a"), orientation
    )
    assert (moved.width, moved.height) == (shown_w, shown_h)
    np.testing.assert_array_equal(geometry.object_mask(moved.objects[0], shown_w, shown_h), expected)
    ys, xs = np.nonzero(expected)
    assert moved.objects[0].box_xyxy == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # the L's extent
    assert geometry.shape_origin(moved.objects[0].shape) == "polygon"
    assert moved.objects[1].shape is None and moved.objects[1].box_xyxy == geometry.displayed_box(
        box, orientation, width, height
    )


def test_image_kinds_become_8_bit_rgb(tmp_path):
    rgb = picture(16, 12)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as cmyk:
        assert cmyk.mode == "CMYK"
        np.testing.assert_array_equal(
            np.asarray(images.read_image(tmp_path / "cmyk.jpg")), np.asarray(cmyk.convert("RGB"))
        )

    palette = Image.new("P", (4, 2))
    palette.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * 759)
    palette.putdata([0, 1, 2, 0, 1, 2, 0, 1])
    palette.save(tmp_path / "palette.png", transparency=1)  # blue is the transparent colour
    read = np.asarray(images.read_image(tmp_path / "palette.png"))
    assert read[0, :3].tolist() == [[255, 0, 0], [255, 255, 255], [0, 255, 0]]  # transparent -> white
    palette.save(tmp_path / "opaque_palette.png")
    assert np.asarray(images.read_image(tmp_path / "opaque_palette.png"))[0, 1].tolist() == [0, 0, 255]

    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (0, 0, 0)  # black under the transparency, as many tools store it
    rgba[..., 3] = [[0, 128, 255], [255, 0, 0]]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    read = np.asarray(images.read_image(tmp_path / "rgba.png")).astype(int)
    assert read[0, 0].tolist() == [255, 255, 255] and read[0, 2].tolist() == [0, 0, 0]
    assert abs(read[0, 1] - 127).max() <= 1  # half transparent black over white: mid grey

    grey16 = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5957  # 0 .. 65527: all above 255
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as opened:
        assert opened.mode == "I;16"
    read = np.asarray(images.read_image(tmp_path / "grey16.png"))
    np.testing.assert_array_equal(read[..., 0], np.rint(grey16 / 257).astype(np.uint8))  # scaled, not clipped
    assert (read[..., 0] == read[..., 2]).all() and len(np.unique(read)) == 12
    big_endian = Image.frombytes("I;16B", (4, 3), grey16.astype(">u2").tobytes())
    np.testing.assert_array_equal(np.asarray(images.as_displayed_rgb(big_endian))[..., 1], read[..., 1])
    as_int = Image.fromarray(grey16.astype(np.int32), "I")
    np.testing.assert_array_equal(np.asarray(images.as_displayed_rgb(as_int))[..., 1], read[..., 1])

    grey = rgb[..., 0]
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    np.testing.assert_array_equal(np.asarray(images.read_image(tmp_path / "grey.png")), np.stack([grey] * 3, -1))
    assert np.asarray(images.read_image(tmp_path / "grey.png", "L")).shape == (12, 16)
    Image.fromarray(grey > 128).save(tmp_path / "bilevel.png")
    np.testing.assert_array_equal(
        np.asarray(images.read_image(tmp_path / "bilevel.png"))[..., 0], np.where(grey > 128, 255, 0)
    )
    Image.fromarray(np.stack([grey, np.zeros_like(grey)], -1), "LA").save(tmp_path / "la.png")
    assert (np.asarray(images.read_image(tmp_path / "la.png")) == 255).all()  # all transparent: white


def test_masks_read_transparent_pixels_as_background(tmp_path):
    rgba = np.full((4, 4, 4), 255, np.uint8)  # white everywhere, painted only where opaque
    rgba[..., 3] = 0
    rgba[1:3, 1:3, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "mask.png")
    expected = np.zeros((4, 4), bool)
    expected[1:3, 1:3] = True
    np.testing.assert_array_equal(images.read_mask(tmp_path / "mask.png"), expected)
    Image.fromarray((expected * 65535).astype(np.uint16)).save(tmp_path / "mask16.png")
    np.testing.assert_array_equal(images.read_mask(tmp_path / "mask16.png"), expected)


def test_unreadable_files_are_named_with_the_reason(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)  # mostly pixel data, little header
    save_tagged(tmp_path / "whole.jpg", Image.fromarray(noise), 6, quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) * 3 // 4])
    (tmp_path / "notes.png").write_text("not an image at all")
    for name, reason in (
        ("truncated.jpg", "truncated"),
        ("notes.png", "cannot identify"),
        ("missing.png", "file not found"),
    ):
        path = tmp_path / name
        for read in (images.read_image, images.read_mask, lambda p: images.read_header(p, decode=True)):
            with pytest.raises(images.ImageReadError, match=reason) as caught:
                read(path)
            assert str(caught.value).startswith(f"{path}: cannot read image: ") and isinstance(caught.value, ValueError)
    assert images.read_header(tmp_path / "truncated.jpg").displayed_size == (48, 64)  # the header alone is intact


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims `width` x `height` and holds no pixels: a decompression bomb's calling card."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IEND", b"")
    )
    return path


def test_decompression_limit_is_clear_and_configurable(tmp_path, monkeypatch):
    bomb = png_header_only(tmp_path / "bomb.png", 30_000, 30_000)  # 900M pixels, 10x the default
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # never PIL's DecompressionBombWarning
        with pytest.raises(
            images.ImageReadError, match=r"30000x30000 is 900,000,000 pixels, over the limit of 89,478,485"
        ):
            images.read_header(bomb)
    small = tmp_path / "small.png"
    Image.fromarray(picture(20, 15)).save(small)
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "299")
    with pytest.raises(
        images.ImageReadError,
        match=f"{small}: cannot read image: 20x15 is 300 pixels, over the limit of 299 .*--max-image-pixels N` or PALISEG_MAX_IMAGE_PIXELS=N",
    ):
        images.read_image(small)
    with images.pixel_limit(300):
        assert images.read_image(small).size == (20, 15)
    assert images.max_image_pixels() == 299
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match="PALISEG_MAX_IMAGE_PIXELS must be a positive number of pixels, got 'lots'"):
        images.max_image_pixels()


# --- the stages -----------------------------------------------------------------------------------------


def test_score_and_canvas_read_masks_and_photos_in_the_displayed_frame(tmp_path, capsys):
    truth = np.zeros((40, 24), bool)  # displayed frame: 24 wide, 40 high
    truth[5:30, 4:12] = True
    stored = np.rot90(truth, 1)  # orientation 6 shows the stored pixels turned 90 degrees clockwise
    save_tagged(tmp_path / "gt" / "a.segment_crack.png", Image.fromarray(np.where(stored, 255, 0).astype(np.uint8)), 6)
    files.write_mask(tmp_path / "pred" / "a.segment_crack.png", truth)  # a predicted mask: untagged, displayed frame
    argv = ["score", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred"), "--prompt-from-name", "--json"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["overall"]["miou"] == 1.0
    assert cli.main(["--max-image-pixels", "100", *argv]) == 1
    assert (
        "a.segment_crack.png: cannot read image: 40x24 is 960 pixels, over the limit of 100" in capsys.readouterr().err
    )
    assert images.max_image_pixels() == images.DEFAULT_MAX_IMAGE_PIXELS  # the option lasts one command

    shown = np.zeros((40, 24, 3), np.uint8)
    shown[:20] = (230, 20, 20)  # red on top, blue below, as the photo is viewed
    shown[20:] = (20, 20, 230)
    save_tagged(tmp_path / "photo.jpg", Image.fromarray(np.ascontiguousarray(np.rot90(shown, 1))), 6, quality=95)
    files.write_mask(tmp_path / "masks" / "photo.png", truth)
    suffix = tokens.format_suffix([tokens.SegObject(tokens.box_to_locs((4, 5, 12, 30), 24, 40), None, "crack")])
    record = records.Record(
        "photo.jpg", "segment crack", suffix, "masks/photo.png", source=tmp_path / "data.jsonl", line=1
    )
    drawn, score = canvas.canvas_for_record(record, canvas.CanvasPrediction(mask=truth, suffix=suffix), panel_height=80)
    assert score.iou == 1.0 and score.box_miou == 1.0
    original = np.asarray(drawn)[:, :20].astype(int)  # the first panel is 40 wide (24x40 at height 80)
    red = np.nonzero((original[..., 0] > 180) & (original[..., 2] < 80))[0]
    blue = np.nonzero((original[..., 2] > 180) & (original[..., 0] < 80))[0]
    assert len(red) and len(blue) and red.max() < blue.min()  # upright: red above blue


def coco_export(root: Path) -> Path:
    """Three copies of one sideways photo (stored 40x24, orientation 6: shown 24x40) whose COCO entries
    describe the displayed frame, the stored frame, and neither; the same L-shaped crack and box in each."""
    split = root / "train"
    split.mkdir(parents=True)
    width, height = 40, 24
    ring = [4, 3, 30, 3, 30, 10, 14, 10, 14, 20, 4, 20]
    box = [22, 13, 12, 8]  # x, y, w, h
    shown_ring = [c for x, y in zip(ring[::2], ring[1::2]) for c in geometry.displayed_point(x, y, 6, width, height)]
    x1, y1, x2, y2 = geometry.displayed_box((22, 13, 34, 21), 6, width, height)
    shown_box = [x1, y1, x2 - x1, y2 - y1]
    entries = [("shown.jpg", height, width, shown_ring, shown_box), ("stored.jpg", width, height, ring, box),
               ("neither.jpg", 50, 50, ring, box)]  # fmt: skip
    data = {"categories": [{"id": 1, "name": "crack", "supercategory": "none"}, {"id": 2, "name": "wall", "supercategory": "x"}],
            "images": [], "annotations": []}  # fmt: skip
    for index, (name, w, h, polygon, bbox) in enumerate(entries):
        save_tagged(split / name, Image.fromarray(picture(width, height)), 6, quality=95)
        data["images"].append({"id": index, "file_name": name, "width": w, "height": h})
        data["annotations"].append(
            {"id": 2 * index, "image_id": index, "category_id": 2, "segmentation": [polygon], "bbox": [0, 0, 1, 1]}
        )
        data["annotations"].append(
            {"id": 2 * index + 1, "image_id": index, "category_id": 2, "segmentation": [], "bbox": bbox}
        )
    (split / "_annotations.coco.json").write_text(json.dumps(data))
    return root


def test_convert_brings_coco_annotations_of_either_frame_to_the_displayed_frame(tmp_path, vae_path):
    export = coco_export(tmp_path / "export")
    summary = convert(ConvertConfig([export], tmp_path / "out", vae=vae_path, box_masks="fill"))
    assert summary["skipped"] == {"size_mismatch": 1}
    assert summary["warnings"] == {"box_only_annotation": 3, "stored_frame_annotations": 1}
    skipped = next(e for e in summary["examples"] if e["reason"] == "size_mismatch")
    assert skipped["where"].endswith("_annotations.coco.json:images[2]")
    assert "neither.jpg is 24x40 (40x24 as stored, EXIF orientation 6), the annotation says 50x50" in skipped["message"]

    converted = {
        r.extra["source_image"]: r for r in records.read_records(records.annotations_path(tmp_path / "out", "train"))
    }
    shown, stored = converted["shown.jpg"], converted["stored.jpg"]
    assert (stored.extra["width"], stored.extra["height"]) == (shown.extra["width"], shown.extra["height"]) == (24, 40)
    assert stored.suffix == shown.suffix and len(tokens.parse_suffix(stored.suffix).objects) == 2
    assert [o["mask_from"] for o in stored.extra["objects"]] == [o["mask_from"] for o in shown.extra["objects"]]
    mask = images.read_mask(stored.mask_path)
    np.testing.assert_array_equal(mask, images.read_mask(shown.mask_path))
    assert mask.shape == images.read_image(stored.image_path).size[::-1] == (40, 24)
    # Every object's box (loc tokens) holds its part of the mask, and the mask holds nothing else.
    inside = np.zeros_like(mask)
    for obj in tokens.parse_suffix(stored.suffix).objects:
        x1, y1, x2, y2 = tokens.locs_to_box(obj.locs, 24, 40)
        inside[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))] = True
    assert mask.any() and not (mask & ~inside).any()
    assert cli.main(["validate", str(tmp_path / "out")]) == 0


def test_mask_folders_and_yolo_labels_are_read_in_the_displayed_frame(tmp_path, vae_path):
    shown = np.zeros((40, 24), bool)  # the photo below is shown 24 wide, 40 high
    shown[5:30, 4:12] = True
    save_tagged(tmp_path / "masks" / "train" / "a.jpg", Image.fromarray(picture(40, 24)), 6, quality=95)
    files.write_mask(tmp_path / "masks" / "train" / "a_mask.png", shown)
    yolo = tmp_path / "yolo"
    save_tagged(yolo / "train" / "images" / "a.jpg", Image.fromarray(picture(40, 24)), 6, quality=95)
    (yolo / "train" / "labels").mkdir()
    (yolo / "train" / "labels" / "a.txt").write_text(
        f"0 {8 / 24} {17.5 / 40} {8 / 24} {25 / 40}\n"
    )  # box (4, 5, 12, 30)
    (yolo / "data.yaml").write_text("names: [crack]\n")
    for export in ("masks", "yolo"):
        summary = convert(
            ConvertConfig([tmp_path / export], tmp_path / f"out-{export}", vae=vae_path, box_masks="fill")
        )
        assert summary["skipped"] == {}
        (record,) = records.read_records(records.annotations_path(tmp_path / f"out-{export}", "train"))
        np.testing.assert_array_equal(images.read_mask(record.mask_path), shown)
        (obj,) = tokens.parse_suffix(record.suffix).objects
        np.testing.assert_allclose(tokens.locs_to_box(obj.locs, 24, 40), (4, 5, 12, 30), atol=0.05)


@pytest.mark.slow
def test_predict_writes_masks_of_the_displayed_size(tmp_path, vae_path, capsys):
    import jax

    from infer.predictor import Predictor
    from paliseg import checkpoints, model
    from paliseg import config as model_configs

    config = model_configs.preset("tiny")
    checkpoint = checkpoints.save(tmp_path / "tiny", model.init_params(config, jax.random.key(0)), config)
    photo = save_tagged(tmp_path / "photos" / "wall.jpg", Image.fromarray(picture(90, 60)), 6, quality=95)
    out = tmp_path / "pred"
    argv = ["predict", "--checkpoint", str(checkpoint), "--image", str(tmp_path / "photos"), "--prompt", "segment crack",
            "--out", str(out), "--vae", str(vae_path), "--max-new-tokens", "8", "--batch-size", "1", "--json"]  # fmt: skip
    assert cli.main(argv) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    with Image.open(out / result["mask"]) as written:
        assert written.size == (60, 90)  # every viewer shows the photo 60 wide, 90 high
    with Image.open(out / "canvases" / "wall.segment_crack.png") as drawn:
        assert drawn.height > drawn.width / 3  # three upright panels side by side, not three sideways ones
    predictor = Predictor.from_checkpoint(checkpoint, vae_model=vae.load(vae_path), max_new_tokens=8, batch_size=1)
    with Image.open(photo) as opened:  # a PIL image given directly is turned too
        (prediction,) = predictor.predict(opened, "segment crack")
    assert (prediction.width, prediction.height) == (60, 90)
