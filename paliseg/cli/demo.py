"""`paliseg demo`: every stage end to end, offline, on bundled data, with a model that really learns.

The demo runs the real commands in this process (the same argument parsing and handlers as typing them),
prints each command before it runs it, and ends with a summary of what the model learned:

    1. synthetic shapes  python -m converters.synthetic OUT/exports/shapes ...   (a Roboflow COCO export)
    2. convert           paliseg convert OUT/exports/shapes --out OUT/data/shapes ...; paliseg validate ...
                         paliseg convert <bundled real cracks + drywall sample> --out OUT/data/real ...
    3. train             paliseg train --preset tiny --init random --trainable all ... --out OUT/run
    4. eval              paliseg eval OUT/run --data OUT/data/shapes --out OUT/report
    5. predict           paliseg predict --run OUT/run --step best --image OUT/data/real/... --out OUT/predict

The model is the `tiny` preset (1M parameters, 64-pixel images) trained from a seeded random init, every
parameter trainable, on dark ellipses, rectangles and triangles on light walls, with box edges on an
8-pixel grid: a task it learns within minutes on two CPU cores. Step 0 of the report is the untrained
model. Every stage uses the bundled mask VAE, so the demo's figures do not depend on what is in models/.
OUT/demo.json holds the summary (also printed with --json). `--resume` continues an interrupted demo in
the same OUT (finished stages are kept, training resumes from its last checkpoint, the sweep decodes only
what it has not cached); `--overwrite` deletes an earlier demo's OUT first.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

_DESCRIPTION = """\
Run the whole pipeline offline on bundled data and watch a model learn: a synthetic-shapes dataset in
Roboflow COCO format -> convert (loc + seg tokens with the bundled VAE) -> train a small `tiny` PaliGemma
from scratch -> eval every checkpoint (report, plots, canvases) -> predict on real crack and drywall
photos. No GPU, no download. The full run takes about 15 minutes on
2 CPU cores, --quick about 3."""

_EPILOG = """\
what it shows:
  learning is real: the report scores the untrained model (step 0) and every checkpoint on the synthetic
  validation split; the best checkpoint's mIoU is far above step 0's. The model is the 1M-parameter
  `tiny` preset trained from a random init on synthetic ellipses, rectangles and triangles. The
  predictions on the real photos only show the `predict` command: this model does not segment real cracks
  or taping (that is what PaliGemma 3B and `paliseg train --checkpoint ...` are for).

outputs in OUT:
  exports/shapes/{train,valid}/   the synthetic Roboflow COCO export (images + _annotations.coco.json)
  data/shapes/, data/real/        converted datasets (annotation JSONL, images, ground-truth masks)
  run/                            the training run (config.json, checkpoints/, metrics.csv, best.json)
  report/                         report.md, report.json, metrics.csv, plots/, canvases/
  predict/                        masks/, canvases/, json/ for the real photos
  demo.json                       the summary: mIoU at step 0 and at the best step, timings, file paths

