"""Token-aware geometric augmentation: zoom, shift and mirror an example, and rewrite its suffix to match.

Photometric jitter leaves the objects where they were; moving the pixels moves the objects, so the target
text must move with them, or the model learns boxes and shapes that are not in its input. Here every
token describes the pixels the model sees:

- The transform (`Transform`, drawn by `draw_transform` from the (seed, step, slot) generator) places the
  whole source image on an integer pixel rectangle of the model's square frame, zoomed in or out and
  shifted, padding with the image's mean colour, then mirrors the frame left-right when asked. It works
  in normalised coordinates, as the model sees the image squashed to its square; one crop-and-resize of
  the full-resolution image gives the model's input, resampled exactly as `paliseg.images.preprocess`
  does (an identity transform gives the very same pixels).
- Loc tokens are recomputed from the boxes, moved and clipped to the frame.
- Seg tokens are re-encoded by the run's VAE from each object's mask cropped to its visible box. The
  transform is axis-aligned, so that crop of the moved mask is the crop of the source mask to the box's
  visible part, mirrored with the frame: it is taken at the source's full resolution with the converter's
  own crop (`vae.masks.crop_to_64`), and no mask is ever resampled.
- An object cut by the frame stays, as its visible part, when at least `min_visible` of its mask's pixels
  (of its box's area for a box-only object) are in the frame; else it is dropped from the suffix. The
  objects are put back in reading order (`paliseg.tokens.reading_order`, as the converter orders them);
  labels are unchanged, and a negative (empty suffix) stays one. The suffix never gets longer in tokens:
  the same objects or fewer, each with as many tokens as before.

The work is in two steps so that the VAE runs once per batch, not per example, and never in a data
worker: `transform_example` (NumPy and PIL: a worker's per-example load) and `encode` (one VAE call for
the examples of a batch, which gives their suffixes and the 64x64 crops the mask loss takes as targets).

Which mask is each object's: a converted JSONL folder stores only the record's union mask, so the caller
passes it for every object, as the mask loss (`train.data.mask_loss_targets`) crops it: an object's mask
is then the union inside its box, which a neighbour overlapping the box adds to. A TFDS folder also stores
each object's own mask (feature `objects/mask`), which `paliseg.tfds_data` does not read back: passing
those would train a TFDS folder otherwise than its JSONL twin.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, ImageStat

from paliseg import images
from paliseg import tokens as codec
from train.config import TrainConfig
from vae.masks import crop_box, crop_to_64
from vae.model import MASK_SIZE, MaskVAE

Box = tuple[float, float, float, float]  # (x1, y1, x2, y2)


@dataclasses.dataclass(frozen=True)
class Transform:
    """Where the source image lands in the model's `size` x `size` frame: its normalised coordinate u (x /
    width or y / height, in [0, 1]) goes to frame pixel `left + u * extent` along x and `top + u * extent`
    along y; then the frame is mirrored left-right when `flip`. Integer edges put the image's borders on
    pixel borders, so the image is resampled by one crop-and-resize with no sub-pixel drift from its boxes."""

    size: int
    left: int
    top: int
    extent: int  # the image's side in frame pixels: size x zoom
    flip: bool

    def visible(self) -> Box:
        """The part of the source inside the frame, in normalised source coordinates."""

        def span(edge: int) -> tuple[float, float]:
            return max(-edge / self.extent, 0.0), min((self.size - edge) / self.extent, 1.0)

        (x1, x2), (y1, y2) = span(self.left), span(self.top)
        return x1, y1, x2, y2

    def box(self, box: Box) -> Box:
        """A normalised source box inside `visible()` -> its normalised box in the frame."""
        x1, x2 = ((self.left + x * self.extent) / self.size for x in (box[0], box[2]))
        y1, y2 = ((self.top + y * self.extent) / self.size for y in (box[1], box[3]))
        return (1.0 - x2, y1, 1.0 - x1, y2) if self.flip else (x1, y1, x2, y2)

    def image(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image (`paliseg.images.read_image`) -> the model's input, float32 [size, size, 3] in [-1, 1];
        the frame around the image (zoomed out or shifted) is filled with the mean colour of its part in the frame."""
        width, height = image.size
        x1, y1 = max(self.left, 0), max(self.top, 0)
        x2, y2 = min(self.left + self.extent, self.size), min(self.top + self.extent, self.size)
        source = (
            (x1 - self.left) / self.extent * width,
            (y1 - self.top) / self.extent * height,
            (x2 - self.left) / self.extent * width,
            (y2 - self.top) / self.extent * height,
        )
        frame = part = image.resize((x2 - x1, y2 - y1), Image.Resampling.BILINEAR, box=source)
        if part.size != (self.size, self.size):
            frame = Image.new("RGB", (self.size, self.size), tuple(round(v) for v in ImageStat.Stat(part).mean))
            frame.paste(part, (x1, y1))
        return images.preprocess(ImageOps.mirror(frame) if self.flip else frame, self.size)


