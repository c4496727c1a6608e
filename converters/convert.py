"""The writer: source images and objects -> annotation records with loc + seg tokens, images and GT masks.

For every image of every split of every export:
  1. the image is decoded (a corrupt or missing image is a counted skip), its objects are brought to its
     displayed frame (EXIF orientation applied, see `_Converter._read_image`) and get full-size
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

Output layout (paths in records are relative to DIR):
    DIR/_annotations.<split>.jsonl
    DIR/images/<split>/<export>/<file>                  hard link to the source image, else a copy
    DIR/masks/<split>/<export>/<stem>.<prompt-slug>.png  0/255 union mask of the record's prompt
    DIR/conversion.json                                 the summary (counts, skips, settings) and the
                                                        VAE's identity ("vae": SHA-256 and path, `vae.identity`)
Masks and images are written before the JSONL files, each atomically, so an interrupted run never leaves a
record pointing at a missing file. An existing non-empty DIR is refused unless `overwrite`; with it, the
files this run writes are replaced and any other `_annotations.*.jsonl` is removed (a stale split would
otherwise be trained on), other files are left alone.

Skipped objects (see `IssueLog`) are left out of both the suffix and the mask of their record, so the two
always agree; an image whose every object of a prompt was skipped is a negative for that prompt.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import vae
from converters import geometry
from converters.config import BOX_MASK_MODES, OBJECT_MODES, ConvertConfig
from converters.detect import read_export
from converters.sources import ConversionError, IssueLog, SourceImage, SourceObject, SourceSplit
from paliseg import console, files, images, records, tokens
from vae import identity

# VAE encodes are batched across images: flush once this many objects are waiting (a VAE batch bucket).
ENCODE_BATCH = 128


@dataclasses.dataclass
class _Planned:
    """A record waiting for its seg tokens: objects with their full-size masks."""

    record: records.Record
    split: str
    width: int
    height: int
    label_of: dict[str, str]
    objects: list[tuple[SourceObject, np.ndarray, str]]  # object, mask, where the mask came from
    mask_path: Path


def parse_map(entries: Sequence[str], option: str) -> dict[str, str]:
    """`CLASS=VALUE` strings (CLASS may be a glob such as `NewCracks*`) -> dict, in the order given."""
    mapping = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key or not value.strip():
            raise ValueError(f"{option} {entry!r}: expected CLASS=VALUE")
        mapping[key] = value.strip()
    return mapping


def _lookup(mapping: dict[str, str], class_name: str) -> str | None:
    if class_name in mapping:
        return mapping[class_name]
    return next((v for k, v in mapping.items() if fnmatch.fnmatchcase(class_name, k)), None)


class _BoxMasker:
    """Masks for box-only objects: `fill` (the box) or SAM (one embedding per image)."""

    def __init__(self, config: ConvertConfig, log: IssueLog):
        self.log = log
        self.mode = config.box_masks or ("sam" if config.sam_checkpoint else "fill")
        if self.mode not in BOX_MASK_MODES:
            raise ValueError(f"--box-masks {self.mode!r}: choose from {', '.join(BOX_MASK_MODES)}")
        self.segmenter = None
        if self.mode == "sam":
            if config.sam_checkpoint is None:
                raise ValueError("--box-masks sam needs --sam-checkpoint PATH (a segment-anything .pth file)")
            from converters import sam

            self.segmenter = sam.BoxSegmenter(sam.load_sam(config.sam_checkpoint, config.sam_model, config.sam_device))

    @property
    def needs_pixels(self) -> bool:
        return self.segmenter is not None

    def masks(
        self, pixels: np.ndarray, width: int, height: int, objects: list[SourceObject]
    ) -> list[tuple[np.ndarray, str]]:
        """(mask, origin) per box-only object; an empty SAM mask falls back to the box (counted)."""
        boxes = [o.box_xyxy for o in objects]
        if self.segmenter is None:
            return [(geometry.box_mask(b, width, height), "box_fill") for b in boxes]
        results = []
        for obj, mask in zip(objects, self.segmenter.masks_for_boxes(pixels, boxes)):
            if mask.any():
                results.append((mask, "box_sam"))
            else:
                self.log.warn(obj.where, "sam_empty_mask", "SAM gave an empty mask for the box: using the box itself")
                results.append((geometry.box_mask(obj.box_xyxy, width, height), "box_fill"))
        return results


class _Converter:
    def __init__(self, config: ConvertConfig, log: IssueLog):
        self.config = config
        self.log = log
        self.out = Path(config.out)
        if config.objects not in OBJECT_MODES:
            raise ValueError(f"--objects {config.objects!r}: choose from {', '.join(OBJECT_MODES)}")
        self.exports = [(Path(s), read_export(s, config.format, config.mask_class)) for s in config.sources]
        self.tags = _export_tags([path for path, _ in self.exports])
        available = {s.split for _, splits in self.exports for s in splits}
        if config.splits and (unknown := sorted(set(config.splits) - available)):
            raise ValueError(
                f"--splits {', '.join(unknown)}: not in the sources (found: {', '.join(sorted(available))})"
            )
        self._check_maps()
        self.box_masker = _BoxMasker(config, log)
        self.vae_identity = identity.identify(config.vae)  # recorded: the tokens need this very VAE
        self.model = vae.load(config.vae)
        self.records: dict[str, list[records.Record]] = collections.defaultdict(list)
        self.pending: list[_Planned] = []
        self.linked: set[Path] = set()
        self.images_done: collections.Counter = collections.Counter()

    # --- settings -------------------------------------------------------------------------------------

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
            label = self.label(class_name)
            try:
                tokens.SegObject((0, 0, 1, 1), None, label)
            except ValueError:
                raise ValueError(
                    f"label {label!r} of class {class_name!r} is not a valid suffix label (no '<', '>', ';'); "
                    f"give one with --label-map {class_name!r}=LABEL"
                ) from None
            prompt = self.prompt(class_name)
            if slugs.setdefault(records.prompt_slug(prompt), prompt) != prompt:
                raise ValueError(
                    f"prompts {prompt!r} and {slugs[records.prompt_slug(prompt)]!r} share the mask file name "
                    f"'{records.prompt_slug(prompt)}'; make them differ in letters or digits"
                )

    def prompt(self, class_name: str) -> str:
        return _lookup(self.config.prompt_map, class_name) or f"segment {class_name}"

    def label(self, class_name: str) -> str:
        return _lookup(self.config.label_map, class_name) or class_name

    # --- the run --------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self._prepare_output()
        start = time.perf_counter()
        splits_read: dict = {}
        for (path, splits), tag in zip(self.exports, self.tags):
            for split in splits:
                if self.config.splits and split.split not in self.config.splits:
                    continue
                splits_read.setdefault(str(path), {})[split.split] = {
                    "format": split.format,
                    "classes": split.class_names,
                    "images": split.count,
                }
                total = split.count if self.config.limit is None else min(split.count, self.config.limit)
                images = itertools.islice(split.read(self.log), self.config.limit)
                for image in console.progress(images, f"convert {tag}/{split.split}", total=total, unit="img"):
                    self._plan_image(image, split, tag)
                    if sum(len(p.objects) for p in self.pending) >= ENCODE_BATCH:
                        self._flush()
        self._flush()
        if not self.records:
            raise ConversionError(
                f"no record was produced from {', '.join(map(str, self.config.sources))}: see the skipped items above"
            )
        for split, split_records in self.records.items():
            records.write_records(
                records.annotations_path(self.out, split), split_records, overwrite=self.config.overwrite
            )
        seconds = time.perf_counter() - start
        summary = self._summary(splits_read, seconds)
        files.write_json(self.out / records.CONVERSION_FILE, summary, overwrite=self.config.overwrite)
        return summary

    def _prepare_output(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise files.OutputExistsError(self.out)
        if self.out.is_dir() and any(self.out.iterdir()):
            if not self.config.overwrite:
                raise files.OutputExistsError(self.out)
            for stale in self.out.glob(records.ANNOTATIONS_GLOB):  # splits this run may not write again
                stale.unlink()
        self.out.mkdir(parents=True, exist_ok=True)

    def _plan_image(self, image: SourceImage, split: SourceSplit, tag: str) -> None:
        read = self._read_image(image)
        if read is None:
            return
        pixels, image = read
        image_rel = Path("images") / split.split / tag / image.name
        if self.out / image_rel in self.linked:
            self.log.skip(image.where, "duplicate_image", f"{image.name} was already converted for split {split.split}")
            return
        self._link(image.path, self.out / image_rel)
        self.images_done[split.split] += 1

        masked, box_only = [], []
        for obj in image.objects:
            x1, y1, x2, y2 = obj.box_xyxy
            if min(x2 - x1, y2 - y1) < self.config.min_box_side:
                self.log.skip(
                    obj.where,
                    "tiny_box",
                    f"box {_rounded(obj.box_xyxy)} is under {self.config.min_box_side:g} px on a side",
                )
                continue
            mask = geometry.object_mask(obj, image.width, image.height)
            if mask is None:
                box_only.append(obj)
            elif not mask.any():
                self.log.skip(obj.where, "empty_mask", "the polygon covers no pixel centre when rasterised")
            else:
                masked.append((obj, mask, geometry.shape_origin(obj.shape)))
        if box_only:
            made = self.box_masker.masks(pixels, image.width, image.height, box_only)
            masked += [(obj, mask, origin) for obj, (mask, origin) in zip(box_only, made)]

        by_prompt: dict[str, list] = {self.prompt(c): [] for c in split.class_names}
        classes_of: dict[str, list[str]] = collections.defaultdict(list)
        for c in split.class_names:
            classes_of[self.prompt(c)].append(c)
        for obj, mask, origin in masked:
            locs = tokens.box_to_locs(obj.box_xyxy, image.width, image.height)
            if locs[2] <= locs[0] or locs[3] <= locs[1]:
                self.log.skip(
                    obj.where,
                    "degenerate_box",
                    f"box {_rounded(obj.box_xyxy)} is thinner than one loc bin (1/1023 of the image)",
                )
                continue
            by_prompt[self.prompt(obj.class_name)].append((obj, mask, origin))

        stem = str(Path(image.name).with_suffix(""))
        for prompt, objects in by_prompt.items():
            if not objects and not self.config.negatives:
                continue
            mask_rel = Path("masks") / split.split / tag / f"{stem}.{records.prompt_slug(prompt)}.png"
            extra = {
                "source": str(split.export),
                "source_format": split.format,
                "source_image": image.name,
                "source_id": image.source_id,
                "width": image.width,
                "height": image.height,
                "classes": classes_of[prompt],
            }
            record = records.Record(image_rel.as_posix(), prompt, "", mask_rel.as_posix(), extra)
            label_of = {c: self.label(c) for c in classes_of[prompt]}
            self.pending.append(
                _Planned(record, split.split, image.width, image.height, label_of, objects, self.out / mask_rel)
            )

    def _read_image(self, image: SourceImage) -> tuple[np.ndarray, SourceImage] | None:
        """Decode the whole image (catches truncated files) and bring its annotations to the image's displayed
        frame (`paliseg.images`); pixels only when SAM needs them. None: skipped (counted).

        The annotated size says which frame the annotations describe: the displayed one (Roboflow exports,
        and what annotation tools show; also when both frames have that size) is used as it is; the stored
        one of an image with an orientation tag is turned to the displayed frame (`geometry.to_displayed_frame`,
        a counted warning); neither is a `size_mismatch` skip."""
        if not image.path.is_file():
            self.log.skip(image.where, "missing_image", f"image {image.path} not found")
            return None
        try:
            header = images.read_header(image.path, decode=not self.box_masker.needs_pixels)
            pixels = np.asarray(images.read_image(image.path)) if self.box_masker.needs_pixels else np.zeros(0)
        except images.ImageReadError as error:
            self.log.skip(image.where, "corrupt_image", f"image {image.path} is not readable: {error.reason}")
            return None
        annotated = (image.width, image.height)
        if annotated == header.displayed_size:
            return pixels, image
        (width, height), (stored_w, stored_h) = header.displayed_size, header.stored_size
        if annotated == header.stored_size:
            self.log.warn(image.where, "stored_frame_annotations",
                          f"image {image.path} is shown turned (EXIF orientation {header.orientation}) as {width}x{height}; "
                          f"its {stored_w}x{stored_h} annotations describe the stored frame and were turned with it")  # fmt: skip
            return pixels, geometry.to_displayed_frame(image, header.orientation)
        stored = (
            f" ({stored_w}x{stored_h} as stored, EXIF orientation {header.orientation})"
            if header.orientation != 1
            else ""
        )
        self.log.skip(
            image.where,
            "size_mismatch",
            f"image {image.path} is {width}x{height}{stored}, the annotation says {image.width}x{image.height}",
        )
        return None

    def _link(self, source: Path, target: Path) -> None:
        """Hard-link (or copy, across file systems) atomically: a temporary name, then a rename."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        os.unlink(tmp)
        try:
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        self.linked.add(target)

    def _flush(self) -> None:
        """Encode all waiting objects in one VAE batch, then finish their records and write their masks."""
        if not self.pending:
            return
        masks, boxes = [], []
        unions = []
        for planned in self.pending:
            union = np.zeros((planned.height, planned.width), bool)
            for _, mask, _ in planned.objects:
                union |= mask
            unions.append(union)
            for obj, mask, _ in planned.objects:
                masks.append(union if self.config.objects == "merged" else mask)
                boxes.append(obj.box_xyxy)
        codes = iter(vae.masks_to_tokens(self.model, masks, boxes))
        for planned, union in zip(self.pending, unions):
            info_of, seg_objects = {}, []
            for (obj, _, origin), seg in zip(planned.objects, codes):
                locs = tokens.box_to_locs(obj.box_xyxy, planned.width, planned.height)
                seg_object = tokens.SegObject(locs, tuple(int(v) for v in seg), planned.label_of[obj.class_name])
                seg_objects.append(seg_object)
                where = obj.where.removeprefix(planned.record.extra["source"] + os.sep)
                info_of[id(seg_object)] = {
                    "box": _rounded(obj.box_xyxy),
                    "class": obj.class_name,
                    "mask_from": origin,
                    "annotation": where,
                }
            ordered = tokens.sort_objects(seg_objects)
            planned.record.suffix = tokens.format_suffix(ordered)
            planned.record.extra["objects"] = [info_of[id(o)] for o in ordered]
            files.write_mask(planned.mask_path, union, overwrite=self.config.overwrite)
            self.records[planned.split].append(planned.record)
        self.pending = []

    def _summary(self, splits_read: dict, seconds: float) -> dict[str, Any]:
        splits = {}
        for split in records.SPLITS + tuple(sorted(set(self.records) - set(records.SPLITS))):
            if split not in self.records:
                continue
            prompts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
            for record in self.records[split]:
                count = len(record.extra["objects"])
                prompts[record.prefix].update(records=1, objects=count, empty=int(count == 0))
            totals = sum(prompts.values(), collections.Counter())
            splits[split] = {
                "images": self.images_done[split],
                "records": totals["records"],
                "objects": totals["objects"],
                "empty": totals["empty"],
                "prompts": {p: {k: c[k] for k in ("records", "objects", "empty")} for p, c in sorted(prompts.items())},
            }
        images = sum(self.images_done.values())
        return {
            "out": str(self.out),
            "sources": splits_read,
            "settings": {
                "objects": self.config.objects,
                "box_masks": self.box_masker.mode,
                "sam_model": self.config.sam_model if self.box_masker.mode == "sam" else None,
                "vae": self.model.source,
                "negatives": self.config.negatives,
                "min_box_side": self.config.min_box_side,
                "limit": self.config.limit,
                "prompts": {c: self.prompt(c) for c in self._classes()},
                "labels": {c: self.label(c) for c in self._classes()},
            },
            "vae": self.vae_identity.to_json(),
            "splits": splits,
            **self.log.to_json(),
            "seconds": round(seconds, 3),
            "images_per_second": round(images / seconds, 2) if seconds > 0 else None,
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


def _rounded(box: Sequence[float]) -> list[float]:
    return [round(float(v), 3) for v in box]


def convert(config: ConvertConfig, log: IssueLog | None = None) -> dict[str, Any]:
    """Run a conversion; returns the summary (also written to `DIR/conversion.json`)."""
    log = log or IssueLog(strict=config.strict, echo=console.info)
    return _Converter(config, log).run()


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
