"""`paliseg score` and `paliseg visualize` (registered by paliseg.cli.main).

Only argparse and the settings at the top: the handlers import numpy, PIL and the metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from paliseg import settings
from paliseg.settings import setting

_SCORE_HELP = "Score a folder of predicted mask PNGs against ground-truth PNGs matched by file name."
_SCORE_EPILOG = """\
inputs:
  --gt DIR      ground-truth masks, one PNG per image and prompt (foreground = pixel value > 127)
  --pred DIR    predicted masks with the same file names and sizes, from any method (ours or another)
outputs:
  a summary table (per prompt and overall: mIoU, mDice, cIoU, spread and percentiles of the per-image IoU);
  with --out, REPORT_DIR/scores.json, per_image.csv and summary.md; with --json, the result on stdout.
conventions:
  a ground truth without a prediction is INVALID and scores 0 (never skipped); prediction and ground
  truth both empty score --empty-score; masks must have the same size (never resized).
  --prompt-from-name reads the prompt from NAME.PROMPT.png as the converter writes it
  (img_jpg.rf.abc.segment_crack.png -> "segment crack").

example:
  paliseg score --gt data/masks --pred runs/r1/pred_masks --prompt-from-name --out runs/r1/score --json
"""

_VISUALIZE_HELP = "Draw canvases (original | ground truth | prediction) for annotation records."
_VISUALIZE_EPILOG = """\
inputs:
  --data JSONL  annotation records (image, prefix, suffix, mask); GT boxes come from the suffix's loc tokens;
                or a converted folder (JSONL or TFDS) and its --split
  --pred P      optional: a folder of predicted mask PNGs (named like the record's mask file, or
                IMAGE_STEM.png), or a predictions JSONL (records whose suffix is the predicted text and,
                optionally, whose mask is the predicted mask)
outputs:
  OUT/IMAGE_STEM.PROMPT.png per record: ground truth in green, prediction in orange, boxes with labels,
  prompt and per-image IoU in the caption; with --grid also OUT/grid.png (the first canvases together).

example:
  paliseg visualize --data data/_annotations.valid.jsonl --pred runs/r1/predictions.jsonl --out viz --limit 20 --grid
