"""A converted dataset folder, opened and checked in one place for every stage.

    DIR/_annotations.<split>.jsonl      one annotation record per line (`paliseg.records`)
    DIR/<record.image>, DIR/<record.mask>   the image and its ground-truth mask PNG, relative to the JSONL

or the same records as a TFDS dataset (`paliseg.tfds_data`: DIR/dataset_info.json and the shards), whose
examples hold each record's image and mask. This module is the one place that tells the two apart: the
records it reads are equal either way, and their `image_path` / `mask_path` read the same pixels through
`paliseg.images`, so every stage accepts both. A folder holding both (`paliseg convert --output-format
both`) is read from its JSONL.

`paliseg validate` reports every problem this module finds; eval, train and the VAE tools use the same
checks to keep the usable records (`Item`) and count the others as named skips (`Skip`, by `reason`), so a
record the one accepts the others accept too. Opening a folder or split that is not there is a clear error
that names the folder and lists the splits it has.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from paliseg import images, records, tfds_data
from paliseg import tokens as codec

# Why a record cannot be used (Skip.reason), in the order they are checked.
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
INVALID_SUFFIX = "invalid_suffix"
MISSING_MASK = "missing_mask"
UNREADABLE_MASK = "unreadable_mask"
MASK_SIZE = "mask_size"
DUPLICATE = "duplicate"


def is_converted(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds converted data: annotation JSONL files or a TFDS dataset."""
    return bool(records.available_splits(directory)) or tfds_data.is_dataset(directory)


def _is_tfds(directory: str | os.PathLike) -> bool:
    return not records.available_splits(directory) and tfds_data.is_dataset(directory)


def find_splits(directory: str | os.PathLike) -> list[str]:
    """The splits of a converted folder (known ones first); raises when it is not one."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: dataset folder not found")
    found = tfds_data.splits(directory) if _is_tfds(directory) else records.available_splits(directory)
    if not found:
        raise FileNotFoundError(
            f"{directory}: not a converted dataset (no {records.ANNOTATIONS_GLOB} file, no TFDS {tfds_data.INFO_FILE})"
        )
    return found


def _check_split(directory: str | os.PathLike, split: str) -> None:
    """Raises "DIR: no split 'test'; found: train, valid" when the folder has no such split."""
    found = find_splits(directory)
    if split not in found:
        raise FileNotFoundError(missing_split(directory, split, found))


def split_location(directory: str | os.PathLike, split: str) -> str:
    """Where a split's records are, for messages: its annotation file, or its TFDS shards."""
    _check_split(directory, split)
    if _is_tfds(directory):
        return f"{Path(directory) / tfds_data.DATASET_NAME}-{split}.* (TFDS)"
    return str(records.annotations_path(directory, split))


def split_digest(directory: str | os.PathLike, split: str) -> str:
    """SHA-256 identifying a split's records (a resumed run checks that its data did not change)."""
    _check_split(directory, split)
    if _is_tfds(directory):
        return tfds_data.split_digest(directory, split)
    return hashlib.sha256(records.annotations_path(directory, split).read_bytes()).hexdigest()


def missing_split(directory: str | os.PathLike, split: str, found: Iterable[str]) -> str:
    """The message for a split a dataset does not have (also used for COCO exports with split folders)."""
    return f"{directory}: no split {split!r}; found: {', '.join(found)}"


def read_records(directory: str | os.PathLike, split: str) -> list[records.Record]:
    """Every record of a split; the first malformed line raises `records.RecordError` naming file:line."""
    _check_split(directory, split)
    if _is_tfds(directory):
        return tfds_data.read_records(directory, split)
    return records.read_records(records.annotations_path(directory, split))


def read_source(path: str | os.PathLike, split: str) -> list[records.Record]:
    """The records of an annotation JSONL file, or of `split` of a converted folder (JSONL or TFDS)."""
    path = Path(path)
    return read_records(path, split) if path.is_dir() else records.read_records(path)


def read_lines(directory: str | os.PathLike, split: str) -> list[records.Record | records.RecordError]:
    """Every record of a split, with each malformed line's error in its place (a TFDS split has none)."""
    _check_split(directory, split)
    if _is_tfds(directory):
        return list(tfds_data.read_records(directory, split))
    path = records.annotations_path(directory, split)
    parsed: list[records.Record | records.RecordError] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    parsed.append(records.parse_record(line, path, number))
                except records.RecordError as error:
                    parsed.append(error)
    return parsed


@dataclasses.dataclass(frozen=True)
class Problem:
    reason: str  # one of the reason constants above
    message: str


@dataclasses.dataclass
class Inspection:
    """What a record's files hold: the image size (None when unreadable), the mask (None when the record has
    none, it is unreadable or masks were not checked) and at most one problem with each file."""

    size: tuple[int, int] | None
    image_problem: Problem | None
    mask: np.ndarray | None
    mask_problem: Problem | None


ImageSizes = dict  # Path -> (width, height) | Problem: images shared by several records are decoded once


