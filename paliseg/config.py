"""Typed model configs and the named presets.

A `ModelConfig` fully determines the parameter tree (big_vision's: `img/...` SigLIP, `llm/...` Gemma) and
the numerics (dtype policy, remat, LoRA). Presets:

- `paligemma-3b-224`, `-448`, `-896`: the released PaliGemma 1 sizes (So400m/14 + Gemma 2B, vocab 257152 =
  256000 + 1024 loc + 128 seg). They need the real `paligemma_tokenizer.model` (`--tokenizer`).
- `paligemma2-{3b,10b,28b}-{224,448,896}`: the released PaliGemma 2 sizes (So400m/14 + Gemma 2 2B / 9B /
  27B), same vocab and tokenizer.
- `tiny`, `tiny-112`: a few-layer model over the bundled tiny tokenizer (`paliseg/assets/`), small enough to
  train from scratch on two CPU cores; the demo and the tests use them. `tiny-pg2`: the same with Gemma 2's
  features (post-norms, soft-cap, grouped kv heads, heads * head_dim != width).
- `mid`: the benchmark's mid-size config (4 layers, width 512, vision width 384, 224 px).

Configs are frozen dataclasses, so they hash: a config can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from paliseg.settings import setting

ASSETS = Path(__file__).resolve().parent / "assets"
# Made (deterministically) by:
#   python -c "from paliseg.tokenizer import build_tiny_tokenizer as b; b('paliseg/assets/tiny_tokenizer.model')"
TINY_TOKENIZER = ASSETS / "tiny_tokenizer.model"


def installed_asset(path: Path) -> Path:
    """`path`, or where it is missing and names a file bundled with paliseg (`.../paliseg/assets/NAME`), this
    installation's copy: a run records the absolute path of the bundled file it used, and is still read
    after paliseg moved (another checkout, a rebuilt venv)."""
    if path.is_file() or path.parent.parts[-2:] != ("paliseg", "assets") or not (ASSETS / path.name).is_file():
        return path
    return ASSETS / path.name


# Pieces in the bundled tiny tokenizer (tests check this against the file): the tiny presets' vocab.
TINY_VOCAB_SIZE = 1792
PALIGEMMA_VOCAB_SIZE = 256_000 + 1024 + 128

# What `--dtype` offers (`ModelConfig.with_dtype`): the weights' and the matmuls' dtype.
DTYPES = ("float32", "bfloat16")

# What `--base-dtype` / `--quantize` offer: the frozen base's projection weights stored quantized.
QUANTIZED_DTYPES = ("int8", "nf4")

# Short LoRA target names: the Gemma projections, and (prefixed `img_`) the SigLIP ones.
LLM_LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
IMG_LORA_TARGETS = ("img_q", "img_k", "img_v", "img_o", "img_fc1", "img_fc2")


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """The image encoder: a ViT without CLS token or pooling, whose per-patch `head` projects to the LLM."""

    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    norm_eps: float = 1e-6
    # How a fresh `pos_embedding` is initialised (it is learned either way): "normal" as SigLIP, or
    # "sincos2d" (big_vision's fixed 2-D sin-cos embedding), which lets a small model trained from scratch
    # tell patches apart from the first step: the tiny presets learn where objects are far sooner with it.
    posemb_init: str = "normal"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"vision width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.posemb_init not in ("normal", "sincos2d"):
            raise ValueError(f"posemb_init must be 'normal' or 'sincos2d', got {self.posemb_init!r}")
        if self.posemb_init == "sincos2d" and self.width % 4:
            raise ValueError(f"sincos2d position embeddings need a vision width divisible by 4, got {self.width}")


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """The Gemma decoder of both PaliGemma generations: Gemma 1 (PaliGemma 1) with the defaults, Gemma 2
    (PaliGemma 2) with `post_norms`, the soft-caps, grouped-query attention and, optionally, a sliding window.

    `query_pre_attn_scalar`: queries are scaled by its inverse square root (None: `head_dim`; Gemma 2 27B
    uses width / num_heads). `attn_logits_softcap` / `final_logits_softcap`: `c * tanh(x / c)` on the
    attention logits / output logits, 0.0 for none (big_vision fine-tunes PaliGemma 2 with no final cap;
    Hugging Face checkpoints carry 30.0). `sliding_window`: the even layers (0, 2, ...) attend only to the
    last `sliding_window` positions, as Hugging Face's Gemma 2 (None: every layer is global, as big_vision)."""

    width: int = 2048
    depth: int = 18
    mlp_dim: int = 16384
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    norm_eps: float = 1e-6
    rope_max_wavelength: float = 10_000.0
    post_norms: bool = False
    attn_logits_softcap: float = 0.0
    final_logits_softcap: float = 0.0
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")

    @property
    def generation(self) -> int:
        """1 for Gemma 1 (PaliGemma 1), 2 for Gemma 2 (post-norms): what checkpoint key names mean."""
        return 2 if self.post_norms else 1

    @property
    def query_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters inside the projections: y = x@W + (alpha/rank) * dropout(x)@A@B, B zero-initialised.

    `targets` are short names (`LLM_LORA_TARGETS`, `IMG_LORA_TARGETS`). Each target adapts its own slice of
    a fused weight: `k` adapts only index 0 of `kv_einsum`, `gate` only index 0 of `gating_einsum`.
    `rank=0` disables LoRA. `paliseg train` takes these settings as `--lora-rank` etc. (its config's `lora`).
    """

    rank: int = setting(0, "adapter rank", metavar="R")
    alpha: float = setting(16.0, "adapter scale numerator: scale = alpha / rank", metavar="A")
    dropout: float = setting(0.0, "dropout on the adapter input", metavar="P")
    targets: tuple[str, ...] = setting(
        LLM_LORA_TARGETS,
        "projections to adapt: Gemma's, and SigLIP's (img_*)",
        metavar="T1,T2",
        choices=LLM_LORA_TARGETS + IMG_LORA_TARGETS,
    )

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = sorted(set(self.targets) - set(LLM_LORA_TARGETS + IMG_LORA_TARGETS))
        if unknown:
            raise ValueError(f"unknown LoRA targets {unknown}; valid: {', '.join(LLM_LORA_TARGETS + IMG_LORA_TARGETS)}")
        if self.rank < 0:
            raise ValueError(f"LoRA rank must be >= 0, got {self.rank}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0 and bool(self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapts(self, target: str) -> bool:
        return self.enabled and target in self.targets


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """The frozen base's projection weights stored quantized and dequantized layer by layer, in the layer's
    computation (`paliseg.model.quantization`). The embedding, norms, biases and the patch and position
    embeddings are never quantized. `paliseg train` takes these as `--base-dtype`, `--quantization-*`."""

    format: str | None = setting(
        None,
        "store the frozen base's projection weights quantized: int8 (per-output-channel absmax scales) or nf4 "
        "(QLoRA's 4-bit NormalFloat, blocks of 64); only --trainable lora; matmuls stay in --dtype",
        choices=QUANTIZED_DTYPES,
        flag="--base-dtype",
    )
    skip_vision: bool = setting(False, "keep the vision tower (SigLIP and its projection onto the LLM) unquantized")
    double_scales: bool = setting(False, "nf4: store the block scales in 8 bits too (QLoRA's double quantization)")

    def __post_init__(self):
        if self.format not in (None, *QUANTIZED_DTYPES):
            raise ValueError(f"quantization format must be one of {', '.join(QUANTIZED_DTYPES)}, got {self.format!r}")

    @property
    def enabled(self) -> bool:
        return self.format is not None


# The param tree's subtrees stacked over depth when `scan_layers` ('/'-joined); unscanned, layer i of a
# stack is `<stack>_<i>` (`llm/layers_0/...`). Sharding and the CPU inference layout both key on these.
SCANNED_STACKS = ("llm/layers", "img/Transformer/encoderblock")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """PaliGemma = SigLIP + Gemma, plus the numerics.

    dtype policy: parameters are stored in `param_dtype` and matmuls run in `compute_dtype`; norms, softmax
    and logits always run in float32. `remat` recomputes each layer in the backward pass
    (`nothing_saveable`), trading compute for activation memory when training. `scan_layers` runs the
    layers as one scanned module whose params are stacked over depth (`layers/...` [L, ...], the checkpoint's
    tree); False gives one module per layer (`layers_0/...`, ...), big_vision's `scan=False`, each projection
    weight stored as `kernels.Matrices` (unless quantized), which `inference.for_inference` picks for decoding
    on CPU. `quantization`: the frozen base's projection weights
    stored as int8 or NF4 (`QuantizationConfig`). `tokenizer` is the default
    tokenizer: a path, or the name of a file in `paliseg/assets/` (the tiny presets use the bundled one);
    None means it must be given.
    """

    img: SiglipConfig = SiglipConfig()
    llm: GemmaConfig = GemmaConfig()
    lora: LoraConfig = LoraConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    param_dtype: str = "bfloat16"
    compute_dtype: str = "bfloat16"
    cache_dtype: str = "bfloat16"
    dropout: float = 0.0
    remat: bool = False
    scan_layers: bool = True
    tokenizer: str | None = None

    @property
    def num_image_tokens(self) -> int:
        return self.img.num_patches

    @property
    def tokenizer_path(self) -> Path | None:
        if self.tokenizer is None:
            return None
        path = Path(self.tokenizer)
        if path.is_absolute() or not (ASSETS / path).exists():
            return path
        return ASSETS / path

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with fields changed; `img`, `llm`, `lora` and `quantization` also accept dicts of their own
        fields."""
        for name in ("img", "llm", "lora", "quantization"):
            if isinstance(changes.get(name), dict):
                changes[name] = dataclasses.replace(getattr(self, name), **changes[name])
        return dataclasses.replace(self, **changes)

    def with_dtype(self, dtype: str | None) -> ModelConfig:
        """Weights, matmuls and the KV cache in `dtype` (None: unchanged). float32 reproduces a float32
        reference (transformers) token for token; bfloat16 halves the memory and drifts after a few tokens."""
        if dtype is None:
            return self
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return self.replace(param_dtype=dtype, compute_dtype=dtype, cache_dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        lora = dict(data.pop("lora", {}))
        if "targets" in lora:
            lora["targets"] = tuple(lora["targets"])
        return cls(
            img=SiglipConfig(**data.pop("img", {})),
            llm=GemmaConfig(**data.pop("llm", {})),
            lora=LoraConfig(**lora),
            quantization=QuantizationConfig(**data.pop("quantization", {})),  # absent before quantization
            **data,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _paligemma(image_size: int) -> ModelConfig:
    return ModelConfig(img=SiglipConfig(image_size=image_size), llm=GemmaConfig())


# PaliGemma 2's decoders (Gemma 2 2B / 9B / 27B), with big_vision's fine-tuning choices: no final soft-cap,
# every layer global. Hugging Face checkpoints bring their own values (`checkpoints.huggingface`).
GEMMA2_SIZES = {
    "3b": dict(width=2304, depth=26, mlp_dim=9216, num_heads=8, num_kv_heads=4, head_dim=256),
    "10b": dict(width=3584, depth=42, mlp_dim=14336, num_heads=16, num_kv_heads=8, head_dim=256),
    "28b": dict(width=4608, depth=46, mlp_dim=36864, num_heads=32, num_kv_heads=16, head_dim=128,
                query_pre_attn_scalar=4608 // 32),
}  # fmt: skip


def _paligemma2(size: str, image_size: int) -> ModelConfig:
    llm = GemmaConfig(**GEMMA2_SIZES[size], post_norms=True, attn_logits_softcap=50.0)
    return ModelConfig(img=SiglipConfig(image_size=image_size), llm=llm)


def _tiny(image_size: int) -> ModelConfig:
    return ModelConfig(
        img=SiglipConfig(
            width=96, depth=2, mlp_dim=384, num_heads=4, patch_size=8, image_size=image_size, posemb_init="sincos2d"
        ),
        llm=GemmaConfig(
            width=128, depth=3, mlp_dim=512, num_heads=4, num_kv_heads=1, head_dim=32, vocab_size=TINY_VOCAB_SIZE
        ),
        param_dtype="float32",
        compute_dtype="float32",
        cache_dtype="float32",
        tokenizer=TINY_TOKENIZER.name,
    )


def _tiny_pg2(image_size: int) -> ModelConfig:
    """The tiny preset with every Gemma 2 feature: post-norms, soft-cap, grouped kv heads, and heads * head_dim
    (192) != width (128) with a query scalar other than head_dim."""
    llm = dict(depth=4, num_heads=4, num_kv_heads=2, head_dim=48, post_norms=True, attn_logits_softcap=50.0,
               query_pre_attn_scalar=32)  # fmt: skip
    return _tiny(image_size).replace(llm=llm)


PRESETS: dict[str, ModelConfig] = {
    "paligemma-3b-224": _paligemma(224),
    "paligemma-3b-448": _paligemma(448),
    "paligemma-3b-896": _paligemma(896),
    **{f"paligemma2-{size}-{res}": _paligemma2(size, res) for size in GEMMA2_SIZES for res in (224, 448, 896)},
    "tiny": _tiny(64),
    "tiny-112": _tiny(112),
    "tiny-pg2": _tiny_pg2(64),
    "mid": ModelConfig(
        img=SiglipConfig(width=384, depth=4, mlp_dim=1536, num_heads=6, patch_size=14, image_size=224),
        llm=GemmaConfig(
            width=512, depth=4, mlp_dim=2048, num_heads=8, num_kv_heads=1, head_dim=64, vocab_size=TINY_VOCAB_SIZE
        ),
        param_dtype="float32",
        compute_dtype="float32",
        cache_dtype="float32",
        tokenizer=TINY_TOKENIZER.name,
    ),
}


def preset(name: str, **changes: Any) -> ModelConfig:
    """A named preset, optionally with fields changed (see `ModelConfig.replace`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]
