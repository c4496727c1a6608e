"""big_vision `.npz` checkpoints: flat '/'-joined keys (optionally under `params/`), bfloat16 stored by numpy
as raw 2-byte void (`|V2`) and re-viewed on load, as big_vision's `utils.recover_dtype` does."""

from __future__ import annotations

import os
from pathlib import Path

import ml_dtypes
import numpy as np

from paliseg.checkpoints.tree import Flat, flatten
from paliseg.files import atomic_open

_PREFIX = "params/"


def read_npz(path: str | os.PathLike) -> Flat:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    flat = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            value = archive[key]
            if value.dtype == np.dtype("V2"):
                value = value.view(ml_dtypes.bfloat16)
            flat[key.removeprefix(_PREFIX)] = value
    return flat


def write_npz(path: str | os.PathLike, params: dict, overwrite: bool = False) -> Path:
    """Write `params` (nested) as big_vision does (`np.savez`, no `params/` prefix, bf16 as `|V2`)."""
    path = Path(path)
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    with atomic_open(path, "wb", overwrite=overwrite) as handle:
        np.savez(handle, **flat)
    return path