"""

GRID_CANVASES = 8
EMPTY_SCORE_HELP = "score when prediction and ground truth are both empty"
INPUTS_OUTPUTS = "inputs and outputs"
SCORING = "scoring"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreSettings:
    """`paliseg score`: predicted mask PNGs against ground-truth PNGs matched by file name."""

    pred: Path = setting(help="folder of predicted mask PNGs", metavar="DIR", group=INPUTS_OUTPUTS)
    gt: Path = setting(help="folder of ground-truth mask PNGs", metavar="DIR", group=INPUTS_OUTPUTS)
    out: Path | None = setting(
        None, "write scores.json, per_image.csv, summary.md", metavar="REPORT_DIR", group=INPUTS_OUTPUTS
    )
    overwrite: bool = setting(False, "replace an existing report in REPORT_DIR", group=INPUTS_OUTPUTS)
    prompt: str = setting("all", "prompt for every mask", metavar="TEXT", exclusive="prompt", group=SCORING)
    prompt_from_name: bool = setting(
        False, "read each mask's prompt from NAME.PROMPT.png", exclusive="prompt", group=SCORING
    )
    empty_score: float = setting(1.0, EMPTY_SCORE_HELP, metavar="S", at_least=0, at_most=1, group=SCORING)

    def __post_init__(self):
        settings.check(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisualizeSettings:
    """`paliseg visualize`: canvases (original | ground truth | prediction) for annotation records."""

    data: Path = setting(
        help="annotation records to draw: a JSONL file, or a converted folder (JSONL or TFDS)", metavar="JSONL|DIR",
        group=INPUTS_OUTPUTS,
    )  # fmt: skip
    split: str = setting("valid", "the split to draw of a converted --data folder", metavar="SPLIT",
                         group=INPUTS_OUTPUTS)  # fmt: skip
    pred: Path | None = setting(
        None, "mask PNG folder or predictions JSONL", metavar="DIR_OR_JSONL", group=INPUTS_OUTPUTS
    )
    out: Path = setting(help="folder for the canvas PNGs", metavar="DIR", group=INPUTS_OUTPUTS)
    limit: int | None = setting(None, "draw only the first N records", metavar="N", at_least=1, group=INPUTS_OUTPUTS)
    grid: bool = setting(False, f"also write grid.png (the first {GRID_CANVASES} canvases)", group=INPUTS_OUTPUTS)
    panel_height: int = setting(400, "height of each panel, in pixels", metavar="PX", at_least=1, group=INPUTS_OUTPUTS)
    overwrite: bool = setting(False, "replace existing canvases", group=INPUTS_OUTPUTS)
    empty_score: float = setting(1.0, EMPTY_SCORE_HELP, metavar="S", at_least=0, at_most=1, group=SCORING)

    def __post_init__(self):
        settings.check(self)


def register(subparsers) -> None:
    for name, settings_class, help_text, epilog, handler in (
        ("score", ScoreSettings, _SCORE_HELP, _SCORE_EPILOG, run_score),
        ("visualize", VisualizeSettings, _VISUALIZE_HELP, _VISUALIZE_EPILOG, run_visualize),
    ):
        parser = subparsers.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        groups = settings.add_arguments(parser, settings_class)  # a flag per field
        groups[INPUTS_OUTPUTS].add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        parser.set_defaults(run=handler)


def prompt_from_name(file_name: str) -> str:
    """NAME.PROMPT.png (the converter's mask naming) -> "PROMPT" with underscores as spaces."""
    stem = Path(file_name).stem
    if "." not in stem:
        raise ValueError(f"{file_name}: --prompt-from-name expects NAME.PROMPT.png (e.g. a.segment_crack.png)")
    return stem.rsplit(".", 1)[1].replace("_", " ")


def _pngs(directory: Path, role: str) -> dict[str, Path]:
    if not directory.is_dir():
        raise FileNotFoundError(f"{role} folder {directory} does not exist")
    return {p.name: p for p in sorted(directory.iterdir()) if p.suffix.lower() == ".png" and p.is_file()}


def run_score(args: argparse.Namespace) -> int:
    from metrics import aggregate, report, scoring
    from paliseg import console, images

    config = settings.from_args(args, ScoreSettings)
    gt_files, pred_files = _pngs(config.gt, "ground-truth"), _pngs(config.pred, "prediction")
    if not gt_files:
        raise ValueError(f"no ground-truth PNGs in {config.gt}")
    scores, missing = [], []
    for name, gt_path in console.progress(gt_files.items(), desc="scoring", total=len(gt_files), unit="mask"):
        gt = images.read_mask(gt_path)
        pred = images.read_mask(pred_files[name]) if name in pred_files else None
        if pred is None:
            missing.append(name)
        elif pred.shape != gt.shape:
            raise ValueError(
                f"{pred_files[name]} is {pred.shape[1]}x{pred.shape[0]} but {gt_path} is {gt.shape[1]}x{gt.shape[0]}; "
                "predicted masks must have the ground truth's full resolution"
            )
        prompt = prompt_from_name(name) if config.prompt_from_name else config.prompt
        scores.append(scoring.score_image(pred, gt, prompt, name, empty=config.empty_score))
    extra = sorted(set(pred_files) - set(gt_files))
    summary = aggregate.summarize(scores)
    result = {
        "summary": summary,
        "missing_predictions": missing,
        "extra_predictions": len(extra),
        "conventions": list(report.CONVENTIONS),
        "report": None,
    }
    if config.out is not None:
        details = {"gt_dir": str(config.gt), "pred_dir": str(config.pred), "empty_score": config.empty_score}
        details |= {"missing_predictions": missing, "extra_predictions": extra}
        title = f"scores of {config.pred}"
        report.write_report(config.out, summary, scores, title=title, extra=details, overwrite=config.overwrite)
        result["report"] = str(config.out)
    lines = [report.summary_table(summary), ""]
    lines.append(f"{len(scores)} ground-truth masks, {len(missing)} without a prediction (scored 0 as invalid)")
    if missing:
        lines.append("missing: " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if extra:
        lines.append(f"{len(extra)} predictions have no ground truth and were ignored: " + ", ".join(extra[:5]))
    if config.out is not None:
        lines.append(f"report written to {config.out}/ (scores.json, per_image.csv, summary.md)")
    console.report(result, "\n".join(lines), args.json)
    return 0


def _prediction_lookup(pred: Path | None):
    """A function record -> CanvasPrediction (or None when no --pred was given), for a mask folder or a JSONL."""
    from metrics.canvas import CanvasPrediction
    from paliseg import images, records

    if pred is None:
        return lambda record: None
    if pred.is_dir():

        def from_folder(record):
            names = ([Path(record.mask).name] if record.mask else []) + [Path(record.image).stem + ".png"]
            for name in names:
                if (pred / name).is_file():
                    return CanvasPrediction(mask=images.read_mask(pred / name))
            return CanvasPrediction()

        return from_folder
    if not pred.is_file():
        raise FileNotFoundError(f"--pred {pred} is neither a folder of mask PNGs nor a predictions JSONL")
    by_key = {}
    for record in records.read_records(pred):
        by_key[(Path(record.image).name, record.prefix)] = CanvasPrediction(
            mask=images.read_mask(record.mask_path) if record.mask_path is not None else None, suffix=record.suffix
        )
    return lambda record: by_key.get((Path(record.image).name, record.prefix), CanvasPrediction())


def run_visualize(args: argparse.Namespace) -> int:
    from metrics import canvas as canvases
    from paliseg import console, dataset, files, records

    config = settings.from_args(args, VisualizeSettings)
    data = dataset.read_source(config.data, config.split)[: config.limit]
    if not data:
        raise ValueError(f"{config.data}: no records to draw")
    lookup = _prediction_lookup(config.pred)
    written, drawn, scored = [], [], []
    for record in console.progress(data, desc="drawing", unit="canvas"):
        image, score = canvases.canvas_for_record(record, lookup(record), config.empty_score, config.panel_height)
        path = config.out / f"{Path(record.image).stem}.{records.prompt_slug(record.prefix)}.png"
        files.write_image(path, image, overwrite=config.overwrite)
        written.append(str(path))
        scored.append(None if score is None else score.to_row())
        if len(drawn) < GRID_CANVASES:
            drawn.append(image)
    grid = None
    if config.grid:
        grid = config.out / "grid.png"
        files.write_image(grid, canvases.make_grid(drawn, columns=2), overwrite=config.overwrite)
    result = {"canvases": written, "scores": scored, "grid": None if grid is None else str(grid)}
    human = f"{len(written)} canvases written to {config.out}/" + (f", grid at {grid}" if grid else "")
    console.report(result, human, args.json)
    return 0