examples:
  paliseg demo --quick                 a 3-minute run into demo_out/
  paliseg demo --out /tmp/demo         the full run (about 15 minutes)
  paliseg demo --out /tmp/demo --resume   continue it after an interruption"""

DEMO_MARKER = ".paliseg-demo"  # marks OUT as a demo folder: only such a folder is deleted by --overwrite
SUMMARY_FILE = "demo.json"
REAL_SAMPLE = ("cracks", "drywall")
# The real exports' class names -> the prompts and labels the peer projects use.
REAL_PROMPTS = ("NewCracks*=segment crack", "drywall-join=segment taping area")
REAL_LABELS = ("NewCracks*=crack", "drywall-join=taping area")


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """Everything a demo run depends on: the data and the training schedule of the tiny preset, trained from
    a seeded random init with every parameter trainable."""

    train_images: int
    valid_images: int
    steps: int
    save_every: int
    classes: tuple[str, ...] = ("ellipse", "rectangle", "triangle")
    batch_size: int = 16
    lr: float = 3e-3
    grid: int = 8  # box edges on an 8-pixel grid: loc tokens a small model learns quickly (converters.synthetic)
    object_scale: tuple[float, float] = (0.35, 0.85)
    image_size: int = 64  # the tiny preset's resolution: images are not resized
    seq_len: int = 32  # bos + prompt + "\n" + 4 loc + 16 seg + label + eos fits with room
    warmup_fraction: float = 0.05
    seed: int = 0


FULL = DemoPlan(train_images=3000, valid_images=48, steps=2000, save_every=250)
QUICK = DemoPlan(train_images=600, valid_images=24, steps=300, save_every=75)


@dataclasses.dataclass
class Layout:
    out: Path

    @property
    def export(self) -> Path:
        return self.out / "exports" / "shapes"

    @property
    def shapes(self) -> Path:
        return self.out / "data" / "shapes"

    @property
    def real(self) -> Path:
        return self.out / "data" / "real"

    @property
    def run(self) -> Path:
        return self.out / "run"

    @property
    def report(self) -> Path:
        return self.out / "report"

    @property
    def predict(self) -> Path:
        return self.out / "predict"


def run_paliseg(argv: list[str]) -> dict[str, Any]:
    """Run `paliseg ARGV --json` in this process, as if typed; returns its JSON result.

    The command's human text goes to stderr (that is what --json does), its progress bars too."""
    from paliseg.cli.main import build_parser

    args = build_parser().parse_args([*argv, "--json"])
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        code = args.run(args)
    if code:
        raise RuntimeError(f"`paliseg {shlex.join(argv)}` failed with exit code {code}")
    return json.loads(captured.getvalue().strip().splitlines()[-1])


