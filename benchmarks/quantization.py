"""What quantizing the frozen base costs in quality, on the demo's tiny model (trained from scratch).

    .venv/bin/python benchmarks/quantization.py [--out /tmp/paliseg_quantization] [--demo DEMO_OUT]

Uses the output of `paliseg demo --quick` (run here into OUT/demo unless --demo names one) and prints:

A fresh validation split of the demo's task (`--valid-images`, 240 by default, seed 1: the demo's own 24
images move the mIoU in steps of ~0.02 per image) is converted into OUT/valid, and all figures are on it:

1. logit error and greedy agreement of `--quantize int8` and `nf4` against the unquantized model (all with
   bfloat16 matmuls, `--dtype bfloat16`), on the validation records: teacher-forced on the ground-truth
   suffix, the relative RMS and the largest absolute logit error and the share of positions whose top token
   agrees; free-running greedy decoding (as `paliseg predict`), the share of identical texts and of tokens
   that agree position by position;
2. the mask mIoU of the demo's best checkpoint on that split (`paliseg eval --dtype bfloat16 [--quantize Q]`):
   goals, int8 within 0.01 of bf16, nf4 within 0.03;
3. a LoRA fine-tune over an NF4 base against the same fine-tune over the bf16 base (`paliseg train
   --checkpoint BASE --trainable lora --dtype bfloat16 [--base-dtype nf4]`), BASE being the demo's first
   checkpoint (trained in float32, the 1st quarter of its schedule), each scored on its own base: goal,
   within 0.03 mIoU.

The largest mIoU drop is printed last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from infer import sweep  # noqa: E402
from infer.config import DecodingSettings, EvalSettings  # noqa: E402
from infer.predictor import Predictor  # noqa: E402
from paliseg import checkpoints, images, model, records, settings  # noqa: E402
from paliseg.cli.main import main as paliseg_main  # noqa: E402
from train import commands as train_commands  # noqa: E402
from train import run as run_folder  # noqa: E402
from train.run import Run  # noqa: E402
from vae.model import BUNDLED_VAE_PATH  # noqa: E402

FORMATS = ("int8", "nf4")
GOALS = {"int8": 0.01, "nf4": 0.03, "lora over nf4": 0.03}


def demo_folder(out: Path, demo: Path | None) -> Path:
    if demo is not None:
        return demo
    demo = out / "demo"
    if not (demo / "run" / "best.json").is_file():
        flags = ["--resume"] if demo.exists() else []
        assert paliseg_main(["demo", "--quick", "--out", str(demo), *flags]) == 0
    return demo


def validation_data(out: Path, count: int) -> Path:
    """A converted folder whose valid split is `count` new images of the demo's task (its DemoPlan, seed 1)."""
    from converters import synthetic
    from converters.convert import ConvertConfig, convert
    from paliseg.cli.demo import QUICK

    data = out / "valid" / "data"
    if (data / records.CONVERSION_FILE).is_file():
        return data
    shapes = synthetic.ShapesConfig(image_size=QUICK.image_size, classes=QUICK.classes, objects_per_image=(1, 1),
                                    object_scale=QUICK.object_scale, grid=QUICK.grid)  # fmt: skip
    export = out / "valid" / "export"
    synthetic.write_synthetic_coco(export, n_train=1, n_valid=count, config=shapes, seed=1, overwrite=True)
    convert(ConvertConfig(sources=[export], out=data, vae=str(BUNDLED_VAE_PATH), negatives=False, overwrite=True))
    return data


def valid_items(data: Path, predictor: Predictor):
    """(images [N,S,S,3], prompts, suffixes) of the validation records of `data`."""
    items = records.read_records(records.annotations_path(data, "valid"))
    pixels = np.stack([predictor.preprocess(images.read_image(data / item.image)) for item in items])
    return pixels, [item.prefix for item in items], [item.suffix for item in items]


