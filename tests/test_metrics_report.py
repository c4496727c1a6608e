"""Report files parse back to what was scored; plots are written as real PNGs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from metrics import aggregate, report, scoring
from paliseg import files


@pytest.fixture
def scores() -> list[scoring.ImageScore]:
    rng = np.random.default_rng(0)
    out = []
    for index in range(9):
        gt = rng.random((10, 10)) < 0.3
        pred = None if index == 4 else rng.random((10, 10)) < 0.3
        boxes = ([[0, 0, 5, 5]], [[1, 0, 5, 6]]) if index % 2 else (None, None)
        out.append(
            scoring.score_image(pred, gt, f"segment {'crack' if index % 3 else 'joint'}", f"im{index}.png",
                                pred_boxes=boxes[0], gt_boxes=boxes[1], invalid_objects=index % 4 == 1)
        )  # fmt: skip
    return out


def test_report_files_parse_back(tmp_path, scores):
    summary = aggregate.summarize(scores)
    paths = report.write_report(tmp_path, summary, scores, title="unit test", extra={"run": "r1"})
    assert [p.name for p in paths] == ["scores.json", "per_image.csv", "summary.md"]

    data = json.loads((tmp_path / "scores.json").read_text())
    assert data["summary"] == json.loads(json.dumps(summary)) and data["run"] == "r1" and data["title"] == "unit test"
    assert any("never skipped" in line for line in data["conventions"])
    assert any("linear_sum_assignment" in line for line in data["conventions"])

    with open(tmp_path / "per_image.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == scoring.FIELDS and len(rows) == len(scores)
    for row, score in zip(rows, scores):
        assert row["image_id"] == score.image_id and row["prompt"] == score.prompt
        assert float(row["iou"]) == score.iou and int(row["union"]) == score.union
        assert row["valid"] == str(score.valid)
        assert row["box_miou"] == ("" if score.box_miou is None else str(score.box_miou))
    assert sum(row["valid"] == "False" for row in rows) == summary["overall"]["invalid"] == 1

    markdown = (tmp_path / "summary.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| prompt | images | invalid | mIoU")
    assert [line.split(" | ")[0] for line in table[1:]] == ["| segment crack", "| segment joint", "| **all**"]
    assert f"{summary['overall']['miou']:.4f}" in table[-1]
    assert markdown.startswith("# unit test") and "- A missing or fully unparsable prediction" in markdown


def test_report_refuses_to_overwrite(tmp_path, scores):
    summary = aggregate.summarize(scores)
    report.write_report(tmp_path, summary, scores)
    with pytest.raises(files.OutputExistsError):
        report.write_report(tmp_path, summary, scores)
    report.write_report(tmp_path, summary, scores[:2], overwrite=True)
    assert len((tmp_path / "per_image.csv").read_text().splitlines()) == 3


def test_summary_table_shows_missing_box_stats_as_dash():
    blank = np.zeros((3, 3), bool)
    table = report.summary_table(aggregate.summarize([scoring.score_image(blank, blank, "p", "a")]))
    assert table.splitlines()[-1].endswith("| – | – | – |")


def test_plots_are_written(tmp_path, scores):
    rows = [
        {"step": step, "prompt": prompt, "miou": value}
        for step in (100, 200, 300)
        for prompt, value in (("segment crack", step / 400), ("all", step / 500), ("segment joint", None))
    ]
    report.plot_metric_vs_step(rows, "miou", tmp_path / "miou.png")
    report.plot_iou_histogram(scores, tmp_path / "hist.png")
    for name in ("miou.png", "hist.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 250
            assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something was drawn
