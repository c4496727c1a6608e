"""The Gemma decoder of both PaliGemma generations, as big_vision's `models/ppp/gemma.py`.

One layer (`Block`, scanned over depth; [Gemma 2 only], each chosen by `GemmaConfig`):

    h = pre_attention_norm(x)                      RMSNorm: h / rms(h) * (1 + scale), in float32
    q, k, v = h @ q_einsum, h @ kv_einsum          (one qkv_einsum when num_kv_heads == num_heads)
    q, k = rope(q) * query_scale, rope(k)          split-half RoPE; head_dim**-0.5 or (width/heads)**-0.5
    logits = [soft_cap(q . k, c)]                  c * tanh(x / c), in float32, before masking
    h = softmax(masked logits) @ v @ attn_vec_einsum
    x = x + [post_attention_norm](h)
    h = pre_ffw_norm(x)
    gate, up = h @ gating_einsum                   GeGLU: the two parts of one fused [2,D,F] weight
    x = x + [post_ffw_norm]((gelu_tanh(gate) * up) @ linear)

then `final_norm`, and logits = [soft_cap](x @ embedder.input_embedding.T) (tied; tokens are embedded by
the same table times sqrt(width)). Each `@ weight` is an `Einsum` with its equation where it is used,
wrapped in `LoRA`, which adds scale * (x@A)@B for the parts `ModelConfig.lora` targets. No biases. Gemma 2
may also slide a window over the even layers (Hugging Face's `layer_types`; big_vision attends globally).

Param tree (under `llm/`): `embedder/input_embedding` [V,D], `layers/...` stacked over depth
(`{pre_attention,pre_ffw,post_attention,post_ffw}_norm/scale`, `attn/{q_einsum,kv_einsum|qkv_einsum,
attn_vec_einsum}/w`, `mlp/{gating_einsum,linear}`), `final_norm/scale`.

Attention takes an explicit boolean mask and an optional, read-only KV cache (k, v: [B,K,S,H]); it returns
the new tokens' keys and values, which the caller writes into the cache in one update for all layers. One
code path serves training and prefill (no cache) and decoding (one token over the cache): the layers
never copy the cache, and the weights are used in their stored layout.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from paliseg.config import ModelConfig
from paliseg.model import kernels, layers
from paliseg.model.layouts import WeightLayout, with_layout
from paliseg.model.lora import projections

# big_vision's mask value: finite, so fully masked rows (padding queries) give no NaN.
_MASKED = -2.3819763e38

KVCache = tuple[jax.Array, jax.Array]


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
    """Gemma 2's `cap * tanh(x / cap)`; `cap == 0` means none."""
    return cap * jnp.tanh(x / cap) if cap else x


class RMSNorm(layers.Module):
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


class Attention(layers.Module):
    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: KVCache | None
    ) -> tuple[jax.Array, KVCache]:
        """x [B,T,D] attends to the cached keys (if any, [B,K,S,H]) and to its own. `mask` is [B,T,S+T] over
        [cache slots | new tokens] ([B,T,T] without a cache). Returns the output and the new (k, v)
        as [B,K,T,H]."""
        cfg = self.config.llm
        d, n, k_heads, h = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        einsum, lora = projections(self.config, self.deterministic)
        if n == k_heads:  # big_vision fuses all three projections when there is one kv head per q head
            q, k, v = lora(einsum((3, n, d, h), "...D,PNDH->P...NH", ("q", "k", "v"), name="qkv_einsum"))(x)
        else:
            q = lora(einsum((n, d, h), "...D,NDH->...NH", ("q",), name="q_einsum"))(x)
            k, v = lora(einsum((2, k_heads, d, h), "...D,PKDH->P...KH", ("k", "v"), name="kv_einsum"))(x)
        q = apply_rope(q, positions, cfg.rope_max_wavelength) * cfg.query_scale
        k = apply_rope(k, positions, cfg.rope_max_wavelength)
        # head-major operands ([B,K,...,H]): plain batched matmuls for XLA, and the cache layout
        batch, length = q.shape[:2]
        q = q.reshape(batch, length, k_heads, n // k_heads, h).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,H]
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,K,T,H]
        keys, values = (k, v) if cache is None else (
            jnp.concatenate([cache[0].astype(k.dtype), k], axis=2),
            jnp.concatenate([cache[1].astype(v.dtype), v], axis=2),
        )  # fmt: skip
        logits = jnp.einsum("BKGTH,BKSH->BKGTS", q, keys, preferred_element_type=jnp.float32)
        logits = soft_cap(logits, cfg.attn_logits_softcap)
        logits = jnp.where(mask[:, None, None, :, :], logits, _MASKED)
        weights = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
        encoded = jnp.einsum("BKGTS,BKSH->BKGTH", weights, values)
        encoded = encoded.transpose(0, 3, 1, 2, 4).reshape(batch, length, n, h)
        out = lora(einsum((n, h, d), "...NH,NHD->...D", ("o",), name="attn_vec_einsum"))(encoded)
        return out, (k, v)


