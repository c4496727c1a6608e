"""`paliseg serve` under load: requests/s one at a time vs many at once (dynamic batching), tiny preset.

    .venv/bin/python benchmarks/serve_load.py [--preset tiny] [--requests 256] [--clients 16] [--max-batch 16]
        [--max-wait-ms 10] [--max-new-tokens 48] [--sequential 32] [--image-size 0]

One server process (`paliseg serve --checkpoint ... --port 0`, the real command) on 127.0.0.1, then, side by
side against it:
- one at a time: one client sends `--sequential` requests, each after the previous answer;
- concurrent: `--clients` threads send `--requests` requests together (the worker batches them, up to
  `--max-batch`, waiting `--max-wait-ms` for companions).
Each request is one bundled real crack photo (640x640 JPEG, `paliseg/assets/demo`) and "segment crack"; the
answer is the whole path: decode, VAE masks pasted back at 640x640, COCO RLE, JSON. The model is a seeded
random init of the preset saved as a paliseg checkpoint, with a random VAE (the architecture sets the cost;
under the grammar a random model writes objects up to the token budget: the worst case). Two warm-up rounds
of each kind come first (the VAE compiles its object-count buckets on first use). The last line is the ratio.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
IMAGES = REPO / "paliseg" / "assets" / "demo" / "roboflow" / "cracks" / "valid"
PROMPT = "segment crack"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--requests", type=int, default=256, help="concurrent round: requests in all")
    parser.add_argument("--clients", type=int, default=16, help="concurrent round: client threads")
    parser.add_argument("--sequential", type=int, default=32, help="one-at-a-time round: requests")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--image-size", type=int, default=0,
        help="send the photos resized to this square size (e.g. 64, the tiny preset's input); 0: as they are",
    )  # fmt: skip
    return parser.parse_args()


def write_model(folder: Path, preset: str) -> tuple[Path, Path]:
    """A random init of `preset` as a paliseg checkpoint folder, and a random VAE."""
    import jax

    import vae
    from paliseg import checkpoints, model
    from paliseg import config as model_configs

    config = model_configs.preset(preset)
    checkpoint = checkpoints.save(folder / "checkpoint", model.init_params(config, jax.random.key(0)), config)
    return checkpoint, vae.write_random_npz(folder / "vae.npz", seed=0)


def start(checkpoint: Path, vae_path: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "paliseg.cli.main", "serve", "--checkpoint", str(checkpoint), "--vae",
               str(vae_path), "--port", "0", "--max-batch", str(args.max_batch), "--max-wait-ms",
               str(args.max_wait_ms), "--max-new-tokens", str(args.max_new_tokens), "--no-access-log",
               "--prompt", PROMPT]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and process.poll() is None:
        found = re.search(r"listening on (http://\S+/)", log.read_text())
        if found:
            return process, found.group(1)
        time.sleep(0.5)
    process.kill()
    sys.exit(f"paliseg serve did not start:\n{log.read_text()}")


def _photo(path: Path, size: int) -> bytes:
    if not size:
        return path.read_bytes()
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def main() -> None:
    args = parse_args()
    import requests

    photos = [_photo(path, args.image_size) for path in sorted(IMAGES.glob("*.jpg"))]

    def ask(index: int) -> None:
        files = [("image", (f"{index}.jpg", photos[index % len(photos)], "image/jpeg")), ("prompt", (None, PROMPT))]
        response = requests.post(f"{url}v1/segment", files=files, timeout=600)
        response.raise_for_status()

    def one_at_a_time(count: int) -> float:
        started = time.perf_counter()
        for index in range(count):
            ask(index)
        return count / (time.perf_counter() - started)

    def concurrent_round(count: int) -> float:
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(ask, range(count)))
        return count / (time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint, vae_path = write_model(tmp, args.preset)
        process, url = start(checkpoint, vae_path, args, tmp / "serve.log")
        try:
            health = f"{url}v1/health"
            shown = f"{args.image_size}x{args.image_size}" if args.image_size else "640x640"
            print(f"{args.preset} preset (random init), {len(photos)} real crack photos at {shown}, {PROMPT!r}, up to "
                  f"{args.max_new_tokens} new tokens; server --max-batch {args.max_batch} --max-wait-ms "
                  f"{args.max_wait_ms:g} on {url}")  # fmt: skip
            one_at_a_time(2), concurrent_round(2 * args.clients)  # warm-up
            sequential = one_at_a_time(args.sequential)
            before = requests.get(health, timeout=60).json()["decoded"]
            together = concurrent_round(args.requests)
            after = requests.get(health, timeout=60).json()["decoded"]
            mean_batch = (after["jobs"] - before["jobs"]) / max(1, after["batches"] - before["batches"])
            print(f"one at a time ({args.sequential} requests)            : {sequential:7.2f} requests/s")
            print(f"concurrent ({args.requests} requests, {args.clients} clients)    : {together:7.2f} requests/s "
                  f"(mean batch {mean_batch:.1f})")  # fmt: skip
            print(f"ratio concurrent / one at a time: {together / sequential:.2f}")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(120)


if __name__ == "__main__":
    main()
