"""paliseg.settings: flags derived from config dataclasses, the flags given, and the flags of a config."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Literal

import pytest

from converters import commands as converters_commands
from converters.config import ConvertConfig
from infer import config as infer_config
from metrics import commands as metrics_commands
from paliseg import settings
from paliseg.cli import demo
from paliseg.cli.main import build_parser
from paliseg.config import LoraConfig
from paliseg.settings import setting
from train import config as train_config
from train import run as run_folder
from vae import commands as vae_commands
from vae.training import VaeTrainConfig


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


@dataclasses.dataclass(frozen=True)
class Shared:
    dtype: str | None = setting(None, "a dtype", choices=("f32", "bf16"))
    steps: int = setting(4, "steps", metavar="N", at_least=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Checked:
    size: int = setting(1, "a size", at_least=1)
    rate: float = setting(0.5, "a rate", above=0, at_most=1)
    sizes: list[int] = setting([1], "sizes", at_least=0)
    fast: bool = setting(False, "go fast", exclusive="speed")
    slow: bool = setting(False, "go slow", exclusive="speed")
    left: str | None = setting(None, "from the left", exclusive="side", required=True)
    right: str | None = setting(None, "from the right", exclusive="side", required=True)
    shared: Shared = setting(Shared(), prefix=False)

    def __post_init__(self):
        settings.check(self)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--size", "0"], "argument --size: must be at least 1, got 0"),
        (["--rate", "0"], "argument --rate: must be more than 0, got 0"),
        (["--rate", "1.5"], "argument --rate: must be at most 1, got 1.5"),
        (["--sizes", "2,-1"], "argument --sizes: must be at least 0, got -1"),
        (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
        (["--size", "x"], "argument --size: invalid int value: 'x'"),
        (["--fast", "--slow"], "argument --slow: not allowed with argument --fast"),
        (["--left", "a", "--right", "b"], "argument --right: not allowed with argument --left"),
        ([], "one of the arguments --left --right is required"),
    ],
)
def test_bounds_and_exclusive_groups_are_refused_at_parse_time(argv, message, capsys):
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, Checked)
    needed = [] if "--left" in argv or not argv else ["--left", "a"]
    with pytest.raises(SystemExit):
        parser.parse_args(argv + needed)
    assert message in capsys.readouterr().err


def test_check_refuses_in_python_what_argparse_refuses_on_the_command_line():
    assert Checked(left="a", size=5, rate=1.0, sizes=[0, 3], fast=True).size == 5
    with pytest.raises(ValueError) as refused:
        Checked(left="a", size=0, rate=0.0, sizes=[2, -1], fast=True, slow=True, shared=Shared(dtype="f16"))
    assert str(refused.value) == (
        "--size must be at least 1, got 0; --rate must be more than 0, got 0; --sizes must be at least 0, got -1; "
        "--dtype must be one of f32, bf16, got 'f16'; --fast and --slow are exclusive"
    )
    with pytest.raises(ValueError, match=r"^one of --left, --right is required$"):
        Checked()
    with pytest.raises(ValueError, match=r"^--left and --right are exclusive$"):
        Checked(left="a", right="b")


def test_an_unprefixed_nested_config_keeps_its_flag_names():
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, Checked)
    args = parser.parse_args(["--left", "a", "--dtype", "bf16", "--steps", "7"])
    assert args.dtype == "bf16"  # the dest of the flag, not of the field's path
    assert settings.given(args, Checked) == {"left": "a", "shared": {"dtype": "bf16", "steps": 7}}
    config = settings.from_dict(Checked, settings.given(args, Checked))
    assert config.shared == Shared(dtype="bf16", steps=7)
    assert settings.to_argv(config) == ["--left", "a", "--dtype", "bf16", "--steps", "7"]


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


# Every subcommand's flags come from its settings classes.

COMMAND_SETTINGS = {
    "convert": (ConvertConfig,),
    "validate": (converters_commands.ValidateSettings,),
    "train": (train_config.TrainConfig, train_config.ProcessSettings, train_config.PlanConfig),
    "plan": (train_config.TrainConfig, train_config.PlanConfig),
    "predict": (infer_config.PredictSettings,),
    "eval": (infer_config.EvalSettings, train_config.ProcessSettings),
    "serve": (infer_config.ServeSettings,),
    "score": (metrics_commands.ScoreSettings,),
    "visualize": (metrics_commands.VisualizeSettings,),
    "demo": (demo.DemoSettings,),
    "vae train": (vae_commands.TrainOutput, VaeTrainConfig),
    "vae ceiling": (vae_commands.CeilingSettings,),
    "vae download": (vae_commands.DownloadSettings,),
    "vae encode": (vae_commands.EncodeSettings,),
}
# Flags a command declares itself: none changes what it computes (--beam: where it runs, the files equal;
# --config, --resume, --overwrite: where the settings come from; --plan: print the plan instead of running),
# and convert's maps (CLASS=VALUE pairs, fields the command parses itself).
COMMAND_ONLY = {
    "--help", "--json", "--beam", "--config", "--resume", "--overwrite", "--plan", "--prompt-map", "--label-map",
}  # fmt: skip


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser by its name ("vae train" for a nested one)."""

    def walk(parser: argparse.ArgumentParser, prefix: str) -> dict[str, argparse.ArgumentParser]:
        found = {}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    children = walk(sub, f"{prefix}{name} ")
                    found.update(children or {f"{prefix}{name}": sub})
        return found

    return walk(build_parser(), "")


