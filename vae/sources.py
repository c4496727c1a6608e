"""Ground-truth object masks from the places paliseg meets them, as one uniform `Sample` per image and prompt.

- a converted dataset (`_annotations.<split>.jsonl`, paliseg.records): the union mask PNG and the boxes of
  the suffix's objects. Per-object masks are not stored, so an object's mask is the union mask cropped to
  its box (an overlapping neighbour leaks into the crop, exactly as it would for a model trained on it).
- a Roboflow COCO export folder (`_annotations.coco.json`): polygons rasterised with pycocotools, one
  instance mask per annotation; box-only annotations (empty `segmentation`) become filled rectangles.
- a folder of mask PNGs: each connected component (8-connected) is an object.

Used by `paliseg vae ceiling` (score the token round trip) and `paliseg vae train` (real training crops).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from paliseg import dataset, images, records
from paliseg import tokens as codec

MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")


@dataclasses.dataclass
class Sample:
    """One image's ground truth for one prompt."""

    name: str  # where it came from, for messages and canvases
    prompt: str
    mask: np.ndarray  # bool [H, W], union of the objects
    boxes: list[tuple[float, float, float, float]]  # pixel (x1, y1, x2, y2) per object
    instance_masks: list[np.ndarray] | None = None  # bool [H, W] per object, when the source has them
    image_path: Path | None = None

    @property
    def height(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def object_masks(self) -> list[np.ndarray]:
        """The mask each object is encoded from: its instance mask, else the union (cropped by its box)."""
        return self.instance_masks if self.instance_masks is not None else [self.mask] * len(self.boxes)


def kind_of(path: Path) -> str:
    """'records', 'coco', 'coco-splits' or 'masks'; raises FileNotFoundError/ValueError otherwise."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise ValueError(f"{path}: expected a folder (converted dataset, COCO export or mask PNGs)")
    if dataset.is_converted(path):
        return "records"
    if (path / records.COCO_ANNOTATIONS_FILE).is_file():
        return "coco"
    if any((path / split / records.COCO_ANNOTATIONS_FILE).is_file() for split in records.SPLITS):
        return "coco-splits"
    if any(p.suffix.lower() in MASK_SUFFIXES for p in path.iterdir()):
        return "masks"
    raise ValueError(
        f"{path}: not a converted dataset (_annotations.<split>.jsonl), a COCO export ({records.COCO_ANNOTATIONS_FILE}, "
        "or split folders holding one) nor a folder of mask PNGs"
    )


def samples(
    path: str | os.PathLike,
    split: str | None = None,
    limit: int | None = None,
    skipped: list[dataset.Skip] | None = None,
) -> Iterator[Sample]:
    """Every sample of a source. `split` picks the split of a converted dataset or of a COCO export with
    split folders (default: valid if present, else the first available). A converted dataset's records that
    `paliseg.dataset.check` rejects are left out, and appended to `skipped` when it is given."""
    path = Path(path)
    kind = kind_of(path)
    if kind == "records":
        iterator = _record_samples(path, _pick_split(path, split, dataset.find_splits(path)), skipped)
    elif kind == "coco-splits":
        available = [s for s in records.SPLITS if (path / s / records.COCO_ANNOTATIONS_FILE).is_file()]
        iterator = _coco_samples(path / _pick_split(path, split, available))
    elif kind == "coco":
        iterator = _coco_samples(path)
    else:
        iterator = _mask_folder_samples(path)
    for index, sample in enumerate(iterator):
        if limit is not None and index >= limit:
            return
        yield sample


def _pick_split(path: Path, split: str | None, available: list[str]) -> str:
    if split is None:
        return "valid" if "valid" in available else available[0]
    if split not in available:
        raise ValueError(dataset.missing_split(path, split, available))
    return split


def _record_samples(directory: Path, split: str, skipped: list[dataset.Skip] | None) -> Iterator[Sample]:
    for checked in dataset.check(dataset.read_records(directory, split)):
        if isinstance(checked, dataset.Skip):
            if skipped is not None:
                skipped.append(checked)
            continue
        record = checked.record
        parsed = codec.parse_suffix(record.suffix, require_seg=False)
        boxes = [codec.locs_to_box(o.locs, checked.width, checked.height) for o in parsed.objects]
        yield Sample(record.where, record.prefix, checked.read_mask(), boxes, None, record.image_path)


def _coco_samples(folder: Path) -> Iterator[Sample]:
    from pycocotools import mask as coco_mask

    annotation_file = folder / records.COCO_ANNOTATIONS_FILE
    try:
        data = json.loads(annotation_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{annotation_file}:{error.lineno}: not valid JSON ({error.msg})") from None
    names = {c["id"]: c["name"] for c in data.get("categories", [])}
    by_image: dict[int, list[dict]] = {}
    for annotation in data.get("annotations", []):
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    used = sorted({a["category_id"] for a in data.get("annotations", [])})
    for image in data.get("images", []):
        height, width = int(image["height"]), int(image["width"])
        for category in used:
            instances, boxes = [], []
            for annotation in by_image.get(image["id"], []):
                if annotation["category_id"] != category:
                    continue
                x, y, w, h = (float(v) for v in annotation["bbox"])
                boxes.append((x, y, x + w, y + h))
                instance = np.zeros((height, width), bool)
                segmentation = annotation.get("segmentation")
                if isinstance(segmentation, list) and segmentation:
                    rles = coco_mask.frPyObjects(segmentation, height, width)
                    instance = coco_mask.decode(coco_mask.merge(rles)).astype(bool)
                elif isinstance(segmentation, dict):  # RLE
                    rle = (
                        coco_mask.frPyObjects(segmentation, height, width)
                        if isinstance(segmentation.get("counts"), list)
                        else segmentation
                    )
                    instance = coco_mask.decode(rle).astype(bool)
                else:  # box-only annotation: the box is the mask
                    instance[int(round(y)) : int(round(y + h)), int(round(x)) : int(round(x + w))] = True
                instances.append(instance)
            union = np.logical_or.reduce(instances) if instances else np.zeros((height, width), bool)
            yield Sample(
                f"{annotation_file}:{image['file_name']}", names.get(category, str(category)), union, boxes,
                instances, folder / image["file_name"],
            )  # fmt: skip


def _mask_folder_samples(folder: Path) -> Iterator[Sample]:
    from scipy import ndimage

    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in MASK_SUFFIXES):
        mask = images.read_mask(path)
        labels, _count = ndimage.label(mask, structure=np.ones((3, 3), bool))
        instances, boxes = [], []
        for index, found in enumerate(ndimage.find_objects(labels), start=1):
            ys, xs = found
            boxes.append((float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)))
            instances.append(labels == index)
        yield Sample(str(path), folder.name, mask, boxes, instances, None)
