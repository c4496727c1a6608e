"""Gemma-1 decoder as big_vision's `ppp/gemma.py` (the PaliGemma 1 LLM).

Param tree (under `llm/`): `embedder/input_embedding` [V,D] (tied output projection), `layers/...` scanned
over depth (`pre_attention_norm/scale`, `attn/{q_einsum,kv_einsum|qkv_einsum,attn_vec_einsum}/w`,
`pre_ffw_norm/scale`, `mlp/{gating_einsum,linear}`), `final_norm/scale`. RMSNorm with (1+scale), split-half
RoPE, q scaled by head_dim**-0.5 after RoPE, GeGLU with tanh-GELU, no soft-capping, no biases.

Attention takes an explicit boolean mask [B,T,S] and an optional KV cache (k, v: [B,S,K,H]) written at
`cache_index`: with a cache the keys are the cache slots, so one code path serves training (no cache),
prefill (empty cache, index 0) and decoding (one token at index N+t).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from paliseg.config import ModelConfig
from paliseg.model.projection import Numerics, Projection, project

# big_vision's mask value: finite, so fully masked rows (padding queries) give no NaN.
_MASKED = -2.3819763e38

KVCache = tuple[jax.Array, jax.Array]


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + scale), in float32."""

    eps: float
    param_dtype: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],), jnp.dtype(self.param_dtype))
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return x * (1.0 + scale.astype(jnp.float32))


def apply_rope(x: jax.Array, positions: jax.Array, max_wavelength: float) -> jax.Array:
    """Rotary embedding, split-halves convention. x [B,T,N,H], positions [B,T]."""
    head_dim = x.shape[-1]
    exponents = 2.0 * jnp.arange(head_dim // 2, dtype=jnp.float32) / head_dim
    radians = positions[..., None, None].astype(jnp.float32) / (max_wavelength**exponents)
    sin, cos = jnp.sin(radians), jnp.cos(radians)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
    config: ModelConfig
    numerics: Numerics

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        cache: KVCache | None,
        cache_index: jax.Array | None,
    ) -> tuple[jax.Array, KVCache | None]:
        cfg = self.config.llm
        n, k_heads, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        sizes = (("D", cfg.width), ("N", n), ("K", k_heads), ("H", h))
        if n == k_heads:  # big_vision fuses all three projections when there is one kv head per q head
            q, k, v = Projection("attn/qkv_einsum/w", sizes, self.numerics, name="qkv_einsum")(x)
        else:
            q = Projection("attn/q_einsum/w", sizes, self.numerics, name="q_einsum")(x)
            k, v = Projection("attn/kv_einsum/w", sizes, self.numerics, name="kv_einsum")(x)
        q = apply_rope(q, positions, cfg.rope_max_wavelength) * h**-0.5
        k = apply_rope(k, positions, cfg.rope_max_wavelength)

        if cache is not None:
            cache_k, cache_v = cache
            start = (0, cache_index, 0, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
            cache = (cache_k, cache_v)
            k, v = cache_k.astype(q.dtype), cache_v.astype(q.dtype)

        batch, length = q.shape[:2]
        q = q.reshape(batch, length, k_heads, n // k_heads, h)
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
        logits = jnp.where(mask[:, None, None, :, :], logits, _MASKED)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        encoded = jnp.einsum("BKGTS,BSKH->BTKGH", weights, v).reshape(batch, length, n, h)
        out = Projection("attn/attn_vec_einsum/w", sizes, self.numerics, name="attn_vec_einsum")(encoded)
        return out, cache


class FeedForward(nn.Module):
    """GeGLU: (gelu(x@W_gate) * x@W_up) @ W_down, with gate/up fused in `gating_einsum` [2,D,F]."""

    config: ModelConfig
    numerics: Numerics

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        sizes = {"D": self.config.llm.width, "F": self.config.llm.mlp_dim}
        gate, up = project(self, "gating_einsum", "mlp/gating_einsum", x, sizes, self.numerics)
        return project(self, "linear", "mlp/linear", nn.gelu(gate, approximate=True) * up, sizes, self.numerics)


class Block(nn.Module):
    config: ModelConfig
    numerics: Numerics

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cache: KVCache | None,
        positions: jax.Array,
        mask: jax.Array,
        cache_index: jax.Array | None,
    ) -> tuple[jax.Array, KVCache | None]:
        norm = lambda name: RMSNorm(self.config.llm.norm_eps, self.config.param_dtype, name=name)  # noqa: E731
        drop = nn.Dropout(self.config.dropout, deterministic=self.numerics.deterministic)
        h, cache = Attention(self.config, self.numerics, name="attn")(
            norm("pre_attention_norm")(x), positions, mask, cache, cache_index
        )
        x = x + drop(h).astype(jnp.float32)
        h = FeedForward(self.config, self.numerics, name="mlp")(norm("pre_ffw_norm")(x))
        return x + drop(h).astype(jnp.float32), cache


class Gemma(nn.Module):
    """Methods: `embed_tokens`, `__call__` (the layers over embeddings), `compute_logits`."""

    config: ModelConfig
    numerics: Numerics

    def setup(self):
        cfg = self.config.llm
        self.embedder = Embedder(cfg.vocab_size, cfg.width, self.config.param_dtype, self.config.compute_dtype)
        block = Block
        if self.config.remat:
            block = nn.remat(block, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.depth,
        )(self.config, self.numerics)
        self.final_norm = RMSNorm(cfg.norm_eps, self.config.param_dtype)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return self.embedder.encode(tokens)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        cache: KVCache | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Embeddings [B,T,D] -> final-normed hidden states [B,T,D] (f32), and the updated per-layer cache
        (k, v: [L,B,S,K,H]) when one is given."""
        x, cache = self.layers(x, cache, positions, mask, cache_index)
        return self.final_norm(x), cache

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        return self.embedder.decode(hidden)


class Embedder(nn.Module):
    vocab_size: int
    width: int
    param_dtype: str
    compute_dtype: str

    def setup(self):
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0)
        self.input_embedding = self.param(
            "input_embedding", init, (self.vocab_size, self.width), jnp.dtype(self.param_dtype)
        )

    def encode(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings scaled by sqrt(width) (the scale rounded to the table's dtype, as Gemma does)."""
        table = self.input_embedding
        return (table[tokens] * jnp.asarray(self.width**0.5, table.dtype)).astype(jnp.float32)

    def decode(self, hidden: jax.Array) -> jax.Array:
        """Tied output projection in compute dtype, accumulated into float32 logits (no f32 copy of the
        table, which would be 2 GB for the real vocabulary)."""
        dtype = jnp.dtype(self.compute_dtype)
        return jnp.einsum(
            "...D,VD->...V",
            hidden.astype(dtype),
            self.input_embedding.astype(dtype),
            preferred_element_type=jnp.float32,
        )
