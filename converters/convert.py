"""The writer: source images and objects -> annotation records with loc + seg tokens, images and GT masks.

For every image of every split of every export:
  1. the image is decoded (a corrupt or missing image is a counted skip), its objects are brought to its
     displayed frame (EXIF orientation applied, see `converters.worker.ImageConverter._read_image`) and get full-size
     masks: their own geometry (pycocotools rasterisation), or for box-only objects `--box-masks`: SAM
     (one image embedding, all boxes batched) or `fill` (the box itself);
  2. objects are grouped by prompt (`--prompt-map`, default `segment <class>`); each prompt of the export's
     class list gives one record per image, so images without the class stay in as negatives (empty suffix,
     all-zero mask) unless `--no-negatives`;
  3. each object becomes `<loc>`x4 from its pixel box (big_vision's `round(v * 1023)`) + `<seg>`x16 from the
     VAE encoding of its mask cropped to that box (`--objects instance`; `merged` crops the prompt's union
     mask instead, as the peer project did), then its label; objects are sorted top-to-bottom,
     left-to-right;
  4. the record's ground truth mask is the union of the prompt's object masks at full resolution.

Images are numbered in reading order (`ImageJob`) and converted in chunks of `CHUNK_IMAGES` (one VAE batch
per chunk) by an `ImageConverter` (`converters.worker`), which holds SAM and the VAE: in this process, or on
Apache Beam workers with `--beam` (`converters.beam`), where each worker loads them once. Each image's result carries its
records and the issues met; `Deduper` then keeps the first converted image of each output name, and
`converters.output` writes the results into DIR (`--output-format`: JSONL with image and mask files, a
TFDS dataset, or both). Both ways see the same chunks and replay the issues in image order, so they give
the same records and counts.

Output layout (paths in records are relative to DIR; `converters.output` and `paliseg.tfds_data`):
    DIR/_annotations.<split>.jsonl                      (jsonl) one record per image and prompt
    DIR/images/<split>/<export>/<file>                  (jsonl) hard link to the source image, else a copy
    DIR/masks/<split>/<export>/<stem>.<prompt-slug>.png  (jsonl) 0/255 union mask of the record's prompt
    DIR/dataset_info.json, DIR/paliseg-<split>.*        (tfds) the same records as TFDS examples
    DIR/conversion.json                                 the summary (counts, skips, settings) and the
                                                        VAE's identity ("vae": SHA-256 and path, `vae.identity`)
Everything is written into a hidden folder beside DIR that becomes DIR only when the conversion finished,
so an interrupted or failed run leaves nothing that looks like a dataset. An existing non-empty DIR is
refused unless `overwrite`; with it, the earlier dataset in DIR is replaced and other files are left alone.

Skipped objects (see `IssueLog`) are left out of both the suffix and the mask of their record, so the two
always agree; an image whose every object of a prompt was skipped is a negative for that prompt.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import itertools
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import vae
from converters import output
from converters.config import OBJECT_MODES, OUTPUT_FORMATS, ConvertConfig
from converters.detect import read_export
from converters.sources import ConversionError, IssueLog
from converters.worker import (
    CHUNK_IMAGES,
    Deduper,
    ImageConverter,
    ImageJob,
    ImageResult,
    box_mask_mode,
    label_of,
    prompt_of,
    replay,
)
from paliseg import console, records, tokens
from vae import identity


def parse_map(entries: Sequence[str], option: str) -> dict[str, str]:
    """`CLASS=VALUE` strings (CLASS may be a glob such as `NewCracks*`) -> dict, in the order given."""
    mapping = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key or not value.strip():
            raise ValueError(f"{option} {entry!r}: expected CLASS=VALUE")
        mapping[key] = value.strip()
    return mapping


class _Conversion:
    def __init__(self, config: ConvertConfig, log: IssueLog):
        if config.objects not in OBJECT_MODES:
            raise ValueError(f"--objects {config.objects!r}: choose from {', '.join(OBJECT_MODES)}")
        if config.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"--output-format {config.output_format!r}: choose from {', '.join(OUTPUT_FORMATS)}")
        self.log = log
        self.out = Path(config.out)
        self.exports = [(Path(s), read_export(s, config.format, config.mask_class)) for s in config.sources]
        self.tags = _export_tags([path for path, _ in self.exports])
        available = {s.split for _, splits in self.exports for s in splits}
        if config.splits and (unknown := sorted(set(config.splits) - available)):
            raise ValueError(
                f"--splits {', '.join(unknown)}: not in the sources (found: {', '.join(sorted(available))})"
            )
        self.box_mask_mode = box_mask_mode(config)
        self.vae_identity = identity.identify(config.vae)  # recorded: the tokens need this very VAE
        self.vae_source = str(Path(config.vae)) if config.vae is not None else str(vae.model.default_path())
        self.config = config
        self._check_maps()
        self.splits_read: dict = {}

    def _classes(self) -> list[str]:
        return list(dict.fromkeys(c for _, splits in self.exports for s in splits for c in s.class_names))

    def _check_maps(self) -> None:
        classes = self._classes()
        for option, mapping in (("--prompt-map", self.config.prompt_map), ("--label-map", self.config.label_map)):
            for key in mapping:
                if not any(key == c or fnmatch.fnmatchcase(c, key) for c in classes):
                    raise ValueError(
                        f"{option} {key!r} matches no class of the sources (classes: {', '.join(map(repr, classes))})"
                    )
        slugs: dict[str, str] = {}
        for class_name in classes:
            label = label_of(self.config, class_name)
            try:
                tokens.SegObject((0, 0, 1, 1), None, label)
            except ValueError:
                raise ValueError(
                    f"label {label!r} of class {class_name!r} is not a valid suffix label (no '<', '>', ';'); "
                    f"give one with --label-map {class_name!r}=LABEL"
                ) from None
            prompt = prompt_of(self.config, class_name)
            if slugs.setdefault(records.prompt_slug(prompt), prompt) != prompt:
                raise ValueError(
                    f"prompts {prompt!r} and {slugs[records.prompt_slug(prompt)]!r} share the mask file name "
                    f"'{records.prompt_slug(prompt)}'; make them differ in letters or digits"
                )

    def jobs(self, progress: bool) -> Iterator[ImageJob]:
        """Every image to convert, numbered, read lazily from the exports (issues of the annotations are
        counted as they are read); with `progress`, a progress bar per split."""
        index, shards = 0, output.ShardPlan()
        for (path, splits), tag in zip(self.exports, self.tags):
            for split in splits:
                if self.config.splits and split.split not in self.config.splits:
                    continue
                self.splits_read.setdefault(str(path), {})[split.split] = {
                    "format": split.format,
                    "classes": split.class_names,
                    "images": split.count,
                }
                total = split.count if self.config.limit is None else min(split.count, self.config.limit)
                found = itertools.islice(split.read(self.log), self.config.limit)
                if progress:
                    found = console.progress(found, f"convert {tag}/{split.split}", total=total, unit="img")
                for image, shard in zip(found, shards.run_of(split.split)):
                    yield ImageJob(
                        index, split.split, shard, tag, str(split.export), split.format, split.class_names, image
                    )
                    index += 1

    def run(self) -> dict[str, Any]:
        writer = output.DatasetWriter(self.out, self.config.output_format, self.config.overwrite)
        start = time.perf_counter()
        try:
            if self.config.beam is None:
                results = self._convert_here(writer)
            else:
                from converters import beam

                worker_config = dataclasses.replace(self.config, vae=self.vae_identity.path)
                results = beam.convert(worker_config, list(self.jobs(progress=False)), writer, self.config.beam)
                for result in results:
                    replay(self.log, result)
            converted = [result for result in results if result.records is not None]
            if not converted or not any(result.records for result in converted):
                raise ConversionError(
                    f"no record was produced from {', '.join(map(str, self.config.sources))}: see the skipped items above"
                )
            summary = self._summary(converted, time.perf_counter() - start)
            writer.finish(converted, summary)
        except BaseException:
            writer.abort()
            raise
        return summary

    def _convert_here(self, writer: output.DatasetWriter) -> list[ImageResult]:
        converter, deduper, results = ImageConverter(self.config), Deduper(), []
        jobs = self.jobs(progress=True)
        while chunk := list(itertools.islice(jobs, CHUNK_IMAGES)):
            for result in converter.convert(chunk):
                result = deduper.admit(result)
                replay(self.log, result)
                writer.write(result)
                results.append(result.light())
        writer.close_shards()
        return results

    def _summary(self, converted: list[ImageResult], seconds: float) -> dict[str, Any]:
        by_split: dict[str, list[ImageResult]] = collections.defaultdict(list)
        for result in converted:
            by_split[result.split].append(result)
        splits = {}
        for split in sorted(by_split, key=records.split_order):
            prompts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
            for record in (r for result in by_split[split] for r in result.records):
                count = len(record.extra["objects"])
                prompts[record.prefix].update(records=1, objects=count, empty=int(count == 0))
            if not prompts:
                continue
            totals = sum(prompts.values(), collections.Counter())
            splits[split] = {
                "images": len(by_split[split]),
                "records": totals["records"],
                "objects": totals["objects"],
                "empty": totals["empty"],
                "prompts": {p: {k: c[k] for k in ("records", "objects", "empty")} for p, c in sorted(prompts.items())},
            }
        converted_images = len(converted)
        return {
            "out": str(self.out),
            "sources": self.splits_read,
            "settings": {
                "objects": self.config.objects,
                "box_masks": self.box_mask_mode,
                "sam_model": self.config.sam_model if self.box_mask_mode == "sam" else None,
                "vae": self.vae_source,
                "negatives": self.config.negatives,
                "min_box_side": self.config.min_box_side,
                "limit": self.config.limit,
                "prompts": {c: prompt_of(self.config, c) for c in self._classes()},
                "labels": {c: label_of(self.config, c) for c in self._classes()},
                "output_format": self.config.output_format,
            },
            "vae": self.vae_identity.to_json(),
            "splits": splits,
            **self.log.to_json(),
            "seconds": round(seconds, 3),
            "images_per_second": round(converted_images / seconds, 2) if seconds > 0 else None,
        }


def _export_tags(paths: list[Path]) -> list[str]:
    """A folder name per export (`cracks`, `drywall`), made unique; a single-split export is named by its parent."""
    tags = []
    for path in paths:
        resolved = path.resolve()
        base = resolved.parent.name if resolved.name in records.SPLITS else resolved.name
        tag, n = base, 2
        while tag in tags:
            tag, n = f"{base}-{n}", n + 1
        tags.append(tag)
    return tags


def convert(config: ConvertConfig, log: IssueLog | None = None) -> dict[str, Any]:
    """Run a conversion; returns the summary (also written to `DIR/conversion.json`)."""
    log = log or IssueLog(strict=config.strict, echo=console.info)
    return _Conversion(config, log).run()


def summary_text(summary: dict[str, Any]) -> str:
    """The human summary: records per split and prompt, then skips and warnings by reason."""
    rows = [
        (split, prompt, c["records"], c["objects"], c["empty"])
        for split, info in summary["splits"].items()
        for prompt, c in info["prompts"].items()
    ]
    lines = [
        f"converted into {summary['out']} ({summary['settings']['objects']} objects, box masks: "
        f"{summary['settings']['box_masks']}, VAE: {summary['settings']['vae']})",
        "",
        console.markdown_table(["split", "prompt", "records", "objects", "empty records"], rows),
        "",
        "images per split: " + ", ".join(f"{s} {i['images']}" for s, i in summary["splits"].items()),
    ]
    issues = [("skipped", r, n) for r, n in summary["skipped"].items()] + [
        ("warning", r, n) for r, n in summary["warnings"].items()
    ]
    if issues:
        lines += ["", console.markdown_table(["kind", "reason", "count"], issues)]
    else:
        lines += ["", "nothing skipped, no warnings"]
    lines.append(f"\n{summary['seconds']:.1f} s ({summary['images_per_second']} images/s)")
    return "\n".join(lines)
