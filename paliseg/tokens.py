"""The seg-token codec: boxes <-> loc tokens, VAE codes <-> seg tokens, objects <-> suffix strings.

Conventions are big_vision's (see docs/formats.md): loc tokens are ordered (y1, x1, y2, x2), each
`clip(round(v * 1023), 0, 1023)` of the coordinate normalised by the image height or width, decoded as
`index / 1023`. An object is four loc tokens, sixteen seg tokens, then its label after one space:

    <loc0102><loc0033><loc0511><loc0900><seg012>...<seg077> crack ; <loc...>... crack

Model output is untrusted, so `parse_suffix` accepts any string: it never raises, returns the objects that
are valid and counts, by reason, the ones that are not.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterable, Sequence

LOC_BINS = 1024
SEG_CODES = 128
SEG_PER_OBJECT = 16
OBJECT_SEPARATOR = " ; "

LOC_TOKEN = re.compile(r"<loc(\d{4})>")  # one loc token; group 1 is its index
SEG_TOKEN = re.compile(r"<seg(\d{3})>")  # one seg token; group 1 is its code
_OBJECT = re.compile(rf"(?P<locs>(?:{LOC_TOKEN.pattern})*)(?P<segs>(?:{SEG_TOKEN.pattern})*)(?P<label>[^<>]*)")


def loc_token(index: int) -> str:
    return f"<loc{index:04d}>"


def seg_token(index: int) -> str:
    return f"<seg{index:03d}>"


def loc_token_strings() -> list[str]:
    """All 1024 loc pieces in id order (as appended to the PaliGemma vocabulary)."""
    return [loc_token(i) for i in range(LOC_BINS)]


def seg_token_strings() -> list[str]:
    """All 128 seg pieces in id order."""
    return [seg_token(i) for i in range(SEG_CODES)]


def _quantize(value: float) -> int:
    return int(min(max(round(value * (LOC_BINS - 1)), 0), LOC_BINS - 1))


def box_to_locs(box_xyxy: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box (x1, y1, x2, y2) in an image of `width` x `height` -> loc indices (y1, x1, y2, x2)."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    return _quantize(y1 / height), _quantize(x1 / width), _quantize(y2 / height), _quantize(x2 / width)


def locs_to_box(locs: Sequence[int], width: int, height: int) -> tuple[float, float, float, float]:
    """Loc indices (y1, x1, y2, x2) -> pixel box (x1, y1, x2, y2) as floats, decoded with /1023."""
    y1, x1, y2, x2 = (int(v) / (LOC_BINS - 1) for v in locs)
    return x1 * width, y1 * height, x2 * width, y2 * height


def locs_to_pixel_box(locs: Sequence[int], width: int, height: int) -> tuple[int, int, int, int]:
    """Loc indices -> integer pixel box (x1, y1, x2, y2), truncated as big_vision's evaluator does."""
    return tuple(int(v) for v in locs_to_box(locs, width, height))  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class SegObject:
    """One object of a suffix: loc indices (y1, x1, y2, x2), 16 seg indices (or None for a box-only
    object, as in `detect` outputs) and a label."""

    locs: tuple[int, int, int, int]
    seg: tuple[int, ...] | None
    label: str

    def __post_init__(self):
        if len(self.locs) != 4 or not all(0 <= v < LOC_BINS for v in self.locs):
            raise ValueError(f"locs must be 4 indices in [0, {LOC_BINS}): {self.locs}")
        if self.seg is not None and (len(self.seg) != SEG_PER_OBJECT or not all(0 <= v < SEG_CODES for v in self.seg)):
            raise ValueError(f"seg must be {SEG_PER_OBJECT} indices in [0, {SEG_CODES}): {self.seg}")
        if any(c in self.label for c in "<>;") or self.label != self.label.strip():
            raise ValueError(f"label must not contain '<', '>' or ';', nor outer spaces: {self.label!r}")

    def to_text(self) -> str:
        seg = "".join(seg_token(v) for v in self.seg) if self.seg is not None else ""
        text = "".join(loc_token(v) for v in self.locs) + seg
        return f"{text} {self.label}" if self.label else text


def reading_order(obj: SegObject) -> tuple:
    """The sort key of training suffixes: top-to-bottom, then left-to-right, then by size and label."""
    return obj.locs, obj.label, obj.seg or ()


def sort_objects(objects: Iterable[SegObject]) -> list[SegObject]:
    """Objects in deterministic reading order (`reading_order`)."""
    return sorted(objects, key=reading_order)


def format_suffix(objects: Iterable[SegObject]) -> str:
    """Objects -> suffix string, in the order given (call `sort_objects` first for training data)."""
    return OBJECT_SEPARATOR.join(o.to_text() for o in objects)


@dataclasses.dataclass
class ParseResult:
    """Valid objects of a string, the index of the ";"-separated chunk each came from, and how many
    object-like chunks were rejected, by reason."""

    objects: list[SegObject]
    invalid: collections.Counter
    chunks: list[int] = dataclasses.field(default_factory=list)

    @property
    def invalid_count(self) -> int:
        return sum(self.invalid.values())


def parse_suffix(text: str, require_seg: bool = True) -> ParseResult:
    """Parse any string into objects. Never raises.

    Invalid reasons: `malformed` (text before or between the tokens), `loc_count` (not 4 loc tokens),
    `seg_count` (not 16 seg tokens; 0 is allowed when `require_seg` is False), `token_range` (a seg index
    above 127), `degenerate_box` (y2 <= y1 or x2 <= x1), `empty` (nothing between two separators).
    """
    result = ParseResult(objects=[], invalid=collections.Counter())
    if not isinstance(text, str) or not text.strip():
        return result
    for chunk_index, chunk in enumerate(text.split(";")):
        chunk = chunk.strip()
        if not chunk:
            result.invalid["empty"] += 1
            continue
        match = _OBJECT.fullmatch(chunk)
        if match is None:
            result.invalid["malformed"] += 1
            continue
        locs = [int(v) for v in LOC_TOKEN.findall(match["locs"])]
        segs = [int(v) for v in SEG_TOKEN.findall(match["segs"])]
        if len(locs) != 4:
            result.invalid["loc_count"] += 1
        elif not (len(segs) == SEG_PER_OBJECT or (not segs and not require_seg)):
            result.invalid["seg_count"] += 1
        elif any(v >= LOC_BINS for v in locs) or any(v >= SEG_CODES for v in segs):
            result.invalid["token_range"] += 1
        elif locs[2] <= locs[0] or locs[3] <= locs[1]:
            result.invalid["degenerate_box"] += 1
        else:
            seg = tuple(segs) if segs else None
            result.objects.append(SegObject(tuple(locs), seg, match["label"].strip()))  # type: ignore[arg-type]
            result.chunks.append(chunk_index)
    return result
