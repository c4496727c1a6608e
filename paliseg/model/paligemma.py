"""PaliGemma: SigLIP image tokens (unscaled) followed by Gemma text embeddings, one prefix-LM decoder.

The sequence is [image patches | text]; positions are `cumsum(mask_input) - 1` over all of it (0-based,
as big_vision), and query i may attend key j iff `cumsum(mask_ar)[j] <= cumsum(mask_ar)[i]` and both are
real tokens (`mask_input`). Image tokens have mask_ar 0 and mask_input 1. With a sliding window (Gemma 2
as Hugging Face runs it) the even layers also drop keys `window` or more positions behind the query, except
that the prefix stays fully bidirectional (`sliding_window_mask`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from paliseg.config import ModelConfig
from paliseg.model import layers
from paliseg.model.gemma import Gemma, KVCache
from paliseg.model.siglip import Siglip


def make_attn_mask(mask_input: jax.Array, mask_ar: jax.Array) -> jax.Array:
    """big_vision's prefix-LM mask: [B,T] masks -> bool [B,T(query),T(key)]."""
    cumsum = jnp.cumsum(mask_ar, axis=1)
    causal = cumsum[:, None, :] <= cumsum[:, :, None]
    valid = mask_input[:, None, :].astype(bool) & mask_input[:, :, None].astype(bool)
    return causal & valid


def sliding_window_mask(
    mask: jax.Array, query_positions: jax.Array, key_positions: jax.Array, exempt: jax.Array, window: int
) -> jax.Array:
    """`mask` [B,T,S] restricted to keys less than `window` positions behind their query, except where
    `exempt` [B,T,S] (prefix query and prefix key). This is transformers' `create_sliding_window_causal_mask`
    with PaliGemma's block overlay: `or_masks(sliding_window_overlay & causal, blockwise_overlay(prefix))`,
    there over sequence indices, here over positions, which equal them on every real token (prompts are
    right-padded; decoded tokens continue each example's positions)."""
    near = key_positions[:, None, :] > query_positions[:, :, None] - window
    return mask & (near | exempt)


