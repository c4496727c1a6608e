"""GRPO's gain on the demo's task: mask mIoU of the synthetic valid split at the supervised best step and
after reinforcement fine-tuning from it (`paliseg train --objective grpo`), overall and per class, with the
reward-vs-step plot; the gain is printed last.

    .venv/bin/paliseg demo --out demo_out                       # once: the supervised run to start from
    .venv/bin/python benchmarks/grpo_gain.py --demo demo_out [--steps 400] [--lr 3e-4] ...

The GRPO run goes to DEMO/grpo_gain/run, its report (every checkpoint and step 0, the starting point,
scored by `paliseg eval`'s sweep with the demo's VAE) to DEMO/grpo_gain/report, the plot to
DEMO/grpo_gain/reward_vs_step.png. "after" is the sweep's best GRPO step (picked on the split it reports,
as the demo picks the supervised best step) and the last step is printed too. Timings are wall-clock on
this machine: say whether it was quiet.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infer import sweep
from paliseg import files
from train import config as train_config
from train import grpo, trainer
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


def trained_seconds(run_dir: Path, step: int) -> float:
    """The run's wall-clock training time up to `step`, from its metrics.csv (elapsed_s restarts on resume)."""
    import csv

    with open(run_dir / trainer.METRICS_FILE, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= step]
    restarts = [i for i in range(1, len(rows)) if float(rows[i]["elapsed_s"]) < float(rows[i - 1]["elapsed_s"])]
    ends = [i - 1 for i in restarts] + [len(rows) - 1]
    return round(sum(float(rows[i]["elapsed_s"]) for i in ends), 1) if rows else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True, help="a finished `paliseg demo` folder (run/ with best.json)")
    parser.add_argument("--out", help="where the GRPO run and report go (default: DEMO/grpo_gain)")
    parser.add_argument("--init-step", default="best")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-fraction", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--kl-coef", type=float, default=0.0)
    parser.add_argument("--updates", type=int, default=1, help="--grpo-updates-per-batch")
    parser.add_argument("--trainable", default="all", choices=train_config.TRAINABLE_SETS)
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
                 "updates_per_batch": args.updates}}  # fmt: skip
    resume = (out / "run" / "config.json").exists()  # continue an interrupted benchmark with the same settings
    if resume:  # --init-step was recorded as a number
        saved = Run(out / "run").train_config
        config = train_config.check_resume(saved, {k: v for k, v in requested.items() if k != "init_step"})
    else:
        config = train_config.resolve(requested)
    print(f"GRPO from {demo / 'run'} step {config.init_step}: {args.steps} steps of {args.batch_size} prompts x "
          f"{args.group_size} samples, lr {args.lr}, kl {args.kl_coef}, trainable {args.trainable}", flush=True)  # fmt: skip
    started = time.perf_counter()
    if not args.eval_only:
        trainer.run(config, resume=resume)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    report = sweep.evaluate_run(
        run_dir=out / "run", data_dir=data, out_dir=out / "report", split="valid", vae_path=BUNDLED_VAE_PATH,
        overwrite=True,
    )  # fmt: skip
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
    files.write_json(out / "grpo_gain.json", results)
    print(json.dumps({k: v for k, v in results.items() if k not in ("before", "after", "last")}))
    print(f"training {results['trained_s'] / 60:.1f} min to step {last} (this session {train_s / 60:.1f} min), eval "
          f"{eval_s / 60:.1f} min; reward plot {plot}")  # fmt: skip
    print(f"{'class':<12} {'before':>8} {'after':>8} {'last':>8}")
    for name in before["per_class"]:
        print(
            f"{name:<12} {before['per_class'][name]:8.3f} {after['per_class'][name]:8.3f} {final['per_class'][name]:8.3f}"
        )
    print(f"{'box mIoU':<12} {before['box_miou']:8.3f} {after['box_miou']:8.3f} {final['box_miou']:8.3f}")
    print(f"{'mIoU':<12} {before['miou']:8.3f} {after['miou']:8.3f} {final['miou']:8.3f}")
    print(
        f"gain: mask mIoU {before['miou']:.3f} (supervised step {config.init_step}) -> {after['miou']:.3f} "
        f"(GRPO step {report['best']['step']}): {after['miou'] - before['miou']:+.3f}"
    )


if __name__ == "__main__":
    main()
