"""The mask loss's gain on the demo's task: the demo's supervised recipe without and with
`--mask-loss-weight W` (same steps, seed and data), scored on the 480-image valid split of the same task,
overall and per class; `--grpo` then runs the demo's GRPO stage from each one's best step. The supervised
gain is printed last.

    .venv/bin/paliseg demo --out demo_out          # once: the data, and the run without the mask loss
    .venv/bin/python benchmarks/mask_loss_gain.py --demo demo_out [--weight 1] [--mask-loss dice|bce] \
        [--mask-loss-codes straight-through|expected] [--grpo]

"without" is the demo's own run (the recipe with W = 0: exactly today's token loss) when the steps and
checkpoints asked for are the demo's; otherwise (`--steps N`, a short check) it is trained too, in
OUT/without. "with" is trained in OUT/with. Each run's best step is picked on the demo's 48 valid images (as
the demo picks it) and scored on the larger split (`benchmarks/grpo_gain.py`'s: the demo's generator grown
to --valid-images, its first images the demo's own), where the gain a user can expect is read. Each run's
report on the demo's split (OUT/report_<run>/, with canvases) shows the change. Timings are wall-clock on
this machine: say whether it was quiet. Default run: about 2 x the demo's training time plus evaluation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_gain import figures, larger_valid_split, trained_seconds

from infer import sweep
from infer.config import DecodingSettings, EvalSettings
from paliseg import files
from paliseg.cli.demo import FULL_RL, DemoPlan
from train import commands as train_commands
from train import run as run_folder
from train.run import Run, is_run
from vae.model import BUNDLED_VAE_PATH


def train(settings: dict, out: Path) -> float:
    """Train (or finish an interrupted) run of `settings` in `out`; the seconds this session took."""
    started = time.perf_counter()
    resume = is_run(out)
    config = Run(out).train_config if resume else run_folder.resolve_config({**settings, "out": str(out)})
    train_commands.run(config, resume=resume)
    return time.perf_counter() - started


def score(run_dir: Path, demo_data: Path, large_data: Path, out: Path, name: str) -> dict:
    """The run's steps on the larger split, then on the demo's (which records its best step, as the demo
    does); the figures at the step the demo's split picks, on both."""
    decoding = DecodingSettings(vae=BUNDLED_VAE_PATH)
    large = sweep.evaluate_run(EvalSettings(run_dir=run_dir, data=large_data, out=out / f"report_{name}_large",
                                            decoding=decoding, overwrite=True, ceiling=False, canvases=0))  # fmt: skip
    report = sweep.evaluate_run(
        EvalSettings(run_dir=run_dir, data=demo_data, out=out / f"report_{name}", decoding=decoding, overwrite=True)
    )
    picked = report["best"]["step"]
    return {
        "picked_step": picked,
        "demo_split": figures(report, picked),
        "large_split": figures(large, picked),
        "large_split_own_best": {"step": large["best"]["step"], **figures(large, large["best"]["step"])},
        "trained_s": trained_seconds(run_dir, Run(run_dir).steps[-1]),
        "report": str(out / f"report_{name}" / "report.md"),
    }


def table(title: str, rows: dict[str, dict]) -> None:
    names = list(rows)
    print(f"{title}\n{'class':<12} " + " ".join(f"{name:>10}" for name in names))
    for prompt in rows[names[0]]["per_class"]:
        print(f"{prompt:<12} " + " ".join(f"{rows[name]['per_class'][prompt]:10.3f}" for name in names))
    print(f"{'box mIoU':<12} " + " ".join(f"{rows[name]['box_miou']:10.3f}" for name in names))
    print(f"{'mIoU':<12} " + " ".join(f"{rows[name]['miou']:10.3f}" for name in names))


