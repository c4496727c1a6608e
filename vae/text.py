"""Decoded model text -> objects and their full-resolution masks: the one path from text to masks that
`infer.prediction` (predict, eval) and the reinforcement fine-tuning reward (`train.grpo`) share.

Model output is untrusted: `paliseg.tokens.parse_suffix` never raises and counts the chunks it rejects.
- An empty text is a valid answer, "no object here": an empty union mask.
- A non-empty text with no valid object at all is invalid: `union` is None (it scores 0).
- An object with loc tokens but no seg tokens (a `detect`-style answer) has a box and no mask.
- Masks come from `vae.tokens_to_masks` (big_vision's paste-back) at the given resolution.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings

import numpy as np

from paliseg import tokens as codec
from vae.masks import DegenerateBoxWarning, tokens_to_masks


@dataclasses.dataclass(frozen=True)
class TextMasks:
    """A text's valid objects (and the ";"-chunk each came from), each one's mask (None for a box-only
    object), the union mask (None when the text is invalid) and the rejected chunks by reason."""

    objects: list[codec.SegObject]
    chunks: list[int]
    masks: list[np.ndarray | None]
    union: np.ndarray | None
    invalid: collections.Counter

    def boxes(self, width: int, height: int) -> list[tuple[float, float, float, float]]:
        """Each object's pixel box (x1, y1, x2, y2), as `paliseg.tokens.locs_to_box` decodes it."""
        return [codec.locs_to_box(o.locs, width, height) for o in self.objects]


def text_masks(
    text: str, width: int, height: int, vae_model, degenerate: collections.Counter | None = None
) -> TextMasks:
    """Parse `text` and paste each object's mask at `width` x `height`; `degenerate` counts, by reason,
    the boxes that cover no pixel (their mask is empty)."""
    parsed = codec.parse_suffix(text, require_seg=False)
    if parsed.invalid_count and not parsed.objects:
        return TextMasks([], [], [], None, parsed.invalid)
    with_seg = [o for o in parsed.objects if o.seg is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateBoxWarning)  # counted in `degenerate` instead
        masks = tokens_to_masks(
            vae_model, [o.seg for o in with_seg], [o.locs for o in with_seg], width, height, degenerate
        )
    mask_of = {id(o): m for o, m in zip(with_seg, masks)}
    union = np.logical_or.reduce(masks, axis=0) if len(masks) else np.zeros((height, width), bool)
    return TextMasks(parsed.objects, parsed.chunks, [mask_of.get(id(o)) for o in parsed.objects], union, parsed.invalid)
