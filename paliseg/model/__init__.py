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
- LoRA: `paliseg.model.lora` (`LoRA`, `split_params`, `join_params`; see its docstring) and `merge_lora`.
- `param_shapes(cfg)`: the expected tree of `jax.ShapeDtypeStruct`, without allocating.
- `weight_layouts(cfg)`: {'/'-joined path: `WeightLayout`} for every weight that is contracted (each
  `layers.Einsum`'s, and the embedding table): its axis letters (`LPKDH`: scanned layers, fused parts, ...),
  which contract with the input (`.contracted`: reduce over these for per-output-channel scales), which the
  output keeps, and each part's LoRA target. Read off the einsum equations during an abstract init (no
  memory; cached per config), so it cannot disagree with the forward pass.
- `quantize_params(params, cfg)`: a loaded tree with the weights `cfg.quantization` quantizes quantized
  (`paliseg.model.quantization`).
- `for_inference(cfg, params)`: the config and params to decode with. On CPU the layers unscanned
  (`scan_layers=False`: `llm/layers_0/...`, each layer in buffers of its own, each projection weight as
  row-major matrices, `kernels.Matrices`), which XLA:CPU decodes faster (see there).

The modules, each importing only those listed before it:

    layouts       what a weight's axes mean (`WeightLayout`), read off its einsum
    quantization  quantized weights (`QuantizedWeight`) and how they are made
    kernels       how the contractions run on XLA:CPU (`weight_einsum`, `Matrices`, `low_rank`, ...)
    layers        how a module reads its params (`read`, `Module`) and the weight contraction (`Einsum`)
    lora          the LoRA adapter module and the split of a tree into base and adapters
    siglip, gemma, paligemma    the model
    params        the param tree of a config (`init_params`, `param_shapes`, `weight_layouts`) and the tree
                  transforms that need its layouts (`merge_lora`, `quantize_params`)
    inference     the config and params to decode with (`for_inference`, `decoding_view`)
"""

from __future__ import annotations

import functools

import jax

from paliseg.config import ModelConfig
from paliseg.model.inference import for_inference
from paliseg.model.layouts import WeightLayout
from paliseg.model.lora import join_params, split_params
from paliseg.model.paligemma import PaliGemma, make_attn_mask
from paliseg.model.params import init_params, merge_lora, param_shapes, quantize_params, weight_layouts

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
    "quantize_params",
    "split_params",
    "weight_layouts",
]


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
