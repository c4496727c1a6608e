"""Our checkpoint format: a folder with `paliseg.json` (format tag + the ModelConfig), `params/` (an orbax
checkpoint of the big_vision-named tree, dtypes as saved) and optionally `tokenizer.model`, so a
checkpoint folder is self-contained. Written into a temporary sibling and renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import orbax.checkpoint as ocp

from paliseg.checkpoints.tree import Flat, flatten
from paliseg.config import ModelConfig
from paliseg.files import OutputExistsError, write_json

MARKER = "paliseg.json"
FORMAT = "paliseg-checkpoint"
TOKENIZER = "tokenizer.model"


def is_native(path: Path) -> bool:
    return (path / MARKER).is_file()


def save(
    path: str | os.PathLike,
    params: dict,
    config: ModelConfig,
    tokenizer: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Our format, written atomically. `tokenizer` (default: the config's, if any) is copied in so the
    folder is self-contained."""
    tokenizer = tokenizer if tokenizer is not None else config.tokenizer_path
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / "params", params)
        checkpointer.wait_until_finished()
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER)
        write_json(tmp / MARKER, {"format": FORMAT, "version": 1, "config": config.to_dict()})
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_native_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig recorded in a checkpoint folder's paliseg.json."""
    path = Path(path).absolute()
    meta = json.loads((path / MARKER).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / MARKER}: not a paliseg checkpoint (format {meta.get('format')!r})")
    return ModelConfig.from_dict(meta["config"])


def read_native(path: str | os.PathLike) -> tuple[ModelConfig, Flat]:
    config = read_native_config(path)
    return config, flatten(ocp.StandardCheckpointer().restore(Path(path).absolute() / "params"))
