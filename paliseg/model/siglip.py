"""SigLIP image encoder as big_vision's `vit.Model(pool_type="none", scan=True)`.

    x = embedding(patches) + pos_embedding         the stride-p p x p conv as one matmul; learned positions
    per block (scanned over depth), pre-LN, LayerNorm eps 1e-6 in float32:
      h = LayerNorm_0(x);  q, k, v = h @ query, h @ key, h @ value      (+ biases)
      x = x + softmax(q . k / sqrt(head_dim)) @ v @ out
      x = x + gelu_tanh(LayerNorm_1(x) @ Dense_0) @ Dense_1            (+ biases)
    encoder_norm, then `head`: each patch projected onto the LLM width (no CLS token, no pooling).

Each `@ weight` is an `Einsum` (flax's Dense layouts, with bias) with its equation where it is used; those of
the blocks are wrapped in `LoRA` (targets `img_q`, ..., `img_fc2`), which adds scale * (x@A)@B to the
biased projection, as peft's LoRA around a Linear.

Param tree (under `img/`): `embedding/{kernel,bias}` (HWIO), `pos_embedding` [1,n,W],
`Transformer/encoderblock/{LayerNorm_0,MultiHeadDotProductAttention_0/{query,key,value,out},LayerNorm_1,
MlpBlock_0/{Dense_0,Dense_1}}` (stacked over depth), `Transformer/encoder_norm`, `head/{kernel,bias}`.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from paliseg.config import ModelConfig
from paliseg.model import kernels, layers
from paliseg.model.layouts import WeightLayout, with_layout
from paliseg.model.lora import projections


class LayerNorm(layers.Module):
    """LayerNorm computed in float32 whatever the activation dtype (params `scale`, `bias`)."""

    eps: float
    param_dtype: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (width,), jnp.dtype(self.param_dtype))
        bias = self.param("bias", nn.initializers.zeros, (width,), jnp.dtype(self.param_dtype))
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)


class SelfAttention(layers.Module):
    """flax's `MultiHeadDotProductAttention` layouts: `query`/`key`/`value` kernels [D,N,H], `out` [N,H,D],
    each with a bias."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config.img
        d, n, h = cfg.width, cfg.num_heads, cfg.width // cfg.num_heads
        einsum, lora = projections(self.config, self.deterministic)
        dense = functools.partial(einsum, weight_name="kernel", bias=True)
        q = lora(dense((d, n, h), "...D,DNH->...NH", ("img_q",), name="query"))(x)
        k = lora(dense((d, n, h), "...D,DNH->...NH", ("img_k",), name="key"))(x)
        v = lora(dense((d, n, h), "...D,DNH->...NH", ("img_v",), name="value"))(x)
        # head-major [B,N,T,H] operands: plain batched matmuls, which XLA:CPU runs much faster than the
        # same einsums over [B,T,N,H]
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        q = q * h**-0.5
        logits = jnp.einsum("BNTH,BNSH->BNTS", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("BNTS,BNSH->BNTH", weights, v).transpose(0, 2, 1, 3)
        return lora(dense((n, h, d), "...NH,NHD->...D", ("img_o",), name="out"))(out)


class EncoderBlock(layers.Module):
    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
        cfg = self.config.img
        norm = lambda name: LayerNorm(cfg.norm_eps, self.config.param_dtype, name=name)  # noqa: E731
        attention = SelfAttention(self.config, self.deterministic, name="MultiHeadDotProductAttention_0")
        x = x + attention(norm("LayerNorm_0")(x))
        x = x + MlpBlock(self.config, self.deterministic, name="MlpBlock_0")(norm("LayerNorm_1")(x))
        return x, None


class MlpBlock(layers.Module):
    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, f = self.config.img.width, self.config.img.mlp_dim
        einsum, lora = projections(self.config, self.deterministic)
        dense = functools.partial(einsum, weight_name="kernel", bias=True)
        h = lora(dense((d, f), "...D,DF->...F", ("img_fc1",), name="Dense_0"))(x)
        return lora(dense((f, d), "...F,FD->...D", ("img_fc2",), name="Dense_1"))(nn.gelu(h, approximate=True))


class Encoder(layers.Module):
    config: ModelConfig
    deterministic: bool = True

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
            )(self.config, self.deterministic, name="encoderblock")
            x, _ = blocks(x, None)
        else:
            for i in range(self.config.img.depth):
                x, _ = block(self.config, self.deterministic, name=f"encoderblock_{i}")(x, None)
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


class PatchEmbedding(layers.Module):
    """The stride-p p x p VALID convolution (`kernel` HWIO, `bias`): the contraction `...YXC,YXCD->...D` (its
    layout), computed as one matmul over the patches flattened to Y*X*C values (faster on CPU than the
    convolution; an einsum over the three axes would sum them in another order)."""

    config: ModelConfig

    EQUATION = "...YXC,YXCD->...D"  # Y, X: the rows and columns of a patch; C: its channels

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config.img
        p, grid = cfg.patch_size, cfg.image_size // cfg.patch_size
        param_dtype, dtype = jnp.dtype(self.config.param_dtype), jnp.dtype(self.config.compute_dtype)
        layout = WeightLayout.of(self.EQUATION)
        kernel = self.param("kernel", with_layout(layout.initializer(), layout), (p, p, 3, cfg.width), param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (cfg.width,), param_dtype)
        batch = images.shape[0]
        patches = images.reshape(batch, grid, p, grid, p, 3).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, grid * grid, p * p * 3).astype(dtype)
        kernel = kernel.reshape(p * p * 3, cfg.width).astype(dtype)
        return kernels.weight_einsum("...K,KD->...D", patches, kernel) + bias.astype(dtype)


class Siglip(layers.Module):
    """images [B,H,W,3] in [-1,1] -> image embeddings [B, num_patches, llm width] (float32)."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg, param_dtype = self.config.img, self.config.param_dtype
        einsum, _ = projections(self.config, self.deterministic)
        x = PatchEmbedding(self.config, name="embedding")(images).astype(jnp.float32)
        init = sincos2d_init if cfg.posemb_init == "sincos2d" else nn.initializers.normal(stddev=cfg.width**-0.5)
        pos = self.param("pos_embedding", init, (1, cfg.num_patches, cfg.width), jnp.dtype(param_dtype))
        x = x + pos.astype(jnp.float32)
        x = Encoder(self.config, self.deterministic, name="Transformer")(x)
        head = einsum((cfg.width, self.config.llm.width), "...D,DE->...E", weight_name="kernel", bias=True, name="head")
        return head(x).astype(jnp.float32)
