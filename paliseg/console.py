"""How commands talk to people and scripts.

Every command that reports a result calls `report`: with `--json` the machine-readable result goes to
stdout and the human text to stderr, so `paliseg score ... --json | jq` always gets clean JSON. Long work
shows a progress bar on stderr (hidden when stderr is not a terminal, so CI logs stay short).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def report(result: Any, human: str, as_json: bool) -> None:
    if as_json:
        print(human, file=sys.stderr)
        print(json.dumps(result, default=_jsonable, sort_keys=True))
    else:
        print(human)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def info(message: str) -> None:
    """A progress message for people, on stderr."""
    print(message, file=sys.stderr, flush=True)


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    return iter(tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, disable=None, dynamic_ncols=True))


def progress_bar(desc: str, total: int | None = None, unit: str = "it") -> tqdm:
    """A manual bar (`update`, `set_postfix`) for loops that are not a single iterable, like training."""
    return tqdm(desc=desc, total=total, unit=unit, file=sys.stderr, disable=None, dynamic_ncols=True)


def markdown_table(headers: list[str], rows: Iterable[Iterable[Any]]) -> str:
    """A GitHub-flavoured Markdown table; floats are shown with 4 decimals."""

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
