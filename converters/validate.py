"""`paliseg validate DIR`: check every record before a long training run trips on it.

Per record: the JSON line parses; the image decodes; the mask exists, decodes and has the image's size;
the suffix parses into objects with exactly 4 loc and 16 seg tokens each and valid boxes (y2 > y1,
x2 > x1) and nothing else; an empty suffix goes with an empty mask and a non-empty one with a non-empty
mask; and, when the record carries `objects` provenance, it lists as many objects as the suffix. Every
problem is reported as `file:line: message`, not just the first.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from paliseg import console, images, records, tokens

_LOC = re.compile(r"<loc\d+>")
_SEG = re.compile(r"<seg\d+>")


@dataclasses.dataclass
class SplitCheck:
    split: str
    path: Path
    records: int = 0
    objects: int = 0
    empty: int = 0
    bad_records: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)


def validate(directory: str | Path, splits: Sequence[str] | None = None) -> list[SplitCheck]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: dataset folder not found")
    found = records.available_splits(directory)
    if not found:
        raise FileNotFoundError(f"{directory}: no _annotations.<split>.jsonl file")
    missing = [s for s in splits or () if s not in found]
    if missing:
        raise FileNotFoundError(f"{directory}: no annotation file for split(s) {', '.join(missing)} (found: {', '.join(found)})")
    sizes: dict[Path, tuple[int, int] | str] = {}
    return [_check_split(directory, split, sizes) for split in (splits or found)]


def _check_split(directory: Path, split: str, sizes: dict) -> SplitCheck:
    path = records.annotations_path(directory, split)
    check = SplitCheck(split, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in console.progress(list(enumerate(lines, start=1)), f"validate {split}", unit="rec"):
        if not line.strip():
            continue
        check.records += 1
        where = f"{path}:{number}"
        try:
            record = records.parse_record(line, path, number)
        except records.RecordError as error:
            problems = [str(error)]
        else:
            problems = [f"{where}: {p}" for p in _check_record(record, sizes, check)]
        check.problems += problems
        check.bad_records += int(bool(problems))
    return check


def _image_size(path: Path, sizes: dict) -> tuple[int, int] | str:
    """Displayed (width, height) after a full decode (`paliseg.images`: masks are in the displayed frame), or
    the reason it failed; cached per file."""
    if path not in sizes:
        if not path.is_file():
            sizes[path] = f"{path} not found"
        else:
            try:
                sizes[path] = images.read_header(path, decode=True).displayed_size
            except images.ImageReadError as error:
                sizes[path] = f"{path} is not a readable image ({error.reason})"
    return sizes[path]


def _check_record(record: records.Record, sizes: dict, check: SplitCheck) -> list[str]:
    problems = []
    image_size = _image_size(record.image_path, sizes)
    if isinstance(image_size, str):
        problems.append(f"image {image_size}")

    parsed = tokens.parse_suffix(record.suffix)
    if parsed.invalid:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(parsed.invalid.items()))
        problems.append(f"suffix has {parsed.invalid_count} invalid object(s): {reasons}")
    n = len(parsed.objects)
    locs, segs = len(_LOC.findall(record.suffix)), len(_SEG.findall(record.suffix))
    if not parsed.invalid and (locs != 4 * n or segs != tokens.SEG_PER_OBJECT * n):
        problems.append(f"suffix has {locs} loc and {segs} seg tokens for {n} object(s) (expected {4 * n} and {tokens.SEG_PER_OBJECT * n})")
    listed = record.extra.get("objects")
    if isinstance(listed, list) and len(listed) != n + parsed.invalid_count:
        problems.append(f"'objects' lists {len(listed)} object(s) but the suffix has {n + parsed.invalid_count}")
    check.objects += n
    check.empty += int(not record.suffix.strip())

    if record.mask_path is None:
        problems.append("no 'mask' field: a ground-truth mask PNG is required")
    elif not record.mask_path.is_file():
        problems.append(f"mask {record.mask_path} not found")
    else:
        try:
            mask = images.read_mask(record.mask_path)
        except images.ImageReadError as error:
            problems.append(f"mask {record.mask_path} is not a readable image ({error})")
        else:
            if not isinstance(image_size, str) and mask.shape != (image_size[1], image_size[0]):
                problems.append(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {image_size[0]}x{image_size[1]}")
            if record.suffix.strip() and not mask.any():
                problems.append(f"suffix has {n} object(s) but the mask is empty")
            if not record.suffix.strip() and mask.any():
                problems.append("suffix is empty but the mask is not")
    return problems


def result_json(checks: list[SplitCheck]) -> dict[str, Any]:
    return {
        "ok": not any(c.problems for c in checks),
        "splits": {
            c.split: {"file": str(c.path), "records": c.records, "objects": c.objects, "empty": c.empty,
                      "bad_records": c.bad_records, "problems": len(c.problems)}
            for c in checks
        },
        "problems": [p for c in checks for p in c.problems],
    }


def result_text(checks: list[SplitCheck], max_problems: int = 50) -> str:
    rows = [(c.split, c.records, c.objects, c.empty, c.bad_records) for c in checks]
    lines = [console.markdown_table(["split", "records", "objects", "empty records", "bad records"], rows)]
    problems = [p for c in checks for p in c.problems]
    if problems:
        lines = problems[:max_problems] + ([f"... and {len(problems) - max_problems} more"] if len(problems) > max_problems else []) + [""] + lines
        lines.append(f"\nINVALID: {len(problems)} problem(s) in {sum(c.bad_records for c in checks)} record(s)")
    else:
        lines.append("\nOK: every record is valid")
    return "\n".join(lines)
