"""`paliseg demo`: every stage end to end, offline, on bundled data, with a model that really learns.

The demo calls each stage's Python API in this process and first prints the command line that does the same
(copy-paste one to rerun that stage alone); it ends with a summary of what the model learned:

    1. synthetic shapes  python -m converters.synthetic OUT/exports/shapes ...   (a Roboflow COCO export)
    2. convert           paliseg convert OUT/exports/shapes --out OUT/data/shapes ...; paliseg validate ...
                         paliseg convert <bundled real cracks + drywall sample> --out OUT/data/real ...
    3. train             paliseg train --preset tiny --init random --trainable all ... --out OUT/run
    4. eval              paliseg eval OUT/run --data OUT/data/shapes --out OUT/report
    5. predict           paliseg predict --run OUT/run --step best --image OUT/data/real/... --out OUT/predict

With --rl, two stages come between eval and predict: `paliseg train --objective grpo --init-run OUT/run
--init-step <best> ... --out OUT/rl` (reinforcement fine-tuning with the mask IoU as the reward, see
train.grpo) and `paliseg eval OUT/rl ... --out OUT/report_rl` (its step 0 is the supervised best step).

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
import dataclasses
import json
import shlex
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from paliseg import settings  # light: the standard library only
from paliseg.settings import setting

_DESCRIPTION = """\
Run the whole pipeline offline on bundled data and watch a model learn: a synthetic-shapes dataset in
Roboflow COCO format -> convert (loc + seg tokens with the bundled VAE) -> train a small `tiny` PaliGemma
from scratch -> eval every checkpoint (report, plots, canvases) -> predict on real crack and drywall
photos. Before each stage it prints the command line that does the same: copy one to rerun that stage
alone. No GPU, no download; how long each stage takes on 2 CPU cores: docs/results.md."""

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
  rl/, report_rl/                 with --rl: the GRPO run from the best step, and its report
  demo.json                       the summary: mIoU at step 0 and at the best step, timings, file paths

examples:
  paliseg demo --quick                 a smaller run into demo_out/
  paliseg demo --out /tmp/demo         the full run
  paliseg demo --out /tmp/demo --resume   continue it after an interruption
  paliseg demo --rl                    then GRPO from the best step (mask-IoU reward), evaluated too"""

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

    @property
    def shapes(self):
        """The synthetic images' settings (`converters.synthetic.ShapesConfig`): one shape per image."""
        from converters import synthetic

        return synthetic.ShapesConfig(
            image_size=self.image_size,
            classes=self.classes,
            objects_per_image=(1, 1),
            object_scale=self.object_scale,
            grid=self.grid,
        )

    @classmethod
    def from_json(cls, plan: dict[str, Any]) -> DemoPlan:
        """The plan a demo recorded in its demo.json."""
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in plan.items()})

    def train_settings(self, data: Path, out: Path) -> dict[str, Any]:
        """The `paliseg train` settings of the supervised stage (`train.run.resolve_config` completes them)."""
        return {
            "data": [str(data)], "out": str(out), "preset": "tiny", "init": "random", "trainable": "all",
            "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr, "warmup_fraction": self.warmup_fraction,
            "save_every": self.save_every, "seq_len": self.seq_len, "seed": self.seed, "remat": False,
        }  # fmt: skip


FULL = DemoPlan(train_images=3000, valid_images=48, steps=2000, save_every=250)
QUICK = DemoPlan(train_images=600, valid_images=24, steps=300, save_every=75)


@dataclasses.dataclass(frozen=True)
class RlPlan:
    """The optional `--rl` stage: GRPO (`paliseg train --objective grpo`) from the supervised best step,
    every parameter trainable, the reward the per-image mask IoU eval reports."""

    steps: int
    save_every: int
    batch_size: int = 8  # prompts per step, each sampled group_size times
    group_size: int = 8
    keep: int | None = None  # --grpo-keep: update on this many of each group (its best and worst)
    lr: float = 3e-4
    temperature: float = 1.0
    kl_coef: float = 0.0
    warmup_fraction: float = 0.0

    def train_settings(self, data: Path, init_run: Path, out: Path, seed: int) -> dict[str, Any]:
        """The `paliseg train --objective grpo` settings of the stage, from `init_run`'s best step."""
        return {
            "data": [str(data)], "out": str(out), "objective": "grpo", "init_run": str(init_run), "init_step": "best",
            "trainable": "all", "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
            "warmup_fraction": self.warmup_fraction, "save_every": self.save_every, "seed": seed, "remat": False,
            "grpo": {"group_size": self.group_size, "keep": self.keep, "temperature": self.temperature,
                     "kl_coef": self.kl_coef},
        }  # fmt: skip


