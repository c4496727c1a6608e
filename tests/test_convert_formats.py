"""The YOLO, PaliGemma JSONL and mask-folder readers agree with the COCO reader on the same annotations
(written by converters.layouts from a synthetic COCO export), and count their own kinds of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from scipy import ndimage

import vae
from converters import layouts, synthetic
from converters.convert import ConvertConfig, convert
from converters.detect import read_export
from converters.sources import ConversionError, IssueLog
from paliseg import images, records, tokens

CLASSES = ("ellipse", "rectangle", "triangle")  # shapes that rasterise to one connected component


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory) -> Path:
    return vae.write_random_npz(tmp_path_factory.mktemp("vae") / "vae.npz", seed=0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("exports") / "shapes"
    synthetic.write_synthetic_coco(
        root, n_train=5, n_valid=3, seed=7, config=synthetic.ShapesConfig(64, CLASSES, (1, 3))
    )
    return root


@pytest.fixture(scope="module")
def coco_records(shapes, vae_path, tmp_path_factory) -> dict[str, list[records.Record]]:
    out = tmp_path_factory.mktemp("coco") / "out"
    convert(ConvertConfig([shapes], out, vae=vae_path))
    return {s: records.read_records(records.annotations_path(out, s)) for s in ("train", "valid")}


def convert_to_records(
    source: Path, out: Path, vae_path: Path, **options
) -> tuple[dict, dict[str, list[records.Record]]]:
    log = IssueLog()
    summary = convert(ConvertConfig([source], out, vae=vae_path, **options), log)
    summary["log"] = log
    return summary, {s: records.read_records(records.annotations_path(out, s)) for s in summary["splits"]}


def by_image_and_prompt(converted: list[records.Record]) -> dict:
    return {(Path(r.extra["source_image"]).stem, r.prefix): r for r in converted}


def locs_of(record: records.Record) -> list[tuple[int, ...]]:
    return [o.locs for o in tokens.parse_suffix(record.suffix).objects]


def test_every_layout_is_detected(shapes, tmp_path):
    exports = {
        "coco": shapes,
        "yolo": layouts.write_yolo(shapes, tmp_path / "yolo"),
        "paligemma": layouts.write_paligemma_jsonl(shapes, tmp_path / "pg"),
        "masks": layouts.write_mask_folder(shapes, tmp_path / "masks"),
    }
    for fmt, path in exports.items():
        splits = read_export(path)
        assert [(s.split, s.format, s.count) for s in splits] == [("train", fmt, 5), ("valid", fmt, 3)]
    assert read_export(exports["coco"] / "valid")[0].split == "valid"  # one split folder
    with pytest.raises(ConversionError, match="no coco export found"):
        read_export(exports["yolo"], fmt="coco")


def test_yolo_polygons_and_boxes_match_coco(shapes, coco_records, tmp_path, vae_path):
    summary, polygons = convert_to_records(layouts.write_yolo(shapes, tmp_path / "yolo"), tmp_path / "o1", vae_path)
    assert summary["skipped"] == {} and summary["warnings"] == {}
    for split, reference in coco_records.items():
        expected, got = by_image_and_prompt(reference), by_image_and_prompt(polygons[split])
        assert expected.keys() == got.keys()
        for key, record in got.items():
            # 6-decimal normalised coordinates: at most one loc bin of rounding away from COCO's.
            assert np.abs(np.subtract(locs_of(record), locs_of(expected[key]))).max(initial=0) <= 1
            # Masks differ only where the outline passes within a hair of a pixel centre.
            a, b = images.read_mask(record.mask_path), images.read_mask(expected[key].mask_path)
            edge = ndimage.binary_dilation(b) & ~ndimage.binary_erosion(b)
            assert not np.any((a ^ b) & ~edge)

    _, boxes = convert_to_records(
        layouts.write_yolo(shapes, tmp_path / "yolo_boxes", boxes=True), tmp_path / "o2", vae_path
    )
    oracle = COCO(str(shapes / "train" / "_annotations.coco.json"))
    for record in boxes["train"]:
        assert all(o["mask_from"] == "box_fill" for o in record.extra["objects"])
        image = next(i for i in oracle.imgs.values() if i["file_name"] == record.extra["source_image"])
        annotations = [
            a
            for a in oracle.imgToAnns[image["id"]]
            if f"segment {oracle.cats[a['category_id']]['name']}" == record.prefix
        ]
        want = sorted(
            tokens.box_to_locs((x, y, x + w, y + h), 64, 64) for x, y, w, h in (a["bbox"] for a in annotations)
        )
        got = locs_of(record)
        assert len(got) == len(want) and np.abs(np.subtract(got, want)).max(initial=0) <= 1


def test_paligemma_jsonl_boxes_round_trip_exactly(shapes, tmp_path, vae_path):
    export = layouts.write_paligemma_jsonl(shapes, tmp_path / "pg")
    summary, converted = convert_to_records(export, tmp_path / "out", vae_path)
    assert summary["skipped"] == {} and summary["sources"][str(export)]["train"]["classes"] == list(CLASSES)
    for split in ("train", "valid"):
        source = {}
        for line in (export / "dataset" / f"_annotations.{split}.jsonl").read_text().splitlines():
            data = json.loads(line)
            for obj in tokens.parse_suffix(data["suffix"], require_seg=False).objects:
                source.setdefault((Path(data["image"]).stem, f"segment {obj.label}"), []).append(obj.locs)
        for key, record in by_image_and_prompt(converted[split]).items():
            assert locs_of(record) == sorted(source.get(key, []))  # /1023 then round(* 1023) is the identity


@pytest.mark.parametrize("layout", layouts.MASK_LAYOUTS)
def test_mask_folders_give_components_with_exact_union(shapes, coco_records, tmp_path, vae_path, layout):
    export = layouts.write_mask_folder(shapes, tmp_path / "masks", layout=layout)
    summary, converted = convert_to_records(export, tmp_path / "out", vae_path, mask_class="shape")
    assert summary["skipped"] == {} and set(summary["splits"]) == {"train", "valid"}
    for split, reference in coco_records.items():
        unions = {}
        for record in reference:
            unions.setdefault(record.extra["source_image"], []).append(record)
        for record in converted[split]:
            assert record.prefix == "segment shape"
            expected = [images.read_mask(r.mask_path) for r in unions[record.extra["source_image"]]]
            assert np.array_equal(images.read_mask(record.mask_path), np.logical_or.reduce(expected))
            # one object per drawn shape, boxed by its pixel extent
            assert len(record.extra["objects"]) == sum(
                len(r.extra["objects"]) for r in unions[record.extra["source_image"]]
            )
            for obj in record.extra["objects"]:
                assert obj["mask_from"] == "mask"


def test_real_cracks_train_masks_folder(roboflow_dir, tmp_path, vae_path):
    summary, converted = convert_to_records(
        roboflow_dir / "cracks",
        tmp_path / "out",
        vae_path,
        splits=["train"],
        limit=4,
        prompt_map={"NewCracks*": "segment crack"},
    )
    assert summary["sources"][str(roboflow_dir / "cracks")]["train"]["format"] == "masks"
    assert [r.prefix for r in converted["train"]] == ["segment crack"] * 4  # the class of the COCO valid/test splits
    for record in converted["train"]:
        source = roboflow_dir / "cracks" / "train_masks" / f"{Path(record.extra['source_image']).stem}_mask.png"
        with Image.open(source) as mask:
            assert np.array_equal(images.read_mask(record.mask_path), np.asarray(mask) > 127)
        assert tokens.parse_suffix(record.suffix).invalid_count == 0


def test_bad_yolo_jsonl_and_mask_input_is_counted_with_positions(shapes, tmp_path, vae_path):
    yolo = layouts.write_yolo(shapes, tmp_path / "yolo")
    label = sorted((yolo / "train" / "labels").iterdir())[0]
    label.write_text(label.read_text() + "0 0.5 0.5\n7 0.5 0.5 0.2 0.2\nzero 0.1 0.1 0.1 0.1\n0 0.5 0.5 0 0.3\n")
    (yolo / "train" / "labels" / "train_00001.txt").unlink()  # an image without labels: a negative
    (yolo / "valid" / "images" / "broken.jpg").write_bytes(b"not an image")
    log = IssueLog()
    summary = convert(ConvertConfig([yolo], tmp_path / "o1", vae=vae_path), log)
    n = len(label.read_text().splitlines())
    assert summary["skipped"] == {"malformed_line": 2, "unknown_category": 1, "zero_area": 1, "corrupt_image": 1}
    assert {i.where for i in log.examples if i.reason != "corrupt_image"} == {
        f"{label}:{n - 3}",
        f"{label}:{n - 2}",
        f"{label}:{n - 1}",
        f"{label}:{n}",
    }
    assert summary["splits"]["train"]["images"] == 5

    pg = layouts.write_paligemma_jsonl(shapes, tmp_path / "pg")
    jsonl = pg / "dataset" / "_annotations.valid.jsonl"
    lines = jsonl.read_text().splitlines()
    lines[1] = lines[1][:-5]  # cut: not JSON
    lines.append(json.dumps({"image": "nowhere.jpg", "prefix": "detect ellipse", "suffix": ""}))
    lines.append(
        json.dumps(
            {"image": json.loads(lines[0])["image"], "prefix": "detect ellipse", "suffix": "<loc0001><loc0002> ellipse"}
        )
    )
    jsonl.write_text("\n".join(lines) + "\n")
    log = IssueLog()
    summary = convert(ConvertConfig([pg], tmp_path / "o2", vae=vae_path), log)
    assert summary["skipped"] == {"malformed_line": 1, "missing_image": 1, "malformed_suffix": 1}
    assert {i.reason: i.where for i in log.examples} == {
        "malformed_line": f"{jsonl}:2",
        "missing_image": f"{jsonl}:4",
        "malformed_suffix": f"{jsonl}:5",
    }

    masks = layouts.write_mask_folder(shapes, tmp_path / "masks")
    sorted((masks / "train_masks").iterdir())[0].unlink()
    Image.new("L", (10, 10)).save(sorted((masks / "valid_masks").iterdir())[0])
    summary = convert(ConvertConfig([masks], tmp_path / "o3", vae=vae_path))
    assert summary["skipped"] == {"missing_mask": 1, "size_mismatch": 1}

    with pytest.raises(
        ConversionError, match=r"train_00000.jpg: no mask train_00000_mask.png in \S*train_masks \(--strict\)"
    ):
        convert(ConvertConfig([masks], tmp_path / "o4", vae=vae_path, strict=True))
