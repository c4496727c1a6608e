"""What converts images, in this process or on an Apache Beam worker (`converters.beam`).

`ImageConverter.convert` takes a chunk of numbered images (`ImageJob`) and gives each one's `ImageResult`:
its records, their masks as PNG bytes, and the issues met reading it and its objects, logged apart from the
run's log so that the driver counts them in image order (`replay`) wherever they were converted. It holds
SAM (box-only objects) and the VAE (seg tokens): make one per process. `Deduper` keeps the first converted
image of each output name. The steps per image are those of `converters.convert`'s docstring.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import vae
from converters import geometry
from converters.config import BOX_MASK_MODES, ConvertConfig
from converters.sources import Issue, IssueLog, SourceImage, SourceObject
from paliseg import files, images, records, tokens

# Images converted together: their objects go through the VAE in one batch. Plain and Beam runs cut the
# images into the same chunks, so they encode the same batches.
CHUNK_IMAGES = 8


def _lookup(mapping: dict[str, str], class_name: str) -> str | None:
    if class_name in mapping:
        return mapping[class_name]
    return next((v for k, v in mapping.items() if fnmatch.fnmatchcase(class_name, k)), None)


def prompt_of(config: ConvertConfig, class_name: str) -> str:
    return _lookup(config.prompt_map, class_name) or f"segment {class_name}"


def label_of(config: ConvertConfig, class_name: str) -> str:
    return _lookup(config.label_map, class_name) or class_name


def box_mask_mode(config: ConvertConfig) -> str:
    """`--box-masks`, defaulting to sam when a SAM checkpoint is given; checked before any work starts."""
    mode = config.box_masks or ("sam" if config.sam_checkpoint else "fill")
    if mode not in BOX_MASK_MODES:
        raise ValueError(f"--box-masks {mode!r}: choose from {', '.join(BOX_MASK_MODES)}")
    if mode == "sam" and config.sam_checkpoint is None:
        raise ValueError("--box-masks sam needs --sam-checkpoint PATH (a segment-anything .pth file)")
    if mode == "sam" and not Path(config.sam_checkpoint).is_file():
        raise FileNotFoundError(f"{config.sam_checkpoint}: SAM checkpoint not found")
    return mode


class BoxMasker:
    """Masks for box-only objects: `fill` (the box) or SAM (one embedding per image)."""

    def __init__(self, config: ConvertConfig):
        self.mode = box_mask_mode(config)
        self.segmenter = None
        if self.mode == "sam":
            from converters import sam

            self.segmenter = sam.BoxSegmenter(sam.load_sam(config.sam_checkpoint, config.sam_model, config.sam_device))

    @property
    def needs_pixels(self) -> bool:
        return self.segmenter is not None

    def masks(
        self, pixels: np.ndarray, width: int, height: int, objects: list[SourceObject], log: IssueLog
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
                log.warn(obj.where, "sam_empty_mask", "SAM gave an empty mask for the box: using the box itself")
                results.append((geometry.box_mask(obj.box_xyxy, width, height), "box_fill"))
        return results


@dataclasses.dataclass
class ImageJob:
    """One image of one split of one export, numbered in reading order (which orders the records)."""

    index: int
    split: str
    shard: int  # the TFDS shard of the split its records go to (`output.ShardPlan`)
    tag: str  # the export's folder name in DIR
    export: str  # the export folder, as given (record provenance)
    source_format: str
    class_names: list[str]
    image: SourceImage

    @property
    def image_rel(self) -> str:
        """Where the image goes in DIR (`images/<split>/<export>/<file>`), also its record's `image`."""
        return (Path("images") / self.split / self.tag / self.image.name).as_posix()


@dataclasses.dataclass
class RecordMasks:
    """What a record's files hold: its union mask and, in the suffix's order, each object's pixel box,
    label and own mask, as PNG bytes (compact, so results travel cheaply between Beam workers)."""

    mask_png: bytes
    objects: list[tuple[tuple[float, float, float, float], str, bytes]]


@dataclasses.dataclass
class ImageResult:
    """What converting one image gave: its records (None: skipped), and the issues met reading it and its
    objects (kept apart: a duplicate's object issues are dropped, as its objects are never used)."""

    index: int
    split: str
    shard: int
    where: str
    image_rel: str
    image_path: Path
    read_issues: list[Issue]
    object_issues: list[Issue]
    records: list[records.Record] | None
    masks: list[RecordMasks] | None = None  # per record; dropped once written (`light`)

    def light(self) -> ImageResult:
        """The result without its masks: what the summary and the JSONL need."""
        return dataclasses.replace(self, masks=None)


