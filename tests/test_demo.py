"""`paliseg demo --quick`: every stage runs for real and the trained model beats the untrained one."""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from pathlib import Path

import pytest

from paliseg.cli import demo
from paliseg.cli.main import build_parser, main
from train import run as run_folder
from train.run import Run


@pytest.mark.slow
def test_quick_demo_learns(tmp_path, capsys):
    out = tmp_path / "demo"
    started = time.perf_counter()
    assert main(["demo", "--quick", "--rl", "--out", str(out), "--json"]) == 0
    seconds = time.perf_counter() - started
    printed = capsys.readouterr()
    summary = json.loads(printed.out.strip().splitlines()[-1])
    assert summary == json.loads((out / demo.SUMMARY_FILE).read_text())
    _check_printed_commands(summary, printed.err, out)

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
    # --rl: GRPO from the best step; its step 0 is that very checkpoint, so eval scores it the same
    rl = summary["rl"]
    assert rl["init_step"] == summary["best"]["step"]
    assert rl["start"]["miou"] == pytest.approx(summary["best"]["miou"])
    assert rl["best"]["step"] > 0 and set(rl["start"]["per_class"]) == set(rl["best"]["per_class"])
    assert (out / "report_rl" / "report.md").is_file() and Run(out / "rl").train_config.objective == "grpo"
    print(
        f"demo --quick: {seconds:.0f} s, mIoU step 0 {summary['step0']['miou']:.3f} -> "
        f"best (step {summary['best']['step']}) {summary['best']['miou']:.3f} -> grpo (step {rl['best']['step']}) "
        f"{rl['best']['miou']:.3f}"
    )


def _check_printed_commands(summary, stderr, out):
    """Each stage printed its command lines, and the real parser accepts every `paliseg` one as typed; the
    train command resolves to the very settings the demo trained with."""
    from paliseg import settings
    from train import config as train_config
    from train.run import Run

    stages = summary["stages"]
    assert {name: [c.split()[1] for c in stage["commands"]] for name, stage in stages.items()} == {
        "synthetic shapes": ["-m"], "convert": ["convert", "convert", "validate"], "train": ["train"],
        "eval": ["eval"], "grpo": ["train"], "eval (grpo)": ["eval"], "predict": ["predict"]}  # fmt: skip
    commands = [c for stage in stages.values() for c in stage["commands"]]
    for command in commands:
        assert f"  $ {command}\n" in stderr
        if command.startswith("paliseg "):
            args = build_parser().parse_args(shlex.split(command)[1:])  # argparse exits on a bad line
            assert hasattr(args, "run")
    args = build_parser().parse_args(shlex.split(stages["train"]["commands"][0])[1:])
    typed = run_folder.resolve_config(settings.given(args, train_config.TrainConfig))
    trained = Run(out / "run").train_config
    assert typed == dataclasses.replace(trained, tokenizer=None)  # the tokenizer: the preset's, filled in by training
    args = build_parser().parse_args(shlex.split(stages["grpo"]["commands"][0])[1:])
    typed = run_folder.resolve_config(settings.given(args, train_config.TrainConfig))
    assert typed == Run(out / "rl").train_config


def test_command_line_is_copy_pasteable():
    line = demo.command_line("paliseg convert", {
        "sources": [Path("my exports/cracks"), "drywall"], "--out": Path("data"), "--format": None,
        "--prompt-map": ["NewCracks*=segment crack"], "--label-map": [], "--min-box-side": 0, "--no-negatives": True,
        "--strict": False})  # fmt: skip
    assert (
        line == "paliseg convert 'my exports/cracks' drywall --out data --prompt-map 'NewCracks*=segment crack' "
        "--min-box-side 0 --no-negatives"
    )
    args = build_parser().parse_args(shlex.split(line)[1:])
    assert (args.sources, args.out, args.prompt_map) == (
        ["my exports/cracks", "drywall"],
        "data",
        ["NewCracks*=segment crack"],
    )
    from converters.config import ConvertConfig
    from paliseg import settings

    assert settings.given(args, ConvertConfig) == {"out": "data", "min_box_side": 0, "negatives": False}
    assert args.label_map == []


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
    for words in ("--quick", "--resume", "--rl", "report.md", "step 0", "example"):
        assert words in text
