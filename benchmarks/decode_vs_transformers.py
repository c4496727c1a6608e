"""Decoding throughput: our jitted KV-cache decoder vs transformers `generate`, same weights, same run.

    .venv/bin/python benchmarks/decode_vs_transformers.py [--batch 8] [--new-tokens 24] [--repeats 5]

One random mid-size PaliGemma (the `mid` preset: SigLIP width 384 x 4 layers at 224 px = 256 image
tokens, Gemma width 512 x 4 layers, 8 heads / 1 kv head of 64, vocab 1792), built in transformers, saved
with `save_pretrained` and loaded through our loader, so both sides run identical float32 weights on
CPU. Each side decodes a batch of `--batch` images with a 10-token prompt and exactly `--new-tokens`
greedy tokens (no EOS stop), after a warm-up call (compilation is excluded); the best of `--repeats`.

Prints images/s for each side, each side's achieved FLOP/s (useful model FLOPs: vision tower, prefill,
one decode step per new token over its growing context) as a fraction of this machine's matmul peak
(a 2048^3 float32 matmul timed in the same run), and last the ratio ours / transformers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
from _peak import matmul_peak, timed  # noqa: E402

from paliseg import allocator, checkpoints, decoding  # noqa: E402
from paliseg.config import ModelConfig, preset  # noqa: E402

PROMPT_LEN = 10
NEVER = -1  # an eos id no token can equal: both sides generate every requested token


def hf_model(config: ModelConfig):
    import torch
    import transformers

    img, llm = config.img, config.llm
    hf_config = transformers.PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=img.width,
            intermediate_size=img.mlp_dim,
            num_hidden_layers=img.depth,
            num_attention_heads=img.num_heads,
            image_size=img.image_size,
            patch_size=img.patch_size,
            vision_use_head=False,
        ),
        text_config=dict(
            model_type="gemma",
            hidden_size=llm.width,
            intermediate_size=llm.mlp_dim,
            num_hidden_layers=llm.depth,
            num_attention_heads=llm.num_heads,
            num_key_value_heads=llm.num_kv_heads,
            head_dim=llm.head_dim,
            vocab_size=llm.vocab_size,
        ),
        image_token_index=llm.vocab_size,  # outside the vocabulary, as our exports write it
        projection_dim=llm.width,
    )
    torch.manual_seed(0)
    return transformers.PaliGemmaForConditionalGeneration(hf_config).eval()


def decode_flops(config: ModelConfig, batch: int, new_tokens: int) -> float:
    """Useful FLOPs (2 per multiply-add) to decode `new_tokens` for `batch` images."""
    img, llm = config.img, config.llm
    n = img.num_patches
    vision = 2 * n * img.patch_size**2 * 3 * img.width  # patch embedding
    vision += img.depth * (2 * n * 4 * img.width**2 + 2 * 2 * n * n * img.width + 2 * n * 2 * img.width * img.mlp_dim)
    vision += 2 * n * img.width * llm.width  # head
    d, heads, kv, h, f = llm.width, llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.mlp_dim
    per_token = 2 * (d * heads * h + 2 * d * kv * h + heads * h * d + 3 * d * f)  # projections + MLP, per layer

    def layers(tokens: int, context: int) -> int:  # `tokens` queries over `context` keys, every layer
        return llm.depth * (tokens * per_token + 2 * 2 * tokens * context * heads * h)

    prompt = n + PROMPT_LEN
    prefill = layers(prompt, prompt) + 2 * d * llm.vocab_size
    decode = sum(layers(1, prompt + t + 1) + 2 * d * llm.vocab_size for t in range(new_tokens - 1))
    return float(batch * (vision + prefill + decode))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    allocator.ensure()  # PALISEG_TUNE_MALLOC=1, as for the `paliseg` command (paliseg/allocator.py)

    import torch

    config = preset("mid")
    hf = hf_model(config)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours_config, params = checkpoints.load(
            folder, param_dtype="float32", compute_dtype="float32", cache_dtype="float32"
        )

    rng = np.random.default_rng(0)
    size = config.img.image_size
    images = rng.uniform(-1, 1, (args.batch, size, size, 3)).astype(np.float32)
    prompt = np.concatenate([np.full((args.batch, 1), 2), rng.integers(3, 1000, (args.batch, PROMPT_LEN - 1))], 1)
    zeros, ones = np.zeros_like(prompt), np.ones_like(prompt)

    def ours():
        out = decoding.generate(
            ours_config, params, images, prompt, zeros, ones, max_new_tokens=args.new_tokens, eos_id=NEVER
        )
        return jax.block_until_ready(out)

    n_img = config.num_image_tokens
    ids = torch.tensor(np.concatenate([np.full((args.batch, n_img), config.llm.vocab_size), prompt], 1))
    pixels = torch.tensor(images.transpose(0, 3, 1, 2))

    def theirs():
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids,
                pixel_values=pixels,
                token_type_ids=torch.zeros_like(ids),
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        assert out.shape[1] - ids.shape[1] == args.new_tokens
        return out

    ours()  # compile
    theirs()  # warm up
    best_ours = min(timed(ours) for _ in range(args.repeats))
    best_theirs = min(timed(theirs) for _ in range(args.repeats))
    peak_jax, peak_torch = matmul_peak()
    peak = max(peak_jax, peak_torch)
    flops = decode_flops(config, args.batch, args.new_tokens)

    print(
        f"config: mid preset (vision {config.img.width}x{config.img.depth} @ {size}px, "
        f"gemma {config.llm.width}x{config.llm.depth}, vocab {config.llm.vocab_size}), batch {args.batch}, "
        f"{args.new_tokens} new tokens, float32, {os.cpu_count()} CPU threads visible, torch threads {torch.get_num_threads()}"
    )
    print(f"useful work: {flops / args.batch / 1e9:.2f} GFLOP per image")
    print(f"matmul peak (2048^3 float32): jax {peak_jax / 1e9:.1f} GFLOP/s, torch {peak_torch / 1e9:.1f} GFLOP/s")
    for name, seconds in (("transformers generate", best_theirs), ("paliseg decoding", best_ours)):
        print(
            f"{name:>22}: {args.batch / seconds:7.2f} images/s  ({seconds:.3f} s per batch)  "
            f"{flops / seconds / 1e9:6.1f} GFLOP/s = {flops / seconds / peak:.1%} of the matmul peak"
        )
    print(f"ratio (paliseg / transformers, images/s): {best_theirs / best_ours:.2f}x")


if __name__ == "__main__":
    main()
