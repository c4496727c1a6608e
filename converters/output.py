"""Writing a conversion's results into DIR: the JSONL layout, a TFDS dataset (`paliseg.tfds_data`), or both.

Everything goes into a hidden folder beside DIR (`.DIR.partial-XXXX`), which becomes DIR only in `finish`,
after the last file is written: renamed in one step when DIR is new or empty; into an existing DIR (with
`--overwrite`) the earlier dataset's marker files (conversion.json, dataset_info.json, the JSONL files) go
first and the new ones come last. So a run that fails, is interrupted, or whose Beam worker crashes leaves
nothing that looks like a dataset, and `abort` removes the hidden folder.

The pieces are separate so that a Beam pipeline (`converters.beam`) can run them on its workers:
`write_files` (an image's link and mask files), `examples` (its records as serialized TFDS examples) and
`ShardWriter` (one shard of a split, in both TFDS file formats, numbered by `finish`). `DatasetWriter.write`
runs them in this process, one image after another.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paliseg import files, records, tfds_data

if TYPE_CHECKING:
    from converters.worker import ImageResult

IMAGES_PER_SHARD = 256  # images whose records make one TFDS shard (a few hundred MB of photos)
_TFDS_METADATA = ("features.json", "metadata.json")  # written with dataset_info.json by DatasetInfo
# The files that say "a dataset is here", written last and removed first.
_MARKERS = (records.CONVERSION_FILE, tfds_data.INFO_FILE)


class ShardPlan:
    """Which TFDS shard of its split an image's records go to: runs of `IMAGES_PER_SHARD` images of one
    export's split, and a new shard for the next export's images of that split, so that a run in this
    process writes each shard in one go and never reopens one."""

    def __init__(self):
        self._next: collections.Counter = collections.Counter()

    def run_of(self, split: str) -> Iterator[int]:
        """The shards of the images of one export's split, in order."""
        first = self._next[split]
        for position in itertools.count():
            shard = first + position // IMAGES_PER_SHARD
            self._next[split] = shard + 1
            yield shard


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    split: str
    shard: int  # the planned number (`ShardPlan`); `finish` numbers the written shards 0..N-1
    examples: int
    num_bytes: int


def _temporary_name(split: str, shard: int, file_format: str) -> str:
    return f"{tfds_data.DATASET_NAME}-{split}.{file_format}-planned{shard:05d}"


class ShardWriter:
    """One shard of a split, written in both TFDS file formats at once (`tfds_data.FILE_FORMATS`)."""

    def __init__(self, folder: Path, split: str, shard: int):
        import tensorflow as tf
        from array_record.python import array_record_module

        self.split, self.shard = split, shard
        self._tfrecord = tf.io.TFRecordWriter(os.fspath(folder / _temporary_name(split, shard, "tfrecord")))
        self._array_record = array_record_module.ArrayRecordWriter(
            os.fspath(folder / _temporary_name(split, shard, "array_record")), "group_size:1"
        )
        self.examples = self.num_bytes = 0

    def write(self, serialized: bytes) -> None:
        self._tfrecord.write(serialized)
        self._array_record.write(serialized)
        self.examples += 1
        self.num_bytes += len(serialized)

    def close(self) -> ShardInfo:
        self._tfrecord.close()
        self._array_record.close()
        return ShardInfo(self.split, self.shard, self.examples, self.num_bytes)


