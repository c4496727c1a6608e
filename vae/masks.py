"""Full-resolution masks <-> seg tokens, with big_vision's crop, resize and paste-back conventions.

To tokens (`refcoco_mask2str`): round the pixel box, crop the mask to it, resize the crop to 64x64 with an
antialiased bilinear filter (TF `tf.image.resize(..., 'bilinear', antialias=True)`; here the same
separable triangle-kernel weights, computed in NumPy so that every crop size costs no recompile), keep the
soft values in [0, 1] and encode.

To a mask (`Evaluator.run`): decode the 16 tokens to 64x64 logits, resize them with PIL bilinear to the
integer-truncated pixel box of the loc tokens, threshold at > 0, paste into an empty full-size mask.

A degenerate box (zero width or height after rounding or truncation, or entirely outside the image) never
crashes: tokens_to_mask gives an empty mask, mask_to_tokens encodes an empty 64x64 crop, and both emit a
`DegenerateBoxWarning` and, when given a `counts` Counter, add one to `counts[reason]`.
"""

from __future__ import annotations

import collections
import functools
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import sparse

from paliseg import tokens as codec
from vae.model import MASK_SIZE, MaskVAE


class DegenerateBoxWarning(UserWarning):
    """A box that covers no pixel: its mask is empty."""


def _degenerate(reason: str, box, counts: collections.Counter | None) -> None:
    warnings.warn(f"degenerate box {tuple(box)} ({reason}): using an empty mask", DegenerateBoxWarning, stacklevel=3)
    if counts is not None:
        counts[reason] += 1


@functools.lru_cache(maxsize=4096)
def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of an antialiased bilinear (triangle) resize along one axis.

    The scale-and-translate formulation shared by TF's `antialias=True` and `jax.image.resize`: output
    pixel i samples input coordinate (i + 0.5) * in/out - 0.5; when shrinking, the triangle is widened by
    in/out (a low-pass filter); weights falling outside the input are dropped and the rest renormalised.
    """
    scale = in_size / out_size
    kernel_scale = max(scale, 1.0)
    sample = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    distance = np.abs(sample[:, None] - np.arange(in_size, dtype=np.float64)[None, :]) / kernel_scale
    weights = np.maximum(0.0, 1.0 - distance)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32)


@functools.lru_cache(maxsize=4096)
def _band(in_size: int, out_size: int) -> sparse.csr_matrix:
    """`resize_weights` as a sparse matrix: each output pixel reads only the ~2 x in/out input pixels
    under its triangle, so a 2000 x 1500 crop resizes in milliseconds instead of a dense product's 100."""
    return sparse.csr_matrix(resize_weights(in_size, out_size))


