"""The training input pipeline's supply against a GPU's demand: examples/s of the loader alone (no model).

    .venv/bin/python benchmarks/input_pipeline.py [--roboflow ../shared/data/roboflow] [--photos 24] [--seconds 6]

Data: real-sized photos. The Roboflow exports beside the checkout are all 640x640, so the first `--photos`
images of each valid split (cracks: polygons; drywall: boxes; cracks/train has no COCO file) are upscaled
to 2000x1500 (PIL bilinear, saved as JPEG quality 90) with their polygons and boxes scaled alike, and
converted by `paliseg convert` (boxes as `fill` masks) with the bundled VAE (`vae.model.BUNDLED_VAE_PATH`)
into a temporary folder: 2000x1500 images and ground-truth masks, as a converted folder of phone photos.

Supply: the examples/s of `train.data.TrainData.iterate` (grain) at 224, 448 and 896 px, with photometric
augmentation only and with the token-aware geometric augmentation as well (--augment-geometric
--augment-flip: the masks cropped at full resolution and re-encoded through the run's VAE, the bundled
one), with --workers 0, 1 and 2. Beside it, the hand-written loader grain replaced (a seeded sampler and a
thread pool of PIL decodes; photometric only): its source is read at run time from git (`git show
88b4077:train/data.py`) into a module that runs on today's `paliseg`, so that the two are measured side
by side in one run without keeping dead code in the tree; this needs git and the repository's history.
Its --workers N are N threads, and its 0 is `batch(step)` in the calling thread. Each figure skips the
first workers + 1 batches (worker start-up), then counts whole batches for at least `--seconds`; the VAE's
programs are compiled before any figure (`share_vae_programs`). Workers 0 runs with every thread of this
process pinned to one core (`os.sched_setaffinity`): the supply of one CPU core. Workers 1 and 2 run
unpinned. The loaders tokenize with the bundled tiny tokenizer, once, when `TrainData` is built.

Demand: the examples/s that a PaliGemma 2 3B LoRA step consumes on one H100 at 50% MFU, 0.5 x 989e12 /
(FLOPs of one example), the FLOPs counted by `train.plan.train_flops` (XLA's cost analysis of the step
lowered with its layers unrolled on abstract params, nothing allocated, as `paliseg plan` counts them)
for the presets paligemma2-3b-224/448/896, --trainable lora, batch 1, `--seq-len` 64 text tokens.

Prints each figure as it comes, then a table: per resolution, augmentation and loader, the examples/s with
workers 0 (one core), 1 and 2, the demand, and the ratio (one core's examples/s x 8) / demand, >= 1 when
an 8-core-per-GPU host keeps the accelerator fed. Last, the worst ratio of the grain loader, with its row.
Other jobs on the machine take cores from the figures: run it alone (`flock`) for steady ones.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import jax
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import vae  # noqa: E402
from converters.convert import ConvertConfig, convert  # noqa: E402
from converters.sources import IssueLog  # noqa: E402
from paliseg import allocator  # noqa: E402
from paliseg.tokenizer import Tokenizer  # noqa: E402
from train import data as train_data  # noqa: E402
from train import plan  # noqa: E402
from train import run as run_folder  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from vae.model import BATCH_BUCKETS, BUNDLED_VAE_PATH, MASK_SIZE  # noqa: E402

OLD_LOADER = ("88b4077", "train/data.py")  # the hand-written loader, before grain
PHOTO_SIZE = (2000, 1500)
RESOLUTIONS = (224, 448, 896)
WORKERS = (0, 1, 2)
AUGMENTATIONS = {"photometric": {}, "geometric": {"augment_geometric": True, "augment_flip": True}}
# Export, COCO class -> prompt and label (the classes as the Roboflow exports name them).
EXPORTS = {
    "cracks": ("NewCracks - v2 2024-05-18 10-54pm", "segment crack", "crack"),
    "drywall": ("drywall-join", "segment taping area", "taping"),
}


def upscaled_export(source: Path, target: Path, count: int) -> Path:
    """The first `count` images of a COCO split upscaled to PHOTO_SIZE, their polygons and boxes scaled alike."""
    data = json.loads((source / "_annotations.coco.json").read_text())
    data["images"] = sorted(data["images"], key=lambda i: i["id"])[:count]
    kept = {image["id"]: image for image in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]
    scales = {}
    target.mkdir(parents=True)
    for image in data["images"]:
        with Image.open(source / image["file_name"]) as photo:
            photo.convert("RGB").resize(PHOTO_SIZE, Image.Resampling.BILINEAR).save(
                target / image["file_name"], quality=90
            )
        scales[image["id"]] = (PHOTO_SIZE[0] / image["width"], PHOTO_SIZE[1] / image["height"])
        image["width"], image["height"] = PHOTO_SIZE
    for annotation in data["annotations"]:
        sx, sy = scales[annotation["image_id"]]
        x, y, w, h = annotation["bbox"]
        annotation["bbox"] = [x * sx, y * sy, w * sx, h * sy]
        annotation["area"] = annotation["area"] * sx * sy
        annotation["segmentation"] = [
            [v * (sx if i % 2 == 0 else sy) for i, v in enumerate(polygon)] for polygon in annotation["segmentation"]
        ]
    (target / "_annotations.coco.json").write_text(json.dumps(data))
    return target


def converted_photos(roboflow: Path, work: Path, count: int) -> Path:
    """A converted training folder of 2 x `count` photos at PHOTO_SIZE (see the module docstring)."""
    # cracks/train has masks but no COCO file: the valid splits are the photos, converted as a training split.
    sources = [upscaled_export(roboflow / name / "valid", work / "exports" / name / "train", count) for name in EXPORTS]
    start = time.perf_counter()
    summary = convert(
        ConvertConfig(
            sources,
            work / "photos",
            vae=BUNDLED_VAE_PATH,
            box_masks="fill",
            prompt_map={cls: prompt for cls, prompt, _ in EXPORTS.values()},
            label_map={cls: label for cls, _, label in EXPORTS.values()},
        ),
        IssueLog(),
    )
    counts = summary["splits"]["train"]
    print(
        f"photos: {counts['images']} images at {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}, {counts['objects']} objects, "
        f"converted in {time.perf_counter() - start:.0f} s"
    )
    return work / "photos"


def old_loader() -> ModuleType:
    """The hand-written loader's `train/data.py`, read from git into a module (see the module docstring)."""
    commit, path = OLD_LOADER
    try:
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{commit}:{path}"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        detail = error.stderr.strip() if isinstance(error, subprocess.CalledProcessError) else error
        sys.exit(f"the old loader is read from git (`git show {commit}:{path}`), which failed: {detail}")
    spec = importlib.util.spec_from_loader("old_train_data", loader=None, origin=f"{commit}:{path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, spec.origin, "exec"), module.__dict__)
    return module


def loader_config(data: Path, work: Path, batch_size: int, **changes) -> TrainConfig:
    """A run's settings for the loader; 256 tokens hold every example in the tiny tokenizer's pieces."""
    values = dict(
        data=[str(data)], out=str(work / "run"), init="random", preset="tiny", seq_len=256, batch_size=batch_size
    )
    return run_folder.resolve_config({**values, **changes})


@contextlib.contextmanager
def pinned_to_one_core() -> Iterator[None]:
    """Every thread of this process (and those they start meanwhile) on one core of its allowed set."""
    allowed = os.sched_getaffinity(0)
    _set_affinity({min(allowed)})
    try:
        yield
    finally:
        _set_affinity(allowed)


def _set_affinity(cores: set[int]) -> None:
    for thread in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(thread), cores)


