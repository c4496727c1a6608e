"""A converted dataset as a TFDS dataset folder: its features, its files, and reading its records back.

    DIR/dataset_info.json, features.json, metadata.json  TFDS metadata: `tfds.builder_from_directory(DIR)`
    DIR/paliseg-<split>.tfrecord-NNNNN-of-MMMMM            the split's examples for tf.data (big_vision)
    DIR/paliseg-<split>.array_record-NNNNN-of-MMMMM        the same examples, random access (`as_data_source`)

One example per annotation record (`paliseg.records`), in the JSONL's order:

    image           the image file's bytes, showing the displayed frame to any decoder (`displayed_bytes`)
    prefix, suffix  the prompt and the target text (loc + seg tokens), as in the JSONL
    mask            the record's ground truth, the union of its objects, full resolution, PNG 0/255
    objects         per object of the suffix, in its order: bbox (y1, x1, y2, x2 in [0, 1]), label, and its
                    own full-resolution mask (PNG), the keys big_vision's segmentation evaluator reads
    record          the JSONL record itself (image and mask paths, provenance) as JSON

The dataset's metadata holds the conversion record (`conversion`: what conversion.json holds, the VAE's
SHA-256 and the prompt and label maps among it). Reading needs no paliseg code; paliseg itself reads the
array_record files (without TensorFlow) into the very records of the JSONL, whose image and mask come
from the example (`records.Record.stored`), so every stage reads a TFDS folder as it reads a JSONL one.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from paliseg import files, images, records

DATASET_NAME = "paliseg"  # the TFDS name: shard files are paliseg-<split>.<format>-NNNNN-of-MMMMM
VERSION = "1.0.0"
INFO_FILE = "dataset_info.json"  # TFDS writes it last: the dataset is complete
FILE_FORMATS = ("tfrecord", "array_record")  # tf.data reads the first; random access (data sources) the second
# The stored bytes of an image decode to paliseg's pixels with any decoder only for these kinds.
_PLAIN_FORMATS = ("JPEG", "PNG")
_PLAIN_MODES = ("RGB", "L")


def is_dataset(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a complete TFDS dataset (its dataset_info.json is written last)."""
    return (Path(directory) / INFO_FILE).is_file()


@functools.cache
def features():
    """The `tfds.features.FeaturesDict` of an example (see the module docstring)."""
    import tensorflow_datasets as tfds

    mask = tfds.features.Image(shape=(None, None, 1), encoding_format="png")
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "prefix": tfds.features.Text(),
            "suffix": tfds.features.Text(),
            "mask": mask,
            "objects": tfds.features.Sequence(
                {"bbox": tfds.features.BBoxFeature(), "label": tfds.features.Text(), "mask": mask}
            ),
            "record": tfds.features.Text(),
        }
    )


def displayed_bytes(path: images.ImageFile) -> bytes:
    """The bytes to store for an image: the file's own when any decoder shows paliseg's pixels (an 8-bit RGB
    or grey JPEG or PNG without EXIF orientation or transparency), else PNG of `images.read_image(path)`, so
    that tf.data readers see the displayed frame the masks are drawn in."""
    data = path.read_bytes() if isinstance(path, files.StoredFile) else Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        plain = (
            image.format in _PLAIN_FORMATS
            and image.mode in _PLAIN_MODES
            and images.orientation(image) == 1
            and not image.has_transparency_data
        )
    if plain:
        return data
    buffer = io.BytesIO()
    images.read_image(path).save(buffer, format="PNG")
    return buffer.getvalue()


def serialize_example(
    record: records.Record,
    image: bytes,
    mask_png: bytes,
    objects: Sequence[tuple[Sequence[float], str, bytes]],
    width: int,
    height: int,
) -> bytes:
    """One record as a serialized example: `image` the bytes to store (`displayed_bytes`), `mask_png` its
    union mask, `objects` (pixel box x1, y1, x2, y2; label; mask PNG) in the suffix's order."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import example_serializer

    spec = features()
    example = {
        "image": image,
        "prefix": record.prefix,
        "suffix": record.suffix,
        "mask": mask_png,
        "objects": {
            "bbox": [
                tfds.features.BBox(y1 / height, x1 / width, y2 / height, x2 / width)
                for (x1, y1, x2, y2), _, _ in objects
            ],
            "label": [label for _, label, _ in objects],
            "mask": [mask for _, _, mask in objects],
        },
        "record": json.dumps(record.to_json(), ensure_ascii=False),
    }
    serializer = example_serializer.ExampleSerializer(spec.get_serialized_info())
    return serializer.serialize_example(spec.encode_example(example))


def splits(directory: str | os.PathLike) -> list[str]:
    """The splits of a TFDS dataset folder, known splits first."""
    return sorted(_builder(directory).info.splits, key=records.split_order)


def metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The dataset's metadata (`conversion`: the conversion record)."""
    return dict(_builder(directory).info.metadata or {})


def split_digest(directory: str | os.PathLike, split: str) -> str:
    """SHA-256 of what identifies a split's content: its shards' names and sizes and its example count."""
    info = _builder(directory).info.splits[split]
    digest = hashlib.sha256(f"{split}\t{info.num_examples}\t{info.num_bytes}".encode())
    for name in sorted(p.name for p in Path(directory).glob(f"{DATASET_NAME}-{split}.*")):
        digest.update(f"\n{name}\t{(Path(directory) / name).stat().st_size}".encode())
    return digest.hexdigest()


def read_records(directory: str | os.PathLike, split: str) -> list[records.Record]:
    """Every record of a split, equal to the JSONL's (same fields, order and line numbers), with their image
    and mask read from the examples when asked (`records.Record.stored`)."""
    reader = _SplitReader(Path(directory), split)
    source = Path(directory) / f"{DATASET_NAME}-{split}"  # so that record.where is "DIR/paliseg-train:LINE"
    found = []
    for index in range(len(reader)):
        record = records.parse_record(reader.text(index, "record"), source, index + 1)
        stored = {record.image: "image"} | ({record.mask: "mask"} if record.mask else {})
        record.stored = functools.partial(reader.stored, index, stored)
        found.append(record)
    return found


def _builder(directory: str | os.PathLike):
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(os.fspath(directory))


class _SplitReader:
    """Random access to a split's serialized examples (array_record, no TensorFlow); pickles as its place."""

    def __init__(self, directory: Path, split: str):
        self.directory, self.split = directory, split
        self._source = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "split": self.split}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["split"])

    def _examples(self):
        if self._source is None:
            import tensorflow_datasets as tfds

            self._source = _builder(self.directory).as_data_source(
                self.split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
            )
        return self._source

    def __len__(self) -> int:
        with self._lock:
            return len(self._examples())

    def _feature(self, index: int, key: str) -> bytes:
        from tensorflow_datasets.proto import tf_example_pb2

        with self._lock:
            raw = self._examples()[index]
        return tf_example_pb2.Example.FromString(raw).features.feature[key].bytes_list.value[0]

    def text(self, index: int, key: str) -> str:
        return self._feature(index, key).decode("utf-8")

    def stored(self, index: int, features_by_path: dict[str, str], relative: str) -> bytes:
        return self._feature(index, features_by_path[relative])
