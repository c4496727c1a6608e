"""Find the splits of an export and which reader each needs (or use the one `--format` names).

Detection is per split, because real exports mix: the cracks copy here has COCO JSON for valid and test but
only mask PNGs (`train_masks/`) for train. An export may also be a single split folder (`cracks/valid`).
"""

from __future__ import annotations

from pathlib import Path

from converters import coco, mask_folder, paligemma_jsonl, yolo
from converters.sources import FORMATS, ConversionError, SourceSplit
from paliseg.records import COCO_ANNOTATIONS_FILE, SPLITS, TRAIN_SPLIT, split_order

DEFAULT_MASK_CLASS = "object"


def _split_order(split: SourceSplit) -> tuple:
    return split_order(split.split)


def read_export(path: str | Path, fmt: str | None = None, mask_class: str | None = None) -> list[SourceSplit]:
    """All splits of the export at `path`, in train/valid/test order.

    `mask_class` names the objects of mask-folder splits; by default the export's only class when its other
    splits have exactly one (cracks: the COCO class of valid/test), else "object"."""
    export = Path(path)
    if not export.is_dir():
        raise FileNotFoundError(f"{export}: export folder not found")
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")

    if fmt in (None, "yolo") and (export / yolo.DATA_YAML).is_file():
        names = yolo.class_names(export)
        splits = [yolo.read_yolo_split(export, folder, names) for folder in yolo.split_folders(export)]
    elif fmt in (None, "paligemma") and (files := paligemma_jsonl.annotation_files(export)):
        splits = [paligemma_jsonl.read_jsonl_split(export, f) for f in files]
    elif fmt in (None, "coco", "masks"):
        splits = _read_folders(export, fmt, mask_class)
    else:
        splits = []
    if not splits:
        raise ConversionError(
            f"{export}: no {fmt or 'Roboflow'} export found (looked for data.yaml, _annotations.<split>.jsonl, "
            f"<split>/{COCO_ANNOTATIONS_FILE} and <stem>{mask_folder.MASK_SUFFIX} files)"
        )
    return sorted(splits, key=_split_order)


def _read_folders(export: Path, fmt: str | None, mask_class: str | None) -> list[SourceSplit]:
    """COCO and mask-folder splits: the export itself if it is one split folder, else its sub-folders."""
    if (export / COCO_ANNOTATIONS_FILE).is_file() or (fmt != "coco" and mask_folder.find_layout(export)):
        # One split folder: named by its folder when that is a split name (cracks/valid), else "train".
        candidates, root = [export], export.parent
        names = {export: export.name if export.name in SPLITS else TRAIN_SPLIT}
    else:
        candidates, root = sorted(p for p in export.iterdir() if p.is_dir() and not p.name.endswith("_masks")), export
        names = {p: p.name for p in candidates}
    coco_splits = [
        coco.read_coco_split(root, names[f], f)
        for f in candidates
        if fmt != "masks" and (f / COCO_ANNOTATIONS_FILE).is_file()
    ]
    if mask_class is None:
        classes = {n for s in coco_splits for n in s.class_names}
        mask_class = classes.pop() if len(classes) == 1 else DEFAULT_MASK_CLASS
    coco_folders = {s.annotation_file.parent for s in coco_splits}
    mask_splits = [
        mask_folder.read_mask_folder_split(root, names[f], *layout, mask_class)
        for f in candidates
        if fmt != "coco" and f not in coco_folders and (layout := mask_folder.find_layout(f))
    ]
    return coco_splits + mask_splits