def write_files(folder: Path, result: ImageResult) -> None:
    """An image's files in the JSONL layout: a hard link to the image (a copy across file systems) and its
    records' mask PNGs. Each file is written atomically, so a retried Beam bundle rewrites it whole."""
    target = folder / result.image_rel
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(result.image_path, tmp)
        except OSError:
            shutil.copyfile(result.image_path, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    for record, masks in zip(result.records, result.masks):
        files.write_bytes(folder / record.mask, masks.mask_png)


def examples(result: ImageResult) -> list[bytes]:
    """An image's records as serialized TFDS examples, in order (the image's bytes read once)."""
    image = tfds_data.displayed_bytes(result.image_path)
    return [
        tfds_data.serialize_example(
            record, image, masks.mask_png, masks.objects, record.extra["width"], record.extra["height"]
        )
        for record, masks in zip(result.records, result.masks)
    ]


class DatasetWriter:
    """The outputs of one conversion (`output_format`: jsonl, tfds or both) in a hidden folder beside `out`."""

    def __init__(self, out: Path, output_format: str, overwrite: bool):
        if out.exists() and not out.is_dir():
            raise files.OutputExistsError(out)
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise files.OutputExistsError(out)
        self.out = out
        self.jsonl = output_format in ("jsonl", "both")
        self.tfds = output_format in ("tfds", "both")
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        self.partial = Path(tempfile.mkdtemp(prefix=f".{out.absolute().name}.partial-", dir=out.absolute().parent))
        self.shards: list[ShardInfo] = []
        self._shard: ShardWriter | None = None

    def write(self, result: ImageResult) -> None:
        """One image's files and examples, in this process (images come in reading order)."""
        if result.records is None:
            return
        if self.jsonl:
            write_files(self.partial, result)
        if self.tfds:
            if self._shard is None or (self._shard.split, self._shard.shard) != (result.split, result.shard):
                self.close_shards()
                self._shard = ShardWriter(self.partial, result.split, result.shard)
            for example in examples(result):
                self._shard.write(example)

    def close_shards(self) -> None:
        if self._shard is not None:
            self.shards.append(self._shard.close())
            self._shard = None

    def finish(self, converted: Sequence[ImageResult], summary: dict[str, Any]) -> None:
        """Write the JSONL files, the TFDS metadata and conversion.json, then make the folder DIR."""
        if self.jsonl:
            by_split: dict[str, list[records.Record]] = collections.defaultdict(list)
            for result in sorted(converted, key=lambda r: r.index):
                by_split[result.split] += result.records
            for split, split_records in by_split.items():
                if split_records:
                    records.write_records(records.annotations_path(self.partial, split), split_records)
        if self.tfds:
            _write_tfds_metadata(self.partial, self.shards, summary)
        files.write_json(self.partial / records.CONVERSION_FILE, summary)
        _move_into_place(self.partial, self.out)

    def abort(self) -> None:
        self.close_shards()
        shutil.rmtree(self.partial, ignore_errors=True)


def _write_tfds_metadata(folder: Path, shards: Sequence[ShardInfo], summary: dict[str, Any]) -> None:
    """Number each split's shards 0..N-1 in plan order (the records' order) and write dataset_info.json."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import dataset_info, naming
    from tensorflow_datasets.core import splits as splits_lib

    split_infos = []
    for split in sorted({s.split for s in shards}, key=records.split_order):
        ordered = sorted((s for s in shards if s.split == split), key=lambda s: s.shard)
        template = naming.ShardedFileTemplate(
            data_dir=folder,
            template=naming.DEFAULT_FILENAME_TEMPLATE,
            dataset_name=tfds_data.DATASET_NAME,
            split=split,
            filetype_suffix=tfds_data.FILE_FORMATS[0],
        )
        for number, shard in enumerate(ordered):
            for file_format in tfds_data.FILE_FORMATS:
                final = template.replace(filetype_suffix=file_format).sharded_filepath(
                    shard_index=number, num_shards=len(ordered)
                )
                os.replace(folder / _temporary_name(split, shard.shard, file_format), final)
        split_infos.append(
            splits_lib.SplitInfo(
                name=split,
                shard_lengths=[s.examples for s in ordered],
                num_bytes=sum(s.num_bytes for s in ordered),
                filename_template=template,
            )
        )
    info = dataset_info.DatasetInfo(
        builder=dataset_info.DatasetIdentity(
            name=tfds_data.DATASET_NAME, version=tfds.core.Version(tfds_data.VERSION), data_dir=os.fspath(folder),
            module_name="",
        ),
        description="Annotation records converted by `paliseg convert` (see paliseg.tfds_data for the features).",
        features=tfds_data.features(),
        metadata=tfds.core.MetadataDict(conversion=summary),
        alternative_file_formats=list(tfds_data.FILE_FORMATS[1:]),
    )  # fmt: skip
    info.set_file_format(tfds_data.FILE_FORMATS[0])
    info.set_splits(splits_lib.SplitDict(split_infos))
    info.write_to_directory(folder)


def _is_dataset_file(name: str) -> bool:
    """A file or folder a conversion writes at DIR's top level."""
    return (
        name in ("images", "masks", *_MARKERS, *_TFDS_METADATA)
        or Path(name).match(records.ANNOTATIONS_GLOB)
        or name.startswith(f"{tfds_data.DATASET_NAME}-")
    )


def _marker_rank(path: Path) -> int:
    """2: conversion.json (the run finished), 1: a format's marker (dataset_info.json, a JSONL), 0: data."""
    if path.name == records.CONVERSION_FILE:
        return 2
    return int(path.name == tfds_data.INFO_FILE or path.match(records.ANNOTATIONS_GLOB))


def _move_into_place(partial: Path, out: Path) -> None:
    """Make the finished `partial` folder `out`: renamed when `out` is new or empty; else the earlier
    dataset in `out` is removed (its markers first) and the new one moved in (its markers last)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(partial, out)
        return
    for path in sorted((p for p in out.iterdir() if _is_dataset_file(p.name)), key=_marker_rank, reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for path in sorted(partial.iterdir(), key=_marker_rank):
        os.replace(path, out / path.name)
    partial.rmdir()
