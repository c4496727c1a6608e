"""Decoded text -> what a user needs: objects with labels, pixel boxes and full-resolution masks.

The parsing and the masks are `vae.text.texts_masks` (shared with the reinforcement fine-tuning reward).
Model output is untrusted: `paliseg.tokens.parse_suffix` never raises and counts the chunks it rejects.
Conventions (the sweep scores with them, docs/metrics.md quotes them):
- An empty text is a valid answer: "no object of this prompt here" (an empty mask).
- A non-empty text with no valid object at all is an invalid prediction: `mask` is None, and the
  scoring gives it 0 on every metric (`metrics.scoring`).
- An object with loc tokens but no seg tokens (a `detect`-style answer) keeps its box and has no mask.
- Masks come from `vae.tokens_to_masks` (big_vision's paste-back) at the image's full resolution;
  boxes from `paliseg.tokens.locs_to_box` (pixel x1, y1, x2, y2, floats).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from metrics import scoring
from paliseg import records
from paliseg.dataset import ground_truth  # noqa: F401 (part of this module's API: the sweep uses it)
from vae import TextMasks, texts_masks


@dataclasses.dataclass(frozen=True)
class PredictedObject:
    label: str
    box: tuple[float, float, float, float]  # pixel (x1, y1, x2, y2) in the full image
    locs: tuple[int, int, int, int]  # loc indices (y1, x1, y2, x2)
    seg: tuple[int, ...] | None  # 16 seg indices, or None for a box-only object
    mask: np.ndarray | None  # bool [H, W] at full resolution, None for a box-only object
    confidence: float | None = None  # in (0, 1]: `paliseg.decoding.chunk_scores`; None when not known

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "confidence": None if self.confidence is None else round(self.confidence, 4),
            "box_xyxy": [round(v, 2) for v in self.box],
            "locs": list(self.locs),
            "seg": None if self.seg is None else list(self.seg),
            "area": None if self.mask is None else int(np.count_nonzero(self.mask)),
        }


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One image and one prompt: the raw text, its objects and their union mask.

    `mask` is None only for an invalid prediction (text with no valid object); `invalid` counts the
    rejected chunks of the text by reason (see `paliseg.tokens.parse_suffix`).
    """

    prompt: str
    text: str
    width: int
    height: int
    objects: tuple[PredictedObject, ...]
    invalid: collections.Counter
    mask: np.ndarray | None

    @property
    def valid(self) -> bool:
        return self.mask is not None

    @property
    def boxes(self) -> list[tuple[float, float, float, float]]:
        return [o.box for o in self.objects]

    @property
    def labels(self) -> list[str]:
        return [o.label for o in self.objects]

    @property
    def confidences(self) -> tuple[float | None, ...]:
        return tuple(o.confidence for o in self.objects)

    @property
    def masks(self) -> np.ndarray:
        """bool [N, H, W]: each object's mask (all-zero for a box-only object)."""
        masks = np.zeros((len(self.objects), self.height, self.width), bool)
        for index, obj in enumerate(self.objects):
            if obj.mask is not None:
                masks[index] = obj.mask
        return masks

    @property
    def invalid_count(self) -> int:
        return sum(self.invalid.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "text": self.text,
            "width": self.width,
            "height": self.height,
            "valid": self.valid,
            "objects": [o.to_json() for o in self.objects],
            "invalid": dict(self.invalid),
            "area": None if self.mask is None else int(np.count_nonzero(self.mask)),
        }


def from_text(
    text: str,
    prompt: str,
    width: int,
    height: int,
    vae_model,
    degenerate: collections.Counter | None = None,
    chunk_scores: Sequence[float | None] | None = None,
) -> Prediction:
    """Parse decoded text and paste each object's mask back at `width` x `height`. `degenerate` counts,
    by reason, the boxes that cover no pixel (their mask is empty); `chunk_scores` (per ";"-chunk of the
    text, from `paliseg.decoding.Decoded`) gives each object its confidence."""
    return from_texts([(text, prompt, width, height)], vae_model, degenerate, [chunk_scores])[0]


def from_texts(
    texts: Sequence[tuple[str, str, int, int]],
    vae_model,
    degenerate: collections.Counter | None = None,
    chunk_scores: Sequence[Sequence[float | None] | None] | None = None,
) -> list[Prediction]:
    """`from_text` of many (text, prompt, width, height), every object's mask in one VAE batch
    (`vae.texts_masks`); `chunk_scores`: one list (or None) per text."""
    decoded = texts_masks([(text, width, height) for text, _, width, height in texts], vae_model, degenerate)
    chunk_scores = chunk_scores or [None] * len(texts)
    return [
        _prediction(one, text, prompt, width, height, scores)
        for one, (text, prompt, width, height), scores in zip(decoded, texts, chunk_scores)
    ]


def _prediction(
    decoded: TextMasks, text: str, prompt: str, width: int, height: int, chunk_scores: Sequence[float | None] | None
) -> Prediction:
    if decoded.union is None:
        return Prediction(prompt, text, width, height, (), decoded.invalid, None)
    objects = tuple(
        PredictedObject(
            label=o.label,
            box=box,
            locs=o.locs,
            seg=o.seg,
            mask=mask,
            confidence=None if chunk_scores is None else chunk_scores[chunk],
        )
        for o, chunk, mask, box in zip(decoded.objects, decoded.chunks, decoded.masks, decoded.boxes(width, height))
    )
    return Prediction(prompt, text, width, height, objects, decoded.invalid, decoded.union)


def score(prediction: Prediction, record: records.Record, gt_mask: np.ndarray, gt_boxes) -> scoring.ImageScore:
    """`metrics.scoring.score_image` of a prediction (an invalid one scores 0), boxes matched too."""
    return scoring.score_image(
        prediction.mask, gt_mask, record.prefix, record.image,
        pred_boxes=prediction.boxes, gt_boxes=gt_boxes, invalid_objects=prediction.invalid_count,
    )  # fmt: skip
