"""Atomic writes, the mask PNG convention shared by every stage, and files held inside a dataset.

Nothing paliseg writes is ever half-written: content goes to a temporary file in the target folder and
is renamed into place. Existing files are replaced only when the caller says so (`overwrite=True`).

A `StoredFile` is an image or mask whose bytes live inside a dataset (a TFDS example) instead of on disk;
the readers in `paliseg.images` take it wherever they take a path, so no stage needs to know where a
record's files are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class StoredFile:
    """A file held inside a dataset, standing for the file at `path` in the JSONL layout. It answers the few
    questions readers ask a `Path` (`name`, `stem`, `is_file()`, `read_bytes()`, `str`) the way that file
    would; equal (and hashed) by `path`, so that records sharing an image share its decoded size."""

    path: Path
    read_bytes: Callable[[], bytes] = dataclasses.field(compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def stem(self) -> str:
        return self.path.stem

    def is_file(self) -> bool:
        return True  # the dataset holds it

    def __str__(self) -> str:
        return str(self.path)


class OutputExistsError(FileExistsError):
    """Raised instead of silently replacing a file the user already has."""

    def __init__(self, path: Path):
        super().__init__(f"{path} already exists; pass --overwrite to replace it")
        self.path = path


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", overwrite: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    if not overwrite and path.exists():
        raise OutputExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); outputs get the permissions a plain open() would give.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> None:
    with atomic_open(path, "wb", overwrite=overwrite) as handle:
        handle.write(data)


def write_json(path: str | os.PathLike, obj: Any, overwrite: bool = True) -> None:
    with atomic_open(path, "w", overwrite=overwrite) as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, default=_json_default)
        handle.write("\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_image(path: str | os.PathLike, image: Image.Image, overwrite: bool = True) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format=Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG")
    write_bytes(path, buffer.getvalue(), overwrite=overwrite)


def write_mask(path: str | os.PathLike, mask: np.ndarray, overwrite: bool = True) -> None:
    """Save a boolean HxW mask as a single-channel 0/255 PNG (read back with `paliseg.images.read_mask`)."""
    write_bytes(path, mask_png(mask, path), overwrite=overwrite)


def mask_png(mask: np.ndarray, name: str | os.PathLike = "mask") -> bytes:
    """A boolean HxW mask as the bytes of a single-channel 0/255 PNG (the mask files' encoding)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask for {name} must be 2-D, got shape {mask.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()