class Demo:
    """The stages, each run as its `paliseg` command; `stages` collects commands, timings and results."""

    def __init__(self, out: Path, plan: DemoPlan, resume: bool):
        from vae.model import BUNDLED_VAE_PATH

        self.paths = Layout(out)
        self.plan = plan
        self.resume = resume
        # Always the bundled VAE, never models/vae-oid.npz: the figures must not depend on what is downloaded.
        self.vae = str(BUNDLED_VAE_PATH)
        self.stages: dict[str, dict[str, Any]] = {}
        self.count = 5

    def _stage(self, name: str, commands: list[str]) -> float:
        from paliseg import console

        console.info(f"\n[{len(self.stages) + 1}/{self.count}] {name}")
        for command in commands:
            console.info(f"  $ {command}")
        self.stages[name] = {"commands": commands}
        return time.perf_counter()

    def _done(self, name: str, started: float, **details: Any) -> None:
        self.stages[name].update(seconds=round(time.perf_counter() - started, 1), **details)

    def synthetic_data(self) -> None:
        from converters import synthetic
        from paliseg import console

        plan, export = self.plan, self.paths.export
        command = (f"python -m converters.synthetic {export} --train {plan.train_images} --valid {plan.valid_images} "
                   f"--size {plan.image_size} --classes {','.join(plan.classes)} --objects 1 1 "
                   f"--scale {plan.object_scale[0]} {plan.object_scale[1]} --grid {plan.grid} --seed {plan.seed}")
        started = self._stage("synthetic shapes", [command])
        if self.resume and all((export / s / synthetic.ANNOTATION_FILE).is_file() for s in ("train", "valid")):
            console.info("  (kept from the earlier run)")
        else:
            config = synthetic.ShapesConfig(plan.image_size, plan.classes, (1, 1), plan.object_scale, plan.grid)
            with console.progress_bar("shapes", total=plan.train_images + plan.valid_images, unit="img") as bar:
                synthetic.write_synthetic_coco(export, plan.train_images, plan.valid_images, config, plan.seed,
                                               overwrite=self.resume, on_image=lambda: bar.update(1))
        self._done("synthetic shapes", started, images={"train": plan.train_images, "valid": plan.valid_images})

    def convert(self) -> None:
        from paliseg.config import ASSETS
        from paliseg.records import CONVERSION_FILE

        jobs = [(self.paths.shapes, ["convert", str(self.paths.export), "--out", str(self.paths.shapes),
                                     "--vae", self.vae, "--no-negatives"]),
                (self.paths.real, [
                    "convert", *(str(ASSETS / "demo" / "roboflow" / name) for name in REAL_SAMPLE), "--out",
                    str(self.paths.real), "--vae", self.vae, "--prompt-map", *REAL_PROMPTS, "--label-map",
                    *REAL_LABELS, "--box-masks", "fill"])]  # fmt: skip
        validate = ["validate", str(self.paths.shapes)]
        started = self._stage("convert", [_shown(argv) for _, argv in jobs] + [_shown(validate)])
        records = {}
        for folder, argv in jobs:
            if self.resume and (folder / CONVERSION_FILE).is_file():
                summary = json.loads((folder / CONVERSION_FILE).read_text())
            else:
                summary = run_paliseg(argv + (["--overwrite"] if self.resume else []))
            records[folder.name] = _records(summary)
        run_paliseg(validate)
        self._done("convert", started, records=records)

    def train(self) -> None:
        from train import run

        plan = self.plan
        argv = ["train", "--data", str(self.paths.shapes), "--out", str(self.paths.run), "--preset", "tiny",
                "--init", "random", "--trainable", "all", "--steps", str(plan.steps), "--batch-size", str(plan.batch_size),
                "--lr", str(plan.lr), "--warmup-fraction", str(plan.warmup_fraction), "--save-every",
                str(plan.save_every), "--seq-len", str(plan.seq_len), "--seed", str(plan.seed), "--no-remat"]  # fmt: skip
        started = self._stage("train", [_shown(argv)])
        saved = run.Run(self.paths.run).steps if run.is_run(self.paths.run) else []
        if self.resume and saved and saved[-1] >= plan.steps:
            result = {"checkpoint_steps": saved}
        else:
            result = run_paliseg(["train", "--out", str(self.paths.run), "--resume"] if self.resume and saved else argv)
        self._done("train", started, checkpoints=result["checkpoint_steps"], first_loss=result.get("first_loss"),
                   last_loss=result.get("last_loss"), examples_per_s=result.get("examples_per_s"))

    def evaluate(self) -> dict[str, Any]:
        argv = ["eval", str(self.paths.run), "--data", str(self.paths.shapes), "--split", "valid",
                "--out", str(self.paths.report), "--vae", self.vae]  # fmt: skip
        started = self._stage("eval", [_shown(argv)])
        report = run_paliseg(argv)
        self._done("eval", started)
        return report

    def predict(self) -> dict[str, Any]:
        from paliseg import records

        argv = ["predict", "--run", str(self.paths.run), "--step", "best", "--image",
                str(records.annotations_path(self.paths.real, "valid")), "--out", str(self.paths.predict),
                "--vae", self.vae]  # fmt: skip
        started = self._stage("predict", [_shown(argv)])
        result = run_paliseg(argv + (["--overwrite"] if self.resume else []))
        self._done("predict", started, predicted=result["predicted"])
        return result


def _shown(argv: list[str]) -> str:
    return "paliseg " + shlex.join(argv)