class PaliGemma(layers.Module):
    """Methods: `__call__` (training forward, text logits), `embed_image`, `prefill`, `extend`,
    `continuation_logits` (teacher-forced logits of several continuations of each prompt).

    `deterministic=False` turns dropout (and LoRA dropout) on; it then needs a `dropout` rng.
    """

    config: ModelConfig
    deterministic: bool = True

    def setup(self):
        self.img = Siglip(self.config, self.deterministic)
        self.llm = Gemma(self.config, self.deterministic)

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

    def _run_sequence(self, x, mask_ar, mask_input):
        """The decoder over a whole [image | text] sequence: hidden [B,T,D] and (k, v) [L,B,K,T,H]."""
        positions = jnp.cumsum(mask_input, axis=1) - 1
        mask = make_attn_mask(mask_input, mask_ar)
        local_mask = None
        if self.config.llm.sliding_window is not None:
            prefix = mask_ar == 0
            exempt = prefix[:, :, None] & prefix[:, None, :]
            local_mask = sliding_window_mask(mask, positions, positions, exempt, self.config.llm.sliding_window)
        return self.llm(x, positions, mask, local_mask=local_mask)

    def __call__(self, images, tokens, mask_ar, mask_input) -> jax.Array:
        """Text logits [B,T,V] (float32) for images [B,H,W,3] and tokens/mask_ar/mask_input [B,T]."""
        x, mask_ar, mask_input = self._embed(images, tokens, mask_ar, mask_input)
        hidden, _ = self._run_sequence(x, mask_ar, mask_input)
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
        hidden, (k, v) = self._run_sequence(x, mask_ar, mask_input)
        dtype = jnp.dtype(self.config.cache_dtype)
        pad = ((0, 0), (0, 0), (0, 0), (0, cache_size - length), (0, 0))  # k, v: [L,B,K,S,H]
        cache = (jnp.pad(k.astype(dtype), pad), jnp.pad(v.astype(dtype), pad))
        seq_len = mask_input.sum(axis=1)
        last = jnp.take_along_axis(hidden, (seq_len - 1)[:, None, None], axis=1)[:, 0]
        key_valid = jnp.pad(mask_input.astype(bool), ((0, 0), (0, cache_size - length)))
        return self.llm.compute_logits(last), cache, key_valid, seq_len

    def continuation_logits(self, images, tokens, mask_ar, mask_input, continuations):
        """Teacher-forced logits [B*G,T,V] of continuations [B*G,T] of the B prompts, G each (rows b*G to
        b*G+G-1 continue prompt b, as `decoding.generate(..., samples_per_prompt=G)` samples them); row t
        predicts continuation token t. The image and the prompt run once per prompt and their keys and values
        are shared by its G continuations, which attend to them as decoding does (the prompt's real slots,
        then causally among themselves, positions `seq_len + t`): the full forward of each [prompt |
        continuation] without repeating the prefix G times (GRPO's update)."""
        x, prefix_ar, prefix_input = self._embed(images, tokens, mask_ar, mask_input)
        hidden, (k, v) = self._run_sequence(x, prefix_ar, prefix_input)
        seq_len = prefix_input.sum(axis=1)
        last = jnp.take_along_axis(hidden, (seq_len - 1)[:, None, None], axis=1)  # [B,1,D]: predicts token 0
        group = continuations.shape[0] // tokens.shape[0]
        last, seq_len, key_valid = (jnp.repeat(a, group, axis=0) for a in (last, seq_len, prefix_input.astype(bool)))
        cache = (jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1))  # [L,B*G,K,S,H]
        inputs = continuations[:, :-1]  # the last token predicts nothing
        rows, length = inputs.shape
        positions = seq_len[:, None] + jnp.arange(length)[None, :]
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (rows, length, length))
        mask = jnp.concatenate([jnp.broadcast_to(key_valid[:, None, :], (rows, length, key_valid.shape[1])), causal], 2)
        local_mask = None
        if self.config.llm.sliding_window is not None:
            prefix_positions = cache_positions(0, prefix_input, prefix_input.shape[1])
            keys = jnp.concatenate([jnp.repeat(prefix_positions, group, axis=0), positions], axis=1)
            local_mask = sliding_window_mask(
                mask, positions, keys, jnp.zeros_like(mask), self.config.llm.sliding_window
            )
        out, _ = self.llm(self.llm.embed_tokens(inputs), positions, mask, cache, local_mask=local_mask)
        return self.llm.compute_logits(jnp.concatenate([last, out], axis=1))

    def extend(self, tokens, positions, key_valid, cache: KVCache, cache_index, key_positions=None):
        """One decoding step: tokens/positions [B,1] attend to the cache slots marked in key_valid [B,S]
        and to themselves, and are written at slot `cache_index`. Returns (logits [B,V], cache).
        With a sliding window, `key_positions` [B,S] gives each slot's position (see `cache_positions`)."""
        x = self.llm.embed_tokens(tokens)
        mask = jnp.concatenate([key_valid, jnp.ones_like(key_valid[:, :1])], axis=1)[:, None, :]
        local_mask = None
        window = self.config.llm.sliding_window
        if window is not None:
            if key_positions is None:
                raise ValueError(f"sliding_window {window}: extend needs the cache's key_positions")
            keys = jnp.concatenate([key_positions, positions], axis=1)
            local_mask = sliding_window_mask(mask, positions, keys, jnp.zeros_like(mask), window)
        hidden, (k, v) = self.llm(x, positions, mask, cache, local_mask=local_mask)
        start = (0, 0, 0, cache_index, 0)
        cache = tuple(jax.lax.dynamic_update_slice(c, new.astype(c.dtype), start) for c, new in zip(cache, (k, v)))
        return self.llm.compute_logits(hidden[:, 0]), cache


def cache_positions(num_image_tokens: int, mask_input: jax.Array, cache_size: int) -> jax.Array:
    """[B, cache_size]: the position of each prompt slot after `prefill` (image tokens, then the text's
    `mask_input` [B,T]); decoding sets slot `N + t` to `seq_len + t` as it writes it."""
    ones = jnp.ones((mask_input.shape[0], num_image_tokens), jnp.int32)
    positions = jnp.cumsum(jnp.concatenate([ones, mask_input.astype(jnp.int32)], axis=1), axis=1) - 1
    return jnp.pad(positions, ((0, 0), (0, cache_size - positions.shape[1])))
