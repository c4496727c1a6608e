"""The sweep's report: what a person reads to decide whether a run is good and which checkpoint to deploy.

REPORT_DIR/report.md                 tables per prompt: base, every checkpoint, best, ceiling; plots; canvases
REPORT_DIR/report.json               the same numbers, the skipped records, failed checkpoints, conventions
REPORT_DIR/metrics.csv               one row per (step, prompt), "all" for every prompt together
REPORT_DIR/plots/<metric>_vs_step.png  one line per prompt (`metrics.report.plot_metric_vs_step`)
REPORT_DIR/plots/iou_histogram.png   per-image IoU of the best checkpoint
REPORT_DIR/canvases/best.png, worst.png   the best and worst images of the best checkpoint (grids),
                                     and each canvas alone: best_1.png ..., worst_1.png ...
REPORT_DIR/steps/step_000025/        per-image scores of each step (`metrics.report.write_report`)
REPORT_DIR/ceiling/                  per-image scores of the token round trip
"""

from __future__ import annotations

import csv
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from infer import prediction as prediction_module
from metrics import aggregate, canvas, scoring
from metrics import report as metrics_report
from paliseg import console, dataset, files
from train.run import BEST_FILE

PLOTTED = ("miou", "mdice", "ciou", "box_miou", "box_acc50", "box_acc75", "invalid")
# Columns of the report's tables: (header, key of the `metrics.aggregate` stats).
COLUMNS = (
    ("images", "count"), ("invalid", "invalid"), ("mIoU", "miou"), ("mDice", "mdice"), ("cIoU", "ciou"),
    ("box mIoU", "box_miou"), ("box acc@0.5", "box_acc50"), ("box acc@0.75", "box_acc75"),
    ("P10", "p10"), ("P50", "p50"), ("P90", "p90"),
)  # fmt: skip
METRIC_NAMES = {key: header for header, key in COLUMNS} | {"invalid": "invalid predictions"}
ALL = "all"  # the prompt name of the overall rows
REPORT_MD, REPORT_JSON, METRICS_CSV = "report.md", "report.json", "metrics.csv"  # in REPORT_DIR


