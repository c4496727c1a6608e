"""Hugging Face PaliGemma checkpoints (PaliGemma 1 and 2): a folder with `config.json` and safetensors (one
file, or shards listed in `model.safetensors.index.json`).

The generation comes from `text_config.model_type` (`gemma` or `gemma2`), and it decides what the layer norm
names mean: `post_attention_layernorm` is the pre-FFW norm in Gemma 1 but a real post-attention norm in
Gemma 2 (whose pre-FFW norm is `pre_feedforward_layernorm`), so a wrong guess would load "successfully" and
compute something else. Gemma 2's soft-caps, query scalar and sliding window are read from the file
(`final_logit_softcapping`, `query_pre_attn_scalar`, `sliding_window` with `layer_types`; transformers'
Gemma2Config defaults where absent); only the alternating pattern (even layers sliding) or all-global
layers are supported. Attention reshapes use heads * head_dim, which differs from the width in Gemma 2.

Every key layout transformers has written is accepted (its PaliGemma modeling and conversion code across versions):
`vision_tower.vision_model.*` (hub files, <=4.51), `model.vision_tower.vision_model.*` (4.52-5.5),
`model.vision_tower.*` / on-disk `vision_tower.*` (>=5.6), `language_model.model.*` or
`model.language_model.*`, `multi_modal_projector.*` with or without `model.`; `lm_head` is optional and
must equal the (tied) embedding. Embedding rows beyond `vocab_size` (HF pads 257152 -> 257216 and puts
`<image>` at 257152) are trimmed. Tensors are read one at a time and cast at once, so loading an f32
3B checkpoint into bf16 never holds the f32 model in memory.

Export writes the hub layout (`vision_tower.vision_model.*`, `language_model.model.*`), which every
transformers version reads, with `image_token_index = vocab_size` (an id outside the vocabulary, which
transformers maps to row 0 before its embedding lookup and then overwrites with image features).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from paliseg.checkpoints.tree import Flat, flatten
from paliseg.config import GEMMA2_SIZES, GemmaConfig, ModelConfig, SiglipConfig
from paliseg.files import write_json

Array = Any
_TANH_GELUS = {"gelu_pytorch_tanh", "gelu_fast", "gelu_new", "gelu"}  # transformers rewrites Gemma's "gelu" to tanh


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One of our leaves <- one or more HF tensors (canonical names; `{i}` = layer index when stacked)."""

    ours: str
    hf: tuple[str, ...]
    to_ours: Callable[..., Array]
    to_hf: Callable[[Array], tuple[Array, ...]]
    stacked: bool


