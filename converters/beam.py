"""`paliseg convert --beam`: the conversion as an Apache Beam pipeline (the DirectRunner on this machine;
Dataflow, Flink or Spark with their pipeline options).

    chunks of numbered images (the driver's, as a run in this process cuts them)
      --Reshuffle--> ImageConverter.convert on the workers (SAM and the VAE loaded once per worker process)
      --GroupByKey(image name)--> Deduper: the first converted image of each name, in reading order
      --> jsonl: output.write_files on the workers (image links, mask PNGs)
      --> tfds: output.examples --GroupByKey(split, shard)--> output.ShardWriter, one shard per group
      --> the results without their masks and the shards written, gathered into the hidden output folder

The driver (`converters.convert`) reads the exports' annotations before the pipeline, and after it counts
the issues in image order, writes the JSONL files, the TFDS metadata and conversion.json, and makes the
hidden folder DIR (`converters.output`). So a pipeline that fails (a worker raising, `--strict`) leaves no
dataset, and one that succeeds writes what a run in this process writes.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils import shared

from converters import output
from converters.config import ConvertConfig
from converters.sources import ConversionError
from converters.worker import CHUNK_IMAGES, Deduper, ImageConverter, ImageJob, ImageResult
from paliseg import images

_RESULTS, _SHARDS = ".beam-results.pickle", ".beam-shards.pickle"  # gathered for the driver, then removed
# Before the user's options (which win): workers log warnings and errors only, not every bundle.
_DEFAULT_OPTIONS = ("--default_sdk_harness_log_level=WARNING",)


class _Converter:
    """A worker process's converter, and a lock: its threads take turns (SAM's predictor holds an image)."""

    def __init__(self, config: ConvertConfig):
        self.converter = ImageConverter(config)
        self.lock = threading.Lock()


class _ConvertChunks(beam.DoFn):
    """Chunks of images -> their results; one `ImageConverter` (SAM + VAE) per worker process."""

    def __init__(self, config: ConvertConfig, max_image_pixels: int):
        self._config = config
        self._max_image_pixels = max_image_pixels
        self._shared = shared.Shared()

    def setup(self) -> None:
        images.set_max_image_pixels(self._max_image_pixels)  # the driver's --max-image-pixels
        self._held = self._shared.acquire(lambda: _Converter(self._config))

    def process(self, chunk: Sequence[ImageJob]) -> Iterator[ImageResult]:
        with self._held.lock:
            results = self._held.converter.convert(chunk)
        yield from results


def _first_wins(keyed: tuple[str, Iterable[ImageResult]]) -> Iterator[ImageResult]:
    deduper = Deduper()
    for result in sorted(keyed[1], key=lambda r: r.index):
        yield deduper.admit(result)


def _keyed_examples(result: ImageResult) -> Iterator[tuple[tuple[str, int], tuple[int, int, bytes]]]:
    for position, example in enumerate(output.examples(result)):
        yield (result.split, result.shard), (result.index, position, example)


def _write_shard(folder: Path, keyed: tuple[tuple[str, int], Iterable[tuple[int, int, bytes]]]) -> output.ShardInfo:
    (split, shard), examples = keyed
    writer = output.ShardWriter(folder, split, shard)
    for _, _, example in sorted(examples, key=lambda e: e[:2]):  # the records' order
        writer.write(example)
    return writer.close()


def _save(path: Path, value: object) -> None:
    path.write_bytes(pickle.dumps(value))


def convert(
    config: ConvertConfig, jobs: list[ImageJob], writer: output.DatasetWriter, options: Sequence[str]
) -> list[ImageResult]:
    """Run the pipeline over `jobs` into `writer`'s hidden folder; the results (without masks) in image order,
    and `writer.shards` set to the shards written."""
    folder = writer.partial
    chunks = [jobs[start : start + CHUNK_IMAGES] for start in range(0, len(jobs), CHUNK_IMAGES)]
    try:
        with beam.Pipeline(options=PipelineOptions([*_DEFAULT_OPTIONS, *options])) as pipeline:
            resolved = (
                pipeline
                | "Chunks" >> beam.Create(chunks, reshuffle=False)
                | "Spread" >> beam.Reshuffle()
                | "Convert" >> beam.ParDo(_ConvertChunks(config, images.max_image_pixels()))
                | "ByImage" >> beam.Map(lambda result: (result.image_rel, result))
                | "GroupImage" >> beam.GroupByKey()
                | "FirstWins" >> beam.FlatMap(_first_wins)
            )
            converted = resolved | "Converted" >> beam.Filter(lambda result: result.records is not None)
            if writer.jsonl:
                _ = converted | "WriteFiles" >> beam.Map(lambda result: output.write_files(folder, result))
            shards = pipeline | "NoShards" >> beam.Create([])
            if writer.tfds:
                shards = (
                    converted
                    | "Examples" >> beam.FlatMap(_keyed_examples)
                    | "GroupShard" >> beam.GroupByKey()
                    | "WriteShards" >> beam.Map(lambda keyed: _write_shard(folder, keyed))
                )
            light = resolved | "Light" >> beam.Map(lambda result: result.light())
            _ = (
                light
                | "AllResults" >> beam.combiners.ToList()
                | "SaveResults" >> beam.Map(lambda results: _save(folder / _RESULTS, results))
            )
            _ = (
                shards
                | "AllShards" >> beam.combiners.ToList()
                | "SaveShards" >> beam.Map(lambda infos: _save(folder / _SHARDS, infos))
            )
    except ConversionError:
        raise
    except Exception as error:  # Beam reports a worker's exception inside its own, with the worker's traceback
        raise ConversionError(f"the Beam pipeline failed: {_root_cause(error)}") from error
    results = pickle.loads((folder / _RESULTS).read_bytes())
    writer.shards = pickle.loads((folder / _SHARDS).read_bytes())
    for name in (_RESULTS, _SHARDS):
        (folder / name).unlink()
    return sorted(results, key=lambda r: r.index)


def _root_cause(error: BaseException) -> str:
    """The last line of the innermost message: the worker's own exception, e.g. `ConversionError: ...`."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
