"""GRPO's gain on the demo's task: mask mIoU of the synthetic valid split at the supervised best step and
after reinforcement fine-tuning from it (`paliseg train --objective grpo`), overall and per class, with the
reward-vs-step plot; the gain is printed last.

    .venv/bin/paliseg demo --out demo_out                       # once: the supervised run to start from
    .venv/bin/python benchmarks/grpo_gain.py --demo demo_out [--steps 400] [--lr 3e-4] ...   # defaults: demo --rl's

The GRPO run goes to DEMO/grpo_gain/run, its report (every checkpoint and step 0, the starting point,
scored by `paliseg eval`'s sweep with the demo's VAE) to DEMO/grpo_gain/report, the plot to
DEMO/grpo_gain/reward_vs_step.png. "after" is the sweep's best GRPO step (picked on the split it reports,
as the demo picks the supervised best step) and the last step is printed too. Timings are wall-clock on
this machine: say whether it was quiet.

The demo's valid split is small (48 images: one mIoU is +-0.03 of the next draw's), and picking the best
step on it flatters "after". So the same steps are also scored on a larger valid split of the same task
(--valid-images, default 480: the demo's generator grown, its first images the demo's own), where
"after" is the step the demo's split picked: the gain a user can expect.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters import synthetic
from converters.convert import ConvertConfig, convert
from infer import sweep
from infer.config import DecodingSettings, EvalSettings
from paliseg import files
from paliseg.cli.demo import FULL_RL, DemoPlan
from train import commands as train_commands
from train import config as train_config
from train import grpo
from train import run as run_folder
from train.run import Run
from vae.model import BUNDLED_VAE_PATH


def figures(report: dict, step: int) -> dict:
    summary = next(s["summary"] for s in report["steps"] if s["step"] == step and s["summary"])
    return {
        "miou": summary["overall"]["miou"],
        "box_miou": summary["overall"]["box_miou"],
        "per_class": {
            prompt.removeprefix("segment "): stats["miou"] for prompt, stats in summary["per_prompt"].items()
        },
    }


def larger_valid_split(demo: Path, out: Path, images: int) -> Path:
    """The demo's synthetic valid split grown to `images` (image i of a split depends only on the seed, the
    split and i, so the first are the demo's own), converted as the demo converts it: the data folder."""
    plan = DemoPlan.from_json(json.loads((demo / "demo.json").read_text())["plan"])
    synthetic.write_synthetic_coco(out / "export", 0, images, plan.shapes, plan.seed, overwrite=True)
    convert(ConvertConfig(sources=[out / "export"], out=out / "data", vae=str(BUNDLED_VAE_PATH), negatives=False,
                          overwrite=True))  # fmt: skip
    return out / "data"


