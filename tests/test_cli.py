"""The `paliseg` command: every reserved subcommand exists and teaches through --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from paliseg.cli import main as cli

COMMANDS = ["convert", "validate", "vae", "train", "plan", "predict", "eval", "serve", "score", "visualize", "demo"]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"    {command}" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert len(capsys.readouterr().out.splitlines()) >= 3


def test_console_script_is_installed_and_runs():
    out = subprocess.run(
        [sys.executable, "-m", "paliseg.cli.main", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("paliseg ")


@pytest.mark.parametrize("command", ["predict", "eval", "train"])
def test_predict_eval_and_train_take_a_dtype(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert "--dtype {float32,bfloat16}" in capsys.readouterr().out.replace("\n", " ")
