"""Decoded model text -> objects and their full-resolution masks: the one path from text to masks that
`infer.prediction` (predict, eval) and the reinforcement fine-tuning reward (`train.grpo`) share.

Model output is untrusted: `paliseg.tokens.parse_suffix` never raises and counts the chunks it rejects.
- An empty text is a valid answer, "no object here": an empty union mask.
- A non-empty text with no valid object at all is invalid: `union` is None (it scores 0).
- An object with loc tokens but no seg tokens (a `detect`-style answer) has a box and no mask.
- Masks: the VAE decoder, then big_vision's paste-back (`vae.masks.paste_objects`) at the given resolution.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np

from paliseg import tokens as codec
from vae.masks import DegenerateBoxWarning, paste_objects
from vae.model import TOKENS


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
    return texts_masks([(text, width, height)], vae_model, degenerate)[0]


def texts_masks(
    texts: Sequence[tuple[str, int, int]], vae_model, degenerate: collections.Counter | None = None
) -> list[TextMasks]:
    """`text_masks` of many (text, width, height): every object of every text goes through the VAE
    decoder in one batch (one call per text costs ~10x more on a CPU: GRPO rewards hundreds per step)."""
    parsed = [codec.parse_suffix(text, require_seg=False) for text, _, _ in texts]
    with_seg = [[o for o in p.objects if o.seg is not None] for p in parsed]
    codes = np.asarray([o.seg for objects in with_seg for o in objects], np.int32).reshape(-1, TOKENS)
    logits = vae_model.decode(codes)
    results, start = [], 0
    for (_, width, height), text_parsed, objects in zip(texts, parsed, with_seg):
        object_logits, start = logits[start : start + len(objects)], start + len(objects)
        if text_parsed.invalid_count and not text_parsed.objects:
            results.append(TextMasks([], [], [], None, text_parsed.invalid))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateBoxWarning)  # counted in `degenerate` instead
            masks = paste_objects(object_logits, [o.locs for o in objects], width, height, degenerate)
        mask_of = {id(o): m for o, m in zip(objects, masks)}
        union = np.logical_or.reduce(masks, axis=0) if len(masks) else np.zeros((height, width), bool)
        results.append(
            TextMasks(
                text_parsed.objects,
                text_parsed.chunks,
                [mask_of.get(id(o)) for o in text_parsed.objects],
                union,
                text_parsed.invalid,
            )
        )
    return results
