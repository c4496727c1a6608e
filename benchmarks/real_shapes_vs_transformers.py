"""What a user without a GPU meets: the real PaliGemma 1 and 2 3B shapes in bfloat16 on this CPU, ours vs
transformers, in one run.

    .venv/bin/python benchmarks/real_shapes_vs_transformers.py [--preset paligemma-3b-224] [--threads 2]

For each `--preset` (default: `paligemma-3b-224` and `paligemma2-3b-224`) transformers'
`PaliGemmaForConditionalGeneration` is built with the matching text config (Gemma 1 resp. Gemma 2), eager
attention, random bfloat16 weights, and saved with `save_pretrained`; our side loads that folder through
our Hugging Face loader, so both run the same weights. Where our loader cannot read the checkpoint yet
(PaliGemma 2 before the loader learns Gemma 2) our side runs random weights of the same shapes and dtype,
and the run says so.

Each side runs in its own subprocess, one after the other (3B bf16 weights are ~6 GB per side), on
`--threads` cores (CPU affinity; torch's thread count too), batch 1, 256 image + 16 text tokens (all
real, all prefix): one forward pass (transformers: logits at every position; ours: at the text positions)
and a 20-token greedy decode with the KV cache, no EOS stop. Each is called once to warm up (our
compilation) and then timed `--repeats` times (the best counts). Prints per side the times, the first
call and the peak resident memory while running them (the setup's, building resp. loading the weights, is
printed apart: the peak is reset after it), then the speed ratios ours / transformers (> 1: we are faster), the
decode ratio last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("paligemma-3b-224", "paligemma2-3b-224")
TEXT_LEN = 16
RESULT = "RESULT "  # prefix of the line a side prints its measurements on


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def reset_peak_rss() -> None:
    """Start the peak over from the current resident size (Linux: proc(5), /proc/pid/clear_refs, value 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def hf_config_dict(config) -> dict:
    """transformers' PaliGemma config for `config`: our exporter's, with Gemma 2's text config filled in
    here while the exporter writes Gemma 1 only (values as the PaliGemma 2 preset: no final soft-cap)."""
    from paliseg.checkpoints.huggingface import config_to_hf

    hf = config_to_hf(config)
    llm = config.llm
    if llm.generation == 2 and hf["text_config"]["model_type"] != "gemma2":
        hf["text_config"].update(
            model_type="gemma2",
            query_pre_attn_scalar=llm.query_pre_attn_scalar or llm.head_dim,
            attn_logit_softcapping=llm.attn_logits_softcap or None,
            final_logit_softcapping=llm.final_logits_softcap or None,
            sliding_window=llm.sliding_window or 4096,
        )
    return hf


def loader_reads(hf: dict) -> str | None:
    """None if our Hugging Face loader understands this config, else its reason."""
    from paliseg.checkpoints.huggingface import config_from_hf

    try:
        config_from_hf(hf)
    except ValueError as error:
        return str(error)
    return None


def inputs(config, batch: int = 1):
    rng = np.random.default_rng(0)
    size = config.img.image_size
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    tokens = np.concatenate([np.full((batch, 1), 2), rng.integers(3, config.llm.vocab_size, (batch, TEXT_LEN - 1))], 1)
    return images, tokens.astype(np.int32)


def best_of(repeats: int, fn) -> tuple[float, float]:
    """(first call, best of `repeats` further calls), in seconds."""
    times = []
    for _ in range(1 + repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times[0], min(times[1:])


def side_transformers(preset_name: str, folder: str | None, new_tokens: int, repeats: int) -> dict:
    import torch
    import transformers

    from paliseg.config import preset

    config = preset(preset_name)
    start = time.perf_counter()
    torch.manual_seed(0)
    hf_config = transformers.PaliGemmaConfig(**hf_config_dict(config))
    model = transformers.PaliGemmaForConditionalGeneration._from_config(
        hf_config, attn_implementation="eager", dtype=torch.bfloat16
    ).eval()
    if folder is not None:
        model.save_pretrained(folder)
    setup = time.perf_counter() - start, peak_rss_gb()
    reset_peak_rss()

    images, tokens = inputs(config)
    n_img = config.num_image_tokens
    ids = torch.tensor(np.concatenate([np.full((1, n_img), hf_config.image_token_index), tokens], 1))
    pixels = torch.tensor(images.transpose(0, 3, 1, 2)).to(torch.bfloat16)
    common = dict(
        input_ids=ids,
        pixel_values=pixels,
        token_type_ids=torch.zeros_like(ids),
        attention_mask=torch.ones_like(ids),
    )
    out = {}

    def forward():
        with torch.no_grad():
            model(**common)

    def decode():
        with torch.no_grad():
            generated = model.generate(
                **common, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )
        out["tokens"] = generated[0, ids.shape[1] :].tolist()

    return {
        "setup": setup,
        "forward": best_of(repeats, forward),
        "decode": best_of(repeats, decode),
        "tokens": out["tokens"],
        "threads": torch.get_num_threads(),
    }


def side_paliseg(preset_name: str, folder: str | None, new_tokens: int, repeats: int) -> dict:
    import jax

    from paliseg import checkpoints, decoding, model
    from paliseg.config import preset

    config = preset(preset_name)
    start = time.perf_counter()
    if folder is not None:
        config, params = checkpoints.load(folder)
    else:
        params = model.init_params(config, jax.random.key(0, impl="rbg"))  # rbg: threefry takes minutes for 3B
    config, params = model.for_inference(config, jax.block_until_ready(params), consume=True)
    setup = time.perf_counter() - start, peak_rss_gb()
    reset_peak_rss()

    images, tokens = inputs(config)
    zeros, ones = np.zeros_like(tokens), np.ones_like(tokens)
    out = {}

    def forward():
        jax.block_until_ready(model.forward(config, params, images, tokens, zeros, ones))

    def decode():
        result = decoding.generate(config, params, images, tokens, zeros, ones, max_new_tokens=new_tokens, eos_id=-1)
        out["tokens"] = np.asarray(result.tokens)[0].tolist()

    return {
        "setup": setup,
        "forward": best_of(repeats, forward),
        "decode": best_of(repeats, decode),
        "tokens": out["tokens"],
        "threads": len(os.sched_getaffinity(0)),
    }


SIDES = {"transformers": side_transformers, "paliseg": side_paliseg}


def run_side(side: str, preset_name: str, folder: str | None, args) -> dict:
    """One side in a fresh process (its own peak memory, nothing of the other side resident)."""
    command = [sys.executable, __file__, "--side", side, "--preset", preset_name]
    command += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if folder is not None:
        command += ["--folder", folder]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        sys.exit(f"{side} side of {preset_name} failed (exit status {done.returncode})")
    return json.loads(lines[-1][len(RESULT) :])


def child(args) -> None:
    cores = sorted(os.sched_getaffinity(0))[: args.threads]
    os.sched_setaffinity(0, cores)  # before jax / torch start their thread pools
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    if args.side == "transformers":
        import torch

        torch.set_num_threads(len(cores))
    result = SIDES[args.side](args.preset[0], args.folder, args.new_tokens, args.repeats)
    result["peak_gb"] = peak_rss_gb()
    print(RESULT + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", choices=PRESETS, help="repeatable (default: both)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls after the warm-up call")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side
    parser.add_argument("--folder", help=argparse.SUPPRESS)  # internal: the shared checkpoint
    args = parser.parse_args()
    if args.side:
        child(args)
        return
    sys.path.insert(0, str(REPO))
    from paliseg.config import preset

    ratios = []
    for name in args.preset or PRESETS:
        config = preset(name)
        unreadable = loader_reads(hf_config_dict(config))
        with tempfile.TemporaryDirectory(prefix="real-shapes-") as tmp:
            folder = None if unreadable else tmp
            theirs = run_side("transformers", name, folder, args)
            ours = run_side("paliseg", name, folder, args)
        weights = "the same weights" if folder else f"same-shape random weights (our loader: {unreadable})"
        print(
            f"\n{name}: batch 1, {config.num_image_tokens} image + {TEXT_LEN} text tokens, bfloat16, "
            f"{ours['threads']} threads, {weights}"
        )
        for side, result in (("transformers", theirs), ("paliseg", ours)):
            (forward_first, forward), (decode_first, decode) = result["forward"], result["decode"]
            print(
                f"{side:>13}: forward {forward:6.2f} s (first {forward_first:6.1f} s), {args.new_tokens}-token "
                f"decode {decode:6.2f} s (first {decode_first:6.1f} s); peak RSS {result['peak_gb']:.2f} GB; "
                f"setup {result['setup'][0]:5.1f} s, peak RSS {result['setup'][1]:.2f} GB"
            )
        if folder:
            agree = sum(a == b for a, b in zip(ours["tokens"], theirs["tokens"]))
            print(f"greedy tokens equal at {agree} of {args.new_tokens} positions (bf16 rounding may split them)")
        ratios.append((name, theirs["forward"][1] / ours["forward"][1], theirs["decode"][1] / ours["decode"][1]))
    print()
    for name, forward, _ in ratios:
        print(f"{name}: forward speed ratio (paliseg / transformers): {forward:.2f}x")
    print("decode speed ratio (paliseg / transformers): " + ", ".join(f"{n} {d:.2f}x" for n, _, d in ratios))


if __name__ == "__main__":
    main()