def draw_transform(rng: np.random.Generator, config: TrainConfig, size: int) -> Transform:
    """The transform of one example for a `size`-pixel model: with --augment-geometric a zoom drawn
    log-uniformly from [--augment-min-scale, --augment-max-scale] (zooming in and out equally likely) and a
    shift along each axis from +-(--augment-max-shift) of the frame; with --augment-flip a mirror one time
    in two. The identity when both are off."""
    zoom, shift_x, shift_y = 1.0, 0.0, 0.0
    if config.augment_geometric:
        zoom = math.exp(rng.uniform(math.log(config.augment_min_scale), math.log(config.augment_max_scale)))
        shift_x, shift_y = rng.uniform(-config.augment_max_shift, config.augment_max_shift, 2)
    flip = bool(config.augment_flip and rng.random() < 0.5)
    extent = max(1, round(zoom * size))
    margin = (size - extent) / 2  # where the image's left (top) edge is when it is centred
    return Transform(size, round(margin + shift_x * size), round(margin + shift_y * size), extent, flip)


@dataclasses.dataclass(frozen=True)
class PlacedObject:
    """An object in the frame, before its seg tokens are encoded: its loc tokens (y1, x1, y2, x2), label,
    and the VAE's input for it (float32 [64, 64]; None for a box-only object, which stays one)."""

    locs: tuple[int, int, int, int]
    label: str
    crop: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class TransformedExample:
    """An example after `transform_example`: the model's input image and its objects in the frame."""

    image: np.ndarray  # float32 [size, size, 3] in [-1, 1]
    objects: list[PlacedObject]


def transform_example(
    image: Image.Image, suffix: str, masks: Sequence[np.ndarray], transform: Transform, min_visible: float
) -> TransformedExample:
    """Apply `transform` to an example: `image` its full-resolution RGB image, `suffix` its target text, `masks`
    bool [height, width] per object of the suffix, in its order (the same union mask may repeat; unused for
    box-only objects), `min_visible` the share of an object that must stay in the frame (--augment-min-visible)."""
    width, height = image.size
    objects = codec.parse_suffix(suffix, require_seg=False).objects
    if len(masks) != len(objects):
        raise ValueError(f"transform_example: {len(masks)} masks for the {len(objects)} objects of the suffix")
    visible = transform.visible()
    placed = []
    for obj, mask in zip(objects, masks):
        if obj.seg is not None and np.shape(mask) != (height, width):
            raise ValueError(f"an object's mask is {np.shape(mask)[::-1]} but the image is {width}x{height}")
        box = codec.locs_to_box(obj.locs, 1, 1)
        seen = _intersection(box, visible)
        if seen is None or _visible_share(box, seen, mask if obj.seg is not None else None) < min_visible:
            continue
        locs = codec.box_to_locs(transform.box(seen), 1, 1)
        if locs[2] <= locs[0] or locs[3] <= locs[1]:
            continue  # thinner than a loc bin in the frame: no valid object to write
        crop = None
        if obj.seg is not None:
            crop = crop_to_64(mask, _pixels(seen, width, height))
            crop = np.ascontiguousarray(crop[:, ::-1]) if transform.flip else crop
        placed.append(PlacedObject(locs, obj.label, crop))
    return TransformedExample(transform.image(image), placed)


def _intersection(a: Box, b: Box) -> Box | None:
    box = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    return box if box[2] > box[0] and box[3] > box[1] else None


def _pixels(box: Box, width: int, height: int) -> Box:
    """A normalised box in the pixels of a width x height image."""
    return box[0] * width, box[1] * height, box[2] * width, box[3] * height


def _visible_share(box: Box, seen: Box, mask: np.ndarray | None) -> float:
    """The share of an object in the frame: of its mask's pixels in its box (those the VAE would encode), or
    of its box's area when it has no mask or no mask pixel there."""
    if mask is not None:
        height, width = mask.shape
        counts = []
        for part in (seen, box):
            x1, y1, x2, y2 = crop_box(_pixels(part, width, height), width, height)
            counts.append(np.count_nonzero(mask[y1:y2, x1:x2]))
        if counts[1]:
            return counts[0] / counts[1]
    return ((seen[2] - seen[0]) * (seen[3] - seen[1])) / ((box[2] - box[0]) * (box[3] - box[1]))


@dataclasses.dataclass(frozen=True)
class Targets:
    """An augmented example's target text, and per object with seg tokens, in the suffix's order, the 64x64
    crop its tokens encode: the mask loss's `target_masks` (`train.data.mask_loss_targets`) under augmentation."""

    suffix: str
    target_masks: np.ndarray  # float32 [objects with seg tokens, 64, 64]


def encode(model: MaskVAE, examples: Sequence[TransformedExample]) -> list[Targets]:
    """The examples' targets, their objects' crops encoded by the run's VAE in one call, objects in reading
    order. One example: `encode(model, [example])[0]`."""
    crops = [o.crop for example in examples for o in example.objects if o.crop is not None]
    codes = iter(model.encode(np.reshape(crops, (len(crops), MASK_SIZE, MASK_SIZE))))
    targets = []
    for example in examples:
        pairs = [
            (codec.SegObject(o.locs, None if o.crop is None else tuple(int(v) for v in next(codes)), o.label), o.crop)
            for o in example.objects
        ]
        pairs.sort(key=lambda pair: codec.reading_order(pair[0]))
        masks = [crop for _, crop in pairs if crop is not None]
        target_masks = np.stack(masks) if masks else np.zeros((0, MASK_SIZE, MASK_SIZE), np.float32)
        targets.append(Targets(codec.format_suffix(obj for obj, _ in pairs), target_masks))
    return targets