def _rules(config: ModelConfig) -> list[_Rule]:
    img, llm = config.img, config.llm
    d, n, h = img.width, img.num_heads, img.width // img.num_heads
    rules = [
        _Rule(
            "img/embedding/kernel",
            ("vision.embeddings.patch_embedding.weight",),
            lambda w: w.transpose(2, 3, 1, 0),
            lambda k: (k.transpose(3, 2, 0, 1),),
            False,
        ),
        _Rule("img/embedding/bias", ("vision.embeddings.patch_embedding.bias",), lambda b: b, lambda b: (b,), False),
        _Rule(
            "img/pos_embedding",
            ("vision.embeddings.position_embedding.weight",),
            lambda w: w[None],
            lambda p: (p[0],),
            False,
        ),
        _Rule(
            "img/Transformer/encoder_norm/scale", ("vision.post_layernorm.weight",), lambda w: w, lambda w: (w,), False
        ),
        _Rule("img/Transformer/encoder_norm/bias", ("vision.post_layernorm.bias",), lambda w: w, lambda w: (w,), False),
        _Rule("img/head/kernel", ("projector.linear.weight",), lambda w: w.T, lambda k: (k.T,), False),
        _Rule("img/head/bias", ("projector.linear.bias",), lambda b: b, lambda b: (b,), False),
        _Rule("llm/embedder/input_embedding", ("lm.embed_tokens.weight",), lambda w: w, lambda w: (w,), False),
        _Rule("llm/final_norm/scale", ("lm.norm.weight",), lambda w: w, lambda w: (w,), False),
    ]
    block, layer = "img/Transformer/encoderblock/", "vision.encoder.layers.{i}."
    for ours, theirs in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
        for leaf, hf_leaf in (("scale", "weight"), ("bias", "bias")):
            rules.append(
                _Rule(f"{block}{ours}/{leaf}", (f"{layer}{theirs}.{hf_leaf}",), lambda w: w, lambda w: (w,), True)
            )
    attn = block + "MultiHeadDotProductAttention_0/"
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        rules += [
            _Rule(
                f"{attn}{ours}/kernel",
                (f"{layer}self_attn.{theirs}.weight",),
                lambda w: w.T.reshape(d, n, h),
                lambda k: (k.reshape(d, n * h).T,),
                True,
            ),
            _Rule(
                f"{attn}{ours}/bias",
                (f"{layer}self_attn.{theirs}.bias",),
                lambda b: b.reshape(n, h),
                lambda b: (b.reshape(n * h),),
                True,
            ),
        ]
    rules += [
        _Rule(
            f"{attn}out/kernel",
            (f"{layer}self_attn.out_proj.weight",),
            lambda w: w.T.reshape(n, h, d),
            lambda k: (k.reshape(n * h, d).T,),
            True,
        ),
        _Rule(f"{attn}out/bias", (f"{layer}self_attn.out_proj.bias",), lambda b: b, lambda b: (b,), True),
    ]
    for ours, theirs in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
        rules += [
            _Rule(
                f"{block}MlpBlock_0/{ours}/kernel",
                (f"{layer}mlp.{theirs}.weight",),
                lambda w: w.T,
                lambda k: (k.T,),
                True,
            ),
            _Rule(f"{block}MlpBlock_0/{ours}/bias", (f"{layer}mlp.{theirs}.bias",), lambda b: b, lambda b: (b,), True),
        ]

    D, N, K, H = llm.width, llm.num_heads, llm.num_kv_heads, llm.head_dim
    layers, layer = "llm/layers/", "lm.layers.{i}."
    heads_in = lambda w, heads: w.reshape(heads, H, D).transpose(0, 2, 1)  # noqa: E731  [heads*H, D] -> [heads, D, H]
    heads_out = lambda x, heads: x.transpose(0, 2, 1).reshape(heads * H, D)  # noqa: E731
    proj = lambda name: f"{layer}self_attn.{name}.weight"  # noqa: E731
    if N == K:
        rules.append(
            _Rule(
                f"{layers}attn/qkv_einsum/w",
                (proj("q_proj"), proj("k_proj"), proj("v_proj")),
                lambda q, k, v: np.stack([heads_in(q, N), heads_in(k, N), heads_in(v, N)]),
                lambda x: tuple(heads_out(x[j], N) for j in range(3)),
                True,
            )
        )
    else:
        rules += [
            _Rule(
                f"{layers}attn/q_einsum/w",
                (proj("q_proj"),),
                lambda q: heads_in(q, N),
                lambda x: (heads_out(x, N),),
                True,
            ),
            _Rule(
                f"{layers}attn/kv_einsum/w",
                (proj("k_proj"), proj("v_proj")),
                lambda k, v: np.stack([heads_in(k, K), heads_in(v, K)]),
                lambda x: (heads_out(x[0], K), heads_out(x[1], K)),
                True,
            ),
        ]
    rules += [
        _Rule(
            f"{layers}attn/attn_vec_einsum/w",
            (proj("o_proj"),),
            lambda w: w.T.reshape(N, H, D),
            lambda x: (x.reshape(N * H, D).T,),
            True,
        ),
        _Rule(
            f"{layers}mlp/gating_einsum",
            (f"{layer}mlp.gate_proj.weight", f"{layer}mlp.up_proj.weight"),
            lambda g, u: np.stack([g.T, u.T]),
            lambda x: (x[0].T, x[1].T),
            True,
        ),
        _Rule(f"{layers}mlp/linear", (f"{layer}mlp.down_proj.weight",), lambda w: w.T, lambda x: (x.T,), True),
        _Rule(
            f"{layers}pre_attention_norm/scale", (f"{layer}input_layernorm.weight",), lambda w: w, lambda w: (w,), True
        ),
    ]
    norms = {"pre_ffw_norm": "post_attention_layernorm"}  # Gemma 1's name for it
    if llm.post_norms:
        norms = {
            "post_attention_norm": "post_attention_layernorm",
            "pre_ffw_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        }
    for ours, theirs in norms.items():
        rules.append(_Rule(f"{layers}{ours}/scale", (f"{layer}{theirs}.weight",), lambda w: w, lambda w: (w,), True))
    return rules


def canonical_name(key: str) -> str | None:
    """Any transformers layout -> `vision.*`, `projector.*`, `lm.*` or `lm_head`; None if not PaliGemma's."""
    name = key.removeprefix("model.")
    if name in ("lm_head.weight", "language_model.lm_head.weight"):
        return "lm_head"
    for prefix, canon in (
        ("language_model.model.", "lm."),
        ("language_model.", "lm."),
        ("vision_tower.vision_model.", "vision."),
        ("vision_tower.", "vision."),
        ("multi_modal_projector.", "projector."),
    ):
        if name.startswith(prefix):
            return canon + name[len(prefix) :]
    return None


_EXPORT_PREFIX = {
    "vision.": "vision_tower.vision_model.",
    "projector.": "multi_modal_projector.",
    "lm.": "language_model.model.",
}


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A ModelConfig from a transformers PaliGemmaConfig dict. Missing fields take PaliGemma-3B's values,
    as the hub's config.json files omit the ones equal to transformers' defaults of the time."""
    if hf.get("model_type") != "paligemma":
        raise ValueError(f"{source}: model_type is {hf.get('model_type')!r}, not 'paligemma'")
    text, vision = dict(hf.get("text_config") or {}), dict(hf.get("vision_config") or {})
    text_type = text.get("model_type", "gemma")
    if text_type not in ("gemma", "gemma2"):
        raise ValueError(f"{source}: text model {text_type!r} is neither Gemma ('gemma') nor Gemma 2 ('gemma2')")
    act = text.get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _TANH_GELUS or vision.get("hidden_act", "gelu_pytorch_tanh") not in _TANH_GELUS:
        raise ValueError(f"{source}: only tanh-GELU activations are supported, got {act!r}")
    rope = (text.get("rope_parameters") or {}).get("rope_theta", text.get("rope_theta", 10_000.0))
    # transformers' defaults for absent fields: Gemma2Config's are Gemma 2 2B's (PaliGemma 2 3B)
    llm_defaults = GemmaConfig(**GEMMA2_SIZES["3b"]) if text_type == "gemma2" else GemmaConfig()
    img_defaults = SiglipConfig()
    patch = vision.get("patch_size", img_defaults.patch_size)
    image_size = vision.get("image_size")
    if image_size is None:
        tokens = vision.get("num_image_tokens") or text.get("num_image_tokens") or hf.get("num_image_tokens")
        image_size = math.isqrt(tokens) * patch if tokens else img_defaults.image_size
    llm = GemmaConfig(
        width=text.get("hidden_size", llm_defaults.width),
        depth=text.get("num_hidden_layers", llm_defaults.depth),
        mlp_dim=text.get("intermediate_size", llm_defaults.mlp_dim),
        num_heads=text.get("num_attention_heads", llm_defaults.num_heads),
        num_kv_heads=text.get("num_key_value_heads", llm_defaults.num_kv_heads),
        head_dim=text.get("head_dim") or llm_defaults.head_dim,
        vocab_size=text.get("vocab_size", 257_216),
        norm_eps=text.get("rms_norm_eps", llm_defaults.norm_eps),
        rope_max_wavelength=float(rope),
        **(_gemma2_fields(text, source) if text_type == "gemma2" else {}),
    )
    img = SiglipConfig(
        width=vision.get("hidden_size", img_defaults.width),
        depth=vision.get("num_hidden_layers", img_defaults.depth),
        mlp_dim=vision.get("intermediate_size", img_defaults.mlp_dim),
        num_heads=vision.get("num_attention_heads", img_defaults.num_heads),
        patch_size=patch,
        image_size=image_size,
        norm_eps=vision.get("layer_norm_eps", img_defaults.norm_eps),
    )
    projection = hf.get("projection_dim", vision.get("projection_dim", llm.width))
    if projection != llm.width:
        raise ValueError(f"{source}: projection_dim {projection} != text hidden_size {llm.width}")
    return ModelConfig(img=img, llm=llm)


def _gemma2_fields(text: dict[str, Any], source: str) -> dict[str, Any]:
    """Our GemmaConfig fields for a Gemma 2 text config (Gemma2Config's defaults where absent)."""
    depth = text.get("num_hidden_layers", GEMMA2_SIZES["3b"]["depth"])
    window = text.get("sliding_window", 4096)
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(depth)]
    layer_types = text.get("layer_types") or alternating
    if window is None or layer_types == ["full_attention"] * depth:
        window = None
    elif layer_types != alternating:
        raise ValueError(
            f"{source}: layer_types {layer_types} are not supported (only even layers sliding, or all full)"
        )
    head_dim = text.get("head_dim") or GEMMA2_SIZES["3b"]["head_dim"]
    scalar = text.get("query_pre_attn_scalar", 256)
    return dict(
        post_norms=True,
        attn_logits_softcap=float(text.get("attn_logit_softcapping", 50.0) or 0.0),
        final_logits_softcap=float(text.get("final_logit_softcapping", 30.0) or 0.0),
        query_pre_attn_scalar=None if scalar == head_dim else scalar,
        sliding_window=window,
    )


def _gemma2_to_hf(llm: GemmaConfig) -> dict[str, Any]:
    """The Gemma2Config fields that say what our config says. Without a window every layer is
    `full_attention`; `sliding_window` then only has to be set (transformers builds the unused sliding mask)."""
    return {
        "model_type": "gemma2",
        "query_pre_attn_scalar": _number(llm.query_pre_attn_scalar or llm.head_dim),
        "attn_logit_softcapping": llm.attn_logits_softcap or None,
        "final_logit_softcapping": llm.final_logits_softcap or None,
        "sliding_window": llm.sliding_window or _MAX_POSITIONS,
        "layer_types": [
            "sliding_attention" if llm.sliding_window is not None and i % 2 == 0 else "full_attention"
            for i in range(llm.depth)
        ],
        "max_position_embeddings": _MAX_POSITIONS,
    }


_MAX_POSITIONS = 8192  # Gemma 2's; RoPE itself has no limit


def _number(value: float) -> int | float:
    """An int where the value is whole (Gemma2Config types `query_pre_attn_scalar` as int)."""
    return int(value) if float(value).is_integer() else value


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    img, llm = config.img, config.llm
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "model_type": "paligemma",
        "image_token_index": llm.vocab_size,
        "projection_dim": llm.width,
        "hidden_size": llm.width,
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "text_config": {
            "model_type": "gemma",
            "hidden_size": llm.width,
            "intermediate_size": llm.mlp_dim,
            "num_hidden_layers": llm.depth,
            "num_attention_heads": llm.num_heads,
            "num_key_value_heads": llm.num_kv_heads,
            "head_dim": llm.head_dim,
            "vocab_size": llm.vocab_size,
            "rms_norm_eps": llm.norm_eps,
            "rope_theta": llm.rope_max_wavelength,
            "rope_parameters": {"rope_theta": llm.rope_max_wavelength, "rope_type": "default"},
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "num_image_tokens": img.num_patches,
            "tie_word_embeddings": True,
            "bos_token_id": 2,
            "eos_token_id": 1,
            "pad_token_id": 0,
            **(_gemma2_to_hf(llm) if llm.post_norms else {}),
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": img.width,
            "intermediate_size": img.mlp_dim,
            "num_hidden_layers": img.depth,
            "num_attention_heads": img.num_heads,
            "patch_size": img.patch_size,
            "image_size": img.image_size,
            "num_channels": 3,
            "layer_norm_eps": img.norm_eps,
            "hidden_act": "gelu_pytorch_tanh",
            "vision_use_head": False,
            "projection_dim": llm.width,
            "num_image_tokens": img.num_patches,
        },
    }


