"""A quantized frozen base: int8 and 4-bit NormalFloat (NF4) projection weights, dequantized layer by layer.

With `ModelConfig.quantization.format` set, every projection weight (each `layers.Einsum`'s:
Gemma's attention and MLP, SigLIP's attention and MLP, the image -> LLM `head`; not the vision tower's with
`skip_vision`) is a `QuantizedWeight` in the param tree instead of an array, e.g.

    llm/layers/attn/q_einsum/w  QuantizedWeight(codes [L, N, D, H] int8, scales [L, N, 1, H] f32)    (int8)
    llm/layers/mlp/linear       QuantizedWeight(codes [L, D, F/64, 32] uint8, scales [L, D, F/64] f32)  (nf4)

Everything else stays in `param_dtype`: the token embedding (it is also the tied output projection, whose
error would reach every logit), norms, biases, the patch and position embeddings. These are a small share
of the parameters (the embedding is the largest: 0.59 B of PaliGemma 2 3B's 3.0 B).

Formats (`quantize` / `QuantizedWeight.dequantize`, exact inverses up to the rounding):
- int8: per output channel (every index of the axes the input does not contract with), codes
  round(w / s) with s = absmax over the contracted axes / 127: the error is at most s / 2.
- nf4: QLoRA's NormalFloat4 (Dettmers et al. 2023, arXiv:2305.14314; the 16 levels of bitsandbytes'
  `create_normal_map`): the contracted axes are moved last and flattened, zero-padded to blocks of 64, and
  each block is scaled by its absmax and rounded to the nearest level; two 4-bit codes per uint8. With
  `double_scales`, the float32 block scales are themselves stored as int8 around the mean of each output
  channel's scales (QLoRA's double quantization, with one group per output channel instead of 256 scales).

The model reads its params through `layers.read`, which dequantizes a `QuantizedWeight` (to float32; the
projection casts to its compute dtype): inside the layer scan it sees one layer's slice of the codes, so
only that layer is ever dequantized. `paliseg.model.quantize_params` is the load-time transform of a normal
checkpoint (it sits above the model, whose weight layouts it reads); a model whose config asks for
quantization also creates its weights quantized (`initializer`), so its `init_params` and `param_shapes`
have the same tree. Quantized weights are never trained (LoRA over them is), and `QuantizedWeight` is a
pytree, so jit, sharding and `nn.scan` handle its arrays as any other.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from paliseg.config import QuantizationConfig
from paliseg.model.layouts import WeightLayout

NF4_BLOCK = 64
# bitsandbytes' NF4 code (`create_normal_map(offset=0.9677083)`, as QLoRA's reference implementation).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)  # fmt: skip
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


@struct.dataclass
class QuantizedWeight:
    """A weight stored quantized; `dequantize()` is the float32 weight. Leading (scanned layer) axes of the
    arrays are leading axes of the weight. `contracted`: the weight's input axes, counted from its end;
    `contracted_shape`: their sizes. `scale_stats` ([..., 2]: mean and step) only with double scales."""

    codes: jax.Array
    scales: jax.Array
    format: str = struct.field(pytree_node=False)
    contracted: tuple[int, ...] = struct.field(pytree_node=False)
    contracted_shape: tuple[int, ...] = struct.field(pytree_node=False)
    scale_stats: jax.Array | None = None

    def dequantize(self) -> jax.Array:
        scales = self.scales if self.scale_stats is None else _dequantize_scales(self.scales, self.scale_stats)
        if self.format == "int8":
            return self.codes.astype(jnp.float32) * scales
        codes = jnp.stack([self.codes & 15, self.codes >> 4], axis=-1).reshape(*self.codes.shape[:-1], NF4_BLOCK)
        blocks = jnp.asarray(NF4_LEVELS)[codes] * scales[..., None]
        size = int(np.prod(self.contracted_shape))
        values = blocks.reshape(*blocks.shape[:-2], -1)[..., :size].reshape(*blocks.shape[:-2], *self.contracted_shape)
        k = len(self.contracted)
        return jnp.moveaxis(values, tuple(range(-k, 0)), self.contracted)

    @property
    def shape(self) -> tuple[int, ...]:
        """The dequantized weight's shape."""
        if self.format == "int8":
            return tuple(self.codes.shape)
        k = len(self.contracted)
        moved = np.broadcast_to(np.False_, (*self.codes.shape[:-2], *self.contracted_shape))  # no memory
        return np.moveaxis(moved, tuple(range(-k, 0)), self.contracted).shape