# The best recipe measured (docs/results.md, "GRPO on the demo's task").
FULL_RL = RlPlan(steps=340, save_every=40, batch_size=16, group_size=16, keep=4)
QUICK_RL = RlPlan(steps=40, save_every=20)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """`paliseg demo`: where it runs, how big, whether GRPO follows, and what happens to an earlier demo's OUT."""

    out: Path = setting(Path("demo_out"), "output folder", metavar="DIR")
    quick: bool = setting(False, "a smaller run: fewer images and steps")
    rl: bool = setting(
        False, "then continue from the supervised best step with reinforcement fine-tuning (GRPO, the mask IoU "
        "as the reward) and evaluate that run too",
    )  # fmt: skip
    resume: bool = setting(False, "continue an interrupted demo in --out", exclusive="earlier demo")
    overwrite: bool = setting(False, "delete an earlier demo's --out and start again", exclusive="earlier demo")

    def __post_init__(self):
        settings.check(self)

    @property
    def mode(self) -> str:
        return ("quick" if self.quick else "full") + (" + rl" if self.rl else "")

    @property
    def plan(self) -> DemoPlan:
        return QUICK if self.quick else FULL

    @property
    def rl_plan(self) -> RlPlan:
        return QUICK_RL if self.quick else FULL_RL


class Layout:
    """The demo's folders in OUT (listed in the epilog)."""

    def __init__(self, out: Path):
        self.out, self.export, self.run = out, out / "exports" / "shapes", out / "run"
        self.shapes, self.real = out / "data" / "shapes", out / "data" / "real"
        self.report, self.predict = out / "report", out / "predict"
        self.rl, self.rl_report = out / "rl", out / "report_rl"  # --rl: the GRPO run and its report


def command_line(command: str, flags: dict[str, Any], argv: Sequence[str] = ()) -> str:
    """The copy-pasteable shell line of `command` ("paliseg convert") with `flags`, in their order, then `argv`
    (flags already rendered, e.g. by `paliseg.settings.to_argv` from a typed config).

    A key that starts with "-" is a flag: True gives it alone, None, False or an empty list leave it out, a
    list or tuple puts its values after it. Any other key names a positional argument: its value(s) only."""
    words = command.split()
    for key, value in flags.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if value is None or value is False or not values:
            continue
        words += [key] if key.startswith("-") else []
        words += [str(v) for v in values if v is not True]
    return shlex.join([*words, *argv])


