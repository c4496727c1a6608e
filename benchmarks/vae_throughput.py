"""Mask VAE throughput: masks/s for encode and decode at batch 256, ours (JAX) vs the PyTorch reference.

    .venv/bin/python benchmarks/vae_throughput.py [--vae PATH] [--batch 256] [--rounds 7] [--threads 2]

Both sides load the same npz (default: a random one in the vae-oid layout, `vae.write_random_npz`; the
architecture, not the weights, sets the cost) and run on this machine's CPU in the same process, with the
same number of threads (`torch.set_num_threads` and XLA's intra-op thread pool). The PyTorch side is the
oracle module of tests/test_vae.py, in eval mode under `torch.no_grad()`. Ours is the public API,
`MaskVAE.encode` / `MaskVAE.decode` (NumPy in, NumPy out, jit-compiled). After one warm-up call each, the
sides alternate for `--rounds` rounds; the median time per batch is reported. The inputs are real crack
crops when ../shared/data/roboflow is present, else synthetic shapes; the tokens of both sides are
checked to be identical. Prints the ratio (ours / PyTorch masks/s) last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from paliseg import allocator  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", type=Path, default=None, help="npz to load on both sides (default: random weights)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    allocator.ensure()  # PALISEG_TUNE_MALLOC=1, as for the `paliseg` command (paliseg/allocator.py)
    # XLA reads its thread-pool size once, at import: set it before jax is imported.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={args.threads}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(REPO / "tests"))

    import numpy as np
    import torch
    from test_vae import TorchMaskVAE  # the oracle module

    import vae
    from vae import masks as vae_masks
    from vae import sources
    from vae.synthetic import synthetic_crops

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.vae or vae.write_random_npz(Path(tmp) / "vae-random.npz", seed=0)
        ours, reference = vae.load(path), TorchMaskVAE.from_npz(path)

    cracks = REPO.parent / "shared" / "data" / "roboflow" / "cracks" / "valid"
    if cracks.is_dir():
        crops = [vae_masks.crop_to_64(m, b) for s in sources.samples(cracks) for m, b in zip(s.object_masks(), s.boxes)]
        what = "real crack crops"
    else:
        crops, what = list(synthetic_crops(args.batch, seed=0)), "synthetic shapes"
    masks = np.resize(np.asarray(crops, np.float32), (args.batch, 64, 64))
    print(
        f"{args.batch} masks ({what}), weights {path if args.vae else 'random'}, {args.threads} threads, "
        f"jax {__import__('jax').__version__} vs torch {torch.__version__}"
    )

    tokens = ours.encode(masks)
    reference_tokens = reference.encode(masks)
    agree = float((tokens == reference_tokens).mean())
    ours.decode(tokens), reference.decode(tokens)  # warm-up

    sides = {
        ("encode", "ours"): lambda: ours.encode(masks),
        ("encode", "torch"): lambda: reference.encode(masks),
        ("decode", "ours"): lambda: ours.decode(tokens),
        ("decode", "torch"): lambda: reference.decode(tokens),
    }
    times: dict[tuple[str, str], list[float]] = {key: [] for key in sides}
    for _ in range(args.rounds):
        for key, run in sides.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    rate = {key: args.batch / statistics.median(values) for key, values in times.items()}
    for op in ("encode", "decode"):
        print(f"{op}: ours {rate[(op, 'ours')]:8.0f} masks/s   torch {rate[(op, 'torch')]:8.0f} masks/s")
    print(f"tokens identical to the reference: {agree:.2%}")
    print(
        f"ratio ours/torch (masks/s, batch {args.batch}): encode {rate[('encode', 'ours')] / rate[('encode', 'torch')]:.2f}x, "
        f"decode {rate[('decode', 'ours')] / rate[('decode', 'torch')]:.2f}x"
    )


if __name__ == "__main__":
    main()