def quantize(weight: jax.Array, config: QuantizationConfig, contracted: tuple[int, ...]) -> QuantizedWeight:
    """`weight` (any float dtype; leading axes are independent weights, e.g. scanned layers) in `config`'s
    format; `contracted`: the axes the input contracts with, negative (counted from the end)."""
    if config.format not in ("int8", "nf4"):
        raise ValueError(f"quantization format must be int8 or nf4, got {config.format!r}")
    if any(axis >= 0 for axis in contracted):
        raise ValueError(f"contracted axes must be counted from the end (negative), got {contracted}")
    contracted = tuple(sorted(contracted))
    return _quantize(weight, config.format, config.double_scales, contracted)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(weight, format_: str, double_scales: bool, contracted: tuple[int, ...]) -> QuantizedWeight:
    if weight.ndim - len(contracted) >= 2 and -weight.ndim not in contracted:
        # one slice of the leading (e.g. layer) output axis at a time: float copies of one slice only
        return jax.lax.map(lambda part: _quantize_slice(part, format_, double_scales, contracted), weight)
    return _quantize_slice(weight, format_, double_scales, contracted)


def _quantize_slice(weight, format_: str, double_scales: bool, contracted: tuple[int, ...]) -> QuantizedWeight:
    weight = weight.astype(jnp.float32)
    contracted_shape = tuple(weight.shape[axis] for axis in contracted)
    if format_ == "int8":
        absmax = jnp.max(jnp.abs(weight), axis=contracted, keepdims=True)
        scales = jnp.where(absmax > 0, absmax / 127, 1.0)
        codes = jnp.clip(jnp.round(weight / scales), -127, 127).astype(jnp.int8)
        return QuantizedWeight(codes, scales, "int8", contracted, contracted_shape)
    k = len(contracted)
    rows = jnp.moveaxis(weight, contracted, tuple(range(-k, 0)))
    rows = rows.reshape(*rows.shape[: rows.ndim - k], -1)
    padding = -rows.shape[-1] % NF4_BLOCK
    rows = jnp.pad(rows, [(0, 0)] * (rows.ndim - 1) + [(0, padding)])
    blocks = rows.reshape(*rows.shape[:-1], -1, NF4_BLOCK)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    scales = jnp.where(absmax > 0, absmax, 1.0)
    codes = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), blocks / scales[..., None]).astype(jnp.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    if not double_scales:
        return QuantizedWeight(packed, scales, "nf4", contracted, contracted_shape)
    scale_codes, stats = _quantize_scales(scales)
    return QuantizedWeight(packed, scale_codes, "nf4", contracted, contracted_shape, stats)


def _quantize_scales(scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each row of block scales ([..., blocks]) as int8 steps around its mean: (codes, [..., 2] mean and step)."""
    mean = jnp.mean(scales, axis=-1, keepdims=True)
    spread = jnp.max(jnp.abs(scales - mean), axis=-1, keepdims=True)
    step = jnp.where(spread > 0, spread / 127, 1.0)
    codes = jnp.clip(jnp.round((scales - mean) / step), -127, 127).astype(jnp.int8)
    return codes, jnp.concatenate([mean, step], axis=-1)


def _dequantize_scales(codes: jax.Array, stats: jax.Array) -> jax.Array:
    return stats[..., :1] + codes.astype(jnp.float32) * stats[..., 1:]


# Contracted weights that stay in `param_dtype`: the token embedding (also the tied output projection, whose
# error would reach every logit) and the patch embedding.
UNQUANTIZED = ("llm/embedder/input_embedding", "img/embedding/kernel")


def quantizes(config: QuantizationConfig, path: str, layout: WeightLayout | None) -> tuple[int, ...] | None:
    """The axes the input contracts with, counted from the end (scanned layer axes in front do not matter),
    of the weight at `path` (a '/'-joined param path; `layout`: its `WeightLayout`, None for a param that
    is not a weight) when `config` stores it quantized, else None."""
    if config.format is None or layout is None or path in UNQUANTIZED:
        return None
    if config.skip_vision and path.startswith("img/"):
        return None
    return tuple(axis - len(layout.axes) for axis in layout.contracted)


def initializer(init: Callable, config: QuantizationConfig, path: str, layout: WeightLayout) -> Callable:
    """`init` whose result is quantized when `config` quantizes the weight at `path`: the model creates a
    quantized tree, which passes flax's check of the existing params against the init's shapes."""
    axes = quantizes(config, path, layout)
    return init if axes is None else (lambda key, *args: quantize(init(key, *args), config, axes))


def is_quantized(leaf: Any) -> bool:
    return isinstance(leaf, QuantizedWeight)


def dequantize_params(params: dict) -> dict:
    """Every `QuantizedWeight` of `params` as its float32 weight: a tree the unquantized model runs."""
    return jax.tree.map(lambda leaf: leaf.dequantize() if is_quantized(leaf) else leaf, params, is_leaf=is_quantized)


def cast(params: dict, dtype) -> dict:
    """The unquantized leaves cast to `dtype`; quantized weights as they are."""
    return jax.tree.map(lambda leaf: leaf if is_quantized(leaf) else leaf.astype(dtype), params, is_leaf=is_quantized)
