"""`paliseg score` and `paliseg visualize` (registered by paliseg.cli.main).

Only argparse and the standard library at the top: the handlers import numpy, PIL and the metrics.
"""

from __future__ import annotations

import argparse
from pathlib import Path

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
  truth both empty score --empty-score (1.0); masks must have the same size (never resized).
  --prompt-from-name reads the prompt from NAME.PROMPT.png as the converter writes it
  (img_jpg.rf.abc.segment_crack.png -> "segment crack").

example:
  paliseg score --gt data/masks --pred runs/r1/pred_masks --prompt-from-name --out runs/r1/score --json
"""

_VISUALIZE_HELP = "Draw canvases (original | ground truth | prediction) for annotation records."
_VISUALIZE_EPILOG = """\
inputs:
  --data JSONL  annotation records (image, prefix, suffix, mask); GT boxes come from the suffix's loc tokens
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
_EMPTY_HELP = "score when prediction and ground truth are both empty (default 1.0)"


def register(subparsers) -> None:
    score = subparsers.add_parser(
        "score", help=_SCORE_HELP, description=_SCORE_HELP, epilog=_SCORE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    score.add_argument("--pred", required=True, type=Path, metavar="DIR", help="folder of predicted mask PNGs")
    score.add_argument("--gt", required=True, type=Path, metavar="DIR", help="folder of ground-truth mask PNGs")
    prompt = score.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="all", metavar="TEXT", help="prompt for every mask (default: all)")
    prompt.add_argument("--prompt-from-name", action="store_true", help="read each mask's prompt from NAME.PROMPT.png")
    score.add_argument("--empty-score", type=float, default=1.0, metavar="S", help=_EMPTY_HELP)
    score.add_argument("--out", type=Path, metavar="REPORT_DIR", help="write scores.json, per_image.csv, summary.md")
    score.add_argument("--overwrite", action="store_true", help="replace an existing report in REPORT_DIR")
    score.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    score.set_defaults(run=run_score)

    visualize = subparsers.add_parser(
        "visualize", help=_VISUALIZE_HELP, description=_VISUALIZE_HELP, epilog=_VISUALIZE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    visualize.add_argument("--data", required=True, type=Path, metavar="JSONL", help="annotation records to draw")
    visualize.add_argument("--pred", type=Path, metavar="DIR_OR_JSONL", help="mask PNG folder or predictions JSONL")
    visualize.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the canvas PNGs")
    visualize.add_argument("--limit", type=int, metavar="N", help="draw only the first N records")
    visualize.add_argument("--grid", action="store_true", help=f"also write grid.png ({GRID_CANVASES} canvases)")
    visualize.add_argument("--panel-height", type=int, default=400, metavar="PX", help="panel height (default 400)")
    visualize.add_argument("--empty-score", type=float, default=1.0, metavar="S", help=_EMPTY_HELP)
    visualize.add_argument("--overwrite", action="store_true", help="replace existing canvases")
    visualize.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    visualize.set_defaults(run=run_visualize)


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

    gt_files, pred_files = _pngs(args.gt, "ground-truth"), _pngs(args.pred, "prediction")
    if not gt_files:
        raise ValueError(f"no ground-truth PNGs in {args.gt}")
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
        prompt = prompt_from_name(name) if args.prompt_from_name else args.prompt
        scores.append(scoring.score_image(pred, gt, prompt, name, empty=args.empty_score))
    extra = sorted(set(pred_files) - set(gt_files))
    summary = aggregate.summarize(scores)
    result = {
        "summary": summary,
        "missing_predictions": missing,
        "extra_predictions": len(extra),
        "conventions": list(report.CONVENTIONS),
        "report": None,
    }
    if args.out is not None:
        details = {"gt_dir": str(args.gt), "pred_dir": str(args.pred), "empty_score": args.empty_score}
        details |= {"missing_predictions": missing, "extra_predictions": extra}
        title = f"scores of {args.pred}"
        report.write_report(args.out, summary, scores, title=title, extra=details, overwrite=args.overwrite)
        result["report"] = str(args.out)
    lines = [report.summary_table(summary), ""]
    lines.append(f"{len(scores)} ground-truth masks, {len(missing)} without a prediction (scored 0 as invalid)")
    if missing:
        lines.append("missing: " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if extra:
        lines.append(f"{len(extra)} predictions have no ground truth and were ignored: " + ", ".join(extra[:5]))
    if args.out is not None:
        lines.append(f"report written to {args.out}/ (scores.json, per_image.csv, summary.md)")
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
    from paliseg import console, files, records

    data = records.read_records(args.data)[: args.limit]
    if not data:
        raise ValueError(f"{args.data}: no records to draw")
    lookup = _prediction_lookup(args.pred)
    written, drawn, scored = [], [], []
    for record in console.progress(data, desc="drawing", unit="canvas"):
        image, score = canvases.canvas_for_record(record, lookup(record), args.empty_score, args.panel_height)
        path = args.out / f"{Path(record.image).stem}.{records.prompt_slug(record.prefix)}.png"
        files.write_image(path, image, overwrite=args.overwrite)
        written.append(str(path))
        scored.append(None if score is None else score.to_row())
        if len(drawn) < GRID_CANVASES:
            drawn.append(image)
    grid = None
    if args.grid:
        grid = args.out / "grid.png"
        files.write_image(grid, canvases.make_grid(drawn, columns=2), overwrite=args.overwrite)
    result = {"canvases": written, "scores": scored, "grid": None if grid is None else str(grid)}
    human = f"{len(written)} canvases written to {args.out}/" + (f", grid at {grid}" if grid else "")
    console.report(result, human, args.json)
    return 0
