"""One-off: the real `paligemma-3b-224` shapes on CPU with random bf16 weights.

    .venv/bin/python benchmarks/full_size_memory.py [--new-tokens 20] [--batch 1]

Initialises the 2.92 B-parameter model in bfloat16 (5.4 GiB; the fast `rbg` PRNG, as threefry takes
minutes for 2.9 B numbers on CPU), turns it into the inference view (`model.inference_view`, in place),
runs a batch-`--batch` forward pass (text logits for 256 image + 16 text tokens) and a `--new-tokens`
greedy decode with the KV cache, and prints each time (first call, which includes compilation, and a
second, compiled call) and the process's peak resident memory (goal: < 12 GB). On a GPU run it with
`--batch 32` and read the decode images/s.
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

import jax  # noqa: E402

from paliseg import decoding, model  # noqa: E402
from paliseg.config import preset  # noqa: E402
from paliseg.model.lora import count_params  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def timed_twice(name: str, fn) -> float:
    times = []
    for _ in range(2):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    print(f"{name}: first call (with compilation) {times[0]:.1f} s, compiled {times[1]:.1f} s; "
          f"peak RSS so far {peak_rss_gb():.2f} GB", flush=True)
    return times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=20)
    args = parser.parse_args()

    config = preset("paligemma-3b-224")  # bf16 params and matmuls, f32 norms/softmax/logits, bf16 KV cache
    start = time.perf_counter()
    params = jax.block_until_ready(model.init_params(config, jax.random.key(0, impl="rbg")))
    print(f"{jax.devices()[0].device_kind}: init {count_params(params) / 1e9:.3f} B params "
          f"({sum(x.nbytes for x in jax.tree.leaves(params)) / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f} s; "
          f"peak RSS {peak_rss_gb():.2f} GB", flush=True)
    params = model.inference_view(params)

    rng = np.random.default_rng(0)
    size = config.img.image_size
    images = rng.uniform(-1, 1, (args.batch, size, size, 3)).astype(np.float32)
    tokens = rng.integers(3, 256_000, (args.batch, 16)).astype(np.int32)
    mask_ar = np.array([[0] * 8 + [1] * 8] * args.batch, np.int32)
    ones = np.ones_like(tokens)
    timed_twice(f"forward (batch {args.batch}, 256 image + 16 text tokens)",
                lambda: model.forward(config, params, images, tokens, mask_ar, ones))
    prompt_mask = np.array([[1] * 8 + [0] * 8] * args.batch, np.int32)
    seconds = timed_twice(
        f"decode (batch {args.batch}, {args.new_tokens} new tokens)",
        lambda: decoding.generate(config, params, images, tokens, 0 * mask_ar, prompt_mask,
                                  max_new_tokens=args.new_tokens, eos_id=-1),
    )
    print(f"decode: {args.batch / seconds:.3f} images/s, {args.batch * args.new_tokens / seconds:.2f} tokens/s")
    print(f"peak RSS: {peak_rss_gb():.2f} GB (goal < 12 GB)")


if __name__ == "__main__":
    main()