def _tensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{index}: lists {file.name}, which does not exist")
    return files


def read_hf(folder: str | os.PathLike, vocab_size: int | None = None, dtype: Any = None) -> tuple[ModelConfig, Flat]:
    """(config, flat params as numpy in `dtype` (default: as stored)) from a transformers PaliGemma folder.

    `vocab_size` (the tokenizer's size) trims the embedding; by default all rows are kept."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    config = config_from_hf(json.loads(config_path.read_text()), str(config_path))
    where: dict[str, tuple[Path, str]] = {}  # canonical name: (file, key)
    unexpected, rows = [], config.llm.vocab_size
    for file in _tensor_files(folder):
        with safe_open(str(file), framework="np") as handle:  # the header only: tensors load in _read_tensor
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                name = canonical_name(key)
                if name is None:
                    unexpected.append(f"{key} ({file.name})")
                elif name in where:
                    raise ValueError(f"{folder}: {key} and {where[name][1]} are the same weight in two layouts")
                else:
                    where[name] = (file, key)
                    if name == "lm.embed_tokens.weight":
                        rows = handle.get_slice(key).get_shape()[0]
    vocab = vocab_size or rows
    if vocab > rows:
        raise ValueError(f"{folder}: the embedding has {rows} rows, fewer than the tokenizer's {vocab} pieces")
    config = config.replace(llm={"vocab_size": vocab})
    full = config.replace(llm={"vocab_size": rows})

    errors: list[str] = []
    flat: Flat = {}
    needed = set()
    for rule in _rules(full):
        names = [n.format(i=i) for n in rule.hf for i in (range(_depth(rule, full)) if rule.stacked else [0])]
        needed.update(names)
        if all(n in where for n in names):
            flat[rule.ours] = _read_rule(rule, where, full, dtype, errors)
    missing = sorted(_export_name(n) + " (in any layout)" for n in needed - set(where))
    unexpected += sorted(where[k][1] for k in set(where) - needed - {"lm_head"})
    if missing or unexpected or errors:
        parts = [f"{folder} is not a PaliGemma checkpoint of the shape its config.json describes:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", errors)):
            if items:
                parts.append(
                    f"  {title} ({len(items)}): " + ", ".join(items[:12]) + (" ..." if len(items) > 12 else "")
                )
        raise ValueError("\n".join(parts))
    embedding = flat["llm/embedder/input_embedding"]
    if "lm_head" in where:
        file, key = where["lm_head"]
        head = _read_tensor(file, key)
        if head.shape != embedding.shape or not np.array_equal(head.astype(embedding.dtype), embedding):
            raise ValueError(f"{folder}: {key} differs from the embedding; only tied output layers are supported")
    flat["llm/embedder/input_embedding"] = embedding[:vocab]
    return config, flat


def _read_tensor(file: Path, key: str) -> np.ndarray:
    """One tensor, its file mapped only while it is read: mapped pages count as resident memory, so keeping
    every file open through the load showed a 3B checkpoint's load at twice its size."""
    with safe_open(str(file), framework="np") as handle:
        return handle.get_tensor(key)