def examples_per_second(batches: Iterator, warmup: int, seconds: float) -> float:
    """Examples/s over whole batches after `warmup` batches, for at least `seconds` and 3 batches."""
    for _ in range(warmup):
        next(batches)
    start, examples, count = time.perf_counter(), 0, 0
    while count < 3 or time.perf_counter() - start < seconds:
        _, ids, _ = next(batches)
        examples += ids.size
        count += 1
    return examples / (time.perf_counter() - start)


def measure(loader: ModuleType, config: TrainConfig, tokenizer, size: int, seconds: float) -> float:
    if loader is train_data:
        batches = train_data.TrainData(config, tokenizer, size, vae_path=BUNDLED_VAE_PATH).iterate(0, 10**9)
    else:
        data = loader.TrainData(config, tokenizer, size)
        if config.workers == 0:  # the old loader's in-thread path (its pool needs a thread)
            batches = ((step, data.example_ids(step), data.batch(step)) for step in range(10**9))
        else:
            batches = data.iterate(0, 10**9)
    try:
        return examples_per_second(batches, config.workers + 1, seconds)
    finally:
        batches.close()


def flops_per_example(size: int, seq_len: int) -> float:
    """The FLOPs of a PaliGemma 2 3B LoRA step on one example (see the module docstring)."""
    preset = f"paligemma2-3b-{size}"
    config = run_folder.resolve_config(
        dict(
            data=["unused"], out="unused", init="random", preset=preset, trainable="lora", batch_size=1, seq_len=seq_len
        )
    )
    return plan.train_flops(config)