class Demo:
    """The stages, each called through its Python API after printing the `paliseg` command that does the
    same; `stages` collects those commands, timings and results."""

    def __init__(self, out: Path, plan: DemoPlan, resume: bool):
        from vae.model import BUNDLED_VAE_PATH

        self.paths, self.plan, self.resume = Layout(out), plan, resume
        # Always the bundled VAE, never models/vae-oid.npz: the figures must not depend on what is downloaded.
        self.vae = BUNDLED_VAE_PATH
        self.stages: dict[str, dict[str, Any]] = {}
        self.count = 5

    def _stage(self, name: str, commands: list[str]) -> float:
        from paliseg import console

        console.info(f"\n[{len(self.stages) + 1}/{self.count}] {name}")
        console.info("\n".join(f"  $ {command}" for command in commands))
        self.stages[name] = {"commands": commands}
        return time.perf_counter()

    def _done(self, name: str, started: float, outcome: str, **details: Any) -> None:
        from paliseg import console

        console.info(f"  {outcome}")
        self.stages[name].update(seconds=round(time.perf_counter() - started, 1), **details)

    def synthetic_data(self) -> None:
        from converters import synthetic
        from paliseg import console, records

        plan, export = self.plan, self.paths.export
        shapes = plan.shapes
        started = self._stage("synthetic shapes", [command_line("python -m converters.synthetic", {
            "out": export, "--train": plan.train_images, "--valid": plan.valid_images, "--size": shapes.image_size,
            "--classes": ",".join(shapes.classes), "--objects": shapes.objects_per_image,
            "--scale": shapes.object_scale, "--grid": shapes.grid, "--seed": plan.seed})])  # fmt: skip
        kept = self.resume and all((export / s / records.COCO_ANNOTATIONS_FILE).is_file() for s in ("train", "valid"))
        if not kept:
            with console.progress_bar("shapes", total=plan.train_images + plan.valid_images, unit="img") as bar:
                synthetic.write_synthetic_coco(
                    export,
                    n_train=plan.train_images,
                    n_valid=plan.valid_images,
                    config=shapes,
                    seed=plan.seed,
                    overwrite=self.resume,
                    on_image=lambda: bar.update(1),
                )
        done = (
            "kept from the earlier run"
            if kept
            else f"wrote {plan.train_images} train and {plan.valid_images} valid images"
        )
        self._done("synthetic shapes", started, done, images={"train": plan.train_images, "valid": plan.valid_images})

    def convert(self) -> None:
        from converters.convert import ConvertConfig, convert, parse_map
        from converters.validate import result_json, result_text, validate
        from paliseg.config import ASSETS
        from paliseg.records import CONVERSION_FILE

        configs = [
            ConvertConfig(sources=[self.paths.export], out=self.paths.shapes, vae=self.vae, negatives=False),
            ConvertConfig(sources=[ASSETS / "demo" / "roboflow" / name for name in REAL_SAMPLE], out=self.paths.real,
                          vae=self.vae, prompt_map=parse_map(REAL_PROMPTS, "--prompt-map"),
                          label_map=parse_map(REAL_LABELS, "--label-map"), box_masks="fill"),
        ]  # fmt: skip
        by_hand = ("sources", "prompt_map", "label_map")  # the command's positional and CLASS=VALUE arguments
        commands = [command_line("paliseg convert", {
            "sources": c.sources, "--prompt-map": [f"{k}={v}" for k, v in c.prompt_map.items()],
            "--label-map": [f"{k}={v}" for k, v in c.label_map.items()]}, settings.to_argv(c, by_hand))
            for c in configs]  # fmt: skip
        commands.append(command_line("paliseg validate", {"directory": self.paths.shapes}))
        started = self._stage("convert", commands)
        records = {}
        for config in configs:
            done = Path(config.out) / CONVERSION_FILE  # written last: the conversion finished
            summary = (
                json.loads(done.read_text())
                if self.resume and done.is_file()
                else convert(dataclasses.replace(config, overwrite=self.resume))
            )
            records[Path(config.out).name] = {
                split: sum(c["records"] for c in info["prompts"].values()) for split, info in summary["splits"].items()
            }
        checks = validate(directory=self.paths.shapes)
        if not result_json(checks)["ok"]:
            raise ValueError(f"the converted demo data is not valid:\n{result_text(checks)}")
        self._done("convert", started, f"records {records}; {self.paths.shapes} is valid", records=records)

    def _train_stage(self, stage: str, config, run_dir: Path):
        """`paliseg train` of `config` as a demo stage, resumed (with the run's own settings, as `paliseg train
        --out RUN --resume`) when asked and `run_dir` holds a run: (the config it ran, the run's summary, start)."""
        from train import commands as train_commands
        from train import config as train_config
        from train.run import Run, is_run

        started = self._stage(stage, [command_line("paliseg train", {}, settings.to_argv(config))])
        resume = self.resume and is_run(run_dir)
        if resume:
            config = train_config.check_resume(Run(run_dir).train_config, {"out": config.out})
        return config, train_commands.run(config, resume=resume), started

    def train(self) -> None:
        from train import run as run_folder

        config = run_folder.resolve_config(self.plan.train_settings(self.paths.shapes, self.paths.run))
        config, result, started = self._train_stage("train", config, self.paths.run)
        steps = ", ".join(map(str, result["checkpoint_steps"]))
        done = (
            f"loss {result['first_loss']:.4f} -> {result['last_loss']:.4f}, {result['examples_per_s']:.1f} "
            f"examples/s; checkpoints at steps {steps}"
            if result["losses"]
            else f"already trained: checkpoints at steps {steps}"
        )
        self._done(
            "train",
            started,
            done,
            checkpoints=result["checkpoint_steps"],
            first_loss=result["first_loss"],
            last_loss=result["last_loss"],
            examples_per_s=result["examples_per_s"],
        )

    def rl_train(self, rl: RlPlan) -> None:
        from train import run as run_folder

        paths = self.paths
        config = run_folder.resolve_config(rl.train_settings(paths.shapes, paths.run, paths.rl, self.plan.seed))
        config, result, started = self._train_stage("grpo", config, self.paths.rl)
        steps = ", ".join(map(str, result["checkpoint_steps"]))
        done = (
            f"from step {config.init_step} of {self.paths.run}: mean reward {result['first_reward']:.3f} -> "
            f"{result['last_reward']:.3f}; checkpoints at steps {steps}"
            if result.get("rewards")
            else f"already trained: checkpoints at steps {steps}"
        )
        self._done("grpo", started, done, checkpoints=result["checkpoint_steps"], init_step=int(config.init_step),
                   first_reward=result.get("first_reward"), last_reward=result.get("last_reward"))  # fmt: skip

    def evaluate(self, rl: bool = False) -> dict[str, Any]:
        from infer import sweep
        from infer.config import DecodingSettings, EvalSettings

        name = "eval (grpo)" if rl else "eval"
        run, out = (self.paths.rl, self.paths.rl_report) if rl else (self.paths.run, self.paths.report)
        config = EvalSettings(run_dir=run, data=self.paths.shapes, out=out, decoding=DecodingSettings(vae=self.vae))
        started = self._stage(
            name, [command_line("paliseg eval", {"run_dir": run}, settings.to_argv(config, ["run_dir"]))]
        )
        report = sweep.evaluate_run(config)
        best = report["best"]
        self._done(
            name,
            started,
            f"best: step {best['step']} ({report['metric']} {best['value']:.4f})"
            if best
            else "no checkpoint could be scored",
        )
        return report

    def predict(self) -> None:
        from infer import outputs
        from infer.commands import load_predictor
        from infer.config import DecodingSettings, ModelSettings, PredictSettings
        from paliseg import records

        config = PredictSettings(
            model=ModelSettings(run_dir=self.paths.run, step="best"), image=records.annotations_path(self.paths.real, "valid"),
            out=self.paths.predict, overwrite=self.resume, decoding=DecodingSettings(vae=self.vae),
        )  # fmt: skip
        started = self._stage("predict", [command_line("paliseg predict", {}, settings.to_argv(config))])
        jobs = outputs.jobs_for(config.image, config.prompt)
        predictor, _ = load_predictor(config.model, config.decoding, batch_size=config.batch_size)
        result = outputs.predict_set(predictor, jobs, config.out, canvases=config.canvas, overwrite=config.overwrite)
        self._done(
            "predict",
            started,
            f"{result['predicted']} predicted with {predictor.source}, "
            f"{result['invalid_predictions']} invalid; files in {result['out']}/",
            predicted=result["predicted"],
        )


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    from paliseg import files

    if out.exists() and not out.is_dir():
        raise files.OutputExistsError(out)
    if out.is_dir() and any(out.iterdir()):
        is_demo = (out / DEMO_MARKER).is_file()
        if overwrite:
            if not is_demo:
                raise FileExistsError(
                    f"{out} is not an earlier demo's folder (no {DEMO_MARKER}); "
                    "--overwrite deletes only those: choose another --out"
                )
            shutil.rmtree(out)
        elif not resume:
            raise FileExistsError(
                f"{out} is not empty: pass --resume to continue the demo in it, "
                "--overwrite to start again, or choose another --out"
            )
        elif not is_demo:
            raise FileExistsError(f"{out} is not a demo folder (no {DEMO_MARKER}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).touch()


def summarize(demo: Demo, report: dict[str, Any], seconds: float, mode: str) -> dict:
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
        "best": None
        if best is None
        else {
            "step": best["step"],
            **{key: _step_overall(report, best["step"])[key] for key in ("miou", "box_miou", "invalid")},
        },
        "ceiling_miou": ceiling["miou"] if ceiling else None,
        "steps": [
            {"step": s["step"], "miou": s["summary"]["overall"]["miou"]} for s in report["steps"] if s["summary"]
        ],
        "stages": demo.stages,
        "files": {
            "report": str(report_dir / sweep_report.REPORT_MD),
            "report_json": str(report_dir / sweep_report.REPORT_JSON),
            "metrics_csv": str(report_dir / sweep_report.METRICS_CSV),
            "plots": report.get("files", {}).get("plots", []),
            "canvases": report.get("files", {}).get("canvases", []),
            "run": str(demo.paths.run),
            "predictions": str(demo.paths.predict),
        },
    }


