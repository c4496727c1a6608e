"""SigLIP image encoder as big_vision's `vit.Model(pool_type="none", scan=True)`.

Param tree (under `img/`): `embedding/{kernel,bias}` (patch conv, HWIO), `pos_embedding` [1,n,W] (learned),
`Transformer/encoderblock/...` (scanned: leading depth axis), `Transformer/encoder_norm`, and `head`, the
per-patch Dense that projects onto the LLM width. Pre-LN blocks, tanh-GELU MLP, LayerNorm eps 1e-6, no CLS.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from paliseg.config import ModelConfig
from paliseg.model import backend
from paliseg.model.projection import Numerics, Projection


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the activation dtype (params `scale`, `bias`)."""

    eps: float
    param_dtype: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = backend.stored(self.param("scale", nn.initializers.ones, (width,), jnp.dtype(self.param_dtype)))
        bias = backend.stored(self.param("bias", nn.initializers.zeros, (width,), jnp.dtype(self.param_dtype)))
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)


class SelfAttention(nn.Module):
    config: ModelConfig
    numerics: Numerics

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config.img
        sizes = (("D", cfg.width), ("N", cfg.num_heads), ("H", cfg.width // cfg.num_heads))
        site = "MultiHeadDotProductAttention_0/{}/kernel"

        def proj(name: str, bias_axes: str) -> Projection:
            return Projection(site.format(name), sizes, self.numerics, "kernel", bias_axes, name=name)

        # head-major [B,N,T,H] operands: plain batched matmuls, which XLA:CPU runs much faster than the
        # same einsums over [B,T,N,H]
        q, k, v = (proj(name, "NH")(x).transpose(0, 2, 1, 3) for name in ("query", "key", "value"))
        q = q * (cfg.width // cfg.num_heads) ** -0.5
        logits = jnp.einsum("BNTH,BNSH->BNTS", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("BNTS,BNSH->BNTH", weights, v).transpose(0, 2, 1, 3)
        return proj("out", "D")(out)


class EncoderBlock(nn.Module):
    config: ModelConfig
    numerics: Numerics

    @nn.compact
    def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
        cfg = self.config.img
        norm = lambda name: LayerNorm(cfg.norm_eps, self.config.param_dtype, name=name)  # noqa: E731
        x = x + SelfAttention(self.config, self.numerics, name="MultiHeadDotProductAttention_0")(norm("LayerNorm_0")(x))
        x = x + MlpBlock(self.config, self.numerics, name="MlpBlock_0")(norm("LayerNorm_1")(x))
        return x, None


class MlpBlock(nn.Module):
    config: ModelConfig
    numerics: Numerics

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config.img
        sizes = (("D", cfg.width), ("F", cfg.mlp_dim))
        h = Projection("MlpBlock_0/Dense_0/kernel", sizes, self.numerics, "kernel", "F", name="Dense_0")(x)
        h = nn.gelu(h, approximate=True)
        return Projection("MlpBlock_0/Dense_1/kernel", sizes, self.numerics, "kernel", "D", name="Dense_1")(h)


class Encoder(nn.Module):
    config: ModelConfig
    numerics: Numerics

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block = EncoderBlock
        if self.config.remat:
            block = nn.remat(block, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
        if self.config.scan_layers:
            blocks = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                length=self.config.img.depth,
            )(self.config, self.numerics, name="encoderblock")
            x, _ = blocks(x, None)
        else:
            for i in range(self.config.img.depth):
                x, _ = block(self.config, self.numerics, name=f"encoderblock_{i}")(x, None)
        return LayerNorm(self.config.img.norm_eps, self.config.param_dtype, name="encoder_norm")(x)


def sincos2d_init(key: jax.Array, shape: tuple[int, int, int], dtype=jnp.float32) -> jax.Array:
    """big_vision's `posemb_sincos_2d` for a square grid, as an initializer of `pos_embedding` [1, n, W]:
    sin and cos of the x then the y patch index at W/4 frequencies each (`key` is unused)."""
    del key
    _, n, width = shape
    side = math.isqrt(n)
    y, x = jnp.mgrid[:side, :side]
    omega = 1.0 / 10_000.0 ** (jnp.arange(width // 4) / (width // 4 - 1))
    x = x.reshape(-1, 1) * omega
    y = y.reshape(-1, 1) * omega
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)[None].astype(dtype)


class PatchEmbedding(nn.Module):
    """The stride-p p x p VALID convolution (`kernel` HWIO, `bias`), computed as one matmul over the
    flattened patches: identical to the convolution, faster on CPU."""

    config: ModelConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config.img
        p, grid = cfg.patch_size, cfg.image_size // cfg.patch_size
        param_dtype, dtype = jnp.dtype(self.config.param_dtype), jnp.dtype(self.config.compute_dtype)
        kernel = backend.stored(self.param("kernel", nn.initializers.lecun_normal(), (p, p, 3, cfg.width), param_dtype))
        bias = backend.stored(self.param("bias", nn.initializers.zeros, (cfg.width,), param_dtype))
        batch = images.shape[0]
        patches = images.reshape(batch, grid, p, grid, p, 3).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, grid * grid, p * p * 3).astype(dtype)
        return patches @ kernel.reshape(p * p * 3, cfg.width).astype(dtype) + bias.astype(dtype)


class Siglip(nn.Module):
    """images [B,H,W,3] in [-1,1] -> image embeddings [B, num_patches, llm width] (float32)."""

    config: ModelConfig
    numerics: Numerics

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config.img
        x = PatchEmbedding(self.config, name="embedding")(images)
        init = sincos2d_init if cfg.posemb_init == "sincos2d" else nn.initializers.normal(stddev=cfg.width**-0.5)
        pos = self.param("pos_embedding", init, (1, cfg.num_patches, cfg.width), jnp.dtype(self.config.param_dtype))
        x = x.astype(jnp.float32) + backend.stored(pos).astype(jnp.float32)
        x = Encoder(self.config, self.numerics, name="Transformer")(x)
        sizes = (("D", cfg.width), ("F", self.config.llm.width))
        head = Projection("head/kernel", sizes, self.numerics, "kernel", "F", name="head")
        return head(x).astype(jnp.float32)
