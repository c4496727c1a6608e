"""`paliseg demo --quick`: every stage runs for real and the trained model beats the untrained one."""

from __future__ import annotations

import json
import time

import pytest

from paliseg.cli import demo
from paliseg.cli.main import main


@pytest.mark.slow
def test_quick_demo_learns(tmp_path, capsys):
    out = tmp_path / "demo"
    started = time.perf_counter()
    assert main(["demo", "--quick", "--out", str(out), "--json"]) == 0
    seconds = time.perf_counter() - started
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == json.loads((out / demo.SUMMARY_FILE).read_text())

    steps = {s["step"]: s["miou"] for s in summary["steps"]}
    assert 0 in steps and len(steps) >= 3, steps
    assert summary["best"]["step"] > 0
    assert summary["best"]["miou"] > summary["step0"]["miou"] + 0.1, steps
    assert summary["best"]["miou"] == max(steps[s] for s in steps if s > 0)

    report = json.loads((out / "report" / "report.json").read_text())
    assert report["best"]["step"] == summary["best"]["step"]
    for key in ("report", "report_json", "metrics_csv"):
        assert (out / "report").joinpath(summary["files"][key].rsplit("/", 1)[-1]).is_file()
    assert summary["files"]["plots"] and all(p.endswith(".png") for p in summary["files"]["plots"])
    assert any(p.endswith("best.png") for p in summary["files"]["canvases"])
    predictions = [json.loads(line) for line in (out / "predict" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 16  # every committed real image, with its own prompt
    assert len(list((out / "predict" / "canvases").glob("*.png"))) == 16
    print(f"demo --quick: {seconds:.0f} s, mIoU step 0 {summary['step0']['miou']:.3f} -> "
          f"best (step {summary['best']['step']}) {summary['best']['miou']:.3f}")


def test_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    for flags in ([], ["--resume"], ["--overwrite"]):
        with pytest.raises(FileExistsError):
            demo._prepare_out(tmp_path, resume="--resume" in flags, overwrite="--overwrite" in flags)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_overwrite_only_replaces_an_earlier_demo(tmp_path):
    demo._prepare_out(tmp_path / "d", resume=False, overwrite=False)
    (tmp_path / "d" / "run").mkdir()
    with pytest.raises(FileExistsError, match="--resume"):
        demo._prepare_out(tmp_path / "d", resume=False, overwrite=False)
    demo._prepare_out(tmp_path / "d", resume=True, overwrite=False)
    assert (tmp_path / "d" / "run").is_dir()
    demo._prepare_out(tmp_path / "d", resume=False, overwrite=True)
    assert not (tmp_path / "d" / "run").exists() and (tmp_path / "d" / demo.DEMO_MARKER).is_file()


def test_help_teaches_the_stages(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for words in ("--quick", "--resume", "report.md", "step 0", "example"):
        assert words in text
