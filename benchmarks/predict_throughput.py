"""Whole predict path throughput: images/s at batch 8 on CPU for the tiny and mid presets.

    .venv/bin/python benchmarks/predict_throughput.py [--presets tiny,mid] [--batch 8] [--batches 3]
        [--max-new-tokens 64] [--threads 2] [--vae PATH]

What is timed, side by side on the same images and the same model:
- decode: `Predictor.decode_texts` alone (prefill + KV-cached, grammar-constrained greedy decoding);
- predict: `infer.outputs.predict_set`, the whole `paliseg predict` path: read and preprocess the images,
  decode, parse the text, VAE-decode every object and paste it back at full resolution, write the mask
  PNGs, per-object PNGs, JSON and COCO results (canvases off, as `--no-canvas`; they are timed apart).
The last line per preset is the ratio predict / decode images/s: the share of the LM in the whole path.

Inputs are the bundled real crack photos (paliseg/assets/demo, 640x640), repeated to fill the batches. The
models are seeded random inits (the architecture sets the cost; a random model under the grammar emits
objects until the token budget, so every image carries `--max-new-tokens` tokens: the worst case). The VAE
is random too unless `--vae` is given. One warm-up batch compiles; the median over `--batches` rounds of one
batch is reported.
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

IMAGES = REPO / "paliseg" / "assets" / "demo" / "roboflow" / "cracks" / "valid"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,mid")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3, help="timed rounds (one batch each)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vae", type=Path, default=None, help="mask VAE npz (default: random weights)")
    return parser.parse_args()


def _median_seconds(function, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    allocator.ensure()  # PALISEG_TUNE_MALLOC=1, as for the `paliseg` command (paliseg/allocator.py)
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={args.threads}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax

    import vae
    from infer import outputs
    from infer.predictor import Predictor
    from metrics import canvas
    from paliseg import config as model_configs
    from paliseg import images, model
    from paliseg.tokenizer import Tokenizer

    paths = sorted(p for p in IMAGES.iterdir() if p.suffix == ".jpg")
    paths = (paths * (args.batch // len(paths) + 1))[: args.batch]
    prompt = "segment crack"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vae_model = vae.MaskVAE.from_npz(args.vae or vae.write_random_npz(tmp / "vae.npz", seed=0))
        jobs = [outputs.Job(path, prompt, None, f"{index}.{path.stem}") for index, path in enumerate(paths)]
        print(f"{len(jobs)} images of {IMAGES.name} (640x640 real cracks), prompt {prompt!r}, batch {args.batch}, "
              f"max {args.max_new_tokens} new tokens, {args.threads} CPU threads, jax {jax.__version__}")  # fmt: skip
        for name in args.presets.split(","):
            config = model_configs.preset(name)
            params = model.init_params(config, jax.random.key(0))
            predictor = Predictor(config, params, Tokenizer(config.tokenizer_path), vae_model,
                                  batch_size=args.batch, max_new_tokens=args.max_new_tokens, source=f"random {name}")  # fmt: skip
            pixels = [predictor.preprocess(images.read_image(path)) for path in paths]
            texts = predictor.decode_texts(pixels, [prompt] * len(pixels))  # warm-up: compiles
            decode = _median_seconds(lambda: predictor.decode_texts(pixels, [prompt] * len(pixels)), args.batches)
            counter = iter(range(10**6))
            outputs.predict_set(predictor, jobs, tmp / f"warm-{name}", canvases=False)
            whole = _median_seconds(
                lambda: outputs.predict_set(predictor, jobs, tmp / f"{name}-{next(counter)}", canvases=False),
                args.batches,
            )
            predictions = predictor.predict(paths, prompt)
            drawing = _median_seconds(
                lambda: [
                    canvas.make_canvas(images.read_image(p), None, q.mask, "x", pred_boxes=q.boxes)
                    for p, q in zip(paths, predictions)
                ],
                1,
            )
            objects = sum(len(p.objects) for p in predictions) / len(predictions)
            tokens = sum(len(predictor.tokenizer.encode(t.text)) for t in texts) / len(texts)
            print(f"\n[{name}] {tokens:.0f} tokens and {objects:.1f} objects per image")
            print(f"  decode only               : {args.batch / decode:7.2f} images/s  ({decode:.2f} s per batch)")
            print(f"  whole predict (no canvas) : {args.batch / whole:7.2f} images/s  ({whole:.2f} s per batch)")
            print(f"  canvases (drawn apart)    : {args.batch / drawing:7.2f} images/s")
            print(f"  ratio predict / decode images/s: {decode / whole:.3f}")


if __name__ == "__main__":
    main()
