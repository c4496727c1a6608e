"""The model's param tree for a config: random (`init_params`), abstract (`param_shapes`, and each contracted
weight's `WeightLayout`: `weight_layouts`), and the transforms of a tree that need those layouts
(`merge_lora`, `quantize_params`).

Above the model: the layouts are read off an abstract init of `PaliGemma`, so the modules below it (LoRA,
quantization) keep their tree transforms here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from paliseg.config import ModelConfig
from paliseg.model import quantization
from paliseg.model.layouts import PARTS, LayoutBox, WeightLayout
from paliseg.model.lora import LORA_A, LORA_B, Params, is_lora_path
from paliseg.model.paligemma import PaliGemma


def _dummy_inputs(config: ModelConfig):
    size = config.img.image_size
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    tokens = jnp.zeros((1, 2), jnp.int32)
    return images, tokens, tokens, jnp.ones((1, 2), jnp.int32)


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Random parameters (jit-compiled, so no float32 copy of a bf16 model is ever materialised).

    Compiled with the non-partitionable threefry: with jax's default (partitionable) the XLA compile of
    the ~30 random initialisers takes 2.5x longer on CPU, and init is compiled once per config."""
    model = PaliGemma(config)
    init = jax.jit(lambda key: meta.unbox(model.init(key, *_dummy_inputs(config))["params"]))
    with jax.threefry_partitionable(False):
        return init(rng)


@functools.lru_cache(maxsize=16)
def _abstract_params(config: ModelConfig) -> Params:
    """The params of an init that allocates nothing, weights still boxed with their `WeightLayout`."""
    model = PaliGemma(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *_dummy_inputs(config)))["params"]


def param_shapes(config: ModelConfig) -> Params:
    """Cached: treat the result as read-only."""
    return meta.unbox(_abstract_params(config))


@functools.lru_cache(maxsize=16)
def weight_layouts(config: ModelConfig) -> dict[str, WeightLayout]:
    """Every contracted weight's layout, by '/'-joined param path (see `paliseg.model.layouts`). Cached:
    treat the result as read-only."""
    is_box = lambda x: isinstance(x, LayoutBox)  # noqa: E731
    leaves = jax.tree_util.tree_flatten_with_path(_abstract_params(config), is_leaf=is_box)[0]
    return {"/".join(k.key for k in path): box.layout for path, box in leaves if is_box(box)}


def merge_lora(params: Params, config: ModelConfig) -> Params:
    """Fold every adapter into its weight (W += alpha/rank * A@B, in the weight's dtype) and drop the LoRA
    leaves: the result loads into a model with LoRA disabled and computes the same function."""
    layouts = weight_layouts(config)
    flat = traverse_util.flatten_dict(params, sep="/")
    merged = {k: v for k, v in flat.items() if not is_lora_path(k)}
    for path in [k for k in flat if k.endswith(LORA_A)]:
        weight_path = path[: -len(LORA_A)]
        if weight_path not in layouts or weight_path not in flat:
            raise ValueError(f"LoRA param {path} has no known base weight")
        layout, weight = layouts[weight_path], flat[weight_path]
        a, b = (jnp.asarray(flat[weight_path + suffix], jnp.float32) for suffix in (LORA_A, LORA_B))
        delta = layout.lora_delta(a, b) * config.lora.scale
        if layout.fused:  # the adapters cover the adapted parts only
            axis, parts = layout.axes.index(PARTS), layout.adapted_parts(config.lora)
            if delta.shape[axis] != len(parts):
                raise ValueError(f"{path} adapts {delta.shape[axis]} parts but LoRA targets give {len(parts)}")
            index = (slice(None),) * axis + (np.asarray(parts),)
            delta = jnp.zeros(weight.shape, jnp.float32).at[index].set(delta)
        merged[weight_path] = (jnp.asarray(weight, jnp.float32) + delta).astype(weight.dtype)
    return traverse_util.unflatten_dict(merged, sep="/")


def quantize_params(params: Params, config: ModelConfig) -> Params:
    """A normal param tree of `config`'s model (e.g. a loaded checkpoint) with the weights
    `config.quantization` quantizes quantized (`paliseg.model.quantization`); the other leaves are the same
    arrays. Leaf by leaf, so the float weights are never copied all at once."""
    layouts = weight_layouts(config)
    flat = traverse_util.flatten_dict(params, sep="/")
    out = {}
    for path, leaf in flat.items():
        quantized = quantization.is_quantized(leaf)
        axes = None if quantized else quantization.quantizes(config.quantization, path, layouts.get(path))
        out[path] = leaf if axes is None else quantization.quantize(leaf, config.quantization, axes)
    return traverse_util.unflatten_dict(out, sep="/")
