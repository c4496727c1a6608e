"""Score reports (JSON, CSV, Markdown) and the plots the eval sweep draws.

The conventions text is assembled from the "Conventions" sections of the metric modules' docstrings, so
the report, docs/metrics.md and the code can never disagree.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from metrics import aggregate, boxes, masks, scoring
from paliseg import console, files

_CONVENTIONS_HEADER = "Conventions (quoted by the report and docs/metrics.md):"


def _conventions_of(module) -> list[str]:
    """The bullet points under the module docstring's conventions header, one string per bullet."""
    text = module.__doc__.split(_CONVENTIONS_HEADER, 1)[1]
    bullets: list[str] = []
    for line in text.strip().splitlines():
        if line.startswith("- "):
            bullets.append(line[2:].strip())
        elif line.strip() and bullets:
            bullets[-1] += " " + line.strip()
    return bullets


CONVENTIONS: tuple[str, ...] = tuple(
    bullet for module in (masks, scoring, boxes, aggregate) for bullet in _conventions_of(module)
)

# Columns of the summary table: (header, key of the stats dict).
_TABLE_COLUMNS = (
    ("images", "count"), ("invalid", "invalid"), ("mIoU", "miou"), ("mDice", "mdice"), ("cIoU", "ciou"),
    ("std", "std"), ("min", "min"), ("P10", "p10"), ("P50", "p50"), ("P90", "p90"), ("max", "max"),
    ("box mIoU", "box_miou"), ("box acc@0.5", "box_acc50"), ("box acc@0.75", "box_acc75"),
)  # fmt: skip


def summary_table(summary: Mapping[str, Any]) -> str:
    """The summary as a Markdown table: one row per prompt, then the overall row."""
    rows = [(prompt, stats) for prompt, stats in summary["per_prompt"].items()] + [("**all**", summary["overall"])]
    return console.markdown_table(
        ["prompt"] + [header for header, _ in _TABLE_COLUMNS],
        [[prompt] + ["–" if stats[k] is None else stats[k] for _, k in _TABLE_COLUMNS] for prompt, stats in rows],
    )


def write_report(
    out_dir: str | os.PathLike,
    summary: Mapping[str, Any],
    scores: Iterable[scoring.ImageScore],
    title: str = "paliseg scores",
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write `scores.json` (summary, conventions, `extra`), `per_image.csv` and `summary.md` atomically.

    Existing report files are replaced only with `overwrite`. Returns the paths written.
    """
    out_dir = Path(out_dir)
    paths = [out_dir / "scores.json", out_dir / "per_image.csv", out_dir / "summary.md"]
    if not overwrite:
        for path in paths:
            if path.exists():
                raise files.OutputExistsError(path)
    files.write_json(
        paths[0], {"title": title, "summary": summary, "conventions": list(CONVENTIONS)} | dict(extra or {})
    )
    with files.atomic_open(paths[1], "w", overwrite=True) as handle:
        writer = csv.DictWriter(handle, fieldnames=scoring.FIELDS, lineterminator="\n")
        writer.writeheader()
        for score in scores:
            writer.writerow({k: "" if v is None else v for k, v in score.to_row().items()})
    markdown = [f"# {title}", "", summary_table(summary), "", "Conventions:", ""]
    markdown += [f"- {bullet}" for bullet in CONVENTIONS]
    with files.atomic_open(paths[2], "w", overwrite=True) as handle:
        handle.write("\n".join(markdown) + "\n")
    return paths


def _save(figure: Figure, out_png: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    files.write_bytes(out_png, buffer.getvalue())


_METRIC_NAMES = {
    "miou": "mIoU", "mdice": "mDice", "ciou": "cIoU", "box_miou": "box mIoU", "box_acc50": "box acc@0.5",
    "box_acc75": "box acc@0.75", "invalid": "invalid predictions",
}  # fmt: skip


def plot_metric_vs_step(rows: Sequence[Mapping[str, Any]], metric: str, out_png: str | os.PathLike) -> None:
    """One line per prompt of `metric` against training step; the best step of each line is marked.

    `rows` are mappings with "step", "prompt" and `metric` (e.g. one per checkpoint and prompt, with
    prompt "all" for the overall score). Rows whose metric is None are left out.
    """
    name = _METRIC_NAMES.get(metric, metric)
    figure = Figure(figsize=(7, 4.2))
    axes = figure.subplots()
    prompts = sorted({row["prompt"] for row in rows}, key=lambda p: (p == "all", p))
    for prompt in prompts:
        points = sorted((r["step"], r[metric]) for r in rows if r["prompt"] == prompt and r[metric] is not None)
        if not points:
            continue
        steps, values = zip(*points)
        style = {"color": "black", "linewidth": 2.2} if prompt == "all" else {"linewidth": 1.5}
        (line,) = axes.plot(steps, values, marker="o", markersize=4, label=prompt, **style)
        best = int(np.argmax(values)) if metric != "invalid" else int(np.argmin(values))
        axes.scatter([steps[best]], [values[best]], s=90, facecolors="none", edgecolors=line.get_color(), zorder=3)
    axes.set_title(f"{name} by training step (circle: best step)")
    axes.set_xlabel("training step")
    axes.set_ylabel(name)
    axes.grid(alpha=0.3)
    if metric != "invalid":
        axes.set_ylim(0, 1.02)
    axes.legend(title="prompt", fontsize=8)
    _save(figure, out_png)


def plot_iou_histogram(scores: Iterable[scoring.ImageScore], out_png: str | os.PathLike) -> None:
    """Histogram of per-image IoU, stacked by prompt, with each prompt's mean as a dashed line."""
    scores = list(scores)
    prompts = sorted({s.prompt for s in scores})
    groups = [np.array([s.iou for s in scores if s.prompt == p]) for p in prompts]
    figure = Figure(figsize=(7, 4.2))
    axes = figure.subplots()
    if scores:
        colours = [f"C{i}" for i in range(len(prompts))]
        axes.hist(groups, bins=np.linspace(0, 1, 21), stacked=True, label=prompts, color=colours, edgecolor="white")
        for group, colour in zip(groups, colours):
            axes.axvline(group.mean(), color=colour, linestyle="--", linewidth=1.8, zorder=3)
        axes.legend(title="prompt (dashed: mean)", fontsize=8)
    invalid = sum(not s.valid for s in scores)
    axes.set_title(f"Per-image IoU ({len(scores)} images, {invalid} invalid predictions counted as 0)")
    axes.set_xlabel("IoU")
    axes.set_ylabel("images")
    axes.set_xlim(0, 1)
    _save(figure, out_png)
