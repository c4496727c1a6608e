"""One LoRA training step: ours (JAX, one compiled step) vs transformers + peft (the peer project's stack).

    .venv/bin/python benchmarks/train_vs_transformers.py [--batch 8] [--text-len 32] [--rounds 5] [--steps 3]

Both sides train the same model with the same weights on the same batch, on this machine's CPU, in one run:
- the `mid` preset (SigLIP 4 layers x 384, Gemma 4 layers x 512, MQA, 224 px -> 256 image tokens), random
  weights built in transformers, saved with `save_pretrained` and loaded by our loader (so the first losses
  must agree: printed as a check);
- LoRA rank 8, alpha 16, no dropout, on the Gemma q, k, v, o, gate, up, down projections (peft: a regex on
  the language model's modules), float32 everywhere, no activation checkpointing on either side,
  transformers with its default attention (sdpa);
- AdamW, global-norm clipping at 1, loss over the suffix tokens (every example has the same suffix length,
  so big_vision's per-example mean and HF's token mean are the same number).

Timing: after warm-up (our compile, torch's first step), the sides alternate for `--rounds` rounds of
`--steps` steps each; the median per-step time of each side is reported. Achieved FLOP/s uses one analytic
count of the step's useful work (forward, input gradients through the frozen weights, adapter gradients;
the frozen vision tower has no backward), divided by each side's step time and by this machine's matmul
peak, measured in the same run (the best of a large float32 matmul in JAX and in torch).
Prints the steps/s ratio (ours / transformers) last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
from _peak import matmul_peak  # noqa: E402

from paliseg import allocator  # noqa: E402
from paliseg import config as model_configs  # noqa: E402
from paliseg.checkpoints.huggingface import config_to_hf  # noqa: E402
from train import optim  # noqa: E402
from train import run as run_folder  # noqa: E402
from train import step as train_step  # noqa: E402
from train.config import TrainConfig  # noqa: E402

RANK, ALPHA, LR = 8, 16.0, 1e-4
LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_step_flops(cfg: model_configs.ModelConfig, batch: int, text_len: int) -> float:
    """Useful FLOPs of one LoRA step: a matmul costs 2mkn forward and 2mkn again for its input gradient
    (frozen weights get no weight gradient); attention's two batched matmuls cost 2x forward backwards;
    adapters cost 3x forward (input and weight gradients). The vision tower runs forward only."""
    img, llm = cfg.img, cfg.llm
    patches = img.num_patches
    vision_params_per_token = 4 * img.width**2 + 2 * img.width * img.mlp_dim
    vision = (
        2
        * batch
        * patches
        * (img.depth * vision_params_per_token + img.patch_size**2 * 3 * img.width + img.width * llm.width)
    )
    vision += img.depth * 2 * 2 * batch * patches**2 * img.width  # scores and values
    tokens = patches + text_len
    d, n, k, h, f = llm.width, llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.mlp_dim
    llm_params_per_token = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f
    linear = 2 * batch * tokens * llm.depth * llm_params_per_token
    attention = llm.depth * 2 * 2 * batch * tokens**2 * n * h
    logits = 2 * batch * text_len * d * llm.vocab_size
    lora_per_token = RANK * ((d + n * h) + 2 * (d + k * h) + (n * h + d) + 2 * (d + f) + (f + d))
    lora = 3 * 2 * batch * tokens * llm.depth * lora_per_token
    return float(vision + 2 * linear + 3 * attention + 2 * logits + lora)


def make_batch(cfg: model_configs.ModelConfig, batch: int, text_len: int, prefix_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    size = cfg.img.image_size
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    tokens = rng.integers(4, cfg.llm.vocab_size, (batch, text_len)).astype(np.int32)
    tokens[:, 0] = 2  # bos
    suffix = (np.arange(text_len) >= prefix_len).astype(np.int32)[None].repeat(batch, 0)
    return {
        "image": images,
        "tokens": tokens,
        "mask_ar": suffix,
        "mask_loss": suffix,
        "mask_input": np.ones_like(tokens),
    }


def build_hf(cfg: model_configs.ModelConfig, folder: Path):
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.PaliGemmaConfig(**config_to_hf(cfg))
    model = transformers.PaliGemmaForConditionalGeneration(hf_config)
    with torch.no_grad():  # larger than the default init, so the loss is not flat
        for name, param in model.named_parameters():
            param.normal_(0, 0.1 if "norm" in name else 0.05)
    model.save_pretrained(folder)
    return model, hf_config.image_token_index


class Transformers:
    def __init__(self, model, image_token: int, batch: dict, num_image_tokens: int):
        import peft
        import torch

        model.train()  # transformers' default attention (sdpa), as the peer project ran it
        lora = peft.LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            target_modules=r".*language_model.*\.(" + "|".join(LLM_TARGETS) + ")",
        )
        self.model = peft.get_peft_model(model, lora)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_count = sum(p.numel() for p in trainable)
        self.optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
        tokens = torch.tensor(batch["tokens"], dtype=torch.long)
        bsz = tokens.shape[0]
        image_ids = torch.full((bsz, num_image_tokens), image_token, dtype=torch.long)
        suffix = torch.tensor(batch["mask_loss"], dtype=torch.long)
        self.inputs = dict(
            input_ids=torch.cat([image_ids, tokens], 1),
            pixel_values=torch.tensor(batch["image"].transpose(0, 3, 1, 2)),
            token_type_ids=torch.cat([torch.zeros_like(image_ids), suffix], 1),
            attention_mask=torch.ones(bsz, num_image_tokens + tokens.shape[1], dtype=torch.long),
            labels=torch.cat([torch.full_like(image_ids, -100), torch.where(suffix == 1, tokens, -100)], 1),
        )

    def step(self) -> float:
        import torch

        loss = self.model(**self.inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


class Ours:
    def __init__(self, folder: Path, batch: dict):
        config = TrainConfig(
            data=["-"],
            out="-",
            checkpoint=str(folder),
            preset="mid",
            trainable="lora",
            lora=model_configs.LoraConfig(rank=RANK, alpha=ALPHA),
            remat=False,
            lr=LR,
            warmup_fraction=0.0,
            steps=10**6,
            grad_clip=1.0,
            batch_size=len(batch["tokens"]),
        )
        model_cfg = run_folder.model_config(config)
        self.frozen, trainable = run_folder.initial_params(config, model_cfg)
        self.trainable_count = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
        tx = optim.optimizer(config)
        self.state = train_step.init_state(trainable, tx)
        self.batch = jax.device_put({key: value[None] for key, value in batch.items()})  # grad_accum axis
        self.fn = train_step.jit_train_step(config, model_cfg, tx, optim.schedule(config))

    def step(self) -> float:
        self.state, metrics = self.fn(self.state, self.frozen, self.batch)
        return float(metrics["loss"])  # waits for the step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=32, help="text tokens per example (prefix 8, the rest suffix)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    args = parser.parse_args()
    allocator.ensure()  # PALISEG_TUNE_MALLOC=1, as for the `paliseg` command (paliseg/allocator.py)

    import torch

    cfg = model_configs.preset("mid")
    batch = make_batch(cfg, args.batch, args.text_len, prefix_len=8)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model, image_token = build_hf(cfg, Path(tmp))
        ours = Ours(Path(tmp), batch)
    theirs = Transformers(hf_model, image_token, batch, cfg.num_image_tokens)
    print(
        f"mid preset, batch {args.batch}, {cfg.num_image_tokens} image + {args.text_len} text tokens, "
        f"LoRA r={RANK} on {','.join(LLM_TARGETS)}; jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    )
    print(f"trainable parameters: ours {ours.trainable_count:,}, transformers+peft {theirs.trainable_count:,}")

    start = time.perf_counter()
    first_ours = ours.step()
    compile_s = time.perf_counter() - start
    first_theirs = theirs.step()
    print(
        f"first-step loss (same weights and batch): ours {first_ours:.5f}, transformers {first_theirs:.5f} "
        f"(our first step includes {compile_s:.1f} s of compilation)"
    )

    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    for _ in range(args.rounds):
        for name, side in (("ours", ours), ("transformers", theirs)):
            start = time.perf_counter()
            for _ in range(args.steps):
                side.step()
            times[name].append((time.perf_counter() - start) / args.steps)
    peak_jax, peak_torch = matmul_peak()
    peak = max(peak_jax, peak_torch)
    flops = lora_step_flops(cfg, args.batch, args.text_len)
    print(f"matmul peak (2048^3 float32): jax {peak_jax / 1e9:.1f} GFLOP/s, torch {peak_torch / 1e9:.1f} GFLOP/s")
    print(f"useful work per step: {flops / 1e9:.1f} GFLOP")
    for name in ("ours", "transformers"):
        seconds = statistics.median(times[name])
        print(
            f"{name:>12}: {seconds * 1e3:8.1f} ms/step (median of {args.rounds} x {args.steps}), "
            f"{flops / seconds / 1e9:6.1f} GFLOP/s = {flops / seconds / peak:.1%} of the matmul peak"
        )
    ratio = statistics.median(times["transformers"]) / statistics.median(times["ours"])
    print(f"steps/s ratio (ours / transformers+peft): {ratio:.2f}x")


if __name__ == "__main__":
    main()
