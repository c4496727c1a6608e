"""Objects from annotated geometry (with the checks every reader shares) and their full-size masks.

Rasterisation is pycocotools' (`frPyObjects` + `merge` + `decode`), the reference COCO tools use, so a
converted ground-truth mask is exactly what pycocotools draws for the polygon. A box mask (`fill`) is the
pixels whose centres lie inside the box.

Orientation: an image carrying an EXIF orientation tag is read in its displayed frame (`paliseg.images`).
When a COCO file describes the stored frame instead, `to_displayed_frame` moves its objects: boxes by the
exact point transform of the orientation, shapes rasterised in the frame they were drawn in and their
pixels turned like the image (pycocotools' rasterisation is not symmetric under flips, so turning the
polygon first would move edge pixels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from converters.sources import IssueLog, Polygons, RasterMask, Rle, Shape, SourceImage, SourceObject
from paliseg import images

# Mask-folder components smaller than this are speckle, not objects (real crack components are >= 96 px).
MIN_COMPONENT_PIXELS = 10


def _clip_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height)


def box_object(
    class_name: str, box_xyxy: Sequence[float], width: int, height: int, where: str, log: IssueLog
) -> SourceObject | None:
    """A box-only object; boxes reaching outside the image are clipped (warning), empty ones skipped."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    if not all(np.isfinite([x1, y1, x2, y2])) or x2 <= x1 or y2 <= y1:
        log.skip(where, "zero_area", f"box {_fmt(box_xyxy)} has no area")
        return None
    clipped = _clip_box(box_xyxy, width, height)
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        log.skip(where, "outside_image", f"box {_fmt(box_xyxy)} lies outside the {width}x{height} image")
        return None
    if clipped != (x1, y1, x2, y2):
        log.warn(where, "clipped_to_image", f"box {_fmt(box_xyxy)} clipped to the {width}x{height} image")
    return SourceObject(class_name, clipped, None, where)


def usable_rings(rings: Sequence[Sequence[float]], where: str, log: IssueLog) -> list[tuple[float, ...]]:
    """The rings with at least 3 finite x,y points; the others are dropped with a warning."""
    usable = []
    for ring in rings:
        values = [float(v) for v in ring]
        if len(values) < 6 or len(values) % 2 or not all(np.isfinite(values)):
            log.warn(
                where, "bad_polygon_ring", f"polygon ring with {len(values)} values dropped (needs >= 3 x,y points)"
            )
            continue
        usable.append(tuple(values))
    return usable


def polygon_object(
    class_name: str, rings: Sequence[tuple[float, ...]], width: int, height: int, where: str, log: IssueLog
) -> SourceObject | None:
    """A polygon object from usable rings (see `usable_rings`), in pixels. Vertices outside the image are
    clipped (warning); a polygon with nothing inside the image is skipped."""
    points = np.concatenate([np.reshape(r, (-1, 2)) for r in rings])
    extent = (points[:, 0].min(), points[:, 1].min(), points[:, 0].max(), points[:, 1].max())
    if extent[2] <= extent[0] or extent[3] <= extent[1]:
        log.skip(where, "zero_area", f"polygon with extent {_fmt(extent)} has no area")
        return None
    box = _clip_box(extent, width, height)
    if box[2] <= box[0] or box[3] <= box[1]:
        log.skip(where, "outside_image", f"polygon with extent {_fmt(extent)} lies outside the {width}x{height} image")
        return None
    if box != tuple(float(v) for v in extent):
        log.warn(where, "clipped_to_image", f"polygon with extent {_fmt(extent)} clipped to the {width}x{height} image")
    return SourceObject(class_name, box, Polygons(tuple(rings)), where)


def rle_object(class_name: str, rle: dict, width: int, height: int, where: str, log: IssueLog) -> SourceObject | None:
    """An RLE object (COCO `iscrowd` style); its box is the decoded mask's pixel extent."""
    try:
        mask = _decode_rle(rle, width, height)
    except (TypeError, ValueError, KeyError) as error:
        log.skip(where, "bad_rle", f"unreadable RLE segmentation: {error}")
        return None
    return _raster_object(class_name, mask, Rle(rle), where, log)


def mask_components(class_name: str, mask: np.ndarray, where: str, log: IssueLog) -> list[SourceObject]:
    """Instances of a union mask: its 8-connected components (thin diagonal cracks stay whole)."""
    labels, _count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    objects = []
    for index, slices in enumerate(ndimage.find_objects(labels), start=1):
        pixels = labels[slices] == index
        if pixels.sum() < MIN_COMPONENT_PIXELS:
            log.warn(where, "speck_removed", f"component of {int(pixels.sum())} px (< {MIN_COMPONENT_PIXELS}) ignored")
            continue
        ys, xs = slices
        shape = RasterMask(pixels, xs.start, ys.start)
        objects.append(SourceObject(class_name, _raster_box(shape), shape, f"{where} component {index}"))
    return objects


