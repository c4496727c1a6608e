"""One-off: the real shapes (`--preset paligemma-3b-224`, the default, `paligemma2-3b-224` or
`paligemma2-10b-224`) on CPU with random bf16 weights, optionally with the projection weights quantized.

    .venv/bin/python benchmarks/full_size_memory.py [--preset P] [--new-tokens 20] [--batch 1] [--quantize Q]
    .venv/bin/python benchmarks/full_size_memory.py --train [--preset P] [--batch 1] [--seq-len 128] [--quantize Q]
    .venv/bin/python benchmarks/full_size_memory.py --grpo [--preset P] [--group 4] [--new-tokens 64]

`--quantize int8|nf4` (`paliseg predict --quantize`, `paliseg train --base-dtype`): the model is created with
its projection weights quantized (`paliseg.model.quantization`; a bf16 copy of the whole model never exists),
and each layer dequantizes its own weights in the layer scan. Goals: `paligemma2-10b-224 --train --quantize
int8` peaks below 20 GB, `paligemma2-3b-224 --quantize nf4` inference below 5 GB.

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
import functools
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from train_vs_transformers import lora_step_flops  # noqa: E402

from paliseg import allocator, decoding, model  # noqa: E402
from paliseg.config import QuantizationConfig, preset  # noqa: E402
from paliseg.model import quantization  # noqa: E402
from train import optim, plan  # noqa: E402
from train import params as param_sets  # noqa: E402
from train import run as run_folder  # noqa: E402
from train import step as train_step  # noqa: E402
from train.config import TrainConfig  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def count_params(tree) -> int:
    """Parameters, a quantized weight counted as the weight it stands for."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree, is_leaf=quantization.is_quantized))