class FeedForward(layers.Module):
    """GeGLU: (gelu(x@W_gate) * x@W_up) @ W_down, with gate/up fused in `gating_einsum` [2,D,F]."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, f = self.config.llm.width, self.config.llm.mlp_dim
        einsum, lora = projections(self.config, self.deterministic)
        gating = einsum((2, d, f), "...D,PDF->P...F", ("gate", "up"), weight_name="gating_einsum")
        linear = einsum((f, d), "...F,FD->...D", ("down",), weight_name="linear")
        for weight in (gating, linear):  # big_vision keeps both weights directly under `mlp`
            nn.share_scope(self, weight)
        gate, up = lora(gating)(x)
        return lora(linear)(nn.gelu(gate, approximate=True) * up)


class Block(layers.Module):
    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cache: KVCache | None,
        sliding: jax.Array | None,
        positions: jax.Array,
        mask: jax.Array,
        local_mask: jax.Array | None,
    ) -> tuple[jax.Array, KVCache]:
        """`sliding` (this layer's flag, a traced bool; None without a window) picks `local_mask` over `mask`."""
        norm = lambda name: RMSNorm(self.config.llm.norm_eps, self.config.param_dtype, name=name)  # noqa: E731
        post_norm = norm if self.config.llm.post_norms else lambda name: lambda h: h
        drop = nn.Dropout(self.config.dropout, deterministic=self.deterministic)
        if sliding is not None:
            mask = jnp.where(sliding, local_mask, mask)
        h, new_kv = Attention(self.config, self.deterministic, name="attn")(
            norm("pre_attention_norm")(x), positions, mask, cache
        )
        x = x + drop(post_norm("post_attention_norm")(h)).astype(jnp.float32)
        h = FeedForward(self.config, self.deterministic, name="mlp")(norm("pre_ffw_norm")(x))
        return x + drop(post_norm("post_ffw_norm")(h)).astype(jnp.float32), new_kv


class Gemma(layers.Module):
    """Methods: `embed_tokens`, `__call__` (the layers over embeddings), `compute_logits`."""

    config: ModelConfig
    deterministic: bool = True

    def setup(self):
        cfg = self.config.llm
        self.embedder = Embedder(cfg.vocab_size, cfg.width, self.config.param_dtype, self.config.compute_dtype)
        block = Block
        if self.config.remat:
            block = nn.remat(block, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
        if self.config.scan_layers:
            self.layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.depth,
            )(self.config, self.deterministic)
        else:  # named layers_0, layers_1, ...
            self.layers = [block(self.config, self.deterministic) for _ in range(cfg.depth)]
        self.final_norm = RMSNorm(cfg.norm_eps, self.config.param_dtype)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return self.embedder.encode(tokens)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        cache: KVCache | None = None,
        local_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Embeddings [B,T,D] -> final-normed hidden states [B,T,D] (f32), and each layer's keys and values
        of these tokens (k, v: [L,B,K,T,H]). With a cache (k, v: [L,B,K,S,H], read only) the tokens also
        attend to its slots; `mask` is then [B,T,S+T]. With a sliding window, the even layers use
        `local_mask` (same shape) instead (see `paligemma.sliding_window_mask`)."""
        cfg = self.config.llm
        sliding = None
        if cfg.sliding_window is not None:
            if local_mask is None:
                raise ValueError(f"sliding_window {cfg.sliding_window} needs a local_mask")
            sliding = jnp.arange(cfg.depth) % 2 == 0  # Hugging Face's layer_types: even layers slide
        if self.config.scan_layers:
            x, new_kv = self.layers(x, cache, sliding, positions, mask, local_mask)
            return self.final_norm(x), new_kv
        new_kvs = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache[0][i], cache[1][i])
            x, kv = layer(x, layer_cache, None if sliding is None else sliding[i], positions, mask, local_mask)
            new_kvs.append(kv)
        return self.final_norm(x), tuple(jnp.stack(parts) for parts in zip(*new_kvs))

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits, soft-capped by `final_logits_softcap` when it is nonzero (as Hugging Face, also in
        the training loss; big_vision fine-tunes PaliGemma 2 with it 0)."""
        return soft_cap(self.embedder.decode(hidden), self.config.llm.final_logits_softcap)


class Embedder(nn.Module):
    """The token table (`input_embedding` [V,D]), also the tied output projection.

    Unlike the model's other modules (`layers.Module`) it reads its param itself (`layers.read`): `encode`
    gathers the tokens' rows from the table as stored and reads only those, as the decoder's storage view
    is meant to be sliced (`inference.storage_view`), rather than a read of the whole table."""

    vocab_size: int
    width: int
    param_dtype: str
    compute_dtype: str

    DECODE = "...D,VD->...V"  # the tied output projection

    def setup(self):
        layout = WeightLayout.of(self.DECODE)
        self.input_embedding = self.param(
            "input_embedding",
            with_layout(layout.initializer("normal"), layout),
            (self.vocab_size, self.width),
            jnp.dtype(self.param_dtype),
        )

    def encode(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings scaled by sqrt(width) (the scale rounded to the table's dtype, as Gemma does)."""
        rows = layers.read(self.input_embedding[tokens])
        return (rows * jnp.asarray(self.width**0.5, rows.dtype)).astype(jnp.float32)

    def decode(self, hidden: jax.Array) -> jax.Array:
        """Tied output projection in compute dtype, accumulated into float32 logits (no f32 copy of the
        table, which would be 2 GB for the real vocabulary)."""
        dtype = jnp.dtype(self.compute_dtype)
        table = layers.read(self.input_embedding).astype(dtype)
        return kernels.weight_einsum(self.DECODE, hidden.astype(dtype), table, result_dtype=jnp.float32)
