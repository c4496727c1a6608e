"""Roboflow "PaliGemma" JSONL: `dataset/_annotations.<split>.jsonl` beside all the images.

A line is `{"image": file, "prefix": "detect c1 ; c2", "suffix": "<loc..>x4 c1 ; <loc..>x4 c2"}`: the
prefix lists every class, the suffix holds boxes as y-first loc tokens (decoded with /1023, as big_vision)
in the image's displayed frame (EXIF orientation applied).
Observed exports carry boxes only; seg tokens, if any, are ignored (counted) because the box is re-masked
from the source geometry anyway. Several lines for one image are merged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from converters import geometry
from converters.sources import IssueLog, SourceImage, SourceSplit, image_size
from paliseg import records, tokens

DETECT = "detect "


def annotation_files(export: Path) -> list[Path]:
    """`_annotations.<split>.jsonl` in the export or in its `dataset/` folder (Roboflow's layout)."""
    for folder in (export / "dataset", export):
        found = sorted(folder.glob(records.ANNOTATIONS_GLOB)) if folder.is_dir() else []
        if found:
            return found
    return []


def split_name(annotation_file: Path) -> str:
    return records.split_of(annotation_file)


def read_jsonl_split(export: Path, annotation_file: Path) -> SourceSplit:
    """The split of one `_annotations.<split>.jsonl` file."""
    lines = annotation_file.read_text(encoding="utf-8").splitlines()
    parsed: list[tuple[int, dict | None]] = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                data = None
            parsed.append((number, data if isinstance(data, dict) else None))
    classes: dict[str, None] = {}
    images: dict[str, None] = {}
    for _, data in parsed:
        if data and isinstance(data.get("prefix"), str) and data["prefix"].startswith(DETECT):
            classes.update(dict.fromkeys(c.strip() for c in data["prefix"][len(DETECT) :].split(";") if c.strip()))
        if data and isinstance(data.get("image"), str):
            images[data["image"]] = None
        if data and isinstance(data.get("suffix"), str):
            classes.update(
                dict.fromkeys(
                    o.label for o in tokens.parse_suffix(data["suffix"], require_seg=False).objects if o.label
                )
            )

    def read(log: IssueLog) -> Iterator[SourceImage]:
        grouped: dict[str, list[tuple[str, dict]]] = {}
        for number, data in parsed:
            where = f"{annotation_file}:{number}"
            if data is None:
                log.skip(where, "malformed_line", "not a JSON object")
            elif not isinstance(data.get("image"), str) or not isinstance(data.get("suffix", ""), str):
                log.skip(where, "malformed_line", "'image' and 'suffix' must be strings")
            else:
                grouped.setdefault(data["image"], []).append((where, data))
        for name, entries in grouped.items():
            where = entries[0][0]
            path = annotation_file.parent / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                log.skip(
                    where, "bad_image_entry", f"image {name!r} is not a relative path inside {annotation_file.parent}"
                )
                continue
            if not path.is_file():
                log.skip(where, "missing_image", f"image {path} not found")
                continue
            try:
                width, height = image_size(path)
            except ValueError as error:
                log.skip(where, "corrupt_image", str(error))
                continue
            objects = []
            for line_where, data in entries:
                result = tokens.parse_suffix(data.get("suffix", ""), require_seg=False)
                for reason, count in sorted(result.invalid.items()):
                    log.skip(line_where, "malformed_suffix", f"{count} object(s) of the suffix rejected: {reason}")
                for obj in result.objects:
                    if not obj.label:
                        log.skip(line_where, "missing_label", "an object of the suffix has no class name")
                        continue
                    if obj.seg is not None:
                        log.warn(line_where, "seg_tokens_ignored", "seg tokens ignored: masks are rebuilt from the box")
                    box = tokens.locs_to_box(obj.locs, width, height)
                    if (made := geometry.box_object(obj.label, box, width, height, line_where, log)) is not None:
                        objects.append(made)
            yield SourceImage(path, name, width, height, objects, where, source_id=name)

    return SourceSplit(
        export, split_name(annotation_file), "paligemma", list(classes), len(images), read, annotation_file
    )