def _records(conversion: dict[str, Any]) -> dict[str, int]:
    return {split: sum(c["records"] for c in info["prompts"].values()) for split, info in conversion["splits"].items()}


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    from paliseg import files

    if out.exists() and not out.is_dir():
        raise files.OutputExistsError(out)
    if out.is_dir() and any(out.iterdir()):
        is_demo = (out / DEMO_MARKER).is_file()
        if overwrite:
            if not is_demo:
                raise FileExistsError(f"{out} is not an earlier demo's folder (no {DEMO_MARKER}); "
                                      "--overwrite deletes only those: choose another --out")
            shutil.rmtree(out)
        elif not resume:
            raise FileExistsError(f"{out} is not empty: pass --resume to continue the demo in it, "
                                  "--overwrite to start again, or choose another --out")
        elif not is_demo:
            raise FileExistsError(f"{out} is not a demo folder (no {DEMO_MARKER}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).touch()


def summarize(demo: Demo, report: dict[str, Any], seconds: float, mode: str, predictions: str) -> dict:
    """The demo's result: what the model learned (step 0 vs best), how long each stage took, where the files are."""
    from infer import sweep_report

    base = report["base"]["overall"] if report.get("base") else None
    ceiling = report["ceiling"]["overall"] if report.get("ceiling") else None
    best = report.get("best")
    report_dir = demo.paths.report
    return {
        "out": str(demo.paths.out),
        "mode": mode,
        "plan": dataclasses.asdict(demo.plan),
        "seconds": round(seconds, 1),
        "metric": report["metric"],
        "step0": None if base is None else {key: base[key] for key in ("miou", "box_miou", "invalid")},
        "best": None if best is None else {"step": best["step"], **{
            key: _step_overall(report, best["step"])[key] for key in ("miou", "box_miou", "invalid")}},
        "ceiling_miou": ceiling["miou"] if ceiling else None,
        "steps": [{"step": s["step"], "miou": s["summary"]["overall"]["miou"]} for s in report["steps"] if s["summary"]],
        "stages": demo.stages,
        "files": {
            "report": str(report_dir / sweep_report.REPORT_MD),
            "report_json": str(report_dir / sweep_report.REPORT_JSON),
            "metrics_csv": str(report_dir / sweep_report.METRICS_CSV),
            "plots": report.get("files", {}).get("plots", []),
            "canvases": report.get("files", {}).get("canvases", []),
            "run": str(demo.paths.run),
            "predictions": predictions,
        },
    }


def _step_overall(report: dict[str, Any], step: int) -> dict[str, Any]:
    return next(s["summary"]["overall"] for s in report["steps"] if s["step"] == step and s["summary"])


def summary_text(summary: dict[str, Any]) -> str:
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    step0, best, plan = summary["step0"], summary["best"], summary["plan"]
    lines = [
        "",
        f"paliseg demo ({summary['mode']}) finished in {summary['seconds'] / 60:.1f} min",
        f"task: segment {', '.join(plan['classes'])} on the synthetic validation split; mIoU by checkpoint:",
        "  " + ", ".join(f"step {s['step']} {s['miou']:.3f}" for s in summary["steps"]),
    ]
    if best is not None and step0 is not None:
        lines.append(f"  untrained (step 0): mIoU {fmt(step0['miou'])}, box mIoU {fmt(step0['box_miou'])}")
        lines.append(f"  best (step {best['step']}): mIoU {fmt(best['miou'])}, box mIoU {fmt(best['box_miou'])}"
                     f"  (token round-trip ceiling: mIoU {fmt(summary['ceiling_miou'])})")
    else:
        lines.append("  no checkpoint was scored (see the eval output above)")
    lines.append("stages: " + ", ".join(f"{name} {info['seconds']:.0f} s" for name, info in summary["stages"].items()))
    files = summary["files"]
    lines += [
        "files:",
        f"  report      {files['report']}  (+ report.json, metrics.csv)",
        *(f"  plot        {path}" for path in files["plots"] if Path(path).stem in ("miou_vs_step", "iou_histogram")),
        *(f"  canvas      {path}" for path in files["canvases"] if Path(path).name in ("best.png", "worst.png")),
        f"  predictions {files['predictions']}/canvases/  (real photos: the tiny model is not expected to find "
        "cracks or taping)",
        f"  summary     {Path(summary['out']) / SUMMARY_FILE}",
    ]
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    from paliseg import console, files

    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite are exclusive")
    mode = "quick" if args.quick else "full"
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    out = Path(args.out)
    _prepare_out(out, args.resume, args.overwrite)
    demo = Demo(out, plan, args.resume)
    demo.synthetic_data()
    demo.convert()
    demo.train()
    report = demo.evaluate()
    predictions = demo.predict()["out"]
    summary = summarize(demo, report, time.perf_counter() - started, mode, predictions)
    files.write_json(out / SUMMARY_FILE, summary)
    console.report(summary, summary_text(summary), args.json)
    return 0


def register(subparsers) -> None:
    help_text = "Run the whole pipeline offline on bundled data: make data, convert, train a tiny model, eval, predict."
    parser = subparsers.add_parser("demo", help=help_text, description=_DESCRIPTION, epilog=_EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default: demo_out)")
    parser.add_argument("--quick", action="store_true", help="a smaller run: about 3 minutes on 2 CPU cores")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier demo's --out and start again")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    parser.set_defaults(run=run_demo)