def _raster_object(class_name: str, mask: np.ndarray, shape: Shape, where: str, log: IssueLog) -> SourceObject | None:
    ys, xs = np.nonzero(mask)
    if not len(ys):
        log.skip(where, "empty_mask", "segmentation covers no pixel")
        return None
    return SourceObject(
        class_name, (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)), shape, where
    )


def _raster_box(shape: RasterMask) -> tuple[float, float, float, float]:
    h, w = shape.pixels.shape
    return float(shape.x1), float(shape.y1), float(shape.x1 + w), float(shape.y1 + h)


def _decode_rle(rle: dict, width: int, height: int) -> np.ndarray:
    if isinstance(rle.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(rle, *rle.get("size", (height, width)))
    elif isinstance(rle.get("counts"), str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    mask = mask_utils.decode(rle).astype(bool)
    if mask.shape != (height, width):
        raise ValueError(f"RLE size {mask.shape} is not the image's {(height, width)}")
    return mask


def object_mask(obj: SourceObject, width: int, height: int) -> np.ndarray | None:
    """Full-size bool mask of an object's shape; None for a box-only object (needs `--box-masks`)."""
    shape = obj.shape
    if shape is None:
        return None
    if isinstance(shape, Polygons):
        rles = mask_utils.frPyObjects([list(r) for r in shape.rings], height, width)
        return mask_utils.decode(mask_utils.merge(rles)).astype(bool)
    if isinstance(shape, Rle):
        return _decode_rle(shape.rle, width, height)
    mask = np.zeros((height, width), bool)
    h, w = shape.pixels.shape
    mask[shape.y1 : shape.y1 + h, shape.x1 : shape.x1 + w] = shape.pixels
    return mask


def box_mask(box_xyxy: Sequence[float], width: int, height: int) -> np.ndarray:
    """The pixels whose centres lie inside the box (the `fill` box mask, and SAM's clipping region)."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    cols = (np.arange(width) + 0.5 >= x1) & (np.arange(width) + 0.5 <= x2)
    rows = (np.arange(height) + 0.5 >= y1) & (np.arange(height) + 0.5 <= y2)
    return rows[:, None] & cols[None, :]


def displayed_point(x: float, y: float, orientation: int, width: int, height: int) -> tuple[float, float]:
    """A point of the stored `width` x `height` frame (pixel edges at integers) in the displayed frame of an
    image with this EXIF orientation: where `ImageOps.exif_transpose` takes it."""
    return {
        1: (x, y),
        2: (width - x, y),  # mirrored left-right
        3: (width - x, height - y),  # turned 180 degrees
        4: (x, height - y),  # mirrored top-bottom
        5: (y, x),  # transposed
        6: (height - y, x),  # turned 90 degrees clockwise
        7: (height - y, width - x),  # transversed
        8: (y, width - x),  # turned 90 degrees anticlockwise
    }[orientation]


def displayed_box(
    box_xyxy: Sequence[float], orientation: int, width: int, height: int
) -> tuple[float, float, float, float]:
    """A stored-frame (x1, y1, x2, y2) box in the displayed frame (see `displayed_point`)."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    (ax, ay), (bx, by) = (displayed_point(x, y, orientation, width, height) for x, y in ((x1, y1), (x2, y2)))
    return min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)


def displayed_mask(mask: np.ndarray, orientation: int) -> np.ndarray:
    """A stored-frame mask turned like the image's pixels (the reader's own transpose)."""
    method = images.ORIENTATION_TRANSPOSE.get(orientation)
    if method is None:
        return np.asarray(mask, bool)
    turned = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L").transpose(method)
    return np.asarray(turned) > 127


def to_displayed_frame(image: SourceImage, orientation: int) -> SourceImage:
    """An image whose annotations describe its stored frame (`image.width` x `image.height`), with them moved
    to the displayed frame of its EXIF `orientation`: boxes exactly, shapes as turned raster masks."""
    width, height = image.width, image.height
    objects = []
    for obj in image.objects:
        box = displayed_box(obj.box_xyxy, orientation, width, height)
        shape = None
        if obj.shape is not None:
            mask = displayed_mask(object_mask(obj, width, height), orientation)
            ys, xs = np.nonzero(mask)
            if len(ys):
                crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
                shape = RasterMask(crop, int(xs.min()), int(ys.min()), origin=shape_origin(obj.shape))
            else:  # covers no pixel: an empty mask, skipped as such by the converter
                shape = RasterMask(np.zeros((0, 0), bool), 0, 0, origin=shape_origin(obj.shape))
        objects.append(dataclasses.replace(obj, box_xyxy=box, shape=shape))
    shown_width, shown_height = images.displayed_size((width, height), orientation)
    return dataclasses.replace(image, width=shown_width, height=shown_height, objects=objects)


def shape_origin(shape: Shape) -> str:
    """Where an object's mask comes from, for provenance: "polygon", "rle" or "mask"."""
    if isinstance(shape, RasterMask):
        return shape.origin
    return {Polygons: "polygon", Rle: "rle"}[type(shape)]


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"