def random_params(config) -> dict:
    """The model's own random init; with a quantized base, random codes and scales of the same tree instead
    (the values matter neither for memory nor for speed, and the initialisers' truncated normals followed
    by the quantization take many minutes of CPU for the 10B model)."""
    key = jax.random.key(0, impl="rbg")  # the fast PRNG: threefry takes minutes for billions of numbers on CPU
    if not config.quantization.enabled:
        return model.init_params(config, key)
    shapes = model.param_shapes(config)
    leaves, treedef = jax.tree.flatten(shapes)
    return jax.tree.unflatten(
        treedef, [_random(s.shape, s.dtype, k) for s, k in zip(leaves, jax.random.split(key, len(leaves)))]
    )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _random(shape, dtype, key):
    """Random values of `shape`, made in pieces of at most 2**24 (their 32-bit random bits would otherwise be
    a transient copy of the leaf at 4 bytes per value)."""
    size = math.prod(shape)
    pieces = next(m for m in range(-(-size // 2**24), size + 1) if size % m == 0)
    return jax.lax.map(lambda k: _values((size // pieces,), dtype, k), jax.random.split(key, pieces)).reshape(shape)


def _values(shape, dtype, key):
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        return jax.random.randint(key, shape, info.min, info.max, jnp.int32).astype(dtype)
    return (jnp.abs(jax.random.normal(key, shape, jnp.float32)) * 0.02).astype(dtype)  # positive: scales too


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
    parser.add_argument(
        "--preset", default="paligemma-3b-224", choices=("paligemma-3b-224", "paligemma2-3b-224", "paligemma2-10b-224")
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--train", action="store_true", help="measure a LoRA training step instead of inference")
    parser.add_argument("--seq-len", type=int, default=128, help="--train: text tokens per example")
    parser.add_argument("--grpo", action="store_true", help="measure a GRPO step (LoRA) instead of inference")
    parser.add_argument("--group", type=int, default=4, help="--grpo: completions sampled per image")
    parser.add_argument("--quantize", choices=("int8", "nf4"), help="the projection weights quantized")
    args = parser.parse_args()
    allocator.ensure()  # PALISEG_TUNE_MALLOC=1, as for the `paliseg` command (paliseg/allocator.py)
    if args.train:
        train(args.preset, args.batch, args.seq_len, args.quantize)
        return
    if args.grpo:
        grpo_step(args.preset, args.group, args.new_tokens)
        return

    # bf16 params and matmuls, f32 norms/softmax/logits, bf16 KV cache
    config = preset(args.preset).replace(quantization={"format": args.quantize})
    start = time.perf_counter()
    params = jax.block_until_ready(random_params(config))
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
    goal = "< 5 GB" if args.quantize == "nf4" else "< 12 GB"
    print(f"peak RSS: {peak_rss_gb():.2f} GB (goal {goal})")


def train(preset_name: str, batch: int, seq_len: int, quantize: str | None) -> None:
    """One compiled LoRA step as `paliseg train` builds it (`--base-dtype quantize`); its peak memory and speed."""
    config = TrainConfig(
        data=["-"], out="-", preset=preset_name, trainable="lora", batch_size=batch, seq_len=seq_len, steps=1000,
        quantization=QuantizationConfig(format=quantize),
    )  # fmt: skip
    model_cfg = run_folder.model_config(config)
    start = time.perf_counter()
    frozen, trainable = jax.block_until_ready(param_sets.split(random_params(model_cfg), "lora"))
    tx = optim.optimizer(config)
    state = train_step.init_state(trainable, tx)
    print(
        f"{preset_name} on {jax.devices()[0].device_kind}: frozen {count_params(frozen) / 1e9:.3f} B params "
        f"({sum(x.nbytes for x in jax.tree.leaves(frozen)) / 2**30:.2f} GiB, base {quantize or 'bf16'}), LoRA {count_params(trainable):,} "
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
    known = plan.accelerator_of(kind)  # `paliseg plan`'s table: datasheet dense bf16 peaks
    if known is not None:
        peak = known.bf16_flops
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
    model_cfg = run_folder.model_config(config)
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
    image = rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
    prompt_tokens = [2, *rng.integers(10, 256_000, 8), 108]  # bos, "segment <class>", "\n"
    prompt = {
        "tokens": np.asarray([prompt_tokens + [0] * (16 - len(prompt_tokens))], np.int32),
        "mask_ar": np.zeros((1, 16), np.int32),
        "mask_input": np.asarray([[1] * len(prompt_tokens) + [0] * (16 - len(prompt_tokens))], np.int32),
    }
    sampler_cfg = model_cfg.replace(remat=False)
    generated = None

    def sample():
        nonlocal generated
        generated = decoding.generate(  # as train.grpo samples: one prefill for the group
            sampler_cfg, param_sets.join(frozen, state["params"]), image, prompt["tokens"], prompt["mask_ar"],
            prompt["mask_input"], max_new_tokens=new_tokens, eos_id=1, pad_id=0, grammar=grammar,
            sampling=decoding.Sampling(temperature=1.0), rng=jax.random.key(1), samples_per_prompt=group,
        )  # fmt: skip
        return generated.tokens

    sample_s = timed_twice(f"sample ({group} completions of up to {new_tokens} tokens, grammar, KV cache)", sample)
    batch = grpo.rollout_batch(image, prompt, np.asarray(generated.tokens), 1)
    print(f"sampled tokens: {int(batch['mask'].sum())} of {group * new_tokens}", flush=True)
    batch["advantages"] = np.linspace(-1.5, 1.5, group).astype(np.float32)
    batch = jax.device_put(batch)
    step_fn = grpo.jit_grpo_step(config, model_cfg, tx, optim.schedule(config), grammar, 1)

    def one_step():
        nonlocal state
        state, metrics = step_fn(state, frozen, trainable, batch)
        return metrics["loss"]

    update_s = timed_twice(
        f"GRPO update (256 image + 16 prompt tokens once, {group} x {new_tokens} sampled, KL, remat)", one_step
    )
    print(
        f"grpo step (compiled, without the reward): {sample_s + update_s:.1f} s = sample {sample_s:.1f} s + update {update_s:.1f} s"
    )
    print(f"peak RSS: {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
