"""Builders that several test modules (and the child processes they start) share: small model configs and
random weights, converted-data folders, tiny training configs and runs. Plain functions, so a child process
started with tests/ on sys.path imports them too (it cannot use the fixtures of conftest.py)."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

import vae
from paliseg import config as cfgs
from paliseg import files, model, records, tokens
from paliseg.checkpoints.tree import flatten, unflatten
from train import commands as train_commands
from train import config as train_config
from train import run as run_folder
from vae import identity

# --- models ----------------------------------------------------------------------------------------------

SMALL = cfgs.preset("tiny").replace(
    img={"width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2, "image_size": 16},
    llm={"width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16},
)


def random_params(config):
    """Weights re-drawn with a large std (as in the transformers oracle) so that greedy decoding of a
    random model does not repeat one token. With Gemma 2's post-norms, as there: small embeddings (else the
    residual stream stays the last token's embedding) and a final norm of (1 + 4)."""
    flat = flatten(model.init_params(config, jax.random.key(0)))
    keys = jax.random.split(jax.random.key(1), len(flat))

    def draw(key, name, value):
        mean, std = 0.0, (0.1 if value.ndim == 1 or "norm" in name else 0.3)
        if config.llm.post_norms and name == "llm/embedder/input_embedding":
            std = 0.02
        if config.llm.post_norms and name == "llm/final_norm/scale":
            mean = 4.0
        return mean + jax.random.normal(key, value.shape) * std

    return unflatten({name: draw(key, name, value) for key, (name, value) in zip(keys, flat.items())})


# --- converted-data folders ------------------------------------------------------------------------------

PROMPT = "segment crack"
PROMPTS = ("segment crack", "segment taping area")


def make_dataset(folder: Path, count: int = 12, seed: int = 0, prompts=PROMPTS) -> Path:
    """A converted-data folder in the real layout: images + _annotations.train.jsonl with seg suffixes.
    Each image is a dark background with one bright rectangle, and the suffix locates that rectangle."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    out = []
    for i in range(count):
        size = 48
        x1, y1 = rng.integers(0, size // 2, 2)
        x2, y2 = x1 + rng.integers(8, size // 2), y1 + rng.integers(8, size // 2)
        pixels = np.full((size, size, 3), 30, np.uint8)
        pixels[y1:y2, x1:x2] = rng.integers(150, 255, 3)
        Image.fromarray(pixels).save(folder / "images" / f"{i}.png")
        prompt = prompts[i % len(prompts)]
        obj = tokens.SegObject(
            tokens.box_to_locs((x1, y1, x2, y2), size, size),
            tuple(int(v) for v in rng.integers(0, 128, 16)),
            prompt.split(" ", 1)[1],
        )
        out.append(records.Record(f"images/{i}.png", prompt, tokens.format_suffix([obj])))
    records.write_records(records.annotations_path(folder, "train"), out)
    return folder


def make_masked_dataset(folder: Path, vae_path: Path) -> Path:
    """A converted-data folder in the real layout: images, 0/255 GT masks, VAE-token suffixes, the VAE's
    identity in conversion.json; 4 train records and 3 valid ones (one of them a negative: empty suffix,
    empty mask), images of varied sizes."""
    vae_model = vae.MaskVAE.from_npz(vae_path)
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("valid", 3)):
        out = []
        for index in range(count):
            width, height = 64 + 8 * index, 48 + 4 * index
            pixels = np.full((height, width, 3), 40, np.uint8)
            mask = np.zeros((height, width), bool)
            objects = []
            if not (split == "valid" and index == 2):
                x1, y1 = rng.integers(0, width // 2), rng.integers(0, height // 2)
                x2, y2 = x1 + rng.integers(10, width // 2), y1 + rng.integers(10, height // 2)
                pixels[y1:y2, x1:x2] = 220
                mask[y1:y2, x1:x2] = True
                seg = vae.mask_to_tokens(vae_model, mask, (x1, y1, x2, y2))
                objects.append(tokens.SegObject(tokens.box_to_locs((x1, y1, x2, y2), width, height), seg, "crack"))
            name = f"{split}_{index}"
            files.write_image(folder / "images" / f"{name}.png", Image.fromarray(pixels))
            files.write_mask(folder / "masks" / f"{name}.png", mask)
            out.append(records.Record(f"images/{name}.png", PROMPT, tokens.format_suffix(objects), f"masks/{name}.png"))
        records.write_records(records.annotations_path(folder, split), out)
    files.write_json(folder / records.CONVERSION_FILE, {"vae": identity.identify(vae_path).to_json()})
    return folder


# --- training configs and runs ---------------------------------------------------------------------------


def tiny_config(dataset: Path, out: Path, **changes) -> train_config.TrainConfig:
    values = dict(
        data=[str(dataset)],
        out=str(out),
        init="random",
        preset="tiny",
        seq_len=48,
        steps=6,
        batch_size=4,
        save_every=3,
        lr=3e-3,
        workers=0,  # no worker processes to start: tests that need them ask (tests/test_grain_input.py)
    )
    values.update(changes)
    return run_folder.resolve_config(values)


def rl_config(data: Path, init_run: Path, out: Path, **changes) -> train_config.TrainConfig:
    """GRPO from `init_run`'s latest checkpoint: 3 steps of 2 images, 4 completions each."""
    values = dict(
        data=[str(data)], out=str(out), objective="grpo", init_run=str(init_run), init_step="latest",
        trainable="all", steps=3, batch_size=2, save_every=1, lr=1e-3, workers=0, augment=False,
        grpo={"group_size": 4, "updates_per_batch": 2, "max_new_tokens": 24},
    )  # fmt: skip
    return run_folder.resolve_config({**values, **changes})


