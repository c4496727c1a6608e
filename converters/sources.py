"""The common in-memory form every reader produces, and the log of skipped and repaired items.

Readers (COCO, YOLO, PaliGemma JSONL, mask folders) differ only in how they find images and objects; all
of them yield `SourceImage`s whose `SourceObject`s carry a class name, a pixel box and a shape (polygons,
an RLE, a raster mask, or nothing for a box-only object). The writer (`converters.convert`) never looks at
a format again.

Object boxes are the tight extent of the object's geometry, the way COCO defines `bbox`: polygon
vertices (clipped to the image), or for raster shapes the pixel extent with x2 = last column + 1 (as
pycocotools' `toBbox`). Box-only objects keep their annotated box, clipped to the image.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from paliseg import images

FORMATS = ("coco", "yolo", "paligemma", "masks")


class ConversionError(ValueError):
    """Bad input under `--strict`, or input that cannot be converted at all; the message names file and position."""


@dataclasses.dataclass(frozen=True)
class Polygons:
    """One or more pixel-coordinate polygons (COCO style flat lists `[x1, y1, x2, y2, ...]`)."""

    rings: tuple[tuple[float, ...], ...]


@dataclasses.dataclass(frozen=True)
class Rle:
    """A COCO run-length encoding (compressed or not), decoded with pycocotools."""

    rle: dict


@dataclasses.dataclass(frozen=True)
class RasterMask:
    """A boolean mask cropped to its box: `pixels` covers rows y1:y2 and columns x1:x2 of the image.

    Stored cropped so that thousands of mask-folder components do not each hold a full-size array."""

    pixels: np.ndarray
    x1: int
    y1: int
    origin: str = (
        "mask"  # what was rasterised: "mask", or the "polygon"/"rle" of an annotation turned to the displayed frame
    )


Shape = Polygons | Rle | RasterMask | None


@dataclasses.dataclass
class SourceObject:
    class_name: str
    box_xyxy: tuple[float, float, float, float]
    shape: Shape
    where: str  # "file:position" of the annotation, for messages and provenance


@dataclasses.dataclass
class SourceImage:
    path: Path
    name: str  # path relative to the split folder: the output keeps it under images/<split>/<export>/
    width: int
    height: int
    objects: list[SourceObject]
    where: str
    source_id: Any = None  # the export's own id (COCO image id, JSONL line), kept as provenance


@dataclasses.dataclass
class SourceSplit:
    """One split of one export: its class list (for negatives) and a lazy image iterator (bounded memory)."""

    export: Path
    split: str
    format: str
    class_names: list[str]
    count: int
    read: Callable[[IssueLog], Iterator[SourceImage]]
    annotation_file: Path | None = None


@dataclasses.dataclass(frozen=True)
class Issue:
    where: str
    reason: str
    message: str
    skipped: bool

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class IssueLog:
    """Counts skipped items (dropped) and warnings (kept after a repair), by reason.

    Under `strict`, a skip raises `ConversionError` at once. Only the first `keep` messages of each reason are
    kept for the summary; counts are always complete."""

    def __init__(self, strict: bool = False, keep: int = 5, echo: Callable[[str], None] | None = None):
        self.strict = strict
        self.keep = keep
        self.echo = echo
        self.skipped: collections.Counter = collections.Counter()
        self.warnings: collections.Counter = collections.Counter()
        self.examples: list[Issue] = []

    def skip(self, where: str, reason: str, message: str) -> None:
        self.record(Issue(where, reason, message, skipped=True))

    def warn(self, where: str, reason: str, message: str) -> None:
        self.record(Issue(where, reason, message, skipped=False))

    def record(self, issue: Issue) -> None:
        """Count an issue (one logged elsewhere, e.g. by a worker, is replayed here)."""
        if issue.skipped and self.strict:
            raise ConversionError(f"{issue} (--strict)")
        counter = self.skipped if issue.skipped else self.warnings
        counter[issue.reason] += 1
        if counter[issue.reason] <= self.keep:
            self.examples.append(issue)
            if self.echo is not None:
                kind = "skipped" if issue.skipped else "warning"
                self.echo(f"{kind}: {issue}")

    def to_json(self) -> dict:
        return {
            "skipped": dict(sorted(self.skipped.items())),
            "warnings": dict(sorted(self.warnings.items())),
            "examples": [dataclasses.asdict(i) for i in self.examples],
        }


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def image_files(folder: Path) -> list[Path]:
    """Images of a folder in sorted order, leaving out mask PNGs (`<stem>_mask.png`)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_mask") and p.is_file()
    )


def image_size(path: Path) -> tuple[int, int]:
    """Displayed (width, height) from the file header (EXIF orientations 5-8 swap the stored ones): the frame
    normalised coordinates (YOLO, PaliGemma JSONL) and mask files are read in. `images.ImageReadError`
    (a ValueError naming the file) if it is not a readable image."""
    return images.read_header(path).displayed_size