def _export_name(canonical: str) -> str:
    prefix = next(p for p in _EXPORT_PREFIX if canonical.startswith(p))
    return _EXPORT_PREFIX[prefix] + canonical[len(prefix) :]


def _depth(rule: _Rule, config: ModelConfig) -> int:
    return config.img.depth if rule.ours.startswith("img/") else config.llm.depth


def _read_rule(rule: _Rule, where, config: ModelConfig, dtype, errors: list[str]):
    """Read, check, transform and (for stacked rules) stack the HF tensors of one of our leaves."""
    expected_layer = _expected_layer_shape(rule, config)
    hf_shapes = [tuple(s.shape) for s in jax.eval_shape(rule.to_hf, jax.ShapeDtypeStruct(expected_layer, np.float32))]
    out = None
    layers = range(_depth(rule, config)) if rule.stacked else [None]
    for i in layers:
        arrays = []
        for name, shape in zip(rule.hf, hf_shapes):
            file, key = where[name.format(i=i)]
            tensor = _read_tensor(file, key)
            if tuple(tensor.shape) != shape:
                errors.append(f"{key} {tuple(tensor.shape)}, expected {shape}")
                return None
            arrays.append(tensor if dtype is None else tensor.astype(dtype))
        value = rule.to_ours(*arrays)
        if i is None:
            return value
        if out is None:
            out = np.empty((len(layers), *value.shape), value.dtype)
        out[i] = value
    return out


