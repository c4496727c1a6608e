"""The annotation record: one line of `_annotations.<split>.jsonl`, the contract between all stages.

    {"image": "images/a.jpg", "prefix": "segment crack", "suffix": "<loc...>... crack ; ...",
     "mask": "masks/a.segment_crack.png", ...provenance fields}

Paths are relative to the JSONL file. `mask` is the full-resolution ground-truth PNG (0/255), the union of
the prompt's objects; an image with no object of the prompt has an empty suffix and an all-zero mask.

A record read from a TFDS dataset (`paliseg.tfds_data`) is the same record, with its image and mask held in
the dataset: `stored` gives their bytes, and `image_path` / `mask_path` are then `files.StoredFile`s, which
`paliseg.images` reads like the files they stand for.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from paliseg import files

SPLITS = TRAIN_SPLIT, VALID_SPLIT, TEST_SPLIT = ("train", "valid", "test")  # the known splits, in their order
COCO_ANNOTATIONS_FILE = "_annotations.coco.json"  # a Roboflow COCO split folder's annotations
CONVERSION_FILE = "conversion.json"  # a converted folder's summary: counts, skips, settings, the VAE's identity
_ANNOTATIONS_PREFIX, _ANNOTATIONS_SUFFIX = "_annotations.", ".jsonl"
ANNOTATIONS_GLOB = f"{_ANNOTATIONS_PREFIX}*{_ANNOTATIONS_SUFFIX}"  # every split's annotation file in a folder
_FIELDS = ("image", "prefix", "suffix", "mask")


class RecordError(ValueError):
    """A malformed annotation line; the message starts with `file:line:`."""


def prompt_slug(prompt: str) -> str:
    """A prompt as a file-name part ("segment crack" -> "segment_crack"): mask files are named
    `<image stem>.<slug>.png` by convert, predict and visualize alike, so `paliseg score` can pair them."""
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_") or "prompt"


def annotations_path(directory: str | os.PathLike, split: str) -> Path:
    """Roboflow's naming: DIR/_annotations.<split>.jsonl."""
    return Path(directory) / f"{_ANNOTATIONS_PREFIX}{split}{_ANNOTATIONS_SUFFIX}"


def split_of(annotation_file: str | os.PathLike) -> str:
    """The split an annotation file is named for (`_annotations.valid.jsonl` -> "valid")."""
    return Path(annotation_file).name[len(_ANNOTATIONS_PREFIX) : -len(_ANNOTATIONS_SUFFIX)]


def split_order(split: str) -> tuple[int, str]:
    """Sort key of split names: the known splits in their order, then the others by name."""
    return (SPLITS.index(split) if split in SPLITS else len(SPLITS), split)


def available_splits(directory: str | os.PathLike) -> list[str]:
    """Splits with an annotation file in `directory`, known splits first."""
    return sorted((split_of(p) for p in Path(directory).glob(ANNOTATIONS_GLOB)), key=split_order)


@dataclasses.dataclass
class Record:
    image: str
    prefix: str
    suffix: str
    mask: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Where the record was read from, for messages and for resolving relative paths; not serialised.
    source: Path | None = dataclasses.field(default=None, compare=False)
    line: int | None = dataclasses.field(default=None, compare=False)
    # The bytes of the record's files by relative path, when a dataset holds them (TFDS); None: on disk.
    stored: Callable[[str], bytes] | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.source is not None else "<record>"

    def resolve(self, relative: str) -> Path | files.StoredFile:
        base = self.source.parent if self.source is not None else Path(".")
        if self.stored is None:
            return base / relative
        return files.StoredFile(base / relative, functools.partial(self.stored, relative))

    @property
    def image_path(self) -> Path | files.StoredFile:
        return self.resolve(self.image)

    @property
    def mask_path(self) -> Path | files.StoredFile | None:
        return self.resolve(self.mask) if self.mask else None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"image": self.image, "prefix": self.prefix, "suffix": self.suffix}
        if self.mask is not None:
            data["mask"] = self.mask
        data.update(self.extra)
        return data


def parse_record(line: str, source: Path | None = None, line_number: int | None = None) -> Record:
    where = f"{source}:{line_number}"
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise RecordError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(data).__name__}")
    for field in ("image", "prefix"):
        if not isinstance(data.get(field), str) or not data[field]:
            raise RecordError(f"{where}: field '{field}' must be a non-empty string")
    if not isinstance(data.get("suffix", ""), str):
        raise RecordError(f"{where}: field 'suffix' must be a string")
    if data.get("mask") is not None and not isinstance(data["mask"], str):
        raise RecordError(f"{where}: field 'mask' must be a string path")
    extra = {k: v for k, v in data.items() if k not in _FIELDS}
    return Record(data["image"], data["prefix"], data.get("suffix", ""), data.get("mask"), extra, source, line_number)


def read_records(path: str | os.PathLike) -> list[Record]:
    """Read every record of a JSONL file; the first malformed line raises `RecordError` naming it."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                records.append(parse_record(line, path, number))
    return records


def write_records(path: str | os.PathLike, records: Iterable[Record], overwrite: bool = False) -> int:
    """Atomically write records as JSONL; refuses to replace an existing file unless `overwrite`."""
    count = 0
    with files.atomic_open(path, "w", overwrite=overwrite) as handle:
        for record in records:
            handle.write(json.dumps(record.to_json(), ensure_ascii=False, sort_keys=False) + "\n")
            count += 1
    return count
