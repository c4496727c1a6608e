"""`paliseg validate DIR`: check every record before a long training run trips on it (JSONL or TFDS folder).

Per record: the JSON line parses; the image decodes; the mask exists, decodes and has the image's size;
the suffix parses into objects with exactly 4 loc and 16 seg tokens each and valid boxes (y2 > y1,
x2 > x1) and nothing else; an empty suffix goes with an empty mask and a non-empty one with a non-empty
mask; and, when the record carries `objects` provenance, it lists as many objects as the suffix. Every
problem is reported as `file:line: message`, not just the first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from paliseg import console, dataset, records, tokens


@dataclasses.dataclass
class SplitCheck:
    split: str
    location: str  # the split's annotation file, or its TFDS shards (`dataset.split_location`)
    records: int = 0
    objects: int = 0
    empty: int = 0
    bad_records: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)


def validate(directory: str | Path, splits: Sequence[str] | None = None) -> list[SplitCheck]:
    directory = Path(directory)
    splits = list(splits or dataset.find_splits(directory))
    # every split is there before any is checked
    locations = [dataset.split_location(directory, split) for split in splits]
    sizes: dataset.ImageSizes = {}
    return [_check_split(directory, split, location, sizes) for split, location in zip(splits, locations)]


def _check_split(directory: Path, split: str, location: str, sizes: dataset.ImageSizes) -> SplitCheck:
    check = SplitCheck(split, location)
    for parsed in console.progress(dataset.read_lines(directory, split), f"validate {split}", unit="rec"):
        check.records += 1
        if isinstance(parsed, records.RecordError):
            problems = [str(parsed)]
        else:
            problems = [f"{parsed.where}: {p}" for p in _check_record(parsed, sizes, check)]
        check.problems += problems
        check.bad_records += int(bool(problems))
    return check


def _check_record(record: records.Record, sizes: dataset.ImageSizes, check: SplitCheck) -> list[str]:
    problems = []
    inspection = dataset.inspect_record(record, sizes)
    if inspection.image_problem is not None:
        problems.append(inspection.image_problem.message)

    parsed = tokens.parse_suffix(record.suffix)
    if parsed.invalid:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(parsed.invalid.items()))
        problems.append(f"suffix has {parsed.invalid_count} invalid object(s): {reasons}")
    n = len(parsed.objects)
    locs, segs = len(tokens.LOC_TOKEN.findall(record.suffix)), len(tokens.SEG_TOKEN.findall(record.suffix))
    if not parsed.invalid and (locs != 4 * n or segs != tokens.SEG_PER_OBJECT * n):
        problems.append(
            f"suffix has {locs} loc and {segs} seg tokens for {n} object(s) (expected {4 * n} and {tokens.SEG_PER_OBJECT * n})"
        )
    listed = record.extra.get("objects")
    if isinstance(listed, list) and len(listed) != n + parsed.invalid_count:
        problems.append(f"'objects' lists {len(listed)} object(s) but the suffix has {n + parsed.invalid_count}")
    check.objects += n
    check.empty += int(not record.suffix.strip())

    if record.mask_path is None:
        problems.append("no 'mask' field: a ground-truth mask PNG is required")
    elif inspection.mask_problem is not None:
        problems.append(inspection.mask_problem.message)
    if inspection.mask is not None:
        if record.suffix.strip() and not inspection.mask.any():
            problems.append(f"suffix has {n} object(s) but the mask is empty")
        if not record.suffix.strip() and inspection.mask.any():
            problems.append("suffix is empty but the mask is not")
    return problems


def result_json(checks: list[SplitCheck]) -> dict[str, Any]:
    return {
        "ok": not any(c.problems for c in checks),
        "splits": {
            c.split: {
                "file": c.location,
                "records": c.records,
                "objects": c.objects,
                "empty": c.empty,
                "bad_records": c.bad_records,
                "problems": len(c.problems),
            }
            for c in checks
        },
        "problems": [p for c in checks for p in c.problems],
    }


def result_text(checks: list[SplitCheck], max_problems: int = 50) -> str:
    rows = [(c.split, c.records, c.objects, c.empty, c.bad_records) for c in checks]
    lines = [console.markdown_table(["split", "records", "objects", "empty records", "bad records"], rows)]
    problems = [p for c in checks for p in c.problems]
    if problems:
        lines = (
            problems[:max_problems]
            + ([f"... and {len(problems) - max_problems} more"] if len(problems) > max_problems else [])
            + [""]
            + lines
        )
        lines.append(f"\nINVALID: {len(problems)} problem(s) in {sum(c.bad_records for c in checks)} record(s)")
    else:
        lines.append("\nOK: every record is valid")
    return "\n".join(lines)