def teacher_forced_logits(
    predictor: Predictor, images, prompts, suffixes, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Logits of every suffix position (teacher-forced on the ground truth) and the mask of those positions."""
    encoded = [predictor.tokenizer.encode_example(p, s, seq_len) for p, s in zip(prompts, suffixes)]
    batch = {key: np.stack([e[key] for e in encoded]) for key in ("tokens", "mask_ar", "mask_input", "mask_loss")}
    logits = model.forward(predictor.config, predictor.params, images, batch["tokens"][:, :-1],
                           batch["mask_ar"][:, :-1], batch["mask_input"][:, :-1])  # fmt: skip
    return np.asarray(logits, np.float32), batch["mask_loss"][:, 1:].astype(bool)


def greedy_agreement(reference: list[str], other: list[str], tokenizer) -> tuple[float, float]:
    """(share of identical texts, share of reference token positions where `other` has the same token)."""
    same = agree = total = 0
    for a, b in zip(reference, other):
        same += a == b
        ids_a, ids_b = tokenizer.encode(a), tokenizer.encode(b)
        agree += sum(x == y for x, y in zip(ids_a, ids_b))
        total += max(len(ids_a), len(ids_b), 1)
    return same / len(reference), agree / total


def mask_miou(run: Run, data: Path, out: Path, step: int, quantize: str | None, dtype: str | None) -> float:
    report = sweep.evaluate_run(EvalSettings(
        run_dir=run, data=data, out=out, steps=str(step), base=False, ceiling=False, canvases=0, overwrite=True,
        decoding=DecodingSettings(vae=BUNDLED_VAE_PATH, dtype=dtype, quantize=quantize),
    ))  # fmt: skip
    [result] = report["steps"]
    if result["status"] != "ok":
        raise RuntimeError(f"step {step}: {result['error']}")
    return float(result["summary"]["overall"]["miou"])


def lora_finetune(demo: Path, out: Path, base: Path, base_dtype: str | None, steps: int) -> Run:
    run_dir = out / f"lora_{base_dtype or 'bf16'}"
    config = run_folder.resolve_config({
        "data": [str(demo / "data" / "shapes")], "out": str(run_dir), "checkpoint": str(base), "preset": "tiny",
        "trainable": "lora", "dtype": "bfloat16", "quantization": {"format": base_dtype}, "steps": steps,
        "save_every": steps, "batch_size": 16, "seq_len": 32, "lr": 3e-3, "warmup_fraction": 0.05,
        "lora": {"rank": 16}, "remat": False, "seed": 0,
    })  # fmt: skip
    print(f"$ paliseg train {' '.join(settings.to_argv(config))}", flush=True)
    started = (run_dir / "config.json").exists()
    if not started or Run(run_dir).steps[-1:] != [steps]:
        train_commands.run(config, resume=started)
    return Run(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/paliseg_quantization"))
    parser.add_argument("--demo", type=Path, help="an existing `paliseg demo --quick` output folder")
    parser.add_argument("--lora-steps", type=int, default=150)
    parser.add_argument("--valid-images", type=int, default=240)
    args = parser.parse_args()
    started = time.perf_counter()
    demo = demo_folder(args.out, args.demo)
    run = Run(demo / "run")
    # the demo's eval chose the best step; each sweep below records its own in RUN_DIR/best.json, so the
    # demo's choice is read from its report and put back at the end
    demo_best = json.loads((demo / "report" / "report.json").read_text())["best"]
    best = demo_best["step"]
    print(f"demo run {run.dir}: best step {best} of {run.steps}; jax on {jax.devices()[0].device_kind}", flush=True)

    # 1. logit error and greedy agreement, bf16 matmuls throughout
    reference = Predictor.from_run(run, best, dtype="bfloat16")
    valid = validation_data(args.out, args.valid_images)
    images, prompts, suffixes = valid_items(valid, reference)
    seq_len = run.train_config.seq_len
    ref_logits, positions = teacher_forced_logits(reference, images, prompts, suffixes, seq_len)
    ref_texts = [d.text for d in reference.decode_texts(images, prompts)]
    ref_rows = ref_logits[positions]
    for fmt in FORMATS:
        quantized = Predictor.from_run(run, best, dtype="bfloat16", quantize=fmt)
        rows = teacher_forced_logits(quantized, images, prompts, suffixes, seq_len)[0][positions]
        error = rows - ref_rows
        rel_rms = np.sqrt(np.mean(error**2)) / np.sqrt(np.mean((ref_rows - ref_rows.mean(-1, keepdims=True)) ** 2))
        top1 = np.mean(rows.argmax(-1) == ref_rows.argmax(-1))
        texts = [d.text for d in quantized.decode_texts(images, prompts)]
        identical, tokens = greedy_agreement(ref_texts, texts, reference.tokenizer)
        print(
            f"{fmt}: logits vs bf16 on {len(prompts)} validation records ({positions.sum()} suffix positions): "
            f"relative RMS error {rel_rms:.4f}, max |error| {np.abs(error).max():.4f}, top-1 agreement "
            f"{top1:.4f}; greedy decoding: {identical:.3f} of the texts identical, {tokens:.4f} of the tokens agree",
            flush=True,
        )

    # 2. mask mIoU of the best checkpoint
    miou = {"bf16": mask_miou(run, valid, args.out / "eval_bf16", best, None, "bfloat16")}
    for fmt in FORMATS:
        miou[fmt] = mask_miou(run, valid, args.out / f"eval_{fmt}", best, fmt, "bfloat16")
    float32 = mask_miou(run, valid, args.out / "eval_f32", best, None, None)
    print(f"(for scale: the same step in float32, the dtype it trained in: mIoU {float32:.4f})", flush=True)
    drops = {}
    for fmt in FORMATS:
        drops[fmt] = miou["bf16"] - miou[fmt]
        print(
            f"mIoU of step {best} on the {len(prompts)} validation records: bf16 {miou['bf16']:.4f}, --quantize "
            f"{fmt} {miou[fmt]:.4f} (drop {drops[fmt]:+.4f}, goal < {GOALS[fmt]})",
            flush=True,
        )

    # 3. LoRA over an NF4 base vs over the bf16 base, from the demo's first checkpoint
    first = run.steps[0]
    base_path = args.out / f"base_step{first}"
    if not base_path.exists():
        base_cfg, base_params = run.load(first)
        checkpoints.save(base_path, base_params, base_cfg)
    print(f"LoRA fine-tunes ({args.lora_steps} steps) from {base_path} (the demo's step {first})", flush=True)
    lora_miou = {}
    for base_dtype in (None, "nf4"):
        lora_run = lora_finetune(demo, args.out, base_path, base_dtype, args.lora_steps)
        lora_miou[base_dtype or "bf16"] = mask_miou(
            lora_run, valid, args.out / f"eval_lora_{base_dtype or 'bf16'}", lora_run.steps[-1], None, None
        )
    drops["lora over nf4"] = lora_miou["bf16"] - lora_miou["nf4"]
    start_miou = mask_miou(run, valid, args.out / "eval_base", first, None, "bfloat16")
    print(
        f"LoRA fine-tune mIoU (from {start_miou:.4f} at the demo's step {first}): over the bf16 base "
        f"{lora_miou['bf16']:.4f}, over an nf4 base {lora_miou['nf4']:.4f} (drop {drops['lora over nf4']:+.4f}, "
        f"goal < {GOALS['lora over nf4']})",
        flush=True,
    )
    run.record_best(demo_best)
    print(f"({time.perf_counter() - started:.0f} s in all)")
    worst = max(drops, key=drops.get)
    print(f"largest mIoU drop: {drops[worst]:+.4f} ({worst}; goal < {GOALS[worst]})")


if __name__ == "__main__":
    main()
