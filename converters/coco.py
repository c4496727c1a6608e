"""Roboflow COCO: `<split>/_annotations.coco.json` beside the split's images.

Roboflow specifics: category id 0 is a placeholder named after the project (`supercategory: "none"`) that
annotations do not use; the real classes are the others. Instance-segmentation projects give pixel polygons
(`segmentation: [[x1, y1, ...], ...]`), box-only projects `segmentation: []` with `bbox: [x, y, w, h]`.
Some polygon projects also hold a few box-only annotations; those become box objects (masks from
`--box-masks`) and are counted as a warning.

Frames: the JSON's width/height are the frame its coordinates describe. Roboflow exports are oriented (no
EXIF orientation tag, sizes match); a file from another tool may describe the stored frame of a photo that
still carries a tag. The converter sorts that out when it reads the image (`convert._Converter._read_image`).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from pathlib import Path

from converters import geometry
from converters.sources import ConversionError, IssueLog, SourceImage, SourceObject, SourceSplit
from paliseg import records


def load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a COCO JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ConversionError(f"{path}: COCO key '{key}' is missing or not a list")
    return data


def placeholder_ids(categories: list[dict]) -> set:
    """Roboflow's project-named category (supercategory "none") when real classes exist beside it."""
    placeholders = {c.get("id") for c in categories if c.get("supercategory") == "none"}
    return placeholders if len(placeholders) < len(categories) else set()


def read_coco_split(export: Path, split: str, folder: Path) -> SourceSplit:
    """A COCO split folder: its `_annotations.coco.json` and the images beside it."""
    annotation_file = folder / records.COCO_ANNOTATIONS_FILE
    data = load_json(annotation_file)
    categories = {c.get("id"): c for c in data["categories"] if isinstance(c, dict)}
    placeholders = placeholder_ids(list(categories.values()))
    class_names = list(
        dict.fromkeys(str(c.get("name")) for i, c in sorted(categories.items()) if i not in placeholders)
    )

    def read(log: IssueLog) -> Iterator[SourceImage]:
        images = {}
        for index, image in enumerate(data["images"]):
            if isinstance(image, dict) and "id" in image:
                images.setdefault(image["id"], (index, image))
            else:
                log.skip(f"{annotation_file}:images[{index}]", "bad_image_entry", "image entry without an id")
        by_image = collections.defaultdict(list)
        for index, annotation in enumerate(data["annotations"]):
            where = f"{annotation_file}:annotations[{index}]"
            if not isinstance(annotation, dict):
                log.skip(where, "bad_annotation", "annotation is not an object")
            elif annotation.get("image_id") not in images:
                log.skip(where, "unknown_image", f"image_id {annotation.get('image_id')!r} is not in 'images'")
            else:
                by_image[annotation["image_id"]].append((where, annotation))
        has_polygons = any(a.get("segmentation") for group in by_image.values() for _, a in group)

        for image_id, (index, image) in images.items():
            where = f"{annotation_file}:images[{index}]"
            width, height, name = image.get("width"), image.get("height"), image.get("file_name")
            if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
                log.skip(where, "bad_image_entry", f"file_name {name!r} is not a relative path inside {folder}")
                continue
            if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
                log.skip(where, "bad_image_entry", f"width/height {width!r}x{height!r} are not positive integers")
                continue
            path = folder / name
            if not path.is_file():
                log.skip(where, "missing_image", f"image {path} not found")
                continue
            objects = [
                obj
                for ann_where, annotation in by_image.get(image_id, [])
                if (
                    obj := _read_annotation(
                        annotation, ann_where, categories, placeholders, width, height, has_polygons, log
                    )
                )
            ]
            yield SourceImage(path, name, width, height, objects, where, source_id=image_id)

    return SourceSplit(export, split, "coco", class_names, len(data["images"]), read, annotation_file)


def _read_annotation(
    annotation: dict,
    where: str,
    categories: dict,
    placeholders: set,
    width: int,
    height: int,
    has_polygons: bool,
    log: IssueLog,
) -> SourceObject | None:
    category_id = annotation.get("category_id")
    if category_id in placeholders:
        log.skip(where, "placeholder_category", f"category_id {category_id} is Roboflow's placeholder category")
        return None
    if category_id not in categories:
        log.skip(where, "unknown_category", f"category_id {category_id!r} is not in 'categories'")
        return None
    class_name = str(categories[category_id].get("name"))
    segmentation = annotation.get("segmentation") or []
    if isinstance(segmentation, dict):
        return geometry.rle_object(class_name, segmentation, width, height, where, log)
    if not isinstance(segmentation, list) or not all(isinstance(r, list) for r in segmentation):
        log.skip(where, "bad_segmentation", "segmentation is neither a list of polygons nor an RLE")
        return None
    rings = geometry.usable_rings(segmentation, where, log)
    if rings:
        return geometry.polygon_object(class_name, rings, width, height, where, log)
    bbox = annotation.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        log.skip(where, "bad_bbox", f"bbox {bbox!r} is not [x, y, width, height]")
        return None
    x, y, w, h = (float(v) for v in bbox)
    obj = geometry.box_object(class_name, (x, y, x + w, y + h), width, height, where, log)
    if obj is not None and has_polygons:
        log.warn(
            where, "box_only_annotation", "no polygon in a polygon export: the mask comes from the box (--box-masks)"
        )
    return obj
