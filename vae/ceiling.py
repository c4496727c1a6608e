"""The round-trip ceiling: ground-truth mask -> loc + seg tokens -> mask, scored at full resolution.

A model that predicts every token perfectly still gets only this mIoU: the box is quantised to 1024 loc
bins (decoded with truncation), the object is squeezed into 64x64, then into 16 codes of 128. For each
sample, each object is encoded from its box crop (`vae.masks_to_tokens`), its loc tokens come from the
same box (`paliseg.tokens.box_to_locs`), the decoded masks are pasted back (`vae.tokens_to_masks`), united,
and scored against the union ground truth with `metrics.masks.iou` (both empty -> 1.0).

`objects="merged"` instead encodes the whole union as one object in its tight box (one 16-token mask per
image and prompt), the other way a dataset can be written.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from metrics import aggregate, scoring
from metrics import masks as mask_metrics
from paliseg import tokens as codec
from vae.masks import masks_to_tokens, tight_box, tokens_to_masks
from vae.model import MaskVAE
from vae.sources import Sample

OBJECT_MODES = ("instance", "merged")


@dataclasses.dataclass
class RoundTrip:
    sample: Sample
    prediction: np.ndarray  # bool [H, W]
    iou: float
    objects: int


def round_trip(
    model: MaskVAE, sample: Sample, objects: str = "instance", counts: collections.Counter | None = None
) -> RoundTrip:
    """Encode the sample's objects, decode them at their loc-token boxes, unite, score."""
    if objects not in OBJECT_MODES:
        raise ValueError(f"objects must be one of {OBJECT_MODES}, got {objects!r}")
    if objects == "merged":
        box = tight_box(sample.mask)
        boxes, sources = ([box], [sample.mask]) if box is not None else ([], [])
    else:
        boxes, sources = sample.boxes, sample.object_masks()
    prediction = np.zeros(sample.mask.shape, bool)
    if boxes:
        segs = masks_to_tokens(model, sources, boxes, counts)
        locs = [codec.box_to_locs(b, sample.width, sample.height) for b in boxes]
        prediction = np.logical_or.reduce(tokens_to_masks(model, segs, locs, sample.width, sample.height, counts))
    return RoundTrip(sample, prediction, mask_metrics.iou(prediction, sample.mask), len(boxes))


def summarize(results: Iterable[RoundTrip], counts: collections.Counter) -> dict:
    """mIoU (mean per-image IoU), cumulative IoU and counts, overall and per prompt: `metrics.aggregate`
    of the round trips scored as predictions (`metrics.scoring.score_image`)."""
    results = list(results)
    scores = [scoring.score_image(r.prediction, r.sample.mask, r.sample.prompt, r.sample.name) for r in results]
    summary = aggregate.summarize(scores)

    def stats(aggregated: dict, group: list[RoundTrip]) -> dict:
        return {"images": aggregated["count"], "objects": sum(r.objects for r in group),
                "miou": aggregated["miou"], "ciou": aggregated["ciou"]}  # fmt: skip

    return {
        "overall": stats(summary["overall"], results),
        "prompts": {
            prompt: stats(aggregated, [r for r in results if r.sample.prompt == prompt])
            for prompt, aggregated in summary["per_prompt"].items()
        },
        "degenerate_boxes": dict(counts),
    }


def write_canvas(directory: Path, results: list[RoundTrip], count: int) -> Path:
    """`directory/round_trip.png`: image | ground truth | round trip for `count` images, half of them the
    worst and the rest spread over the IoU range, each captioned with its IoU."""
    from PIL import Image

    from metrics import canvas
    from paliseg import files, images

    ranked = sorted(results, key=lambda r: r.iou)
    worst = ranked[: count // 2]
    rest = ranked[count // 2 :]
    spread = [rest[int(i)] for i in np.linspace(0, len(rest) - 1, count - len(worst))] if rest else []
    panels = []
    for result in worst + spread:
        sample = result.sample
        image = (
            images.read_image(sample.image_path)
            if sample.image_path is not None and sample.image_path.is_file()
            else None
        )
        if image is None or image.size != (sample.width, sample.height):
            # No image, or one whose displayed frame is not the annotation's (a COCO file describing the
            # stored frame of a photo with an EXIF orientation tag): the masks are drawn on grey.
            image = Image.new("RGB", (sample.width, sample.height), (40, 40, 40))
        caption = (
            f"{Path(sample.name).name}  [{sample.prompt}]  round-trip IoU {result.iou:.3f}, {result.objects} objects"
        )
        panels.append(
            canvas.make_canvas(image, sample.mask, result.prediction, caption, gt_boxes=sample.boxes, panel_height=320)
        )
    out = Path(directory) / "round_trip.png"
    files.write_image(out, canvas.make_grid(panels, columns=2))
    return out
