"""`paliseg score` end to end on a folder of PNG masks, as a user scoring any method would run it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from metrics import masks
from paliseg import files
from paliseg.cli import main as cli


@pytest.fixture
def folders(tmp_path):
    """Three GT masks over two prompts; one prediction missing, one extra prediction without GT."""
    rng = np.random.default_rng(3)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    names = ["a_jpg.rf.1.segment_crack.png", "b_jpg.rf.2.segment_crack.png", "c.segment_taping_area.png"]
    truth = {}
    for name in names:
        gt = rng.random((12, 16)) < 0.4
        truth[name] = (gt, gt ^ (rng.random((12, 16)) < 0.2))
        files.write_mask(gt_dir / name, gt)
    for name in names[:2]:
        files.write_mask(pred_dir / name, truth[name][1])
    files.write_mask(pred_dir / "stray.segment_crack.png", np.ones((12, 16), bool))
    return gt_dir, pred_dir, truth


def test_score_json_on_stdout_counts_missing_prediction_as_invalid(folders, tmp_path):
    gt_dir, pred_dir, truth = folders
    out = subprocess.run(
        [sys.executable, "-m", "paliseg.cli.main", "score", "--pred", str(pred_dir), "--gt", str(gt_dir),
         "--prompt-from-name", "--out", str(tmp_path / "report"), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout)  # stdout is exactly one JSON document; the table went to stderr
    assert "mIoU" in out.stderr
    ious = [masks.iou(pred, gt) for gt, pred in list(truth.values())[:2]]
    overall, per_prompt = result["summary"]["overall"], result["summary"]["per_prompt"]
    assert overall["count"] == 3 and overall["invalid"] == 1
    assert overall["miou"] == pytest.approx((ious[0] + ious[1] + 0.0) / 3)
    assert set(per_prompt) == {"segment crack", "segment taping area"}
    assert per_prompt["segment crack"]["miou"] == pytest.approx(np.mean(ious))
    assert per_prompt["segment taping area"]["miou"] == 0.0 and per_prompt["segment taping area"]["invalid"] == 1
    assert result["missing_predictions"] == ["c.segment_taping_area.png"] and result["extra_predictions"] == 1

    with open(tmp_path / "report" / "per_image.csv", newline="") as handle:
        rows = {row["image_id"]: row for row in csv.DictReader(handle)}
    assert rows["c.segment_taping_area.png"]["valid"] == "False"
    assert int(rows["c.segment_taping_area.png"]["union"]) == truth["c.segment_taping_area.png"][0].sum()
    saved = json.loads((tmp_path / "report" / "scores.json").read_text())
    assert saved["summary"] == result["summary"] and saved["extra_predictions"] == ["stray.segment_crack.png"]


def test_score_human_output_and_fixed_prompt(folders, capsys):
    gt_dir, pred_dir, _ = folders
    assert cli.main(["score", "--pred", str(pred_dir), "--gt", str(gt_dir), "--prompt", "segment wall"]) == 0
    out = capsys.readouterr().out
    assert "| segment wall | 3 | 1 |" in out and "1 without a prediction" in out and "stray.segment_crack.png" in out


def test_score_empty_score_option(tmp_path, capsys):
    for folder in ("gt", "pred"):
        files.write_mask(tmp_path / folder / "x.png", np.zeros((4, 4), bool))
    base = ["score", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--json"]
    for empty in ("1.0", "0.0"):
        assert cli.main([*base, "--empty-score", empty]) == 0
        assert json.loads(capsys.readouterr().out)["summary"]["overall"]["miou"] == float(empty)


def test_score_size_mismatch_names_both_files(tmp_path, capsys):
    files.write_mask(tmp_path / "gt" / "x.png", np.zeros((4, 6), bool))
    files.write_mask(tmp_path / "pred" / "x.png", np.zeros((6, 4), bool))
    assert cli.main(["score", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 1
    error = capsys.readouterr().err
    assert str(tmp_path / "pred" / "x.png") in error and str(tmp_path / "gt" / "x.png") in error
    assert len(error.strip().splitlines()) == 1


def test_score_bad_folders_are_clear_errors(tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    assert cli.main(["score", "--pred", str(tmp_path / "nope"), "--gt", str(tmp_path / "gt")]) == 1
    assert "nope does not exist" in capsys.readouterr().err
    (tmp_path / "pred").mkdir()
    assert cli.main(["score", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 1
    assert "no ground-truth PNGs" in capsys.readouterr().err
