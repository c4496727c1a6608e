"""Consensus decoding (`--samples G`): G answers sampled for one prompt become one answer, in tokens.

A model's samples hold better masks than its greedy answer, and their agreement is better still: on the
demo's task a pixel-wise vote of 16 sampled masks scores +0.02-0.04 mIoU over greedy decoding
(docs/results.md). The vote is taken in token space, so the answer stays one text that every later step
(the prediction cache, masks, scores, outputs) reads as it reads a greedy one, and scores as the pixel vote
did: the answer has the most common number of objects; each object of the sample that agrees best with
the others is matched in every sample (the same label, box IoU >= 0.5), its box is the median of the
matched boxes (coordinate by coordinate), and each of its 16 seg codes is the code nearest the mean of the
matched codes' codebook vectors. An object's confidence is the share of the G samples that hold it.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

from paliseg import tokens as codec

MATCH_IOU = 0.5  # two samples' objects are one object when their boxes overlap this much


def box_iou(a: Sequence[int], b: Sequence[int]) -> float:
    """IoU of two loc boxes (y1, x1, y2, x2)."""
    height = min(a[2], b[2]) - max(a[0], b[0])
    width = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(height, 0) * max(width, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else float(a == b)


def _match(anchor: codec.SegObject, objects: Sequence[codec.SegObject], taken: set[int]) -> int | None:
    """The index of the object of one sample that is `anchor`'s (same label, best box IoU >= MATCH_IOU)."""
    scored = [(box_iou(anchor.locs, o.locs), i) for i, o in enumerate(objects) if o.label == anchor.label]
    scored = [(iou, i) for iou, i in scored if iou >= MATCH_IOU and i not in taken]
    return max(scored)[1] if scored else None


def _matches(anchor: Sequence[codec.SegObject], samples: Sequence[Sequence[codec.SegObject]]) -> list[list]:
    """For each object of `anchor`, its match in every sample (one object of a sample matches once)."""
    members: list[list[codec.SegObject]] = [[] for _ in anchor]
    for objects in samples:
        taken: set[int] = set()
        for index, obj in enumerate(anchor):
            found = _match(obj, objects, taken)
            if found is not None:
                taken.add(found)
                members[index].append(objects[found])
    return members


def _merged(members: Sequence[codec.SegObject], codebook: np.ndarray) -> codec.SegObject:
    """One object from its matches: the median box, each seg code nearest the mean matched code vector."""
    locs = tuple(int(v) for v in np.round(np.median([m.locs for m in members], axis=0)))
    segs = np.asarray([m.seg for m in members if m.seg is not None], np.int64)
    if not len(segs):
        return codec.SegObject(locs, None, members[0].label)
    means = codebook[segs].mean(axis=0)  # [16, D]
    nearest = np.argmin(((means[:, None, :] - codebook[None]) ** 2).sum(axis=-1), axis=1)
    return codec.SegObject(locs, tuple(int(v) for v in nearest), members[0].label)


def consensus(texts: Sequence[str], codebook) -> tuple[str, tuple[float, ...]]:
    """(the answer's text, each of its objects' share of the samples holding it) of G sampled `texts` of one
    prompt; `codebook`: the VAE's [128, D] code vectors. Objects in reading order. Where most samples hold
    no object list at all (a caption, or invalid output), the answer is the most common of those texts."""
    codebook = np.asarray(codebook, np.float64)
    parsed = [(text, codec.parse_suffix(text, require_seg=False).objects) for text in texts]
    samples = [objects for text, objects in parsed if objects or not text.strip()]
    if 2 * len(samples) < len(texts):
        others = collections.Counter(text for text, objects in parsed if text.strip() and not objects)
        return others.most_common(1)[0][0], ()
    counts = collections.Counter(len(objects) for objects in samples)
    size = min(count for count, times in counts.items() if times == max(counts.values()))
    if size == 0:
        return "", ()
    candidates = [objects for objects in samples if len(objects) == size]
    agreement = [sum(len(m) for m in _matches(objects, samples)) for objects in candidates]
    members = _matches(candidates[int(np.argmax(agreement))], samples)
    merged = [(_merged(group, codebook), len(group) / len(texts)) for group in members]
    merged.sort(key=lambda pair: codec.reading_order(pair[0]))
    return codec.format_suffix(obj for obj, _ in merged), tuple(share for _, share in merged)