def resize_antialiased(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """float [h, w] -> float32 [height, width], antialiased bilinear (see `resize_weights`)."""
    image = np.asarray(image, dtype=np.float32)
    rows = _band(image.shape[0], height) @ image  # [height, w]
    return np.asarray((_band(image.shape[1], width) @ rows.T).T, dtype=np.float32)


def crop_box(box_xyxy: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box (x1, y1, x2, y2) -> rounded integer crop box clipped to the image, as big_vision crops."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box_xyxy)
    return max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Pixel box (x1, y1, x2, y2), exclusive end, of the mask's foreground; None if empty."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def crop_to_64(
    full_mask: np.ndarray, box_xyxy: Sequence[float], counts: collections.Counter | None = None
) -> np.ndarray:
    """The encoder input of one object: the mask cropped to its rounded box, resized to 64x64 in [0, 1]."""
    full_mask = np.asarray(full_mask)
    if full_mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {full_mask.shape}")
    height, width = full_mask.shape
    x1, y1, x2, y2 = crop_box(box_xyxy, width, height)
    if x2 <= x1 or y2 <= y1:
        _degenerate("outside_image" if _outside(box_xyxy, width, height) else "zero_area", box_xyxy, counts)
        return np.zeros((MASK_SIZE, MASK_SIZE), np.float32)
    crop = (full_mask[y1:y2, x1:x2] > 0).astype(np.float32)
    return np.clip(resize_antialiased(crop, MASK_SIZE, MASK_SIZE), 0.0, 1.0)


def _outside(box_xyxy: Sequence[float], width: int, height: int) -> bool:
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    return x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height


def masks_to_tokens(
    model: MaskVAE,
    masks: Sequence[np.ndarray],
    boxes: Sequence[Sequence[float]],
    counts: collections.Counter | None = None,
) -> np.ndarray:
    """Full-resolution masks (one per box; the same union mask may repeat) + pixel boxes -> int32 [N, 16]."""
    if len(masks) != len(boxes):
        raise ValueError(f"masks_to_tokens: {len(masks)} masks but {len(boxes)} boxes")
    crops = [crop_to_64(m, b, counts) for m, b in zip(masks, boxes)]
    return model.encode(np.reshape(crops, (len(crops), MASK_SIZE, MASK_SIZE)))


def mask_to_tokens(
    model: MaskVAE, full_mask: np.ndarray, box_xyxy: Sequence[float], counts: collections.Counter | None = None
) -> tuple[int, ...]:
    """One full-resolution mask (H, W) and its pixel box (x1, y1, x2, y2) -> 16 seg indices."""
    return tuple(int(v) for v in masks_to_tokens(model, [full_mask], [box_xyxy], counts)[0])


def paste(
    logits: np.ndarray, pixel_box: Sequence[int], width: int, height: int, counts: collections.Counter | None = None
) -> np.ndarray:
    """64x64 decoder logits -> bool [height, width]: PIL-bilinear resized into `pixel_box`, > 0, pasted."""
    mask = np.zeros((height, width), dtype=bool)
    x1, y1, x2, y2 = (int(v) for v in pixel_box)
    cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    if x2 <= x1 or y2 <= y1 or cx2 <= cx1 or cy2 <= cy1:
        _degenerate("outside_image" if (x2 > x1 and y2 > y1) else "zero_area", pixel_box, counts)
        return mask
    resized = Image.fromarray(np.asarray(logits, dtype=np.float32), mode="F").resize((x2 - x1, y2 - y1), Image.BILINEAR)
    region = np.asarray(resized) > 0.0
    mask[cy1:cy2, cx1:cx2] = region[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]
    return mask


def tokens_to_masks(
    model: MaskVAE,
    segs: Sequence[Sequence[int]],
    locs: Sequence[Sequence[int]],
    width: int,
    height: int,
    counts: collections.Counter | None = None,
) -> np.ndarray:
    """N objects of one image (16 seg indices and 4 loc indices (y1, x1, y2, x2) each) -> bool [N, H, W]."""
    if len(segs) != len(locs):
        raise ValueError(f"tokens_to_masks: {len(segs)} seg sequences but {len(locs)} loc boxes")
    if not len(segs):
        return np.zeros((0, height, width), dtype=bool)
    return paste_objects(
        model.decode(np.asarray(segs, dtype=np.int32).reshape(len(segs), -1)), locs, width, height, counts
    )


def paste_objects(
    logits: np.ndarray,
    locs: Sequence[Sequence[int]],
    width: int,
    height: int,
    counts: collections.Counter | None = None,
) -> np.ndarray:
    """N objects' decoder logits [N, 64, 64] and loc indices (y1, x1, y2, x2) -> bool [N, H, W]."""
    boxes = [codec.locs_to_pixel_box(object_locs, width, height) for object_locs in locs]
    masks = [paste(m, b, width, height, counts) for m, b in zip(logits, boxes)]
    return np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)


def tokens_to_mask(
    model: MaskVAE,
    seg: Sequence[int],
    locs: Sequence[int],
    width: int,
    height: int,
    counts: collections.Counter | None = None,
) -> np.ndarray:
    """One object's 16 seg indices and loc indices (y1, x1, y2, x2) -> bool [height, width] mask."""
    return tokens_to_masks(model, [seg], [locs], width, height, counts)[0]
