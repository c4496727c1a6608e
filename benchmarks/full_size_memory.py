"""One-off: the real 3B shapes (`--preset paligemma-3b-224`, the default, or `paligemma2-3b-224`) on CPU with
random bf16 weights.

    .venv/bin/python benchmarks/full_size_memory.py [--preset P] [--new-tokens 20] [--batch 1]
    .venv/bin/python benchmarks/full_size_memory.py --train [--preset P] [--batch 1] [--seq-len 128]
    .venv/bin/python benchmarks/full_size_memory.py --grpo [--preset P] [--group 4] [--new-tokens 64]

Initialises the model in bfloat16 (PaliGemma 1: 2.92 B parameters, 5.4 GiB; the fast `rbg` PRNG, as threefry takes
minutes for 2.9 B numbers on CPU) and prints each time (first call, which includes compilation, and a
second, compiled call) and the process's peak resident memory.

Inference (default): lays the params out for decoding (`model.for_inference`, in place), runs a
batch-`--batch` forward pass (text logits for 256 image + 16 text tokens) and a `--new-tokens` greedy
decode with the KV cache (goal: peak < 12 GB). On a GPU run it with `--batch 32` and read the decode
images/s.

`--train`: the training step `paliseg train --trainable lora` compiles (train.step, with its compiler
options): LoRA rank 8 on Gemma's q, k, v, o, gate, up, down over the frozen bf16 base, remat, AdamW with
clipping, batch `--batch` of 256 image + `--seq-len` text tokens (goal: peak < 20 GB). On a GPU run it with
`--batch 32` and read examples/s and the MFU line.

`--grpo`: one step of `paliseg train --objective grpo --trainable lora` (train.grpo) for one image and
prompt: `--group` completions of up to `--new-tokens` tokens sampled under the segmentation grammar (a
grammar over PaliGemma's vocabulary layout: loc and seg ids at 256000+, text pieces below; the tokenizer
itself cannot be downloaded here), then the compiled update (reference and policy teacher-forced passes,
the backward, AdamW). The reward (VAE decode of 4 x a few objects, milliseconds) is not included.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
from train_vs_transformers import lora_step_flops  # noqa: E402

from paliseg import allocator, decoding, model  # noqa: E402
from paliseg.config import preset  # noqa: E402
from paliseg.model.lora import count_params  # noqa: E402
from train import optim  # noqa: E402
from train import params as param_sets  # noqa: E402
from train import step as train_step  # noqa: E402
from train.config import TrainConfig  # noqa: E402

# Dense bf16 peak of the accelerators the MFU line knows (FLOP/s): NVIDIA's datasheet figures, no sparsity.
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def timed_twice(name: str, fn) -> float:
    times = []
    for _ in range(2):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    print(
        f"{name}: first call (with compilation) {times[0]:.1f} s, compiled {times[1]:.1f} s; "
        f"peak RSS so far {peak_rss_gb():.2f} GB",
        flush=True,
    )
    return times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paligemma-3b-224", choices=("paligemma-3b-224", "paligemma2-3b-224"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--train", action="store_true", help="measure a LoRA training step instead of inference")
    parser.add_argument("--seq-len", type=int, default=128, help="--train: text tokens per example")
    parser.add_argument("--grpo", action="store_true", help="measure a GRPO step (LoRA) instead of inference")
    parser.add_argument("--group", type=int, default=4, help="--grpo: completions sampled per image")
    args = parser.parse_args()
    allocator.ensure()  # PALISEG_TUNE_MALLOC=1, as for the `paliseg` command (paliseg/allocator.py)
    if args.train:
        train(args.preset, args.batch, args.seq_len)
        return
    if args.grpo:
        grpo_step(args.preset, args.group, args.new_tokens)
        return

    config = preset(args.preset)  # bf16 params and matmuls, f32 norms/softmax/logits, bf16 KV cache
    start = time.perf_counter()
    params = jax.block_until_ready(model.init_params(config, jax.random.key(0, impl="rbg")))
    print(
        f"{args.preset} on {jax.devices()[0].device_kind}: init {count_params(params) / 1e9:.3f} B params "
        f"({sum(x.nbytes for x in jax.tree.leaves(params)) / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f} s; "
        f"peak RSS {peak_rss_gb():.2f} GB",
        flush=True,
    )
    config, params = model.for_inference(config, params, consume=True)

    rng = np.random.default_rng(0)
    size = config.img.image_size
    images = rng.uniform(-1, 1, (args.batch, size, size, 3)).astype(np.float32)
    tokens = rng.integers(3, 256_000, (args.batch, 16)).astype(np.int32)
    mask_ar = np.array([[0] * 8 + [1] * 8] * args.batch, np.int32)
    ones = np.ones_like(tokens)
    timed_twice(
        f"forward (batch {args.batch}, 256 image + 16 text tokens)",
        lambda: model.forward(config, params, images, tokens, mask_ar, ones),
    )
    prompt_mask = np.array([[1] * 8 + [0] * 8] * args.batch, np.int32)
    seconds = timed_twice(
        f"decode (batch {args.batch}, {args.new_tokens} new tokens)",
        lambda: decoding.generate(
            config, params, images, tokens, 0 * mask_ar, prompt_mask, max_new_tokens=args.new_tokens, eos_id=-1
        ),
    )
    print(f"decode: {args.batch / seconds:.3f} images/s, {args.batch * args.new_tokens / seconds:.2f} tokens/s")
    print(f"peak RSS: {peak_rss_gb():.2f} GB (goal < 12 GB)")


def train(preset_name: str, batch: int, seq_len: int) -> None:
    """One compiled LoRA step of the 3B model as `paliseg train` builds it; its peak memory and speed."""
    config = TrainConfig(
        data=["-"], out="-", preset=preset_name, trainable="lora", batch_size=batch, seq_len=seq_len, steps=1000
    )
    model_cfg = param_sets.model_config(config)
    start = time.perf_counter()
    init = jax.jit(lambda key: param_sets.split(model.init_params(model_cfg, key), "lora"))
    frozen, trainable = jax.block_until_ready(init(jax.random.key(0, impl="rbg")))
    tx = optim.optimizer(config)
    state = train_step.init_state(trainable, tx)
    print(
        f"{preset_name} on {jax.devices()[0].device_kind}: frozen {count_params(frozen) / 1e9:.3f} B params "
        f"({sum(x.nbytes for x in jax.tree.leaves(frozen)) / 2**30:.2f} GiB bf16), LoRA {count_params(trainable):,} "
        f"(f32) in {time.perf_counter() - start:.1f} s; peak RSS {peak_rss_gb():.2f} GB",
        flush=True,
    )

    rng = np.random.default_rng(0)
    size = model_cfg.img.image_size
    suffix = (np.arange(seq_len) >= 16).astype(np.int32)[None].repeat(batch, 0)
    tokens = rng.integers(3, model_cfg.llm.vocab_size, (batch, seq_len)).astype(np.int32)
    micro = {
        "image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
        "tokens": tokens,
        "mask_ar": suffix,
        "mask_loss": suffix,
        "mask_input": np.ones_like(tokens),
    }
    step_batch = jax.device_put({key: value[None] for key, value in micro.items()})  # the grad-accum axis
    step_fn = train_step.jit_train_step(config, model_cfg, tx, optim.schedule(config))

    def one_step():
        nonlocal state
        state, metrics = step_fn(state, frozen, step_batch)
        return metrics["loss"]

    seconds = timed_twice(f"LoRA train step (batch {batch}, 256 image + {seq_len} text tokens, remat)", one_step)
    flops = lora_step_flops(model_cfg, batch, seq_len)
    print(f"train: {batch / seconds:.3f} examples/s, {flops / seconds / 1e12:.2f} TFLOP/s of useful work")
    kind = jax.devices()[0].device_kind
    peak = next((value for name, value in BF16_PEAK.items() if name in kind), None)
    if peak is not None:
        print(f"MFU: {flops / seconds / peak:.1%} of the {kind} bf16 peak ({peak / 1e12:.0f} TFLOP/s)")
    print(f"peak RSS: {peak_rss_gb():.2f} GB (goal < 20 GB)")


def paligemma_grammar(vocab_size: int) -> decoding.SegmentGrammar:
    """The segmentation grammar over PaliGemma's vocabulary layout (0 pad, 1 eos, 2 bos, text pieces below
    256000, one "▁;" piece, 1024 loc then 128 seg ids), without its SentencePiece file."""
    from paliseg.tokens import LOC_BINS, SEG_CODES

    token_class = np.full(vocab_size, decoding.TEXT, np.int32)
    token_class[:4] = decoding.FORBIDDEN
    token_class[1] = decoding.EOS
    token_class[4], token_class[5] = decoding.SEMI, decoding.SPACE
    loc = np.arange(256_000, 256_000 + LOC_BINS)
    token_class[loc] = decoding.LOC
    token_class[256_000 + LOC_BINS : 256_000 + LOC_BINS + SEG_CODES] = decoding.SEG
    loc_value = np.full(vocab_size, -1, np.int32)
    loc_value[loc] = np.arange(LOC_BINS)
    return decoding.SegmentGrammar(token_class, loc_value)


def grpo_step(preset_name: str, group: int, new_tokens: int) -> None:
    """One GRPO step with LoRA as `paliseg train --objective grpo` runs it: sampling, then the update."""
    from train import grpo
    from train.config import GrpoConfig

    config = TrainConfig(
        data=["-"], out="-", preset=preset_name, trainable="lora", batch_size=1, steps=1000, objective="grpo",
        grpo=GrpoConfig(group_size=group, max_new_tokens=new_tokens),
    )  # fmt: skip
    model_cfg = param_sets.model_config(config)
    start = time.perf_counter()
    init = jax.jit(lambda key: param_sets.split(model.init_params(model_cfg, key), "lora"))
    frozen, trainable = jax.block_until_ready(init(jax.random.key(0, impl="rbg")))
    tx = optim.optimizer(config)
    state = jax.jit(lambda p: train_step.init_state(p, tx))(trainable)  # a copy: the step donates it
    print(
        f"{preset_name} on {jax.devices()[0].device_kind}: frozen {count_params(frozen) / 1e9:.3f} B params, LoRA "
        f"{count_params(trainable):,} in {time.perf_counter() - start:.1f} s; peak RSS {peak_rss_gb():.2f} GB",
        flush=True,
    )
    grammar = paligemma_grammar(model_cfg.llm.vocab_size)
    rng = np.random.default_rng(0)
    size = model_cfg.img.image_size
    images = np.repeat(rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32), group, axis=0)
    prompt_tokens = [2, *rng.integers(10, 256_000, 8), 108]  # bos, "segment <class>", "\n"
    prompts = {
        "tokens": np.asarray([prompt_tokens + [0] * (16 - len(prompt_tokens))] * group, np.int32),
        "mask_ar": np.zeros((group, 16), np.int32),
        "mask_input": np.asarray([[1] * len(prompt_tokens) + [0] * (16 - len(prompt_tokens))] * group, np.int32),
    }
    sampler_cfg = model_cfg.replace(remat=False)
    generated = None

    def sample():
        nonlocal generated
        generated = decoding.generate(
            sampler_cfg, param_sets.join(frozen, state["params"]), images, prompts["tokens"], prompts["mask_ar"],
            prompts["mask_input"], max_new_tokens=new_tokens, eos_id=1, pad_id=0, grammar=grammar,
            sampling=decoding.Sampling(temperature=1.0), rng=jax.random.key(1),
        )  # fmt: skip
        return generated.tokens

    sample_s = timed_twice(f"sample ({group} completions of up to {new_tokens} tokens, grammar, KV cache)", sample)
    batch = grpo.rollout_batch(prompts, np.asarray(generated.tokens), 1)
    print(f"sampled tokens: {int(batch['mask'].sum())} of {group * new_tokens}", flush=True)
    batch.update(image=images, advantages=np.linspace(-1.5, 1.5, group).astype(np.float32))
    batch = jax.device_put(batch)
    step_fn = grpo.jit_grpo_step(config, model_cfg, tx, optim.schedule(config), grammar, 1)

    def one_step():
        nonlocal state
        state, metrics = step_fn(state, frozen, trainable, batch)
        return metrics["loss"]

    update_s = timed_twice(
        f"GRPO update ({group} x (256 image + 16 prompt + {new_tokens} tokens), KL, remat)", one_step
    )
    print(
        f"grpo step (compiled, without the reward): {sample_s + update_s:.1f} s = sample {sample_s:.1f} s + update {update_s:.1f} s"
    )
    print(f"peak RSS: {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
