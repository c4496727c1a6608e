"""LoRA: the adapter module (`LoRA`, wrapped around a projection), and its params in the tree.

`LoRA(Einsum(...))` computes `base(x) + (alpha/rank) * (dropout(x) @ A) @ B` for each part of the base
weight that `ModelConfig.lora.targets` names (`Einsum.targets`: `q`, `k`, ..., `img_fc2`). A and B are
float32 params created beside the base weight, in the same dict, and only for the adapted parts:

    llm/layers/attn/q_einsum/w            [L, N, D, H]   (frozen base, bf16)
    llm/layers/attn/q_einsum/w_lora_a     [L, D, r]      (A: kaiming-uniform)
    llm/layers/attn/q_einsum/w_lora_b     [L, r, N, H]   (B: zeros, so training starts from the base)
    llm/layers/attn/kv_einsum/w_lora_a    [L, 1, D, r]   (targets {k}: only part 0 of the fused [2,K,D,H])
    llm/layers/mlp/gating_einsum_lora_a   [L, 2, D, r]   (targets gate and up: one adapter per part)

Training updates only A and B (`split_params` / `join_params`), and the base is never copied.
`paliseg.model.merge_lora` folds the adapters into the weights (it sits above the model, whose weight
layouts it reads).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from paliseg.config import LoraConfig, ModelConfig
from paliseg.model import kernels, layers

Params = dict[str, Any]
LORA_A = "_lora_a"
LORA_B = "_lora_b"


class LoRA(layers.Module):
    """`base(x)` plus `scale * (dropout(x) @ A) @ B` on each part of `base` that `config` targets.

    It shares `base`'s scope, so A and B (`<weight>_lora_a`, `<weight>_lora_b`) sit beside the weight; a
    fused weight gets one adapter per adapted part, stacked on a leading axis of A and B."""

    base: layers.Einsum
    config: LoraConfig
    deterministic: bool = True

    def setup(self):
        nn.share_scope(self, self.base)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, ...]:
        y = self.base(x)
        layout, lora = self.base.layout, self.config
        parts = layout.adapted_parts(lora)
        if not parts:
            return y
        outputs = list(y) if layout.fused else [y]
        dtype = jnp.dtype(self.base.compute_dtype)
        x = x.astype(dtype)
        inputs = x.shape[x.ndim - len(layout.inputs) :]
        lead = (len(parts),) if layout.fused else ()
        init_a = nn.initializers.variance_scaling(
            1.0, "fan_in", "uniform", tuple(range(len(lead), len(lead) + len(inputs))), -1, tuple(range(len(lead)))
        )
        name = self.base.weight_name
        a = self.param(name + LORA_A, init_a, lead + inputs + (lora.rank,), jnp.float32)
        b_shape = lead + (lora.rank,) + outputs[0].shape[outputs[0].ndim - len(layout.outputs) :]
        b = self.param(name + LORA_B, nn.initializers.zeros, b_shape, jnp.float32)
        if lora.dropout > 0 and not self.deterministic:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(dtype)
        rows = x.reshape(-1, math.prod(inputs))
        for index, part in enumerate(parts):
            part_a, part_b = (a[index], b[index]) if layout.fused else (a, b)
            delta = kernels.low_rank(
                rows, part_a.reshape(rows.shape[1], -1).astype(dtype), part_b.reshape(lora.rank, -1).astype(dtype)
            )
            outputs[part] = outputs[part] + (delta * lora.scale).astype(dtype).reshape(outputs[part].shape)
        return tuple(outputs) if layout.fused else outputs[0]


def projections(config: ModelConfig, deterministic: bool) -> tuple[Any, Any]:
    """(`Einsum`, `LoRA`) bound to the model's dtypes, quantization and LoRA settings, for `lora(einsum(...))`."""
    einsum = functools.partial(
        layers.Einsum,
        param_dtype=config.param_dtype,
        compute_dtype=config.compute_dtype,
        quantization=config.quantization,
        matrices=not config.scan_layers and not config.quantization.enabled,
    )
    return einsum, functools.partial(LoRA, config=config.lora, deterministic=deterministic)


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