def test_every_subcommand_has_settings():
    assert sorted(_subparsers()) == sorted(COMMAND_SETTINGS)


@pytest.mark.parametrize("command", sorted(COMMAND_SETTINGS))
def test_every_flag_of_a_command_is_a_field_of_its_settings(command):
    parser, classes = _subparsers()[command], COMMAND_SETTINGS[command]
    options = [action for action in parser._actions if action.option_strings]
    mapped = {}
    for action in options:
        if set(action.option_strings) & COMMAND_ONLY:
            continue
        args = argparse.Namespace(**{other.dest: None for other in parser._actions})
        setattr(args, action.dest, action.const if action.const is not None else "x")
        found = [(cls.__name__, key) for cls in classes for key in settings.leaves(cls, settings.given(args, cls))]
        assert len(found) == 1, (command, action.option_strings, found)
        mapped[action.option_strings[0]] = found[0]
    assert len(mapped) == len(set(mapped.values()))  # one flag per field
    flags = {option for action in options for option in action.option_strings}
    assert ("--json" in flags) == (command != "serve")  # every command that reports a result (serve serves)


@pytest.mark.parametrize("command", sorted(COMMAND_SETTINGS))
def test_no_help_restates_a_default_or_a_measured_time(command):
    parser = _subparsers()[command]
    for action in parser._actions:
        text = action.help or ""
        assert text.count("(default") <= 1, (command, action.option_strings, text)
        assert not re.search(r"default \d", text), (command, action.option_strings, text)  # "(default 8)"
    assert "minute" not in parser.format_help()


def _settings_of(command: str, argv: list[str]):
    return settings.from_args(build_parser().parse_args([command, *argv]), COMMAND_SETTINGS[command][0])


def test_predict_and_serve_flags_fill_their_settings():
    config = _settings_of(
        "predict", ["--run", "r", "--image", "i.jpg", "--prompt", "a", "--prompt", "b", "--no-canvas", "--raw",
                    "--dtype", "float32", "--no-constrain", "--batch-size", "2"],
    )  # fmt: skip
    assert config.model == infer_config.ModelSettings(run_dir=Path("r"))
    assert (config.image, config.prompt, config.canvas, config.raw, config.constrain) == (
        Path("i.jpg"), ("a", "b"), False, True, False,
    )  # fmt: skip
    assert (config.decoding.dtype, config.batch_size, config.out) == ("float32", 2, None)
    assert _settings_of("predict", settings.to_argv(config)) == config  # what the demo prints runs the same
    serve = _settings_of("serve", ["--checkpoint", "c", "--max-batch", "4", "--port", "0", "--no-access-log"])
    assert serve.server == infer_config.ServeConfig(max_batch=4) and (serve.port, serve.access_log) == (0, False)


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "--image", "i.jpg", "--out", "o"],  # no model
        ["predict", "--run", "r", "--checkpoint", "c", "--image", "i.jpg", "--out", "o"],
        ["predict", "--run", "r", "--image", "i.jpg", "--batch-size", "0"],
        ["eval", "r", "--data", "d", "--out", "o", "--metric", "accuracy"],
        ["eval", "r", "--data", "d", "--out", "o", "--canvases", "-1"],
        ["serve", "--run", "r", "--port", "70000"],
        ["serve", "--run", "r", "--max-image-mb", "0"],
        ["score", "--pred", "p", "--gt", "g", "--prompt", "x", "--prompt-from-name"],
        ["score", "--pred", "p", "--gt", "g", "--empty-score", "2"],
        ["visualize", "--data", "d", "--out", "o", "--limit", "0"],
        ["demo", "--resume", "--overwrite"],
    ],
)
def test_commands_refuse_bad_settings_at_parse_time(argv, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert f"paliseg {argv[0]}: error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: infer_config.EvalSettings(run_dir=Path("r"), data=Path("d"), out=Path("o"), metric="accuracy"),
         "--metric must be one of miou, mdice"),
        (lambda: infer_config.EvalSettings(run_dir=Path("r"), data=Path("d"), out=Path("o"), steps="best"),
         "--steps must be 'all' or comma-separated step numbers"),
        (lambda: infer_config.PredictSettings(model=infer_config.ModelSettings(), image=Path("i"), raw=True),
         "one of --run, --checkpoint is required"),
        (lambda: infer_config.PredictSettings(model=infer_config.ModelSettings(checkpoint=Path("c")), image=Path("i")),
         "--out DIR is required (or --raw alone"),
        (lambda: infer_config.ServeConfig(max_wait_ms=-1.0), "--max-wait-ms must be at least 0, got -1"),
        (lambda: demo.DemoSettings(resume=True, overwrite=True), "--resume and --overwrite are exclusive"),
    ],
)  # fmt: skip
def test_settings_built_in_python_are_checked_as_the_flags_are(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()
