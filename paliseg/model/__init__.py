"""PaliGemma (SigLIP + Gemma-1) in Flax linen, with big_vision's parameter tree.

Public API:

    from paliseg import config, model
    cfg = config.preset("tiny")                       # or a ModelConfig; LoRA: cfg.replace(lora={"rank": 8})
    params = model.init_params(cfg, jax.random.key(0))   # {"img": ..., "llm": ...}: big_vision's tree
    logits = model.forward(cfg, params, images, tokens, mask_ar, mask_input)   # [B, T, V] float32
    logits = model.forward(cfg, params, ..., train=True, rng=key)               # dropout / LoRA dropout on

- `params` is the checkpoint tree itself: `img/embedding/kernel`, `img/Transformer/encoderblock/...` and
  `llm/layers/...` stacked over depth (nn.scan), `llm/embedder/input_embedding`, ... (no "params" wrapper).
- `forward` computes text logits exactly as big_vision's training forward: `images` [B,H,W,3] in [-1,1],
  `tokens`/`mask_ar`/`mask_input` [B,T] as built by `paliseg.tokenizer`. For the loss, compare
  `logits[:, :-1]` with `tokens[:, 1:]` under `mask_loss[:, 1:]`.
- `PaliGemma(cfg)` is the module (methods `__call__`, `embed_image`, `prefill`, `extend`); decoding lives
  in `paliseg.decoding`.
- LoRA: `paliseg.model.lora` (`LoRA`, `split_params`, `join_params`, `merge_lora`); see its docstring.
- `param_shapes(cfg)`: the expected tree of `jax.ShapeDtypeStruct`, without allocating.
- `weight_layouts(cfg)`: {'/'-joined path: `WeightLayout`} for every weight that is contracted (each
  `layers.Einsum`'s, and the embedding table): its axis letters (`LPKDH`: scanned layers, fused parts, ...),
  which contract with the input (`.contracted`: reduce over these for per-output-channel scales), which the
  output keeps, and each part's LoRA target. Read off the einsum equations during an abstract init (no
  memory; cached per config), so it cannot disagree with the forward pass.
- `for_inference(cfg, params)`: the config and params to decode with. On CPU the layers unscanned
  (`scan_layers=False`: `llm/layers_0/...`, each layer in buffers of its own, each projection weight as
  row-major matrices, `backend.Matrices`), which XLA:CPU decodes faster (see there). This and the model's
  other CPU workarounds live in `paliseg.model.backend`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax.core import meta

from paliseg.config import ModelConfig
from paliseg.model.backend import for_inference
from paliseg.model.layers import LayoutBox, WeightLayout
from paliseg.model.lora import join_params, merge_lora, split_params
from paliseg.model.paligemma import PaliGemma, make_attn_mask

__all__ = [
    "PaliGemma",
    "WeightLayout",
    "continuation_logits",
    "for_inference",
    "forward",
    "init_params",
    "join_params",
    "make_attn_mask",
    "merge_lora",
    "param_shapes",
    "split_params",
    "weight_layouts",
]


def _dummy_inputs(config: ModelConfig):
    size = config.img.image_size
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    tokens = jnp.zeros((1, 2), jnp.int32)
    return images, tokens, tokens, jnp.ones((1, 2), jnp.int32)


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
    """Random parameters (jit-compiled, so no float32 copy of a bf16 model is ever materialised).

    Compiled with the non-partitionable threefry: with jax's default (partitionable) the XLA compile of
    the ~30 random initialisers takes 2.5x longer on CPU, and init is compiled once per config."""
    model = PaliGemma(config)
    init = jax.jit(lambda key: meta.unbox(model.init(key, *_dummy_inputs(config))["params"]))
    with jax.threefry_partitionable(False):
        return init(rng)


@functools.lru_cache(maxsize=16)
def _abstract_params(config: ModelConfig) -> dict:
    """The params of an init that allocates nothing, weights still boxed with their `WeightLayout`."""
    model = PaliGemma(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *_dummy_inputs(config)))["params"]


def param_shapes(config: ModelConfig) -> dict:
    """Cached: treat the result as read-only."""
    return meta.unbox(_abstract_params(config))


@functools.lru_cache(maxsize=16)
def weight_layouts(config: ModelConfig) -> dict[str, WeightLayout]:
    """Every contracted weight's layout, by '/'-joined param path (see the module docstring). Cached: treat
    the result as read-only."""
    is_box = lambda x: isinstance(x, LayoutBox)  # noqa: E731
    leaves = jax.tree_util.tree_flatten_with_path(_abstract_params(config), is_leaf=is_box)[0]
    return {"/".join(k.key for k in path): box.layout for path, box in leaves if is_box(box)}


@functools.partial(jax.jit, static_argnames=("config",))
def continuation_logits(
    config: ModelConfig,
    params: dict,
    images: jax.Array,
    tokens: jax.Array,
    mask_ar: jax.Array,
    mask_input: jax.Array,
    continuations: jax.Array,
) -> jax.Array:
    """Logits [B*G,T,V] (float32) of continuations [B*G,T] of the B prompts (G each, prompt-major): the
    forward of each [image | prompt | continuation] sequence, with each prompt's prefix run once
    (`PaliGemma.continuation_logits`)."""
    return PaliGemma(config).apply(
        {"params": params}, images, tokens, mask_ar, mask_input, continuations, method=PaliGemma.continuation_logits
    )


@functools.partial(jax.jit, static_argnames=("config", "train"))
def forward(
    config: ModelConfig,
    params: dict,
    images: jax.Array,
    tokens: jax.Array,
    mask_ar: jax.Array,
    mask_input: jax.Array,
    *,
    train: bool = False,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Text logits [B,T,V] (float32). With `train=True`, dropout needs `rng`."""
    rngs = {"dropout": rng} if train and rng is not None else {}
    model = PaliGemma(config, deterministic=not train)
    return model.apply({"params": params}, images, tokens, mask_ar, mask_input, rngs=rngs)
