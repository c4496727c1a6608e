"""LoRA params: where they live and how to separate, rejoin and fold them.

With `ModelConfig.lora.rank > 0`, every targeted projection creates two float32 params beside its weight,
in the same dict: `<weight>_lora_a` (A, kaiming-uniform) and `<weight>_lora_b` (B, zeros), e.g.

    llm/layers/attn/q_einsum/w            [L, N, D, H]   (frozen base, bf16)
    llm/layers/attn/q_einsum/w_lora_a     [L, D, r]
    llm/layers/attn/q_einsum/w_lora_b     [L, r, N, H]
    llm/layers/mlp/gating_einsum_lora_a   [L, 2, D, r]   (targets gate and up: one adapter per part)

and the projection computes x@W + (alpha/rank) * (x@A)@B, so training updates only A and B and the base is
never copied. Layouts per weight are in `projection.SITES`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from paliseg.config import LoraConfig
from paliseg.model.projection import LORA_A, LORA_B, site_of

Params = dict[str, Any]


def is_lora_path(path: str) -> bool:
    return path.endswith(LORA_A) or path.endswith(LORA_B)


def split_params(params: Params) -> tuple[Params, Params]:
    """(base, lora): two nested dicts with the same structure, the LoRA leaves in the second."""
    flat = traverse_util.flatten_dict(params, sep="/")
    base = {k: v for k, v in flat.items() if not is_lora_path(k)}
    lora = {k: v for k, v in flat.items() if is_lora_path(k)}
    return traverse_util.unflatten_dict(base, sep="/"), traverse_util.unflatten_dict(lora, sep="/")


def join_params(base: Params, lora: Params) -> Params:
    """The inverse of `split_params`."""
    flat = traverse_util.flatten_dict(base, sep="/")
    flat.update(traverse_util.flatten_dict(lora, sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")


def merge_lora(params: Params, lora: LoraConfig) -> Params:
    """Fold every adapter into its weight (W += alpha/rank * A@B, in the weight's dtype) and drop the LoRA
    leaves: the result loads into a model with LoRA disabled and computes the same function."""
    flat = traverse_util.flatten_dict(params, sep="/")
    merged = {k: v for k, v in flat.items() if not is_lora_path(k)}
    for path in [k for k in flat if k.endswith(LORA_A)]:
        weight_path = path[: -len(LORA_A)]
        site = site_of(weight_path)
        if site is None or weight_path not in flat:
            raise ValueError(f"LoRA param {path} has no known base weight")
        weight = flat[weight_path]
        delta = (
            site.lora_delta_weight(
                jnp.asarray(flat[path], jnp.float32), jnp.asarray(flat[weight_path + LORA_B], jnp.float32)
            )
            * lora.scale
        )
        if site.fused:
            lead = weight.ndim - len(site.layout)  # scanned layer axes before the parts axis
            parts = site.adapted_parts(lora)
            if delta.shape[lead] != len(parts):
                raise ValueError(f"{path} adapts {delta.shape[lead]} parts but LoRA targets give {len(parts)}")
            slices = [jnp.zeros_like(jnp.take(delta, 0, axis=lead))] * len(site.targets)
            for i, part in enumerate(parts):
                slices[part] = jnp.take(delta, i, axis=lead)
            delta = jnp.stack(slices, axis=lead)
        merged[weight_path] = (jnp.asarray(weight, jnp.float32) + delta).astype(weight.dtype)
    return traverse_util.unflatten_dict(merged, sep="/")


def count_params(params: Params) -> int:
    return int(sum(np.prod(np.shape(v)) for v in traverse_util.flatten_dict(params).values()))
