"""Load and save PaliGemma parameters in three formats, always as big_vision's tree.

    config, params = checkpoints.load(path, preset=None, vocab_size=None, dtype=None, **config_changes)

`path` is one of:
- a big_vision `.npz`, PaliGemma 1 or 2, or its `.part*` pieces (sizes from `preset`; without one, from the
  one preset whose sizes the file has; see `checkpoints.big_vision`);
- a Hugging Face folder (`config.json` + safetensors; sizes from config.json; every transformers key
  layout; `vocab_size`, the tokenizer's size, trims HF's padded embedding);
- one of ours (`paliseg.json` + orbax `params/`, written by `save`).

`dtype` ("float32" or "bfloat16") sets the weights', matmuls' and cache's dtypes (`ModelConfig.with_dtype`;
default: the preset's, bfloat16 for Hugging Face folders, the recorded ones for ours); `config_changes` adjust
the returned config (e.g. `param_dtype="float32"`, `lora={"rank": 8}`, `quantization={"format": "nf4"}`: the
weights quantized leaf by leaf as they load); params
come back as jax arrays in `config.param_dtype` and are checked against the config: a mismatch raises one
ValueError naming every missing key, unexpected key and wrong shape.

Writers: `save` (ours, with an optional tokenizer copy), `export_big_vision` (npz), `export_hf`
(safetensors + config.json). Each round trip reloads identical parameters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np

from paliseg.checkpoints import big_vision
from paliseg.checkpoints.big_vision import read_npz, write_npz
from paliseg.checkpoints.huggingface import config_from_hf, read_hf, write_hf
from paliseg.checkpoints.native import TOKENIZER, is_native, read_native, read_native_config, save
from paliseg.checkpoints.tree import check_tree, to_device
from paliseg.config import ModelConfig
from paliseg.config import preset as get_preset

__all__ = [
    "check_sizes",
    "config_from_hf",
    "default_tokenizer",
    "export_big_vision",
    "export_hf",
    "kind_of",
    "load",
    "save",
]


def kind_of(path: str | os.PathLike) -> str:
    """'big_vision', 'hf' or 'paliseg'; raises for anything else."""
    path = Path(path)
    if path.name.endswith(".npz") or ".npz.part" in path.name:
        if not big_vision.pieces(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return "big_vision"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir() and is_native(path):
        return "paliseg"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    raise ValueError(
        f"{path}: not a checkpoint (expected a big_vision .npz or its .npz.part* pieces, a Hugging Face folder with config.json, "
        f"or a paliseg folder with paliseg.json)"
    )


def load(
    path: str | os.PathLike,
    preset: str | None = None,
    vocab_size: int | None = None,
    dtype: str | None = None,
    **config_changes: Any,
) -> tuple[ModelConfig, dict]:
    kind = kind_of(path)
    if kind == "big_vision":
        flat = read_npz(path)
        config = get_preset(preset or _npz_preset(path, flat))
    elif kind == "hf":
        # cast tensor by tensor while reading: an f32 3B checkpoint never sits in memory as f32
        stored = dtype or config_changes.get("param_dtype", ModelConfig.param_dtype)
        config, flat = read_hf(path, vocab_size=vocab_size, dtype=np.dtype(stored))
    else:
        config, flat = read_native(path)
    if config_changes:
        config = config.replace(**config_changes)
    config = config.with_dtype(dtype)
    _check_tree(kind, path, flat, config, preset)
    return config, to_device(flat, config)


def check_sizes(path: str | os.PathLike, config: ModelConfig, preset: str) -> None:
    """Raise ValueError when the checkpoint at `path` does not have the sizes of `config`, the model of
    preset `preset` (a run of that preset could not start from it), naming what differs and the presets
    that fit. Reads the npz's headers, config.json or paliseg.json, no weight: `paliseg plan` checks a
    checkpoint in milliseconds, before anything is compiled."""
    kind = kind_of(path)
    if kind == "big_vision":
        _check_tree(kind, path, big_vision.read_shapes(path), config, preset)
        return
    if kind == "hf":
        stored = config_from_hf(json.loads((Path(path) / "config.json").read_text()), str(Path(path) / "config.json"))
        # loading trims the padded embedding of Hugging Face files to the model's vocabulary
        stored = stored.replace(llm={"vocab_size": min(stored.llm.vocab_size, config.llm.vocab_size)})
    else:
        stored = read_native_config(path)
    found = big_vision.describe_config(stored)
    if found != big_vision.describe_config(config):
        raise ValueError(_hint(path, found, config, preset))


def _check_tree(kind: str, path: str | os.PathLike, flat: dict, config: ModelConfig, preset: str | None) -> None:
    try:
        check_tree(flat, config, str(path))
    except ValueError as error:
        if kind != "big_vision":
            raise
        raise ValueError(f"{error}\n{_hint(path, big_vision.describe(flat), config, preset)}") from None


def _npz_preset(path: str | os.PathLike, flat: dict) -> str:
    """The one preset whose sizes a big_vision npz has (the file does not record them)."""
    names = big_vision.matching_presets(flat)
    if len(names) != 1:
        found = f"it matches the presets {', '.join(names)}" if names else "no preset has its sizes"
        raise ValueError(f"{path}: {big_vision.summary(big_vision.describe(flat))}; {found}: pass a preset (--preset)")
    return names[0]


def _hint(path: str | os.PathLike, found: dict, config: ModelConfig, preset: str | None) -> str:
    """What the file is (its `big_vision.describe` sizes), how it differs from the preset's sizes, and the
    presets it does fit."""
    wanted = big_vision.describe_config(config)
    differ = ", ".join(f"{key} {found[key]} (preset: {wanted[key]})" for key in wanted if found[key] != wanted[key])
    names = big_vision.presets_with(found)
    advice = f"use --preset {' or '.join(names)}" if names else "no preset has these sizes"
    lines = [f"{path} is {big_vision.summary(found)}"]
    if differ:
        lines.append(f"  it differs from preset {preset or '(given)'} in: {differ}")
    return "\n".join([*lines, f"  {advice}"])


def default_tokenizer(path: str | os.PathLike, config: ModelConfig) -> Path | None:
    """The tokenizer that goes with a checkpoint: a `tokenizer.model` inside its folder (ours and HF's both
    ship one), else the config's own (the tiny presets' bundled file)."""
    path = Path(path)
    if path.is_dir() and (path / TOKENIZER).is_file():
        return path / TOKENIZER
    return config.tokenizer_path


def export_big_vision(path: str | os.PathLike, params: dict, overwrite: bool = False) -> Path:
    return write_npz(path, params, overwrite=overwrite)


def export_hf(path: str | os.PathLike, params: dict, config: ModelConfig, overwrite: bool = False) -> Path:
    return write_hf(path, params, config, overwrite=overwrite)
