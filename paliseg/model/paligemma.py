"""PaliGemma: SigLIP image tokens (unscaled) followed by Gemma text embeddings, one prefix-LM decoder.

The sequence is [image patches | text]; positions are `cumsum(mask_input) - 1` over all of it (0-based,
as big_vision), and query i may attend key j iff `cumsum(mask_ar)[j] <= cumsum(mask_ar)[i]` and both are
real tokens (`mask_input`). Image tokens have mask_ar 0 and mask_input 1.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from paliseg.config import ModelConfig
from paliseg.model.gemma import Gemma, KVCache
from paliseg.model.projection import Numerics
from paliseg.model.siglip import Siglip


def make_attn_mask(mask_input: jax.Array, mask_ar: jax.Array) -> jax.Array:
    """big_vision's prefix-LM mask: [B,T] masks -> bool [B,T(query),T(key)]."""
    cumsum = jnp.cumsum(mask_ar, axis=1)
    causal = cumsum[:, None, :] <= cumsum[:, :, None]
    valid = mask_input[:, None, :].astype(bool) & mask_input[:, :, None].astype(bool)
    return causal & valid


class PaliGemma(nn.Module):
    """Methods: `__call__` (training forward, text logits), `embed_image`, `prefill`, `extend`.

    `deterministic=False` turns dropout (and LoRA dropout) on; it then needs a `dropout` rng.
    """

    config: ModelConfig
    deterministic: bool = True

    def setup(self):
        numerics = Numerics(
            lora=self.config.lora,
            param_dtype=self.config.param_dtype,
            compute_dtype=self.config.compute_dtype,
            deterministic=self.deterministic,
        )
        self.img = Siglip(self.config, numerics)
        self.llm = Gemma(self.config, numerics)

    def embed_image(self, images: jax.Array) -> jax.Array:
        """images [B,H,W,3] in [-1,1] -> [B, num_image_tokens, llm width] float32."""
        return self.img(images)

    def _embed(self, images, tokens, mask_ar, mask_input):
        zimg = self.embed_image(images)
        batch, n_img = zimg.shape[:2]
        x = jnp.concatenate([zimg, self.llm.embed_tokens(tokens)], axis=1)
        ones = jnp.ones((batch, n_img), jnp.int32)
        mask_input = jnp.concatenate([ones, mask_input.astype(jnp.int32)], axis=1)
        mask_ar = jnp.concatenate([0 * ones, mask_ar.astype(jnp.int32)], axis=1)
        return x, mask_ar, mask_input

    def __call__(self, images, tokens, mask_ar, mask_input) -> jax.Array:
        """Text logits [B,T,V] (float32) for images [B,H,W,3] and tokens/mask_ar/mask_input [B,T]."""
        x, mask_ar, mask_input = self._embed(images, tokens, mask_ar, mask_input)
        positions = jnp.cumsum(mask_input, axis=1) - 1
        hidden, _ = self.llm(x, positions, make_attn_mask(mask_input, mask_ar))
        return self.llm.compute_logits(hidden[:, -tokens.shape[1] :])

    def prefill(self, images, tokens, mask_ar, mask_input, cache_size: int):
        """Run the prompt and fill a KV cache of `cache_size` slots (slot i = sequence index i).

        Returns (logits [B,V] of each example's last real token, cache, key_valid [B,S], seq_len [B]): the
        next token of example b is written at slot `N + t` (N = image + text length, shared by the batch)
        with position `seq_len[b] + t`, so right-padded prompts of different lengths decode together.
        """
        x, mask_ar, mask_input = self._embed(images, tokens, mask_ar, mask_input)
        length = mask_input.shape[1]
        if cache_size < length:
            raise ValueError(f"cache_size {cache_size} < prompt length {length}")
        positions = jnp.cumsum(mask_input, axis=1) - 1
        hidden, (k, v) = self.llm(x, positions, make_attn_mask(mask_input, mask_ar))
        dtype = jnp.dtype(self.config.cache_dtype)
        pad = ((0, 0), (0, 0), (0, 0), (0, cache_size - length), (0, 0))  # k, v: [L,B,K,S,H]
        cache = (jnp.pad(k.astype(dtype), pad), jnp.pad(v.astype(dtype), pad))
        seq_len = mask_input.sum(axis=1)
        last = jnp.take_along_axis(hidden, (seq_len - 1)[:, None, None], axis=1)[:, 0]
        key_valid = jnp.pad(mask_input.astype(bool), ((0, 0), (0, cache_size - length)))
        return self.llm.compute_logits(last), cache, key_valid, seq_len

    def extend(self, tokens, positions, key_valid, cache: KVCache, cache_index):
        """One decoding step: tokens/positions [B,1] attend to the cache slots marked in key_valid [B,S]
        and to themselves, and are written at slot `cache_index`. Returns (logits [B,V], cache)."""
        x = self.llm.embed_tokens(tokens)
        mask = jnp.concatenate([key_valid, jnp.ones_like(key_valid[:, :1])], axis=1)[:, None, :]
        hidden, (k, v) = self.llm(x, positions, mask, cache)
        start = (0, 0, 0, cache_index, 0)
        cache = tuple(jax.lax.dynamic_update_slice(c, new.astype(c.dtype), start) for c, new in zip(cache, (k, v)))
        return self.llm.compute_logits(hidden[:, 0]), cache