def _image(path: images.ImageFile, sizes: ImageSizes) -> tuple[int, int] | Problem:
    if path not in sizes:
        if not path.is_file():
            sizes[path] = Problem(MISSING_IMAGE, f"image {path} not found")
        else:
            try:
                # Displayed (width, height) after a full decode: masks are in the displayed frame.
                sizes[path] = images.read_header(path, decode=True).displayed_size
            except images.ImageReadError as error:
                sizes[path] = Problem(UNREADABLE_IMAGE, f"image {path} is not a readable image ({error.reason})")
    return sizes[path]


def inspect_record(record: records.Record, sizes: ImageSizes | None = None, masks: bool = True) -> Inspection:
    """Check that the record's image exists and decodes and (with `masks`) that its mask, when it names one,
    exists, decodes and has the image's size."""
    image = _image(record.image_path, {} if sizes is None else sizes)
    size = image if isinstance(image, tuple) else None
    inspection = Inspection(size, image if isinstance(image, Problem) else None, None, None)
    path = record.mask_path
    if not masks or path is None:
        return inspection
    if not path.is_file():
        inspection.mask_problem = Problem(MISSING_MASK, f"mask {path} not found")
        return inspection
    try:
        mask = images.read_mask(path)
    except images.ImageReadError as error:
        inspection.mask_problem = Problem(UNREADABLE_MASK, f"mask {path} is not a readable image ({error.reason})")
        return inspection
    inspection.mask = mask
    if size is not None and mask.shape != (size[1], size[0]):
        inspection.mask_problem = Problem(
            MASK_SIZE, f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {size[0]}x{size[1]}"
        )
    return inspection


@dataclasses.dataclass(frozen=True)
class Item:
    """A usable record, with its image size."""

    record: records.Record
    width: int
    height: int

    @property
    def key(self) -> str:
        """The record's identity within a split: its image and prompt."""
        return f"{self.record.image}\t{self.record.prefix}"

    def read_mask(self) -> np.ndarray:
        return read_mask(self.record, self.width, self.height)


def read_mask(record: records.Record, width: int, height: int) -> np.ndarray:
    """A record's ground-truth union mask, bool [H, W]; all-zero for a record without a mask (no object)."""
    if record.mask_path is None:
        return np.zeros((height, width), bool)
    return images.read_mask(record.mask_path)


def ground_truth(record: records.Record, width: int, height: int) -> tuple[np.ndarray, list[tuple[float, ...]]]:
    """A record's GT union mask (all-zero when it has no mask file: no object) and its objects' pixel boxes."""
    mask = read_mask(record, width, height)
    parsed = codec.parse_suffix(record.suffix, require_seg=False)
    return mask, [codec.locs_to_box(o.locs, width, height) for o in parsed.objects]


@dataclasses.dataclass(frozen=True)
class Skip:
    """A record that cannot be used: where it is, why (a reason constant) and the details."""

    where: str
    reason: str
    message: str


def check(all_records: Iterable[records.Record], masks: bool = True) -> Iterator[Item | Skip]:
    """Each record as an `Item`, or a `Skip` when its image is missing or does not decode, its suffix has
    invalid objects, (with `masks`) it has objects but no mask or its mask is missing, unreadable or of
    another size than the image, or it repeats an (image, prompt) pair already seen."""
    sizes: ImageSizes = {}
    seen: set[str] = set()
    for record in all_records:
        problem = _first_problem(record, sizes, masks)
        item = Item(record, *sizes[record.image_path]) if problem is None else None
        if item is not None and item.key in seen:
            problem = Problem(DUPLICATE, f"image {record.image} with prompt {record.prefix!r} appears twice")
        if problem is not None:
            yield Skip(record.where, problem.reason, problem.message)
        else:
            seen.add(item.key)
            yield item


def _first_problem(record: records.Record, sizes: ImageSizes, masks: bool) -> Problem | None:
    inspection = inspect_record(record, sizes, masks)
    if inspection.image_problem is not None:
        return inspection.image_problem
    parsed = codec.parse_suffix(record.suffix, require_seg=False)
    if parsed.invalid_count:
        return Problem(INVALID_SUFFIX, f"suffix has invalid objects {dict(parsed.invalid)}")
    if masks and record.mask_path is None and parsed.objects:
        return Problem(MISSING_MASK, "no 'mask' field, but the suffix has objects")
    return inspection.mask_problem


def check_split(directory: str | os.PathLike, split: str, limit: int | None = None) -> tuple[list[Item], list[Skip]]:
    """The usable records of a split (of its first `limit` records) and the skipped ones (see `check`)."""
    items: list[Item] = []
    skips: list[Skip] = []
    for checked in check(read_records(directory, split)[:limit]):
        (items if isinstance(checked, Item) else skips).append(checked)
    return items, skips


def skip_counts(skips: Iterable[Skip]) -> dict[str, int]:
    """How many records were skipped for each reason, in the order reasons first occur."""
    counts: dict[str, int] = {}
    for skip in skips:
        counts[skip.reason] = counts.get(skip.reason, 0) + 1
    return counts
