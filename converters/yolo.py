"""Roboflow YOLO: `data.yaml` (class `names`) and `<split>/images/*` with `<split>/labels/<stem>.txt`.

A label line is `class cx cy w h` (a box) or `class x1 y1 x2 y2 x3 y3 ...` (a polygon of >= 3 points), all
normalised to [0, 1] of the image's displayed frame (EXIF orientation applied, as every viewer and Roboflow
show it); files may mix both. Class indices are 0-based and have no placeholder. The split
paths in Roboflow's data.yaml (`../train/images`) are relative to a folder that does not exist, so splits
are found by their folders, as Roboflow lays them out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import yaml

from converters import geometry
from converters.sources import (
    ConversionError,
    IssueLog,
    SourceImage,
    SourceObject,
    SourceSplit,
    image_files,
    image_size,
)

DATA_YAML = "data.yaml"


def class_names(export: Path) -> list[str]:
    path = export / DATA_YAML
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConversionError(f"{path}: not valid YAML ({error})") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):  # {0: name, 1: name}
        names = [names[k] for k in sorted(names)]
    if not isinstance(names, list) or not names:
        raise ConversionError(f"{path}: 'names' must be a non-empty list of class names")
    return [str(n) for n in names]


def split_folders(export: Path) -> list[Path]:
    return sorted(p for p in export.iterdir() if (p / "images").is_dir())


def read_yolo_split(export: Path, folder: Path, names: list[str]) -> SourceSplit:
    """A YOLO split folder: `images/*` with their `labels/<stem>.txt`."""
    images = image_files(folder / "images")

    def read(log: IssueLog) -> Iterator[SourceImage]:
        for path in images:
            where = str(path)
            try:
                width, height = image_size(path)
            except ValueError as error:
                log.skip(where, "corrupt_image", str(error).removeprefix(f"{path}: "))
                continue
            label_file = folder / "labels" / f"{path.stem}.txt"
            objects = _read_labels(label_file, names, width, height, log) if label_file.is_file() else []
            yield SourceImage(path, path.name, width, height, objects, where, source_id=path.stem)

    return SourceSplit(export, folder.name, "yolo", names, len(images), read, export / DATA_YAML)


def _read_labels(label_file: Path, names: list[str], width: int, height: int, log: IssueLog) -> list[SourceObject]:
    objects = []
    for number, line in enumerate(label_file.read_text(encoding="utf-8").splitlines(), start=1):
        where = f"{label_file}:{number}"
        fields = line.split()
        if not fields:
            continue
        try:
            class_index, coords = int(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            log.skip(
                where, "malformed_line", f"expected 'class cx cy w h' or 'class x1 y1 x2 y2 ...', got {line.strip()!r}"
            )
            continue
        if not 0 <= class_index < len(names):
            log.skip(where, "unknown_category", f"class {class_index} is not in data.yaml names (0..{len(names) - 1})")
            continue
        if len(coords) == 4:
            cx, cy, w, h = coords
            box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
            obj = geometry.box_object(names[class_index], box, width, height, where, log)
        elif len(coords) >= 6 and len(coords) % 2 == 0:
            ring = tuple(v * (width if i % 2 == 0 else height) for i, v in enumerate(coords))
            if not all(map(math.isfinite, ring)):
                log.skip(where, "malformed_line", "polygon coordinates must be finite numbers")
                continue
            obj = geometry.polygon_object(names[class_index], [ring], width, height, where, log)
        else:
            log.skip(
                where,
                "malformed_line",
                f"{len(coords)} coordinates: expected 4 (a box) or an even number >= 6 (a polygon)",
            )
            continue
        if obj is not None:
            objects.append(obj)
    return objects