def build(
    *, run_dir: Path, data_dir: Path, out_dir: Path, split: str, limit: int | None, metric: str, items, skips,
    results, best, ceiling: dict | None, degenerate: dict, max_new_tokens: int,
) -> dict[str, Any]:  # fmt: skip
    """The report as one JSON-able dict (report.json; `paliseg eval --json` prints it)."""
    base = next((r for r in results if r.step == 0 and r.summary is not None), None)
    best_json = None
    if best is not None:
        best_json = {
            "step": best.step,
            "metric": metric,
            "value": best.summary["overall"][metric],
            "report": str((out_dir / REPORT_MD).absolute()),
            "data": str(data_dir.absolute()),
            "split": split,
            "records": len(items),
            "limit": limit,
            "steps_scored": [r.step for r in results if r.summary is not None],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    return {
        "title": f"Checkpoint sweep of {run_dir.name}",
        "run_dir": str(run_dir.absolute()),
        "data": str(data_dir.absolute()),
        "split": split,
        "limit": limit,
        "records": len(items),
        "prompts": sorted({item.record.prefix for item in items}),
        "skipped": [{"where": s.where, "reason": s.reason, "message": s.message} for s in skips],
        "skipped_by_reason": dataset.skip_counts(skips),
        "metric": metric,
        "max_new_tokens": max_new_tokens,
        "steps": [r.to_json() for r in results],
        "failed_steps": [{"step": r.step, "error": r.error} for r in results if r.status != "ok"],
        "base": None if base is None else base.summary,
        "ceiling": ceiling,
        "best": best_json,
        "degenerate_boxes": degenerate,
        "conventions": list(metrics_report.CONVENTIONS) + _prediction_conventions(),
    }


def _prediction_conventions() -> list[str]:
    text = prediction_module.__doc__.split("Conventions", 1)[1]
    bullets: list[str] = []
    for line in text.splitlines()[1:]:
        if line.startswith("- "):
            bullets.append(line[2:].strip())
        elif line.strip() and bullets:
            bullets[-1] += " " + line.strip()
    return bullets


def metric_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """metrics.csv: one row per (step, prompt) and per prompt of the ceiling; prompt "all" = overall."""
    best_step = report["best"]["step"] if report["best"] else None
    rows = []
    sources = [(r["step"], r["kind"], r["summary"]) for r in report["steps"] if r["summary"] is not None]
    if report["ceiling"] is not None:
        sources.append((None, "ceiling", report["ceiling"]))
    for step, kind, summary in sources:
        for prompt, stats in [(ALL, summary["overall"]), *summary["per_prompt"].items()]:
            rows.append({"step": step, "kind": kind, "best": step is not None and step == best_step,
                         "prompt": prompt, **stats})  # fmt: skip
    return rows


def write(
    out_dir: Path,
    report: dict[str, Any],
    items,
    scores: Mapping[int, list[scoring.ImageScore]],
    ceiling_scores: list[scoring.ImageScore] | None,
    caches,
    vae_model,
    canvases: int,
) -> list[Path]:
    """Write every report file (replacing the previous sweep's), returns their paths."""
    written: list[Path] = []
    for step, step_scores in scores.items():
        written += metrics_report.write_report(
            out_dir / "steps" / f"step_{step:06d}", aggregate.summarize(step_scores), step_scores,
            title=f"{report['title']}: step {step}", overwrite=True,
        )  # fmt: skip
    if ceiling_scores is not None:
        written += metrics_report.write_report(
            out_dir / "ceiling", report["ceiling"], ceiling_scores,
            title=f"{report['title']}: token round-trip ceiling", overwrite=True,
        )  # fmt: skip

    rows = metric_rows(report)
    csv_path = out_dir / METRICS_CSV
    with files.atomic_open(csv_path, "w") as handle:
        writer = csv.DictWriter(handle, ["step", "kind", "best", "prompt", *aggregate.STAT_KEYS], lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    written.append(csv_path)

    plots = _plots(out_dir, rows, report, scores)
    pictures = _canvases(out_dir, report, items, scores, caches, vae_model, canvases)
    report["files"] = {"plots": [str(p) for p in plots], "canvases": [str(p) for p in pictures]}
    written += plots + pictures
    markdown = out_dir / REPORT_MD
    with files.atomic_open(markdown, "w") as handle:
        handle.write(markdown_report(report, out_dir))
    files.write_json(out_dir / REPORT_JSON, report)
    return written + [markdown, out_dir / REPORT_JSON]


def _shown_step(report: Mapping[str, Any]) -> int | None:
    """The step the histogram and canvases show: the best, else the last step scored (e.g. only the base)."""
    if report["best"] is not None:
        return report["best"]["step"]
    scored = [r["step"] for r in report["steps"] if r["summary"] is not None]
    return scored[-1] if scored else None


def _clear_pictures(folder: Path) -> None:
    """Remove a previous sweep's PNGs (of another best step, count or metric set) before drawing anew."""
    for old in folder.glob("*.png") if folder.is_dir() else []:
        old.unlink()


def _plots(out_dir: Path, rows, report, scores) -> list[Path]:
    _clear_pictures(out_dir / "plots")
    plots = []
    per_step = [row for row in rows if row["step"] is not None]
    if len(report["prompts"]) == 1:  # the "all" line would hide the prompt's own, identical line
        per_step = [row for row in per_step if row["prompt"] != ALL]
    for metric in PLOTTED:
        values = [row[metric] for row in per_step if row[metric] is not None]
        if values and not (metric == "invalid" and not any(values)):  # a flat zero line of invalids says nothing
            path = out_dir / "plots" / f"{metric}_vs_step.png"
            metrics_report.plot_metric_vs_step(per_step, metric, path)
            plots.append(path)
    shown = _shown_step(report)
    if shown is not None:
        path = out_dir / "plots" / "iou_histogram.png"
        metrics_report.plot_iou_histogram(scores[shown], path)
        plots.append(path)
    return plots


def _canvases(out_dir: Path, report, items, scores, caches, vae_model, count: int) -> list[Path]:
    """The `count` best and worst images (by IoU) of the shown step, each alone and as a grid."""
    folder = out_dir / "canvases"
    _clear_pictures(folder)
    shown = _shown_step(report)
    if shown is None or count <= 0:
        return []
    order = sorted(range(len(items)), key=lambda i: (scores[shown][i].iou, items[i].record.image))
    written = []
    for name, indices in (("best", order[::-1][:count]), ("worst", order[:count])):
        pictures = []
        for rank, index in enumerate(indices, start=1):
            item = items[index]
            predicted = prediction_module.from_text(
                caches[shown].text(item.key),
                item.record.prefix,
                item.width,
                item.height,
                vae_model,
                chunk_scores=caches[shown].chunk_scores(item.key),
            )
            picture, _ = canvas.canvas_for_record(
                item.record,
                canvas.CanvasPrediction(predicted.mask, predicted.text, predicted.confidences),
                panel_height=320,
            )
            path = folder / f"{name}_{rank}.png"
            files.write_image(path, picture)
            pictures.append(picture)
            written.append(path)
        grid = folder / f"{name}.png"
        files.write_image(grid, canvas.make_grid(pictures, columns=1))
        written.append(grid)
    return written


def _cell(stats: Mapping[str, Any] | None, key: str) -> Any:
    if stats is None or stats.get(key) is None:
        return "–"
    return stats[key]


def _table(report: Mapping[str, Any], prompt: str | None) -> str:
    """Rows: base, each checkpoint (the best in bold), the ceiling; for one prompt or overall (None)."""

    def stats_of(summary):
        if summary is None:
            return None
        return summary["overall"] if prompt is None else summary["per_prompt"].get(prompt)

    best_step = report["best"]["step"] if report["best"] else None
    rows = []
    for step in report["steps"]:
        if step["status"] != "ok":
            rows.append([f"step {step['step']}", "FAILED (see below)"] + [""] * (len(COLUMNS) - 1))
            continue
        if step["step"] == 0:
            label = "base (before fine-tuning)"
        elif step["step"] == best_step:
            label = f"**step {step['step']} (best)**"
        else:
            label = f"step {step['step']}"
        rows.append([label] + [_cell(stats_of(step["summary"]), key) for _, key in COLUMNS])
    if report["ceiling"] is not None:
        rows.append(["ceiling (token round trip)"] + [_cell(stats_of(report["ceiling"]), key) for _, key in COLUMNS])
    return console.markdown_table(["model"] + [header for header, _ in COLUMNS], rows)


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_report(report: Mapping[str, Any], out_dir: Path) -> str:
    metric_name = METRIC_NAMES.get(report["metric"], report["metric"])
    lines = [f"# {report['title']}", ""]
    lines.append(f"- run: `{report['run_dir']}`")
    lines.append(
        f"- data: `{report['data']}`, split **{report['split']}**: {report['records']} image/prompt pairs scored"
        + (f" (first {report['limit']} records)" if report["limit"] else "")
        + (f", {len(report['skipped'])} skipped (see below)" if report["skipped"] else "")
    )
    lines.append("- prompts: " + ", ".join(f"`{p}`" for p in report["prompts"]))
    lines.append(
        f"- decoding: greedy, at most {report['max_new_tokens']} tokens, segmentation grammar for `segment` prompts"
    )
    lines.append("")
    best = report["best"]
    if best is not None:
        base_value = report["base"]["overall"][report["metric"]] if report["base"] else None
        ceiling_value = report["ceiling"]["overall"][report["metric"]] if report["ceiling"] else None
        lines += [
            f"**Best checkpoint: step {best['step']}**, {metric_name} {best['value']:.4f} over all prompts "
            f"(before fine-tuning: {_fmt(base_value)}; ceiling with these tokens: {_fmt(ceiling_value)}).",
            f"Recorded in `{Path(report['run_dir']) / BEST_FILE}`: `paliseg predict --run {report['run_dir']} --step best` uses it.",
        ]
        if base_value is not None and base_value > best["value"]:
            lines.append(f"Note: the base model scores higher than every checkpoint on {metric_name}.")
    else:
        lines.append(
            "**No trained checkpoint was scored** (none saved yet, or all failed), so no best step was recorded."
        )
    lines.append("")
    lines += ["## All prompts together", "", _table(report, None), ""]
    for prompt in report["prompts"]:
        lines += [f"## Prompt `{prompt}`", "", _table(report, prompt), ""]
    lines += [
        "Columns: mIoU/mDice are means of the per-image scores; cIoU sums intersections over unions; box mIoU and",
        "box acc@0.5/0.75 match predicted to ground-truth boxes; P10/P50/P90 are percentiles of the per-image IoU;",
        "invalid counts unparsable predictions (scored 0). Per-image scores: `steps/step_NNNNNN/per_image.csv`.",
        "",
    ]
    shown = _shown_step(report)
    plots = [Path(p) for p in report.get("files", {}).get("plots", [])]
    if plots:
        lines += ["## Plots", "", "Each metric against the training step (step 0: the base), one line per prompt.", ""]
        for path in plots:
            if path.stem == "iou_histogram":
                title = f"per-image IoU of step {shown}"
            else:
                title = METRIC_NAMES.get(path.stem.removesuffix("_vs_step"), path.stem) + " by step"
            lines += [f"![{title}]({path.relative_to(out_dir).as_posix()})", ""]
    pictures = [Path(p) for p in report.get("files", {}).get("canvases", [])]
    if shown is not None and pictures:
        lines += [
            f"## Best and worst images of step {shown}",
            "",
            "Each row: the image, its ground truth (green) and the prediction (orange), with boxes and labels.",
            "",
        ]
        for name in ("best", "worst"):
            grid = out_dir / "canvases" / f"{name}.png"
            if grid in pictures:
                lines += [
                    f"### {name.capitalize()}",
                    "",
                    f"![{name} images]({grid.relative_to(out_dir).as_posix()})",
                    "",
                ]
    if report["failed_steps"]:
        lines += ["## Checkpoints that could not be scored", ""]
        lines += [f"- step {f['step']}: {f['error']}" for f in report["failed_steps"]] + [""]
    if report["skipped"]:
        lines += [f"## Skipped records ({len(report['skipped'])})", ""]
        lines += [f"- `{s['where']}` ({s['reason']}): {s['message']}" for s in report["skipped"][:50]]
        if len(report["skipped"]) > 50:
            lines.append(f"- ... and {len(report['skipped']) - 50} more (report.json lists them all)")
        lines.append("")
    if report["degenerate_boxes"]:
        lines += [
            "Predicted boxes that cover no pixel (their mask is empty): "
            + "; ".join(f"{k}: {dict(v)}" for k, v in report["degenerate_boxes"].items()),
            "",
        ]
    lines += ["## Conventions", ""] + [f"- {c}" for c in report["conventions"]]
    return "\n".join(lines) + "\n"