def _expected_layer_shape(rule: _Rule, config: ModelConfig) -> tuple[int, ...]:
    from paliseg.model import param_shapes  # local: avoids building the model at import

    shape = tuple(flatten(param_shapes(config))[rule.ours].shape)
    return shape[1:] if rule.stacked else shape


def write_hf(folder: str | os.PathLike, params: dict, config: ModelConfig, overwrite: bool = False) -> Path:
    """Export to a transformers folder (config.json + model.safetensors in the hub layout)."""
    from paliseg.files import OutputExistsError

    folder = Path(folder)
    target = folder / "model.safetensors"
    if target.exists() and not overwrite:
        raise OutputExistsError(target)
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten(params).items()}
    lora = [k for k in flat if k.endswith(("_lora_a", "_lora_b"))]
    if lora:
        raise ValueError(f"params hold LoRA adapters ({lora[0]}, ...): fold them with model.merge_lora first")
    tensors = {}
    for rule in _rules(config):
        value = flat.pop(rule.ours)
        layers = range(value.shape[0]) if rule.stacked else [None]
        for i in layers:
            for name, tensor in zip(rule.hf, rule.to_hf(value if i is None else value[i])):
                tensors[_export_name(name.format(i=i))] = np.ascontiguousarray(tensor)
    if flat:
        raise ValueError(f"params have leaves the model config does not describe: {sorted(flat)[:5]}")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, target)
    hf_config = config_to_hf(config)
    hf_config["dtype"] = hf_config["torch_dtype"] = str(next(iter(tensors.values())).dtype)
    write_json(folder / "config.json", hf_config, overwrite=True)
    return folder