def trained_seconds(run_dir: Path, step: int) -> float:
    """The run's wall-clock training time up to `step`, from its metrics.csv (elapsed_s restarts on resume)."""
    import csv

    with open(run_dir / run_folder.METRICS_FILE, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= step]
    restarts = [i for i in range(1, len(rows)) if float(rows[i]["elapsed_s"]) < float(rows[i - 1]["elapsed_s"])]
    ends = [i - 1 for i in restarts] + [len(rows) - 1]
    return round(sum(float(rows[i]["elapsed_s"]) for i in ends), 1) if rows else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True, help="a finished `paliseg demo` folder (run/ with best.json)")
    parser.add_argument("--out", help="where the GRPO run and report go (default: DEMO/grpo_gain)")
    parser.add_argument("--init-step", default="best")
    plan = FULL_RL  # the defaults: the demo's --rl stage
    parser.add_argument("--steps", type=int, default=plan.steps)
    parser.add_argument("--save-every", type=int, default=plan.save_every)
    parser.add_argument("--batch-size", type=int, default=plan.batch_size, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=plan.group_size)
    parser.add_argument("--lr", type=float, default=plan.lr)
    parser.add_argument("--warmup-fraction", type=float, default=plan.warmup_fraction)
    parser.add_argument("--temperature", type=float, default=plan.temperature)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--kl-coef", type=float, default=plan.kl_coef)
    parser.add_argument("--updates", type=int, default=1, help="--grpo-updates-per-batch")
    parser.add_argument(
        "--keep",
        type=int,
        default=plan.keep,
        help="--grpo-keep: update on the K best and worst of each group (0: on all)",
    )
    parser.add_argument("--trainable", default="all", choices=train_config.TRAINABLE_SETS)
    parser.add_argument(
        "--valid-images", type=int, default=480, help="the larger valid split's size (0: score the demo's only)"
    )
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier --out first")
    parser.add_argument(
        "--eval-only", action="store_true", help="score the checkpoints an interrupted run saved, without training on"
    )
    args = parser.parse_args()

    demo = Path(args.demo)
    out = Path(args.out) if args.out else demo / "grpo_gain"
    if out.exists() and args.overwrite:
        shutil.rmtree(out)
    data = demo / "data" / "shapes"
    requested = {
        "data": [str(data)], "out": str(out / "run"), "objective": "grpo", "init_run": str(demo / "run"),
        "init_step": args.init_step, "trainable": args.trainable, "steps": args.steps, "batch_size": args.batch_size,
        "lr": args.lr, "warmup_fraction": args.warmup_fraction, "save_every": args.save_every, "remat": False,
        "grpo": {"group_size": args.group_size, "temperature": args.temperature, "top_p": args.top_p, "kl_coef": args.kl_coef,
                 "updates_per_batch": args.updates, "keep": args.keep or None}}  # fmt: skip
    resume = (out / "run" / "config.json").exists()  # continue an interrupted benchmark with the same settings
    if resume:  # --init-step was recorded as a number
        saved = Run(out / "run").train_config
        config = train_config.check_resume(saved, {k: v for k, v in requested.items() if k != "init_step"})
    else:
        config = run_folder.resolve_config(requested)
    print(f"GRPO from {demo / 'run'} step {config.init_step}: {args.steps} steps of {args.batch_size} prompts x "
          f"{args.group_size} samples, lr {args.lr}, kl {args.kl_coef}, trainable {args.trainable}", flush=True)  # fmt: skip
    started = time.perf_counter()
    if not args.eval_only:
        train_commands.run(config, resume=resume)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    large = None
    if args.valid_images:  # first: the demo split's sweep below records the run's best step
        large_data = larger_valid_split(demo, out / "valid_large", args.valid_images)
        large = sweep.evaluate_run(EvalSettings(
            run_dir=out / "run", data=large_data, out=out / "report_large", decoding=DecodingSettings(vae=BUNDLED_VAE_PATH),
            overwrite=True, ceiling=False, canvases=0,
        ))  # fmt: skip
    report = sweep.evaluate_run(EvalSettings(
        run_dir=out / "run", data=data, out=out / "report", decoding=DecodingSettings(vae=BUNDLED_VAE_PATH),
        overwrite=True,
    ))  # fmt: skip
    eval_s = time.perf_counter() - started
    plot = grpo.reward_plot(out / "run", out / "reward_vs_step.png")
    last = Run(out / "run").steps[-1]
    before, after, final = figures(report, 0), figures(report, report["best"]["step"]), figures(report, last)
    results = {
        "init_step": int(config.init_step), "best_step": report["best"]["step"], "last_step": last,
        "before": before, "after": after, "last": final, "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
        "trained_s": trained_seconds(out / "run", last),
        "settings": vars(args), "plot": str(plot),
    }  # fmt: skip
    if large:
        results["larger_valid_split"] = {
            "images": args.valid_images, "before": figures(large, 0), "after": figures(large, report["best"]["step"]),
            "last": figures(large, last), "its_best_step": large["best"]["step"],
            "its_best": figures(large, large["best"]["step"]),
        }  # fmt: skip
    files.write_json(out / "grpo_gain.json", results)
    print(json.dumps({k: v for k, v in results.items() if k not in ("before", "after", "last", "larger_valid_split")}))
    print(f"training {results['trained_s'] / 60:.1f} min to step {last} (this session {train_s / 60:.1f} min), eval "
          f"{eval_s / 60:.1f} min; reward plot {plot}")  # fmt: skip
    print(f"{'class':<12} {'before':>8} {'after':>8} {'last':>8}")
    for name in before["per_class"]:
        print(
            f"{name:<12} {before['per_class'][name]:8.3f} {after['per_class'][name]:8.3f} {final['per_class'][name]:8.3f}"
        )
    print(f"{'box mIoU':<12} {before['box_miou']:8.3f} {after['box_miou']:8.3f} {final['box_miou']:8.3f}")
    print(f"{'mIoU':<12} {before['miou']:8.3f} {after['miou']:8.3f} {final['miou']:8.3f}")
    if large:
        big = results["larger_valid_split"]
        print(f"larger valid split ({args.valid_images} images), the same steps:")
        for name in before["per_class"]:
            print(f"{name:<12} " + " ".join(f"{big[k]['per_class'][name]:8.3f}" for k in ("before", "after", "last")))
        print(f"{'mIoU':<12} " + " ".join(f"{big[k]['miou']:8.3f}" for k in ("before", "after", "last"))
              + f"   (its own best: step {big['its_best_step']}, {big['its_best']['miou']:.3f})")  # fmt: skip
        print(f"gain on the larger split: {big['before']['miou']:.3f} -> {big['after']['miou']:.3f}: "
              f"{big['after']['miou'] - big['before']['miou']:+.3f}")  # fmt: skip
    print(
        f"gain: mask mIoU {before['miou']:.3f} (supervised step {config.init_step}) -> {after['miou']:.3f} "
        f"(GRPO step {report['best']['step']}): {after['miou'] - before['miou']:+.3f}"
    )


if __name__ == "__main__":
    main()