def compare(demo: Path, out: Path, changes: dict, label: str, args: argparse.Namespace) -> dict[str, dict]:
    """Train the demo's recipe with `changes` (and, for a short check, without them), score both runs as the
    demo picks their best step, on its split and the larger one; print the table, the supervised change last.
    Returns each run's figures ("without", "with", and with --grpo "grpo_without", "grpo_with"). `args`:
    --steps, --save-every, --valid-images, --grpo (the other benchmarks that compare a recipe change share
    them)."""
    plan = DemoPlan.from_json(json.loads((demo / "demo.json").read_text())["plan"])
    steps, save_every = args.steps or plan.steps, args.save_every or plan.save_every
    demo_data = demo / "data" / "shapes"
    recipe = {**plan.train_settings(demo_data, out), "steps": steps, "save_every": save_every}
    runs = {"without": demo / "run" if (steps, save_every) == (plan.steps, plan.save_every) else out / "without",
            "with": out / "with"}  # fmt: skip
    print(f"the demo's recipe ({steps} steps of {plan.batch_size}, lr {plan.lr}, seed {plan.seed}) as it is "
          f"({runs['without']}) and with {label} ({runs['with']})", flush=True)  # fmt: skip
    session_s = {}
    if runs["without"] != demo / "run":
        session_s["without"] = train(recipe, runs["without"])
    session_s["with"] = train({**recipe, **changes}, runs["with"])
    large_data = larger_valid_split(demo, out / "valid_large", args.valid_images)
    results = {name: score(run_dir, demo_data, large_data, out, name) for name, run_dir in runs.items()}
    if args.grpo:
        for name, run_dir in runs.items():
            rl_dir = out / f"grpo_{name}"
            session_s[f"grpo_{name}"] = train(FULL_RL.train_settings(demo_data, run_dir, rl_dir, plan.seed), rl_dir)
            results[f"grpo_{name}"] = score(rl_dir, demo_data, large_data, out, f"grpo_{name}")
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    summary = {"settings": settings, "session_s": {k: round(v, 1) for k, v in session_s.items()}, **results}
    files.write_json(out / "gain.json", summary)

    for name, result in results.items():
        print(f"{name}: trained {result['trained_s'] / 60:.1f} min; best step {result['picked_step']} (picked on the "
              f"demo's split: mIoU {result['demo_split']['miou']:.3f}); on the larger split its own best is step "
              f"{result['large_split_own_best']['step']} ({result['large_split_own_best']['miou']:.3f}); "
              f"report {result['report']}")  # fmt: skip
    table(f"larger valid split ({args.valid_images} images), each run's picked step:",
          {name: result["large_split"] for name, result in results.items()})  # fmt: skip
    if args.grpo:
        before, after = results["grpo_without"]["large_split"]["miou"], results["grpo_with"]["large_split"]["miou"]
        print(f"after GRPO: mask mIoU {before:.3f} -> {after:.3f}: {after - before:+.3f}")
    before, after = results["without"]["large_split"]["miou"], results["with"]["large_split"]["miou"]
    print(f"supervised change with {label}: mask mIoU {before:.3f} -> {after:.3f} on {args.valid_images} valid "
          f"images: {after - before:+.3f}")  # fmt: skip
    return results


def arguments(description: str, default_out: str) -> argparse.ArgumentParser:
    """The options every recipe comparison takes (`compare`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True, help="a finished `paliseg demo` folder (data/shapes, run/, demo.json)")
    parser.add_argument("--out", help=f"where the runs and reports go (default: DEMO/{default_out})")
    parser.add_argument("--steps", type=int, help="optimizer steps of both runs (default: the demo's)")
    parser.add_argument("--save-every", type=int, help="checkpoint every N steps (default: the demo's)")
    parser.add_argument("--valid-images", type=int, default=480, help="the larger valid split's size")
    parser.add_argument("--grpo", action="store_true", help="then the demo's GRPO stage (demo --rl) from each")
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier --out first")
    return parser


def output_folder(args: argparse.Namespace, default_out: str) -> Path:
    out = Path(args.out) if args.out else Path(args.demo) / default_out
    if out.exists() and args.overwrite:
        shutil.rmtree(out)
    return out


def main() -> None:
    parser = arguments(__doc__, "mask_loss_gain")
    parser.add_argument("--weight", type=float, default=1.0, help="--mask-loss-weight of the run with it")
    parser.add_argument("--mask-loss", default="dice", choices=("dice", "bce"))
    parser.add_argument("--mask-loss-codes", default="straight-through", choices=("straight-through", "expected"))
    args = parser.parse_args()
    changes = {"mask_loss_weight": args.weight, "mask_loss": args.mask_loss, "mask_loss_codes": args.mask_loss_codes}
    label = f"{args.weight:g} x {args.mask_loss} mask loss ({args.mask_loss_codes} codes)"
    compare(Path(args.demo), output_folder(args, "mask_loss_gain"), changes, label, args)


if __name__ == "__main__":
    main()
