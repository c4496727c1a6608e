"""Pictures that show a prediction next to its ground truth: `original | ground truth | prediction`.

Masks are overlaid in colour (ground truth green, prediction orange) with their boundary drawn solid, and
they are shrunk to the panel size by "any pixel covered", so a one-pixel-wide crack stays visible.
Boxes are drawn with their labels; a caption band carries the prompt and the scores.
"""

from __future__ import annotations

import dataclasses
import functools
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from metrics import boxes as box_metrics
from metrics import scoring
from paliseg import images, tokens
from paliseg.records import Record

GT_COLOUR = (0, 200, 60)
PRED_COLOUR = (255, 110, 0)
# Boxes in a darker shade of the mask colour, so a box hugging a thin crack stays distinct from it.
GT_BOX_COLOUR = (0, 110, 35)
PRED_BOX_COLOUR = (185, 60, 0)
_FILL_ALPHA = 0.45
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _panel_size(width: int, height: int, panel_height: int) -> tuple[int, int]:
    """Every panel gets `panel_height` rows (up or down), width in proportion, capped at 2x the height."""
    scale = min(panel_height / height, 2 * panel_height / width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _shrink_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a full-resolution mask to `size`: a panel pixel is on if any source pixel under it is on."""
    coverage = Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8), "L").resize(size, Image.BOX)
    return np.asarray(coverage) > 0


def _overlay(panel: Image.Image, mask: np.ndarray | None, colour: tuple[int, int, int]) -> Image.Image:
    if mask is None:
        return panel.copy()  # boxes are drawn on the result: never on the caller's panel
    on = _shrink_mask(mask, panel.size)
    pixels = np.asarray(panel, dtype=np.float32).copy()
    pixels[on] = (1 - _FILL_ALPHA) * pixels[on] + _FILL_ALPHA * np.array(colour, np.float32)
    boundary = on & ~ndimage.binary_erosion(on)
    pixels[boundary] = colour
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")


def _draw_boxes(
    panel: Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str],
    colour: tuple[int, int, int],
    scale: float,
) -> None:
    draw = ImageDraw.Draw(panel)
    line = max(2, round(panel.height / 200))
    font = _font(max(11, panel.height // 32))
    for index, box in enumerate(boxes):
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
        label = labels[index] if index < len(labels) else ""
        if label:
            left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
            tx, ty = x1, max(0.0, y1 - (bottom - top) - 4)
            draw.rectangle([tx, ty, tx + right - left + 6, ty + bottom - top + 4], fill=colour)
            draw.text((tx + 3 - left, ty + 2 - top), label, fill=(255, 255, 255), font=font)


def _with_title(panel: Image.Image, title: str, colour: tuple[int, int, int]) -> Image.Image:
    font = _font(max(12, panel.height // 24))
    band = font.getbbox("Hg")[3] + 10
    titled = Image.new("RGB", (panel.width, panel.height + band), _BACKGROUND)
    titled.paste(panel, (0, band))
    draw = ImageDraw.Draw(titled)
    draw.rectangle([0, 0, 8, band - 1], fill=colour)
    draw.text((14, 5), title, fill=_TEXT, font=font)
    return titled


def _no_prediction(panel: Image.Image) -> Image.Image:
    grey = Image.blend(panel.convert("L").convert("RGB"), Image.new("RGB", panel.size, _BACKGROUND), 0.7)
    draw = ImageDraw.Draw(grey)
    font = _font(max(14, panel.height // 16))
    draw.text((panel.width / 2, panel.height / 2), "no prediction", fill=(120, 0, 0), font=font, anchor="mm")
    return grey


def make_canvas(
    image: Image.Image,
    gt_mask: np.ndarray | None,
    pred_mask: np.ndarray | None,
    caption: str,
    gt_boxes: Sequence[Sequence[float]] = (),
    pred_boxes: Sequence[Sequence[float]] = (),
    gt_labels: Sequence[str] = (),
    pred_labels: Sequence[str] = (),
    panel_height: int = 400,
) -> Image.Image:
    """Three panels side by side, `original | ground truth | prediction`, over a caption band.

    Masks are full-resolution HxW arrays of the image (or None); boxes are pixel (x1, y1, x2, y2) of the
    full image, in its displayed frame: a PIL image carrying an EXIF orientation tag is turned first, as
    `paliseg.images` reads files. With no predicted mask and no predicted box the third panel says "no
    prediction".
    """
    image = images.as_displayed_rgb(image)
    for name, mask in (("ground-truth", gt_mask), ("predicted", pred_mask)):
        if mask is not None and np.asarray(mask).shape != (image.height, image.width):
            raise ValueError(f"{name} mask has shape {np.asarray(mask).shape}, image is {image.height}x{image.width}")
    size = _panel_size(image.width, image.height, panel_height)
    scale = size[0] / image.width
    base = image.resize(size, Image.LANCZOS)

    truth = _overlay(base, gt_mask, GT_COLOUR)
    _draw_boxes(truth, gt_boxes, gt_labels, GT_BOX_COLOUR, scale)
    if pred_mask is None and not len(pred_boxes):
        prediction = _no_prediction(base)
    else:
        prediction = _overlay(base, pred_mask, PRED_COLOUR)
        _draw_boxes(prediction, pred_boxes, pred_labels, PRED_BOX_COLOUR, scale)
    panels = [
        _with_title(base, "original", (160, 160, 160)),
        _with_title(truth, "ground truth", GT_COLOUR),
        _with_title(prediction, "prediction", PRED_COLOUR),
    ]
    gap = 6
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)

    font = _font(max(13, panel_height // 24))
    char_width = max(1.0, font.getlength("n"))
    columns = int(width / char_width) - 2
    lines = [wrapped for line in caption.splitlines() or [""] for wrapped in textwrap.wrap(line, columns) or [""]]
    line_height = font.getbbox("Hg")[3] + 6
    caption_height = line_height * len(lines) + 12

    canvas = Image.new("RGB", (width, panels[0].height + caption_height), _BACKGROUND)
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + gap
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        draw.text((8, panels[0].height + 6 + index * line_height), line, fill=_TEXT, font=font)
    return canvas


def make_grid(canvases: Sequence[Image.Image], columns: int = 2, gap: int = 12) -> Image.Image:
    """Canvases in rows of `columns`, each in a cell as large as the largest canvas, on white."""
    if not canvases:
        raise ValueError("make_grid needs at least one canvas")
    columns = max(1, min(columns, len(canvases)))
    rows = -(-len(canvases) // columns)
    cell_w, cell_h = max(c.width for c in canvases), max(c.height for c in canvases)
    grid = Image.new("RGB", (columns * cell_w + (columns + 1) * gap, rows * cell_h + (rows + 1) * gap), (230, 230, 230))
    for index, canvas in enumerate(canvases):
        row, column = divmod(index, columns)
        grid.paste(canvas, (gap + column * (cell_w + gap), gap + row * (cell_h + gap)))
    return grid


@dataclasses.dataclass(frozen=True)
class CanvasPrediction:
    """What is known of one prediction, to draw and score on a canvas: its full-resolution mask and/or its
    generated text.

    `CanvasPrediction()` (neither) is a missing or unusable prediction: it is scored as invalid. `confidences`
    (one per valid object of the suffix, in its order) are drawn after the labels.
    """

    mask: np.ndarray | None = None
    suffix: str | None = None
    confidences: tuple[float | None, ...] = ()


def labelled(labels: Sequence[str], confidences: Sequence[float | None]) -> list[str]:
    """Box captions: each label followed by its object's confidence when one is known."""
    padded = list(confidences) + [None] * (len(labels) - len(confidences))
    return [label if c is None else f"{label} {c:.2f}".strip() for label, c in zip(labels, padded)]


def suffix_boxes(suffix: str, width: int, height: int) -> tuple[list[tuple[float, ...]], list[str], int]:
    """Pixel boxes, labels and the invalid-object count of a suffix (seg tokens optional)."""
    parsed = tokens.parse_suffix(suffix, require_seg=False)
    boxes = [tokens.locs_to_box(o.locs, width, height) for o in parsed.objects]
    return boxes, [o.label for o in parsed.objects], parsed.invalid_count


def canvas_for_record(
    record: Record, prediction: CanvasPrediction | None = None, empty: float = 1.0, panel_height: int = 400
) -> tuple[Image.Image, scoring.ImageScore | None]:
    """The canvas of one annotation record and, when a prediction with a mask is given, its score.

    GT mask from the record's `mask`, GT boxes from its suffix. `prediction=None` draws the ground truth
    only; a prediction without a mask is drawn and its boxes scored, but it has no mask IoU. Image and masks
    are read in the image's displayed frame (`paliseg.images`), as the masks paliseg writes are.
    """
    image = images.read_image(record.image_path)
    width, height = image.size
    gt_mask = images.read_mask(record.mask_path) if record.mask_path is not None else None
    if gt_mask is not None and gt_mask.shape != (height, width):
        raise ValueError(
            f"{record.where}: mask {record.mask_path} is {gt_mask.shape[1]}x{gt_mask.shape[0]} but image "
            f"{record.image_path} is {width}x{height}"
        )
    gt_boxes, gt_labels, _ = suffix_boxes(record.suffix, width, height)
    name = Path(record.image).name
    caption = [f"prompt: {record.prefix}    image: {name}"]
    pred_boxes: list[tuple[float, ...]] = []
    pred_labels: list[str] = []
    pred_mask = None
    score = None
    if prediction is None:
        caption.append("no prediction given")
    else:
        invalid = 0
        if prediction.suffix is not None:
            pred_boxes, pred_labels, invalid = suffix_boxes(prediction.suffix, width, height)
            pred_labels = labelled(pred_labels, prediction.confidences)
        pred_mask = prediction.mask
        if pred_mask is not None and pred_mask.shape != (height, width):
            raise ValueError(
                f"{record.where}: predicted mask is {pred_mask.shape[1]}x{pred_mask.shape[0]} but image "
                f"{record.image_path} is {width}x{height}"
            )
        if pred_mask is not None or prediction.suffix is None:
            # Boxes are scored only when the prediction has text (a mask folder has no boxes).
            score = scoring.score_image(
                pred_mask, gt_mask if gt_mask is not None else np.zeros((height, width), bool), record.prefix, name,
                pred_boxes=pred_boxes, gt_boxes=gt_boxes if prediction.suffix is not None else None,
                invalid_objects=invalid, empty=empty,
            )  # fmt: skip
            caption.append(_score_text(score))
        else:
            boxes = box_metrics.box_scores(pred_boxes, gt_boxes, empty=empty)
            caption.append(f"mask IoU n/a (prediction has no mask)    box mIoU {boxes.miou:.3f}")
        if invalid:
            caption[-1] += f"    {invalid} invalid object(s) in the text"
    canvas = make_canvas(
        image, gt_mask, pred_mask, "\n".join(caption), gt_boxes, pred_boxes, gt_labels, pred_labels, panel_height
    )
    return canvas, score


def _score_text(score: scoring.ImageScore) -> str:
    if not score.valid:
        return "INVALID prediction (missing or unparsable): scored 0"
    text = f"IoU {score.iou:.3f}    Dice {score.dice:.3f}"
    if score.box_miou is not None:
        text += f"    box mIoU {score.box_miou:.3f} ({score.n_pred} predicted / {score.n_gt} GT boxes)"
    return text
