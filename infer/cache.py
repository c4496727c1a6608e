"""The sweep's prediction cache: one append-only JSONL per checkpoint, so a crash loses at most one batch.

    REPORT_DIR/predictions/step_000025.jsonl
      {"fingerprint": {...}}                               first line: what produced the texts
      {"key": "images/a.jpg\\tsegment crack", "text": "<loc...>...", "chunk_scores": [...]}   one per record

Each decoded batch is appended and fsync'ed before the next one starts; a re-run reads the file, skips the
records it already holds and decodes only the rest. A torn last line (a crash mid-write) is dropped and the
file rewritten atomically before anything is appended. A file whose fingerprint differs (other decoding
settings, another run config) is stale: it is replaced, never mixed with new texts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from paliseg import console, files


def step_path(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / "predictions" / f"step_{step:06d}.jsonl"


class PredictionCache:
    """Decoded texts of one checkpoint, keyed by record (image path + prompt)."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any]):
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))  # as it reads back
        self.entries: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        header = _json_or_none(lines[0]) if lines else None
        if not isinstance(header, dict) or header.get("fingerprint") != self.fingerprint:
            console.info(f"{self.path}: made with other settings or another run; decoding this step again")
            self._rewrite()
            return
        torn = False
        for line in lines[1:]:
            entry = _json_or_none(line)
            if isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("text"), str):
                self.entries[entry["key"]] = entry
            else:
                torn = True
        if torn:  # a line cut by a crash: rewrite without it so appended lines start clean
            self._rewrite()

    def _rewrite(self) -> None:
        with files.atomic_open(self.path, "w") as handle:
            handle.write(json.dumps({"fingerprint": self.fingerprint}, sort_keys=True) + "\n")
            for entry in self.entries.values():
                handle.write(json.dumps(entry, sort_keys=True) + "\n")

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def text(self, key: str) -> str:
        return self.entries[key]["text"]

    def chunk_scores(self, key: str) -> list[float | None] | None:
        """The objects' confidences (`paliseg.decoding.Decoded.chunk_scores`); None in older caches."""
        return self.entries[key].get("chunk_scores")

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [key for key in keys if key not in self.entries]

    def append(self, entries: Iterable[dict[str, Any]]) -> None:
        """Add one decoded batch durably: written, flushed and fsync'ed before returning."""
        entries = list(entries)
        if not self.path.exists():
            self._rewrite()
        with open(self.path, "a", encoding="utf-8") as handle:
            for entry in entries:
                handle.write(json.dumps(entry, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for entry in entries:
            self.entries[entry["key"]] = entry


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None
