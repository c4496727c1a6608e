"""Flat '/'-joined param trees, validation against a config, and casting onto the device."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from paliseg.config import ModelConfig
from paliseg.model import param_shapes, quantization, weight_layouts
from paliseg.model.lora import is_lora_path

Flat = dict[str, Any]


def flatten(params: dict) -> Flat:
    return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: Flat) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def _listing(title: str, items: list[str], limit: int = 12) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {item}" for item in items[:limit]) + more


def check_tree(flat: Flat, config: ModelConfig, source: str) -> None:
    """Raise one ValueError naming every missing key, unexpected key and wrong shape."""
    expected = flatten(param_shapes(config))
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    shapes = sorted(
        f"{k}: {tuple(np.shape(flat[k]))}, expected {tuple(expected[k].shape)}"
        for k in set(expected) & set(flat)
        if tuple(np.shape(flat[k])) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        parts = [f"{source} does not match the model config:"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if shapes:
            parts.append(_listing("wrong shapes", shapes))
        raise ValueError("\n".join(parts))


def to_device(flat: Flat, config: ModelConfig) -> dict:
    """Nested jax arrays in `config.param_dtype` (LoRA params stay float32), the weights `config.quantization`
    quantizes quantized. Converts leaf by leaf and drops each host array as it goes, so peak memory stays
    near one copy of the model."""
    layouts = weight_layouts(config) if config.quantization.enabled else {}
    out = {}
    for key in list(flat):
        value = flat.pop(key)
        dtype = jnp.float32 if is_lora_path(key) else jnp.dtype(config.param_dtype)
        # waited for: the copy is dispatched asynchronously and holds the host array until it runs, so
        # without the wait every host array outlived the loop (a 3B load peaked at twice the model)
        out[key] = jax.block_until_ready(jnp.asarray(np.asarray(value).astype(dtype, copy=False)))
        del value
        axes = quantization.quantizes(config.quantization, key, layouts.get(key))
        if axes is not None:
            out[key] = quantization.quantize(out[key], config.quantization, axes)
    return unflatten(out)
