"""Every weight matmul of the model, with optional LoRA, described once.

A `Site` names the axes of one big_vision weight (e.g. Gemma's `q_einsum/w` is `NDH`), which of them the
input contracts with and which the output keeps. The same description drives the forward pass (`project`),
the initialiser, LoRA (`<weight>_lora_a` / `<weight>_lora_b` params created beside the weight) and
`lora.merge_lora`, so the four can never disagree about a layout.

Fused weights (Gemma's `kv_einsum` [2,K,D,H], `qkv_einsum` [3,N,D,H], `gating_einsum` [2,D,F]) have a parts
axis `P`; each LoRA target adapts only its own part, and the LoRA params carry a leading axis over the
adapted parts only (e.g. targets {k} on `kv_einsum`: A [1,D,r], B [1,r,K,H]).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from paliseg.config import LoraConfig, QuantizationConfig
from paliseg.model import backend, quantization

LORA_A = "_lora_a"
LORA_B = "_lora_b"


@dataclasses.dataclass(frozen=True)
class Site:
    """One weight: its axis letters (`P` = parts of a fused weight), which axes contract with the input's
    trailing axes (in the input's order), which the output keeps, and the LoRA target name of each part."""

    layout: str
    inputs: str
    outputs: str
    targets: tuple[str, ...]

    @property
    def fused(self) -> bool:
        return "P" in self.layout

    def adapted_parts(self, lora: LoraConfig) -> tuple[int, ...]:
        return tuple(i for i, target in enumerate(self.targets) if lora.adapts(target))

    def lora_shapes(self, sizes: dict[str, int], rank: int, parts: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        lead = (parts,) if self.fused else ()
        a = lead + tuple(sizes[c] for c in self.inputs) + (rank,)
        b = lead + (rank,) + tuple(sizes[c] for c in self.outputs)
        return a, b

    def lora_delta_weight(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """(A @ B) laid out like the adapted parts of the weight; leading (e.g. scanned layer) axes kept."""
        p = "P" if self.fused else ""
        return jnp.einsum(f"...{p}{self.inputs}R,...{p}R{self.outputs}->...{self.layout}", a, b)


# Keyed by the weight's path inside its layer (or block), as in big_vision's tree.
SITES: dict[str, Site] = {
    # Gemma
    "attn/q_einsum/w": Site("NDH", "D", "NH", ("q",)),
    "attn/kv_einsum/w": Site("PKDH", "D", "KH", ("k", "v")),
    "attn/qkv_einsum/w": Site("PNDH", "D", "NH", ("q", "k", "v")),
    "attn/attn_vec_einsum/w": Site("NHD", "NH", "D", ("o",)),
    "mlp/gating_einsum": Site("PDF", "D", "F", ("gate", "up")),
    "mlp/linear": Site("FD", "F", "D", ("down",)),
    # SigLIP (flax DenseGeneral/Dense layouts)
    "MultiHeadDotProductAttention_0/query/kernel": Site("DNH", "D", "NH", ("img_q",)),
    "MultiHeadDotProductAttention_0/key/kernel": Site("DNH", "D", "NH", ("img_k",)),
    "MultiHeadDotProductAttention_0/value/kernel": Site("DNH", "D", "NH", ("img_v",)),
    "MultiHeadDotProductAttention_0/out/kernel": Site("NHD", "NH", "D", ("img_o",)),
    "MlpBlock_0/Dense_0/kernel": Site("DF", "D", "F", ("img_fc1",)),
    "MlpBlock_0/Dense_1/kernel": Site("FD", "F", "D", ("img_fc2",)),
    "head/kernel": Site("DF", "D", "F", ()),  # the image -> LLM projection (not a LoRA target)
}


def site_of(path: str) -> Site | None:
    """The site whose key ends `path` (a '/'-joined param path of the whole tree), if any."""
    for key, site in SITES.items():
        if path == key or path.endswith("/" + key):
            return site
    return None


@dataclasses.dataclass(frozen=True)
class Numerics:
    """What a projection needs to know besides its shape."""

    lora: LoraConfig
    param_dtype: str
    compute_dtype: str
    deterministic: bool = True
    quantization: QuantizationConfig = dataclasses.field(default_factory=QuantizationConfig)


def project(
    module: nn.Module, name: str, site_key: str, x: jax.Array, sizes: dict[str, int], numerics: Numerics
) -> jax.Array | tuple[jax.Array, ...]:
    """x @ W (+ LoRA) for the weight `name` of `module`, described by `SITES[site_key]`.

    x's trailing axes are `site.inputs`; the result is `x.leading + site.outputs` in compute dtype, one
    array per part for a fused weight (a tuple).
    Must be called from inside `module`'s compact method (it creates the params).
    """
    site = SITES[site_key]
    sizes = {**sizes, "P": len(site.targets)}
    shape = tuple(sizes[c] for c in site.layout)
    init = nn.initializers.variance_scaling(
        1.0,
        "fan_in",
        "truncated_normal",
        in_axis=tuple(site.layout.index(c) for c in site.inputs),
        out_axis=tuple(site.layout.index(c) for c in site.outputs),
        batch_axis=(site.layout.index("P"),) if site.fused else (),
    )
    weight = quantization.param(module, name, init, shape, jnp.dtype(numerics.param_dtype), numerics.quantization)
    dtype = jnp.dtype(numerics.compute_dtype)
    x = x.astype(dtype)
    weight = backend.stored(weight).astype(dtype)
    equation = f"...{site.inputs},{site.layout.replace('P', '')}->...{site.outputs}"
    outputs = list(
        backend.einsum_per_part(equation, x, weight) if site.fused else [backend.weight_einsum(equation, x, weight)]
    )

    parts = site.adapted_parts(numerics.lora)
    if parts:
        lora = numerics.lora
        shape_a, shape_b = site.lora_shapes(sizes, lora.rank, len(parts))
        in_axes = tuple(range(len(shape_a) - 1 - len(site.inputs), len(shape_a) - 1))
        a = module.param(
            name + LORA_A,
            nn.initializers.variance_scaling(
                1.0, "fan_in", "uniform", in_axis=in_axes, out_axis=-1, batch_axis=(0,) if site.fused else ()
            ),
            shape_a,
            jnp.float32,
        )
        b = module.param(name + LORA_B, nn.initializers.zeros, shape_b, jnp.float32)
        if lora.dropout > 0 and not numerics.deterministic:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(dtype)
        rows = x.reshape(-1, math.prod(sizes[c] for c in site.inputs))
        for index, part in enumerate(parts):
            part_a, part_b = (a[index], b[index]) if site.fused else (a, b)
            delta = backend.low_rank(
                rows, part_a.reshape(rows.shape[1], -1).astype(dtype), part_b.reshape(lora.rank, -1).astype(dtype)
            )
            outputs[part] = outputs[part] + (delta * lora.scale).astype(dtype).reshape(outputs[part].shape)
    return tuple(outputs) if site.fused else outputs[0]


class Projection(nn.Module):
    """A named submodule owning one weight (`weight_name`) and optionally a bias over `bias_axes`."""

    site_key: str
    sizes: tuple[tuple[str, int], ...]
    numerics: Numerics
    weight_name: str = "w"
    bias_axes: str = ""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, ...]:
        sizes = dict(self.sizes)
        y = project(self, self.weight_name, self.site_key, x, sizes, self.numerics)
        if self.bias_axes:
            shape = tuple(sizes[c] for c in self.bias_axes)
            bias = backend.stored(
                self.param("bias", nn.initializers.zeros, shape, jnp.dtype(self.numerics.param_dtype))
            )
            y = y + bias.astype(y.dtype)
        return y