def share_vae_programs(cache: Path) -> None:
    """The geometric augmentation encodes with the VAE in whichever process loads. Its programs, one per batch
    bucket, are compiled here into a persistent compilation cache that the grain workers (spawned, with this
    environment) read, so that no figure counts an XLA compile."""
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    model = vae.load(BUNDLED_VAE_PATH)
    for bucket in BATCH_BUCKETS:
        model.encode(np.zeros((bucket, MASK_SIZE, MASK_SIZE), np.float32))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roboflow", type=Path, default=REPO.parent / "shared" / "data" / "roboflow")
    parser.add_argument("--photos", type=int, default=24, help="photos taken from each export")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0, help="measured time per figure, after warm-up")
    parser.add_argument("--seq-len", type=int, default=64, help="text tokens of the demand's step")
    parser.add_argument("--cores-per-gpu", type=int, default=8)
    args = parser.parse_args()
    allocator.ensure()  # PALISEG_TUNE_MALLOC=1, as for the `paliseg` command (paliseg/allocator.py)
    old = old_loader()
    h100, mfu = plan.accelerator("H100"), 0.5

    rows = []  # (size, augmentation, loader name, {workers: examples/s})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        share_vae_programs(work / "jax-cache")
        demands = {}
        for size in RESOLUTIONS:
            flops = flops_per_example(size, args.seq_len)
            demands[size] = mfu * h100.bf16_flops / flops
            print(
                f"demand at {size} px: {flops / 1e12:.2f} TFLOP per example, {demands[size]:.1f} examples/s "
                f"(PaliGemma 2 3B LoRA, H100 at {mfu:.0%} MFU)"
            )
        photos = converted_photos(args.roboflow, work, args.photos)
        for size in RESOLUTIONS:
            for augmentation, flags in AUGMENTATIONS.items():
                for name, loader in (("old (threads)", old), ("grain", train_data)):
                    if loader is old and flags:
                        continue  # the old loader had photometric jitter only
                    rates = {}
                    for workers in WORKERS:
                        config = loader_config(photos, work, args.batch_size, workers=workers, **flags)
                        tokenizer = Tokenizer(run_folder.model_config(config).tokenizer_path)
                        with pinned_to_one_core() if workers == 0 else contextlib.nullcontext():
                            rates[workers] = measure(loader, config, tokenizer, size, args.seconds)
                        where = "one core" if workers == 0 else "unpinned"
                        rate = f"{rates[workers]:.1f} examples/s"
                        print(f"{size} px {augmentation:11} {name:13} workers {workers} ({where}): {rate}", flush=True)
                    rows.append((size, augmentation, name, rates))

    print()
    print(f"| px | augmentation | loader | w0 (1 core) | w1 | w2 | demand | 1 core x {args.cores_per_gpu} / demand |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for size, augmentation, name, rates in rows:
        ratio = rates[0] * args.cores_per_gpu / demands[size]
        if name == "grain":
            ratios.append((ratio, size, augmentation))
        print(
            f"| {size} | {augmentation} | {name} | {rates[0]:.1f} | {rates[1]:.1f} | {rates[2]:.1f} | "
            f"{demands[size]:.1f} | {ratio:.2f} |"
        )
    ratio, size, augmentation = min(ratios)
    print(
        f"worst supply/demand ({args.cores_per_gpu} cores per GPU): {ratio:.2f} at {size} px, {augmentation} "
        "(goal >= 1.0)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