@dataclasses.dataclass
class _Planned:
    """A record waiting for its seg tokens: objects with their full-size masks."""

    record: records.Record
    width: int
    height: int
    label_of: dict[str, str]
    objects: list[tuple[SourceObject, np.ndarray, str]]  # object, mask, where the mask came from


class ImageConverter:
    """Converts chunks of images (`convert`); holds SAM and the VAE, so make one per process."""

    def __init__(self, config: ConvertConfig):
        self.config = config
        self.box_masker = BoxMasker(config)
        self.model = vae.load(config.vae)

    def convert(self, jobs: Sequence[ImageJob]) -> list[ImageResult]:
        """Each image's result, in order; the objects of all the chunk's images are encoded in one VAE batch."""
        results, planned = [], []
        for job in jobs:
            read_log, object_log = self._log(), self._log()
            read = self._read_image(job.image, read_log)
            plans = [] if read is None else self._plan(job, *read, object_log)
            result = ImageResult(
                job.index, job.split, job.shard, job.image.where, job.image_rel, job.image.path,
                read_log.examples, object_log.examples, None if read is None else [p.record for p in plans],
            )  # fmt: skip
            results.append(result)
            planned.append(plans)
        masks = iter(self._encode([p for plans in planned for p in plans]))
        for result, plans in zip(results, planned):
            result.masks = None if result.records is None else [next(masks) for _ in plans]
        return results

    def _log(self) -> IssueLog:
        """A log of one image's issues, all kept (the run's log counts them when it replays the result)."""
        return IssueLog(strict=self.config.strict, keep=sys.maxsize)

    def _read_image(self, image: SourceImage, log: IssueLog) -> tuple[np.ndarray, SourceImage] | None:
        """Decode the whole image (catches truncated files) and bring its annotations to the image's displayed
        frame (`paliseg.images`); pixels only when SAM needs them. None: skipped (counted).

        The annotated size says which frame the annotations describe: the displayed one (Roboflow exports,
        and what annotation tools show; also when both frames have that size) is used as it is; the stored
        one of an image with an orientation tag is turned to the displayed frame (`geometry.to_displayed_frame`,
        a counted warning); neither is a `size_mismatch` skip."""
        if not image.path.is_file():
            log.skip(image.where, "missing_image", f"image {image.path} not found")
            return None
        try:
            header = images.read_header(image.path, decode=not self.box_masker.needs_pixels)
            pixels = np.asarray(images.read_image(image.path)) if self.box_masker.needs_pixels else np.zeros(0)
        except images.ImageReadError as error:
            log.skip(image.where, "corrupt_image", f"image {image.path} is not readable: {error.reason}")
            return None
        annotated = (image.width, image.height)
        if annotated == header.displayed_size:
            return pixels, image
        (width, height), (stored_w, stored_h) = header.displayed_size, header.stored_size
        if annotated == header.stored_size:
            log.warn(image.where, "stored_frame_annotations",
                     f"image {image.path} is shown turned (EXIF orientation {header.orientation}) as {width}x{height}; "
                     f"its {stored_w}x{stored_h} annotations describe the stored frame and were turned with it")  # fmt: skip
            return pixels, geometry.to_displayed_frame(image, header.orientation)
        stored = (
            f" ({stored_w}x{stored_h} as stored, EXIF orientation {header.orientation})"
            if header.orientation != 1
            else ""
        )
        log.skip(
            image.where,
            "size_mismatch",
            f"image {image.path} is {width}x{height}{stored}, the annotation says {image.width}x{image.height}",
        )
        return None

    def _plan(self, job: ImageJob, pixels: np.ndarray, image: SourceImage, log: IssueLog) -> list[_Planned]:
        """The image's records (one per prompt), waiting for their objects' seg tokens."""
        config = self.config
        masked, box_only = [], []
        for obj in image.objects:
            x1, y1, x2, y2 = obj.box_xyxy
            if min(x2 - x1, y2 - y1) < config.min_box_side:
                log.skip(
                    obj.where, "tiny_box", f"box {_rounded(obj.box_xyxy)} is under {config.min_box_side:g} px on a side"
                )
                continue
            mask = geometry.object_mask(obj, image.width, image.height)
            if mask is None:
                box_only.append(obj)
            elif not mask.any():
                log.skip(obj.where, "empty_mask", "the polygon covers no pixel centre when rasterised")
            else:
                masked.append((obj, mask, geometry.shape_origin(obj.shape)))
        if box_only:
            made = self.box_masker.masks(pixels, image.width, image.height, box_only, log)
            masked += [(obj, mask, origin) for obj, (mask, origin) in zip(box_only, made)]

        by_prompt: dict[str, list] = {prompt_of(config, c): [] for c in job.class_names}
        classes_of: dict[str, list[str]] = collections.defaultdict(list)
        for c in job.class_names:
            classes_of[prompt_of(config, c)].append(c)
        for obj, mask, origin in masked:
            locs = tokens.box_to_locs(obj.box_xyxy, image.width, image.height)
            if locs[2] <= locs[0] or locs[3] <= locs[1]:
                log.skip(
                    obj.where,
                    "degenerate_box",
                    f"box {_rounded(obj.box_xyxy)} is thinner than one loc bin (1/1023 of the image)",
                )
                continue
            by_prompt[prompt_of(config, obj.class_name)].append((obj, mask, origin))

        stem = str(Path(image.name).with_suffix(""))
        plans = []
        for prompt, objects in by_prompt.items():
            if not objects and not config.negatives:
                continue
            mask_rel = Path("masks") / job.split / job.tag / f"{stem}.{records.prompt_slug(prompt)}.png"
            extra = {
                "source": job.export,
                "source_format": job.source_format,
                "source_image": image.name,
                "source_id": image.source_id,
                "width": image.width,
                "height": image.height,
                "classes": classes_of[prompt],
            }
            record = records.Record(job.image_rel, prompt, "", mask_rel.as_posix(), extra)
            labels = {c: label_of(config, c) for c in classes_of[prompt]}
            plans.append(_Planned(record, image.width, image.height, labels, objects))
        return plans

    def _encode(self, planned: list[_Planned]) -> list[RecordMasks]:
        """Encode all the planned records' objects in one VAE batch, then finish the records: suffix, the
        objects' provenance, and their masks."""
        masks, boxes, unions = [], [], []
        for plan in planned:
            union = np.zeros((plan.height, plan.width), bool)
            for _, mask, _ in plan.objects:
                union |= mask
            unions.append(union)
            for obj, mask, _ in plan.objects:
                masks.append(union if self.config.objects == "merged" else mask)
                boxes.append(obj.box_xyxy)
        codes = iter(vae.masks_to_tokens(self.model, masks, boxes) if masks else [])
        finished = []
        for plan, union in zip(planned, unions):
            info_of, seg_objects, mask_of = {}, [], {}
            for (obj, mask, origin), seg in zip(plan.objects, codes):
                locs = tokens.box_to_locs(obj.box_xyxy, plan.width, plan.height)
                seg_object = tokens.SegObject(locs, tuple(int(v) for v in seg), plan.label_of[obj.class_name])
                seg_objects.append(seg_object)
                where = obj.where.removeprefix(plan.record.extra["source"] + os.sep)
                info_of[id(seg_object)] = {
                    "box": _rounded(obj.box_xyxy),
                    "class": obj.class_name,
                    "mask_from": origin,
                    "annotation": where,
                }
                mask_of[id(seg_object)] = (tuple(obj.box_xyxy), seg_object.label, files.mask_png(mask))
            ordered = tokens.sort_objects(seg_objects)
            plan.record.suffix = tokens.format_suffix(ordered)
            plan.record.extra["objects"] = [info_of[id(o)] for o in ordered]
            finished.append(RecordMasks(files.mask_png(union), [mask_of[id(o)] for o in ordered]))
        return finished


class Deduper:
    """The first converted image of each output name wins (images are admitted in reading order); a later
    one is a `duplicate_image` skip, its object issues dropped, as its objects are never used."""

    def __init__(self):
        self.converted: set[str] = set()

    def admit(self, result: ImageResult) -> ImageResult:
        if result.records is None:
            return result
        if result.image_rel in self.converted:
            name = Path(result.image_rel).name
            message = f"{name} was already converted for split {result.split}"
            duplicate = Issue(result.where, "duplicate_image", message, skipped=True)
            return dataclasses.replace(result, object_issues=[duplicate], records=None, masks=None)
        self.converted.add(result.image_rel)
        return result


def replay(log: IssueLog, result: ImageResult) -> None:
    """Count a result's issues in the run's log."""
    for issue in result.read_issues + result.object_issues:
        log.record(issue)


def _rounded(box: Sequence[float]) -> list[float]:
    return [round(float(v), 3) for v in box]