def read_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(handle)}


def train_tiny_run(root: Path) -> tuple[Path, Path, Path]:
    """(data dir, run dir with checkpoints at steps 2 and 4, VAE path): a tiny run trained in seconds."""
    vae_path = vae.write_random_npz(root / "vae.npz", seed=0)
    data = make_masked_dataset(root / "data", vae_path)
    config = run_folder.resolve_config(dict(
        data=[str(data)], out=str(root / "run"), init="random", preset="tiny", trainable="all", seq_len=48,
        steps=4, batch_size=2, save_every=2, lr=3e-3, workers=0,
    ))  # fmt: skip
    train_commands.run(config)
    return data, root / "run", vae_path


# --- jobs of several processes ---------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def run_processes(
    argv: list[str], logs: Path, processes: int = 2, devices: int = 2, timeout: float = 600, env: dict | None = None
) -> None:
    """`paliseg ARGV` as one job of `processes` processes (`devices` CPU devices each) joined by
    jax.distributed, as on hosts of a pod. Each one's output goes to a file LOGS/process_<i>.log (a pipe
    could fill while the harness waits for another process). Fails, with the logs' tails, when a process exits
    non-zero or the deadline passes (the others are stopped: they would wait for the missing one). A stopped
    process gets SIGABRT first, so its log ends with every thread's Python stack (faulthandler): where it
    waited. `env`: more environment variables."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONFAULTHANDLER="1", **(env or {}))  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    logs.mkdir(parents=True, exist_ok=True)
    started = []
    for index in range(processes):
        joined = ["--coordinator", f"localhost:{port}", "--num-processes", str(processes), "--process-id", str(index)]
        with open(logs / f"process_{index}.log", "wb") as log:
            command = [sys.executable, "-m", "paliseg.cli.main", *argv, *joined]
            started.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in started) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in started):
                break
            time.sleep(0.2)
    finally:
        for process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGABRT)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
            process.wait()
    codes = [process.returncode for process in started]
    tails = "".join(
        f"\n--- process {i} ---\n" + (logs / f"process_{i}.log").read_text(errors="replace")[-6000:]
        for i in range(processes)
    )
    assert codes == [0] * processes, (
        f"exit codes {codes} (killed: past the {timeout} s deadline, or a peer failed){tails}"
    )
