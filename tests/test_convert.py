"""`paliseg convert` on Roboflow COCO: real cracks/drywall subsets checked against pycocotools and the
big_vision loc formula, prompts and negatives, merged vs instance encoding, bad input, overwrite refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

import vae
from converters import synthetic
from converters.convert import ConvertConfig, convert
from converters.sources import ConversionError, IssueLog
from paliseg import dataset, images, tokens
from paliseg.cli import main as cli

CRACK = "NewCracks - v2 2024-05-18 10-54pm"


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory) -> Path:
    return vae.write_random_npz(tmp_path_factory.mktemp("vae") / "vae.npz", seed=0)


@pytest.fixture(scope="module")
def vae_model(vae_path):
    return vae.load(vae_path)


def coco_subset(source_split: Path, target_split: Path, image_ids: list[int]) -> Path:
    """A real split cut down to some images (copied) and their annotations, in the same layout."""
    data = json.loads((source_split / "_annotations.coco.json").read_text())
    data["images"] = [i for i in data["images"] if i["id"] in image_ids]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in image_ids]
    target_split.mkdir(parents=True)
    for image in data["images"]:
        shutil.copyfile(source_split / image["file_name"], target_split / image["file_name"])
    (target_split / "_annotations.coco.json").write_text(json.dumps(data))
    return target_split


def big_vision_locs(x1, y1, x2, y2, width, height) -> tuple[int, ...]:
    """Written out independently of paliseg.tokens: clip(round(v * 1023), 0, 1023), y first."""
    return tuple(int(np.clip(np.round(v * 1023), 0, 1023)) for v in (y1 / height, x1 / width, y2 / height, x2 / width))


def polygon_extent(segmentation, width, height):
    points = np.concatenate([np.reshape(p, (-1, 2)) for p in segmentation])
    x1, y1 = np.clip(points.min(0), 0, [width, height])
    x2, y2 = np.clip(points.max(0), 0, [width, height])
    return x1, y1, x2, y2


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_real_cracks_tokens_follow_polygons_and_masks_match_pycocotools(roboflow_dir, tmp_path, vae_path, vae_model):
    # Images 93 and 184 hold the split's 3 box-only annotations; 10 has the most polygons (7).
    source = coco_subset(roboflow_dir / "cracks" / "valid", tmp_path / "cracks" / "valid", [0, 10, 93, 184, 200])
    summary = convert(ConvertConfig([source], tmp_path / "out", vae=vae_path, label_map={CRACK: "crack"}))
    assert summary["warnings"] == {"box_only_annotation": 3} and summary["skipped"] == {}

    oracle = COCO(str(source / "_annotations.coco.json"))
    converted = dataset.read_records(tmp_path / "out", "valid")
    assert [r.extra["source_id"] for r in converted] == [0, 10, 93, 184, 200]
    for record in converted:
        assert record.prefix == f"segment {CRACK}"
        image = oracle.imgs[record.extra["source_id"]]
        w, h = image["width"], image["height"]
        annotations = oracle.imgToAnns[image["id"]]
        parsed = tokens.parse_suffix(record.suffix)
        assert parsed.invalid_count == 0 and len(parsed.objects) == len(annotations)

        expected_union = np.zeros((h, w), bool)
        expected = []
        for ann in annotations:
            if ann["segmentation"]:
                box = polygon_extent(ann["segmentation"], w, h)
                mask = oracle.annToMask(ann).astype(bool)
            else:  # box-only: the box (fill), as COCO's xywh
                x, y, bw, bh = ann["bbox"]
                box = (x, y, x + bw, y + bh)
                mask = np.zeros((h, w), bool)
                mask[int(y) : int(y + bh), int(x) : int(x + bw)] = True
            expected_union |= mask
            seg = vae.mask_to_tokens(vae_model, mask, box)
            expected.append((big_vision_locs(*box, w, h), seg, "crack"))
        # Deterministic reading order: top-to-bottom, then left-to-right.
        assert [(o.locs, o.seg, o.label) for o in parsed.objects] == sorted(expected)

        gt = images.read_mask(record.mask_path)
        assert gt.shape == (h, w)
        assert iou(gt, expected_union) >= 0.99


def test_real_drywall_boxes_fill_and_negatives(roboflow_dir, tmp_path, vae_path):
    # drywall train: image 380 has no annotation (a negative), 134 has five boxes.
    source = coco_subset(roboflow_dir / "drywall" / "train", tmp_path / "drywall" / "train", [1, 134, 380])
    summary = convert(
        ConvertConfig(
            [source],
            tmp_path / "out",
            vae=vae_path,
            box_masks="fill",
            prompt_map={"drywall-join": "segment taping area"},
            label_map={"drywall-join": "taping"},
        )
    )
    assert summary["splits"]["train"]["prompts"] == {"segment taping area": {"records": 3, "objects": 9, "empty": 1}}
    oracle = COCO(str(source / "_annotations.coco.json"))
    for record in dataset.read_records(tmp_path / "out", "train"):
        image = oracle.imgs[record.extra["source_id"]]
        boxes = [(x, y, x + w, y + h) for x, y, w, h in (a["bbox"] for a in oracle.imgToAnns[image["id"]])]
        parsed = tokens.parse_suffix(record.suffix)
        assert sorted(o.locs for o in parsed.objects) == sorted(big_vision_locs(*b, 640, 640) for b in boxes)
        assert all(o.label == "taping" for o in parsed.objects)
        expected = np.zeros((640, 640), bool)
        for x1, y1, x2, y2 in boxes:
            expected[int(y1) : int(y2), int(x1) : int(x2)] = True
        assert np.array_equal(images.read_mask(record.mask_path), expected)
        assert all(o["mask_from"] == "box_fill" for o in record.extra["objects"])
        if not boxes:
            assert record.suffix == "" and record.extra["source_id"] == 380
    # Images are hard links (same inode) when source and output share a file system.
    linked = dataset.read_records(tmp_path / "out", "train")[0]
    assert linked.image_path.samefile(source / linked.extra["source_image"])


def shapes_export(
    tmp_path: Path, n_train: int = 6, classes=("ellipse", "rectangle", "triangle"), objects_per_image=(2, 3)
) -> Path:
    root = tmp_path / "shapes"
    synthetic.write_synthetic_coco(
        root, n_train=n_train, n_valid=0, seed=3, config=synthetic.ShapesConfig(64, classes, objects_per_image)
    )
    shutil.rmtree(root / "valid")
    return root


def test_one_record_per_prompt_with_maps_and_negatives(tmp_path, vae_path):
    root = shapes_export(tmp_path)
    config = dict(
        vae=vae_path, prompt_map={"rectangle": "segment box", "tri*": "segment triangle"}, label_map={"rect*": "box"}
    )
    summary = convert(ConvertConfig([root], tmp_path / "out", **config))
    converted = dataset.read_records(tmp_path / "out", "train")
    data = json.loads((root / "train" / "_annotations.coco.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    prompts = {"ellipse": "segment ellipse", "rectangle": "segment box", "triangle": "segment triangle"}
    labels = {"ellipse": "ellipse", "rectangle": "box", "triangle": "triangle"}
    assert len(converted) == 6 * 3  # every image, every prompt
    for record in converted:
        wanted = [
            a
            for a in data["annotations"]
            if a["image_id"] == record.extra["source_id"] and prompts[names[a["category_id"]]] == record.prefix
        ]
        parsed = tokens.parse_suffix(record.suffix).objects
        assert len(parsed) == len(wanted)
        assert {o.label for o in parsed} <= {labels[names[a["category_id"]]] for a in wanted}
        assert images.read_mask(record.mask_path).any() == bool(wanted)
    negatives = sum(r.suffix == "" for r in converted)
    assert negatives > 0 and summary["splits"]["train"]["empty"] == negatives

    convert(ConvertConfig([root], tmp_path / "positives", negatives=False, **config))
    assert len(dataset.read_records(tmp_path / "positives", "train")) == len(converted) - negatives


def test_objects_are_sorted_and_merged_mode_encodes_the_union(tmp_path, vae_path, vae_model):
    root = shapes_export(tmp_path, classes=("ellipse",), objects_per_image=(3, 3))
    convert(ConvertConfig([root], tmp_path / "instance", vae=vae_path))
    convert(ConvertConfig([root], tmp_path / "merged", vae=vae_path, objects="merged"))
    differs = 0
    for inst, merged in zip(
        dataset.read_records(tmp_path / "instance", "train"), dataset.read_records(tmp_path / "merged", "train")
    ):
        objects = tokens.parse_suffix(inst.suffix).objects
        assert [o.locs for o in objects] == sorted(o.locs for o in objects)
        union = images.read_mask(merged.mask_path)
        assert np.array_equal(union, images.read_mask(inst.mask_path))
        for info, obj, merged_obj in zip(inst.extra["objects"], objects, tokens.parse_suffix(merged.suffix).objects):
            assert merged_obj.locs == obj.locs
            assert merged_obj.seg == vae.mask_to_tokens(vae_model, union, info["box"])
            differs += merged_obj.seg != obj.seg
    assert differs > 0  # with 3 shapes per image, some box crops include a neighbour


def test_two_exports_into_one_output_with_their_own_prompts(roboflow_dir, tmp_path, capsys, vae_path):
    cracks = coco_subset(roboflow_dir / "cracks" / "valid", tmp_path / "cracks" / "valid", [0, 1])
    drywall = coco_subset(roboflow_dir / "drywall" / "valid", tmp_path / "drywall" / "valid", [0, 1, 2])
    code, out, err = run_cli(
        capsys,
        "convert",
        cracks,
        drywall,
        "--out",
        tmp_path / "out",
        "--vae",
        vae_path,
        "--json",
        "--prompt-map",
        "NewCracks*=segment crack",
        "drywall-join=segment taping area",
        "--label-map",
        "NewCracks*=crack",
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["splits"]["valid"]["prompts"].keys() == {"segment crack", "segment taping area"}
    assert summary["splits"]["valid"]["records"] == 5  # no cross-export negatives
    converted = dataset.read_records(tmp_path / "out", "valid")
    assert {r.image.split("/")[2] for r in converted} == {"cracks", "drywall"}
    assert {r.prefix for r in converted if "/cracks/" in r.image} == {"segment crack"}
    assert json.loads((tmp_path / "out" / "conversion.json").read_text())["splits"] == summary["splits"]
    assert "| valid | segment crack | 2 |" in err  # the human table goes to stderr with --json


def test_bad_coco_input_is_skipped_and_counted_with_positions(tmp_path, vae_path):
    root = shapes_export(tmp_path, n_train=4, objects_per_image=(1, 1), classes=("rectangle",))
    split = root / "train"
    path = split / "_annotations.coco.json"
    data = json.loads(path.read_text())
    anns, images = data["annotations"], data["images"]
    anns[0]["category_id"] = 99  # unknown category
    anns[1]["category_id"] = 0  # Roboflow's placeholder
    anns[2]["segmentation"] = []  # box-only inside a polygon export -> box mask (warning)
    anns[3]["segmentation"] = [
        [p + (100 if i % 2 == 0 else 0) for i, p in enumerate(anns[3]["segmentation"][0])]
    ]  # outside
    extra = [
        {
            "segmentation": [[50.0, 10.0, 80.0, 10.0, 80.0, 30.0, 50.0, 30.0]],
            "bbox": [50, 10, 30, 20],
        },  # partly outside: clipped
        {"segmentation": [], "bbox": [10, 10, 0, 20]},  # zero-area box
        {"segmentation": [[1.0, 2.0, 3.0, 4.0]], "bbox": [1, 2, 2, 2]},  # a 2-point ring: dropped, box used
        {"segmentation": [], "bbox": [0, 0, 0.5, 1]},  # sub-pixel corner box, as in the real drywall export
    ]
    for offset, fields in enumerate(extra):
        anns.append({"id": 100 + offset, "image_id": 0, "category_id": 1, "area": 1, "iscrowd": 0, **fields})
    rle = {"size": [64, 64], "counts": [64 * 20 + 10, 30, 34, 30, 64 * 64 - (64 * 20 + 10) - 94]}
    anns.append(
        {"id": 200, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 1, "segmentation": rle}
    )
    anns.append(
        {"id": 201, "image_id": 77, "category_id": 1, "bbox": [0, 0, 1, 1], "segmentation": []}
    )  # unknown image
    images.append({"id": 4, "file_name": "missing.jpg", "width": 64, "height": 64})
    images.append({"id": 5, "file_name": "corrupt.jpg", "width": 64, "height": 64})
    (split / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG")
    images.append({"id": 6, "file_name": images[0]["file_name"], "width": 65, "height": 64})  # wrong size
    images.append({"id": 7, "file_name": images[1]["file_name"], "width": 64, "height": 64})  # listed twice
    path.write_text(json.dumps(data))

    log = IssueLog()
    summary = convert(ConvertConfig([root], tmp_path / "out", vae=vae_path), log)
    assert summary["skipped"] == {
        "unknown_category": 1,
        "placeholder_category": 1,
        "outside_image": 1,
        "zero_area": 1,
        "unknown_image": 1,
        "missing_image": 1,
        "corrupt_image": 1,
        "size_mismatch": 1,
        "duplicate_image": 1,
        "tiny_box": 1,
    }
    assert summary["warnings"] == {"box_only_annotation": 3, "clipped_to_image": 1, "bad_polygon_ring": 1}
    where = {i.reason: i.where for i in log.examples}
    assert where["unknown_category"] == f"{path}:annotations[0]"
    assert where["zero_area"] == f"{path}:annotations[5]"
    assert where["missing_image"] == f"{path}:images[4]"
    assert where["corrupt_image"] == f"{path}:images[5]"

    converted = {r.extra["source_id"]: r for r in dataset.read_records(tmp_path / "out", "train")}
    assert set(converted) == {0, 1, 2, 3}
    clipped = next(o for o in converted[0].extra["objects"] if o["annotation"].endswith("annotations[4]"))
    assert clipped["box"] == [50.0, 10.0, 64.0, 30.0]
    rle_object = next(o for o in converted[1].extra["objects"] if o["mask_from"] == "rle")
    assert rle_object["box"] == [20.0, 10.0, 22.0, 40.0]  # pixel extent of the decoded RLE (x2 = last + 1)

    with pytest.raises(ConversionError, match=r"annotations\[9\]: image_id 77 is not in 'images' \(--strict\)"):
        convert(ConvertConfig([root], tmp_path / "strict", vae=vae_path, strict=True))


def test_cli_refuses_to_overwrite_and_reports_bad_options(tmp_path, capsys, vae_path):
    root = shapes_export(tmp_path, n_train=2, objects_per_image=(1, 1))
    out = tmp_path / "out"
    assert run_cli(capsys, "convert", root, "--out", out, "--vae", vae_path)[0] == 0
    before = (out / "_annotations.train.jsonl").read_text()
    code, _, err = run_cli(capsys, "convert", root, "--out", out, "--vae", vae_path, "--objects", "merged")
    assert code == 1 and "--overwrite" in err and str(out) in err
    assert (out / "_annotations.train.jsonl").read_text() == before
    assert (
        run_cli(capsys, "convert", root, "--out", out, "--vae", vae_path, "--objects", "merged", "--overwrite")[0] == 0
    )

    code, _, err = run_cli(
        capsys, "convert", root, "--out", tmp_path / "o2", "--vae", vae_path, "--prompt-map", "crackz=segment crack"
    )
    assert code == 1 and "'crackz' matches no class" in err
    code, _, err = run_cli(capsys, "convert", root, "--out", tmp_path / "o5", "--vae", vae_path, "--splits", "valid")
    assert code == 1 and "--splits valid: not in the sources (found: train)" in err
    code, _, err = run_cli(capsys, "convert", tmp_path / "nothing_here", "--out", tmp_path / "o3", "--vae", vae_path)
    assert code == 1 and "nothing_here" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "convert", tmp_path / "empty", "--out", tmp_path / "o4", "--vae", vae_path)
    assert code == 1 and "no Roboflow export found" in err