def rl_summary(demo: Demo, report: dict[str, Any]) -> dict[str, Any]:
    """The --rl stage's result: the GRPO run's step 0 (the supervised best step it started from) and its best
    step, overall and per class, with where its report is."""

    def figures(step: int) -> dict[str, Any]:
        summary = next(s["summary"] for s in report["steps"] if s["step"] == step and s["summary"])
        return {
            **{key: summary["overall"][key] for key in ("miou", "box_miou", "invalid")},
            "per_class": {prompt: stats["miou"] for prompt, stats in summary["per_prompt"].items()},
        }

    best = report.get("best")
    return {
        "init_step": demo.stages["grpo"]["init_step"],
        "start": figures(0),
        "best": None if best is None else {"step": best["step"], **figures(best["step"])},
        "steps": [
            {"step": s["step"], "miou": s["summary"]["overall"]["miou"]} for s in report["steps"] if s["summary"]
        ],
        "report": str(demo.paths.rl_report / "report.md"),
        "run": str(demo.paths.rl),
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
        lines.append(
            f"  best (step {best['step']}): mIoU {fmt(best['miou'])}, box mIoU {fmt(best['box_miou'])}"
            f"  (token round-trip ceiling: mIoU {fmt(summary['ceiling_miou'])})"
        )
    else:
        lines.append("  no checkpoint was scored (see the eval output above)")
    rl = summary.get("rl")
    if rl is not None and rl["best"] is not None:
        lines.append(
            f"  grpo from step {rl['init_step']}: mIoU {fmt(rl['start']['miou'])} -> {fmt(rl['best']['miou'])} at "
            f"GRPO step {rl['best']['step']} (box mIoU {fmt(rl['start']['box_miou'])} -> {fmt(rl['best']['box_miou'])})"
        )
        lines.append(
            "  per class: "
            + ", ".join(
                f"{prompt.removeprefix('segment ')} {fmt(before)} -> {fmt(rl['best']['per_class'].get(prompt))}"
                for prompt, before in rl["start"]["per_class"].items()
            )
        )
    lines.append("stages: " + ", ".join(f"{name} {info['seconds']:.0f} s" for name, info in summary["stages"].items()))
    files = summary["files"]
    lines += [
        "files:",
        f"  report      {files['report']}  (+ report.json, metrics.csv)",
        *([f"  grpo report {rl['report']}"] if rl is not None else []),
        *(f"  plot        {path}" for path in files["plots"] if Path(path).stem in ("miou_vs_step", "iou_histogram")),
        *(f"  canvas      {path}" for path in files["canvases"] if Path(path).name in ("best.png", "worst.png")),
        f"  predictions {files['predictions']}/canvases/  (real photos: the tiny model is not expected to find "
        "cracks or taping)",
        f"  summary     {Path(summary['out']) / SUMMARY_FILE}",
    ]
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    from paliseg import console, files

    config = settings.from_args(args, DemoSettings)
    started = time.perf_counter()
    _prepare_out(config.out, config.resume, config.overwrite)
    demo = Demo(config.out, config.plan, config.resume)
    demo.synthetic_data()
    demo.convert()
    if config.rl:
        demo.count += 2
    demo.train()
    report = demo.evaluate()
    rl_report = None
    if config.rl:
        demo.rl_train(config.rl_plan)
        rl_report = demo.evaluate(rl=True)
    demo.predict()
    summary = summarize(demo, report, time.perf_counter() - started, config.mode)
    if rl_report is not None:
        summary["rl"] = rl_summary(demo, rl_report)
    files.write_json(config.out / SUMMARY_FILE, summary)
    console.report(summary, summary_text(summary), args.json)
    return 0


def register(subparsers) -> None:
    help_text = "Run the whole pipeline offline on bundled data: make data, convert, train a tiny model, eval, predict."
    parser = subparsers.add_parser(
        "demo",
        help=help_text,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    settings.add_arguments(parser, DemoSettings)  # a flag per field: --out, --quick, --rl, --resume, --overwrite
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    parser.set_defaults(run=run_demo)
