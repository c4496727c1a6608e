"""Re-write a Roboflow COCO export in Roboflow's other layouts: YOLO, PaliGemma JSONL, mask folders.

The same annotations in every format let tests and benchmarks check that every reader agrees with the COCO
one (e.g. on `converters.synthetic` data or a slice of a real export), without shipping more data. Each
writer follows the layout described in the readers' docstrings; images are copied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from converters import coco
from paliseg import records, tokens

MASK_LAYOUTS = ("sibling", "beside", "subfolders")


def _coco_splits(coco_root: Path) -> dict[str, dict]:
    """{split: COCO dict} of the splits of a COCO export, real classes only (the placeholder dropped)."""
    splits = {}
    for folder in sorted(p for p in Path(coco_root).iterdir() if (p / records.COCO_ANNOTATIONS_FILE).is_file()):
        data = coco.load_json(folder / records.COCO_ANNOTATIONS_FILE)
        placeholders = coco.placeholder_ids(data["categories"])
        data["categories"] = sorted(
            (c for c in data["categories"] if c["id"] not in placeholders), key=lambda c: c["id"]
        )
        splits[folder.name] = data
    if not splits:
        raise FileNotFoundError(f"{coco_root}: no <split>/{records.COCO_ANNOTATIONS_FILE}")
    return splits


def _annotations_by_image(data: dict) -> dict:
    by_image: dict = {image["id"]: [] for image in data["images"]}
    for annotation in data["annotations"]:
        by_image[annotation["image_id"]].append(annotation)
    return by_image


def write_yolo(coco_root: str | Path, out: str | Path, boxes: bool = False) -> Path:
    """`data.yaml` + `<split>/images` + `<split>/labels`: polygons (or boxes when `boxes`), normalised."""
    coco_root, out = Path(coco_root), Path(out)
    splits = _coco_splits(coco_root)
    names = [c["name"] for c in next(iter(splits.values()))["categories"]]
    out.mkdir(parents=True, exist_ok=True)
    yaml_lines = [f"{s}: ../{s}/images" for s in splits] + [f"nc: {len(names)}", f"names: {json.dumps(names)}"]
    (out / "data.yaml").write_text("\n".join(yaml_lines) + "\n")
    for split, data in splits.items():
        index_of = {c["id"]: i for i, c in enumerate(data["categories"])}
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        (out / split / "labels").mkdir(parents=True, exist_ok=True)
        by_image = _annotations_by_image(data)
        for image in data["images"]:
            shutil.copyfile(coco_root / split / image["file_name"], out / split / "images" / image["file_name"])
            w, h = image["width"], image["height"]
            rows = []
            for ann in by_image[image["id"]]:
                if boxes or not ann["segmentation"]:
                    x, y, bw, bh = ann["bbox"]
                    values = [(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]
                else:
                    values = [v / (w if i % 2 == 0 else h) for i, v in enumerate(ann["segmentation"][0])]
                rows.append(" ".join([str(index_of[ann["category_id"]])] + [f"{v:.6f}" for v in values]))
            label = out / split / "labels" / f"{Path(image['file_name']).stem}.txt"
            label.write_text("".join(r + "\n" for r in rows))
    return out


def write_paligemma_jsonl(coco_root: str | Path, out: str | Path) -> Path:
    """`dataset/` with every image and `_annotations.<split>.jsonl` (detect prefix, boxes as loc tokens)."""
    coco_root, out = Path(coco_root), Path(out)
    folder = out / "dataset"
    folder.mkdir(parents=True, exist_ok=True)
    for split, data in _coco_splits(coco_root).items():
        names = {c["id"]: c["name"] for c in data["categories"]}
        by_image = _annotations_by_image(data)
        lines = []
        for image in data["images"]:
            shutil.copyfile(coco_root / split / image["file_name"], folder / image["file_name"])
            objects = []
            for ann in by_image[image["id"]]:
                x, y, bw, bh = ann["bbox"]
                locs = tokens.box_to_locs((x, y, x + bw, y + bh), image["width"], image["height"])
                objects.append(tokens.SegObject(locs, None, names[ann["category_id"]]))
            prefix = "detect " + " ; ".join(names.values())
            lines.append(
                json.dumps({"image": image["file_name"], "prefix": prefix, "suffix": tokens.format_suffix(objects)})
            )
        records.annotations_path(folder, split).write_text("".join(line + "\n" for line in lines))
    return out


def write_mask_folder(coco_root: str | Path, out: str | Path, layout: str = "sibling") -> Path:
    """Union masks `<stem>_mask.png` (0/255) rasterised by pycocotools, in one of `MASK_LAYOUTS`:
    sibling (`<split>/` + `<split>_masks/`), beside (both in `<split>/`), subfolders (`<split>/images|masks`)."""
    if layout not in MASK_LAYOUTS:
        raise ValueError(f"layout {layout!r}: choose from {', '.join(MASK_LAYOUTS)}")
    coco_root, out = Path(coco_root), Path(out)
    for split, data in _coco_splits(coco_root).items():
        image_folder, mask_folder = {
            "sibling": (out / split, out / f"{split}_masks"),
            "beside": (out / split, out / split),
            "subfolders": (out / split / "images", out / split / "masks"),
        }[layout]
        image_folder.mkdir(parents=True, exist_ok=True)
        mask_folder.mkdir(parents=True, exist_ok=True)
        by_image = _annotations_by_image(data)
        for image in data["images"]:
            shutil.copyfile(coco_root / split / image["file_name"], image_folder / image["file_name"])
            h, w = image["height"], image["width"]
            union = np.zeros((h, w), bool)
            for ann in by_image[image["id"]]:
                if ann["segmentation"]:
                    union |= mask_utils.decode(
                        mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w))
                    ).astype(bool)
            stem = Path(image["file_name"]).stem
            Image.fromarray(union.astype(np.uint8) * 255).save(mask_folder / f"{stem}_mask.png")
    return out
