"""paliseg.settings: flags derived from config dataclasses, the flags given, and the flags of a config."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Literal

import pytest

from paliseg import settings
from paliseg.cli.main import build_parser
from paliseg.config import LoraConfig
from paliseg.settings import setting
from train import config as train_config
from train import run as run_folder


@dataclasses.dataclass(frozen=True)
class Inner:
    rank: int = setting(0, "rank", metavar="R")
    names: tuple[str, ...] = setting(("a", "b"), "names", choices=("a", "b", "c"))


@dataclasses.dataclass
class Example:
    count: int = setting(3, "how many", metavar="N")
    ratio: float = setting(0.5, "a share")
    label: str = setting("x", "a label")
    path: Path | None = setting(None, "a path")
    mode: Literal["fast", "slow"] = setting("fast", "speed")
    kind: str = setting("one", "a kind", choices=("one", "two"))
    verbose: bool = setting(False, "say more")
    check: bool = setting(True, "skip the check")
    cache: bool = setting(True, "cache results", negatable=True)
    weights: list[float] | None = setting(None, "weights")
    files: list[str] = setting([], "files", items="repeated")
    splits: list[str] = setting(["train"], "splits", items="spaced")
    inner: Inner = setting(Inner(rank=4), group="inner settings")
    size: int = setting(1, "a size in pixels", flag="--size-px")


def _parser(cls=Example) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    settings.add_arguments(parser, cls)
    return parser


def _parse(argv: list[str], cls=Example):
    return settings.from_dict(cls, settings.given(_parser(cls).parse_args(argv), cls))


def test_types_come_from_the_annotations():
    config = _parse(
        [
            "--count",
            "7",
            "--ratio",
            "0.25",
            "--label",
            "y",
            "--path",
            "p/q",
            "--mode",
            "slow",
            "--weights",
            "1,2.5",
            "--files",
            "a",
            "--files",
            "b",
            "--splits",
            "valid",
            "test",
        ]
    )
    assert (config.count, config.ratio, config.label, config.path, config.mode) == (7, 0.25, "y", Path("p/q"), "slow")
    assert (config.weights, config.files, config.splits) == ([1.0, 2.5], ["a", "b"], ["valid", "test"])
    assert _parse(["--size-px", "5"]).size == 5  # a declared flag name


def test_nested_fields_take_the_field_name_as_prefix_and_their_parent_default():
    assert _parse([]).inner == Inner(rank=4)  # the parent's default, not Inner()'s
    config = _parse(["--inner-names", "c,a"])
    assert config.inner == Inner(rank=4, names=("c", "a"))  # the annotated tuple, and the untouched default
    assert _parse(["--inner-rank", "9"]).inner.rank == 9
    help_text = _parser().format_help()
    assert "inner settings:" in help_text and "--inner-rank R" in help_text


@pytest.mark.parametrize(
    "argv",
    [["--mode", "medium"], ["--kind", "three"], ["--inner-names", "a,d"], ["--count", "many"], ["--weights", "1,x"]],
)
def test_bad_values_and_choices_are_rejected_by_argparse(argv):
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        _parser().parse_args(argv)


def test_flags_not_given_are_told_apart_from_the_default_value():
    assert settings.given(_parser().parse_args([]), Example) == {}
    args = _parser().parse_args(["--count", "3", "--inner-rank", "4"])  # both equal to their defaults
    assert settings.given(args, Example) == {"count": 3, "inner": {"rank": 4}}


def test_bool_flags_follow_the_default():
    assert _parse([]) == Example()
    assert _parse(["--verbose", "--no-check", "--no-cache"]) == Example(verbose=True, check=False, cache=False)
    assert _parse(["--cache"]).cache is True
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        _parser().parse_args(["--check"])  # on by default: only --no-check exists


def test_comma_lists_skip_empty_items():
    assert _parse(["--weights", "1,,2,"]).weights == [1.0, 2.0]
    assert _parse(["--inner-names", ""]).inner.names == ()


def test_help_shows_the_dataclass_defaults():
    help_text = " ".join(_parser().format_help().split())
    for expected in [
        "how many (default: 3)",
        "a share (default: 0.5)",
        "cache results (default: on)",
        "names; one of: a, b, c (default: a,b)",
        "splits (default: train)",
    ]:
        assert expected in help_text
    assert "say more (default" not in help_text and "a path (default" not in help_text


def test_merge_layers_nested_settings_and_skips_not_given():
    base = {"count": 1, "inner": {"rank": 2, "names": ["a"]}}
    assert settings.merge(base, {"inner": {"rank": 5}, "count": None}) == {
        "count": 1,
        "inner": {"rank": 5, "names": ["a"]},
    }


def test_unknown_keys_list_the_known_ones():
    with pytest.raises(
        ValueError,
        match=r"f\.json: unknown setting\(s\) inner\.size, speed; known: cache, check, "
        r"count, files, inner\.names, inner\.rank, kind",
    ):
        settings.from_dict(Example, {"speed": 1, "inner": {"size": 2}}, "f.json")


@pytest.mark.parametrize(
    "config",
    [
        Example(),
        Example(
            count=0,
            ratio=1e-7,
            label="a b",
            path=Path("/x"),
            mode="slow",
            kind="two",
            verbose=True,
            check=False,
            cache=False,
            weights=[0.1, 3.0],
            files=["p", "q"],
            splits=["a", "b"],
            inner=Inner(rank=0, names=()),
            size=2,
        ),
        Example(cache=True, inner=Inner(rank=4, names=("b",))),
    ],
)
def test_to_argv_round_trips(config):
    argv = settings.to_argv(config)
    assert _parse(argv) == config
    assert (argv == []) == (config == Example())  # only the settings that differ from the defaults


def test_to_argv_refuses_what_no_flag_can_say():
    with pytest.raises(ValueError, match="None cannot be given as --splits"):
        settings.to_argv(Example(splits=None))
    with pytest.raises(ValueError, match="comma"):
        settings.to_argv(Example(weights=None, inner=Inner(names=("a,b",))))


def test_a_field_without_a_declaration_is_an_error():
    @dataclasses.dataclass
    class Undeclared:
        size: int = 3

    with pytest.raises(TypeError, match=r"Undeclared\.size: declare it"):
        settings.add_arguments(argparse.ArgumentParser(), Undeclared)


# `paliseg train`: the flags of TrainConfig


def test_train_help_lists_every_setting_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: no default split by the wrapping
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    lines: dict[str, str] = {}  # each flag's entry, a long metavar's help line joined to it
    flag = None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  --"):
            flag = line.split()[0].rstrip(",")
            lines[flag] = line
        elif line.startswith("    ") and flag is not None:
            lines[flag] += " " + line.strip()
        else:
            flag = None
    defaults = train_config.TrainConfig()
    nested = {"lora": LoraConfig, "grpo": train_config.GrpoConfig}
    fields = [
        (field.name, getattr(defaults, field.name))
        for field in dataclasses.fields(defaults)
        if field.name not in (*nested, "quantization")
    ]
    for prefix, cls in nested.items():
        fields += [(f"{prefix}_{f.name}", getattr(getattr(defaults, prefix), f.name)) for f in dataclasses.fields(cls)]
    fields += [("base_dtype", None), ("quantization_skip_vision", False), ("quantization_double_scales", False)]
    assert len(fields) == len(dataclasses.fields(defaults)) - 3 + 4 + 9 + 3
    for name, default in fields:
        flag = "--" + name.replace("_", "-")
        if default is True and name != "remat":
            flag = "--no-" + name.replace("_", "-")
        assert flag in lines, flag
        if isinstance(default, (list, tuple)):
            default = ",".join(default)
        if name == "remat":
            assert "(default: on)" in lines["--remat"]
        elif not isinstance(default, bool) and default not in (None, ""):
            assert f"(default: {default})" in lines[flag], (flag, lines[flag])
    assert "--lora-rank R" in str(lines) and "(default: 8)" in lines["--lora-rank"]


def _train_args(argv):
    return build_parser().parse_args(["train", *argv])


def test_train_flags_fill_the_nested_lora_settings():
    args = _train_args(["--out", "r", "--lora-rank", "16", "--lora-targets", "q,v", "--lr", "1e-4"])
    requested = settings.given(args, train_config.TrainConfig)
    assert requested == {"out": "r", "lr": 1e-4, "lora": {"rank": 16, "targets": ["q", "v"]}}
    config = run_folder.resolve_config({**requested, "data": ["d"], "init": "random"})
    assert config.lora == LoraConfig(rank=16, alpha=16.0, targets=("q", "v"))


@pytest.mark.parametrize(
    "argv",
    [
        ["--lora-targets", "q,qq"],
        ["--trainable", "head"],
        ["--preset", "huge"],
        ["--checkpoint", "b.npz", "--init", "random"],
    ],
)
def test_train_rejects_bad_choices_at_parse_time(argv, capsys):
    with pytest.raises(SystemExit):
        _train_args(["--out", "r", *argv])
    assert "paliseg train: error:" in capsys.readouterr().err


def test_train_config_file_layers_under_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"steps": 50, "lora": {"rank": 4, "dropout": 0.1}}')
    requested = settings.given(
        _train_args(["--out", "r", "--lora-rank", "32", "--init", "random", "--data", "d"]), train_config.TrainConfig
    )
    config = run_folder.resolve_config(requested, path)
    assert (config.steps, config.lora.rank, config.lora.dropout, config.lora.alpha) == (50, 32, 0.1, 16.0)


def test_train_to_argv_round_trips_through_the_command_line(tmp_path):
    config = run_folder.resolve_config(
        {
            "data": [str(tmp_path / "a"), str(tmp_path / "b")],
            "out": str(tmp_path / "run"),
            "init": "random",
            "preset": "tiny",
            "trainable": "all",
            "remat": False,
            "augment": False,
            "data_weights": [1.0, 3.0],
            "b2": 0.95,
            "lora": {"rank": 2, "targets": ["q", "img_fc1"]},
        }
    )
    argv = settings.to_argv(config)
    assert "--no-remat" in argv and "--no-augment" in argv and argv[argv.index("--lora-targets") + 1] == "q,img_fc1"
    assert run_folder.resolve_config(settings.given(_train_args(argv), train_config.TrainConfig)) == config
