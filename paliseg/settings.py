"""Command-line flags derived from typed config dataclasses, so that each setting is declared once.

A config field declares its help (and where needed metavar, choices, group, ...) with `setting(default,
help)`; `add_arguments` turns the fields into argparse flags: `lr` -> `--lr`, and the fields of a nested
config dataclass take the field's name as prefix (`lora.rank` -> `--lora-rank`). The help ends with the
default, read from the dataclass. Every derived flag defaults to None, so a flag that was not given stays
distinguishable from one given with the default's value: `given(args, cls)` is the nested dict of the
flags given, and settings resolve as defaults < config file < flags with `merge` and `from_dict`.
`to_argv(config)` is the inverse: the flags that reproduce a config (those of the fields that differ from
the defaults).

A field may also declare the values it accepts: choices, bounds (`at_least=1`, `above=0`, `at_most=N`,
`below=1`) and `exclusive` groups (at most one given; one required when a member says `required=True`).
argparse refuses a flag that breaks them, and `check(config)` refuses a config built in Python that does
(a config class calls it from `__post_init__`), with the same flag names in the message.

Types come from the annotations:
    int, float, str, Path           --x VALUE            (`X | None`: the same; None is "no value")
    Literal["a", "b"] or choices=   --x {a,b}            (rejected by argparse otherwise)
    bool                            --x when the default is off, --no-x when it is on (write the help for
                                    that flag), --x/--no-x with negatable=True
    list[X], tuple[X, ...]          --x A,B (items="comma"), --x A --x B ("repeated"), --x A B ("spaced")
    a dataclass                     its fields, flags prefixed by the field name (defaults: the field's);
                                    with prefix=False the fields keep their own flag names (settings that
                                    several commands share, e.g. the model of predict and serve)
"""

from __future__ import annotations

import argparse
import collections.abc
import copy
import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Literal

_METADATA_KEY = "paliseg.settings"
MISSING = dataclasses.MISSING


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one config field appears on the command line (see `setting`)."""

    help: str = ""
    metavar: str | None = None
    choices: tuple | None = None  # allowed values (of each item, for lists)
    flag: str | None = None  # the option string, when not derived from the field name
    group: str | None = None  # title of the argparse argument group (a nested config's applies to its fields)
    exclusive: str | None = None  # flags sharing this name (within a group) are mutually exclusive
    negatable: bool = False  # bool: both --x and --no-x
    required: bool = False  # the flag must be given (in an exclusive group: one of the group's flags)
    items: Literal["comma", "repeated", "spaced"] = "comma"  # how a list is written
    cli: bool = True  # False: no derived flag (the command declares its own, or config files only)
    at_least: float | None = None  # bounds of a number (of each item, for lists)
    at_most: float | None = None
    above: float | None = None  # a lower bound the value must exceed (a size, a rate: more than 0)
    below: float | None = None  # an upper bound the value must stay under (a fraction: less than 1)
    prefix: bool = True  # a nested config: False keeps its fields' own flag names (--dtype, not --x-dtype)


def setting(default: Any = MISSING, help: str = "", **options: Any) -> Any:
    """A dataclass field with its command-line declaration (`Setting`'s fields as keywords); a mutable
    default (list, dict, mutable dataclass) is copied for each instance."""
    factory: Any = MISSING
    if default is not MISSING and type(default).__hash__ is None:
        default, factory = MISSING, functools.partial(copy.deepcopy, default)
    return dataclasses.field(
        default=default, default_factory=factory, metadata={_METADATA_KEY: Setting(help, **options)}
    )


@dataclasses.dataclass(frozen=True)
class _Flag:
    """One leaf field of a config class, as a command-line flag."""

    path: tuple[str, ...]  # field names from the top config down
    names: tuple[str, ...]  # the field names that make up the flag (`path` less the unprefixed configs')
    owner: str  # the class that declares the field, for messages
    option: Setting
    kind: Literal["bool", "value", "list"]
    parse: Callable[[str], Any]  # one value (one item, for lists) from its text
    choices: tuple | None
    default: Any  # MISSING: required

    @property
    def dest(self) -> str:
        return "_".join(self.names)

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def name(self) -> str:
        if self.option.flag:
            return self.option.flag
        base = "-".join(self.names).replace("_", "-")
        off = self.kind == "bool" and self.default is True and not self.option.negatable
        return f"--no-{base}" if off else f"--{base}"

    def text(self, value: Any) -> str:
        """A value as written on the command line (and in the help's default)."""
        if self.kind == "list":
            items = [str(item) for item in value]
            if self.option.items == "comma" and any("," in item for item in items):
                raise ValueError(f"{self.name}: an item holds a comma: {value!r}")
            return ("," if self.option.items == "comma" else " ").join(items)
        if self.kind == "bool":
            return "on" if value else "off"
        return str(value)

    def argv(self, value: Any) -> list[str]:
        if value is None:
            raise ValueError(f"{self.key}: None cannot be given as {self.name} (its default is {self.default!r})")
        if self.kind == "bool":
            if self.option.negatable:
                return [self.name if value else "--no-" + self.name.removeprefix("--")]
            return [self.name]  # the one value the flag can set: the other one is the default
        if self.kind == "list" and self.option.items == "repeated":
            return [part for item in value for part in (self.name, str(item))]
        if self.kind == "list" and self.option.items == "spaced":
            if not value:
                raise ValueError(f"{self.name} takes at least one value; {self.key} is empty")
            return [self.name, *map(str, value)]
        return [self.name, self.text(value)]

    def refusal(self, value: Any) -> str | None:
        """What is wrong with one value (one item, for lists) by the declared choices and bounds, or None."""
        option = self.option
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}, got {value!r}"
        if option.at_least is not None and value < option.at_least:
            return f"must be at least {option.at_least:g}, got {value:g}"
        if option.above is not None and value <= option.above:
            return f"must be more than {option.above:g}, got {value:g}"
        if option.at_most is not None and value > option.at_most:
            return f"must be at most {option.at_most:g}, got {value:g}"
        if option.below is not None and value >= option.below:
            return f"must be less than {option.below:g}, got {value:g}"
        return None

    def checked_parse(self) -> Callable[[str], Any]:
        """`parse` that refuses a value out of the declared bounds (argparse checks the choices itself)."""
        option = self.option
        if all(bound is None for bound in (option.at_least, option.at_most, option.above, option.below)):
            return self.parse

        def parse(text: str) -> Any:
            value = self.parse(text)
            problem = self.refusal(value)
            if problem is not None:
                raise argparse.ArgumentTypeError(problem)
            return value

        parse.__name__ = self.parse.__name__  # argparse names the type in "invalid int value"
        return parse

    def help(self) -> str:
        text = self.option.help
        if self.choices and (self.option.metavar or self.kind == "list"):  # the metavar does not show them
            text += f"; one of: {', '.join(map(str, self.choices))}"
        empty = self.default in (MISSING, None, "") or (isinstance(self.default, (list, tuple)) and not self.default)
        if not empty and (self.kind != "bool" or self.option.negatable):  # a one-way bool flag is its own help
            text += f" (default: {self.text(self.default)})"
        return text.replace("%", "%%")  # argparse formats help with %

    def add_to(self, container: Any, required: bool) -> None:
        common: dict[str, Any] = {"dest": self.dest, "default": None, "help": self.help()}
        if self.kind == "bool":
            if self.option.negatable:
                container.add_argument(self.name, action=argparse.BooleanOptionalAction, **common)
            else:
                container.add_argument(self.name, action="store_const", const=not self.default, **common)
            return
        common.update(metavar=self.option.metavar, required=required)
        parse = self.checked_parse()
        if self.kind == "value":
            container.add_argument(self.name, type=parse, choices=self.choices, **common)
        elif self.option.items == "comma":
            container.add_argument(self.name, type=_comma_list(parse, self.choices), **common)
        elif self.option.items == "repeated":
            container.add_argument(self.name, action="append", type=parse, choices=self.choices, **common)
        else:
            container.add_argument(self.name, nargs="+", type=parse, choices=self.choices, **common)


def _comma_list(parse: Callable[[str], Any], choices: tuple | None) -> Callable[[str], list]:
    def parse_list(text: str) -> list:
        try:
            values = [parse(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {parse.__name__}, got {text!r}"
            ) from None
        bad = [value for value in values if choices is not None and value not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"invalid choice(s) {', '.join(map(str, bad))} (choose from {', '.join(map(str, choices))})"
            )
        return values

    return parse_list


def _scalar(annotation: Any, where: str) -> tuple[Callable[[str], Any], tuple | None]:
    """(parse, choices) of a single value's annotation; `str | Path` is read as str."""
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        if str in members and all(member in (str, Path) for member in members):
            return str, None
    if annotation in (int, float, str, Path):
        return annotation, None
    raise TypeError(f"{where}: no command-line form for the type {annotation!r}")


def _default_of(field: dataclasses.Field, parent_default: Any) -> Any:
    """The field's default: the parent's default instance's value for nested configs, else the field's."""
    if parent_default is not MISSING:
        return getattr(parent_default, field.name)
    if field.default is not MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not MISSING else MISSING


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _nested_class(cls: type, name: str) -> type | None:
    annotation = _hints(cls)[name]
    return annotation if isinstance(annotation, type) and dataclasses.is_dataclass(annotation) else None


@functools.cache
def _flags(cls: type) -> tuple[_Flag, ...]:
    return tuple(_walk(cls, (), (), MISSING, None))


def _walk(cls: type, prefix: tuple[str, ...], names: tuple[str, ...], parent_default: Any, group: str | None):
    for field in dataclasses.fields(cls):
        option = field.metadata.get(_METADATA_KEY)
        where = f"{cls.__name__}.{field.name}"
        default = _default_of(field, parent_default)
        nested = _nested_class(cls, field.name)
        if nested is not None:
            prefixed = option is None or option.prefix
            yield from _walk(
                nested,
                prefix + (field.name,),
                names + (field.name,) if prefixed else names,
                default,
                option.group if option and option.group else group,
            )
            continue
        if option is None:
            raise TypeError(f"{where}: declare it with paliseg.settings.setting(default, help)")
        if not option.group and group:
            option = dataclasses.replace(option, group=group)
        if not option.cli:  # the command declares it: its type needs no command-line form here
            yield _Flag(
                prefix + (field.name,), names + (field.name,), cls.__name__, option, "value", str, None, default
            )
            continue
        annotation = _hints(cls)[field.name]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # `X | None` is read as X
            members = [member for member in typing.get_args(annotation) if member is not type(None)]
            annotation = members[0] if len(members) == 1 else annotation
        origin = typing.get_origin(annotation)
        if annotation is bool:
            kind, parse, choices = "bool", bool, None
        elif origin in (list, tuple, collections.abc.Sequence):
            kind = "list"
            parse, choices = _scalar(typing.get_args(annotation)[0], where)
        else:
            kind = "value"
            parse, choices = _scalar(annotation, where)
        if option.choices is not None:
            choices = tuple(option.choices)
        yield _Flag(prefix + (field.name,), names + (field.name,), cls.__name__, option, kind, parse, choices, default)


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    groups: dict[str, Any] | None = None,
    only: Collection[str] | None = None,
) -> dict[str, Any]:
    """Add a flag per field of `cls` (recursively) to `parser`; returns the argument groups by title.

    Pass `groups` to put flags into groups made already; add a command's own flags to the returned ones.
    `only`: the fields to add (a nested config's name adds all of its fields), for a command that takes
    some of another command's settings (`paliseg plan` takes the model and batch settings of `train`).
    """
    groups = {} if groups is None else groups
    exclusive: dict[tuple[str | None, str], Any] = {}
    members = _exclusive_groups(cls)
    for flag in _flags(cls):
        if not flag.option.cli or (only is not None and flag.path[0] not in only and flag.key not in only):
            continue
        container = parser
        if flag.option.group is not None:
            if flag.option.group not in groups:
                groups[flag.option.group] = parser.add_argument_group(flag.option.group)
            container = groups[flag.option.group]
        if flag.option.exclusive is None:
            flag.add_to(container, required=flag.option.required or flag.default is MISSING)
            continue
        key = (flag.option.group, flag.option.exclusive)
        if key not in exclusive:
            required = any(member.option.required for member in members[key])
            exclusive[key] = container.add_mutually_exclusive_group(required=required)
        flag.add_to(exclusive[key], required=False)  # argparse: the group is required, not its flags
    return groups


def _exclusive_groups(cls: type) -> dict[tuple[str | None, str], list[_Flag]]:
    """The flags of each exclusive group of `cls`, by (argument group, exclusive name)."""
    found: dict[tuple[str | None, str], list[_Flag]] = {}
    for flag in _flags(cls):
        if flag.option.exclusive is not None:
            found.setdefault((flag.option.group, flag.option.exclusive), []).append(flag)
    return found


def check(config: Any) -> None:
    """Raise ValueError naming every setting of `config` that its declaration refuses (`refusals`)."""
    problems = refusals(config)
    if problems:
        raise ValueError("; ".join(problems))


def refusals(config: Any) -> list[str]:
    """Every setting of `config` that its declaration refuses (choices, bounds, exclusive groups), by its
    flag: what argparse refuses on the command line, for configs built in Python. None is "no value" and
    passes."""
    problems = []
    for flag in _flags(type(config)):
        value = lookup(config, flag.key)
        if value is None or not flag.option.cli:
            continue
        for item in value if flag.kind == "list" else [value]:
            problem = flag.refusal(item)
            if problem is not None:
                problems.append(f"{flag.name} {problem}")
                break
    for members in _exclusive_groups(type(config)).values():
        given = [flag.name for flag in members if not _same(lookup(config, flag.key), flag.default)]
        if len(given) > 1:
            problems.append(f"{' and '.join(given)} are exclusive")
        elif not given and any(flag.option.required for flag in members):
            problems.append(f"one of {', '.join(flag.name for flag in members)} is required")
    return problems


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings of `cls` given as flags, nested like the config (`{"lora": {"rank": 16}}`)."""
    values: dict[str, Any] = {}
    for flag in _flags(cls):
        value = getattr(args, flag.dest, None) if flag.option.cli else None
        if value is not None:
            node = values
            for name in flag.path[:-1]:
                node = node.setdefault(name, {})
            node[flag.path[-1]] = value
    return values


def from_args(args: argparse.Namespace, cls: type, **by_hand: Any) -> Any:
    """The config of a command's parsed flags over the defaults, with `by_hand` the settings it takes through
    arguments of its own (a positional argument, a field with cli=False)."""
    return from_dict(cls, {**given(args, cls), **by_hand}, "flags")


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied, nested dicts key by key; None in `overrides` means "not given"."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        elif value is not None:
            merged[key] = value
    return merged


def leaves(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The settings in `values` (nested like `cls`) by dotted name: {"lr": 1e-3, "lora.rank": 16}."""
    found = {}
    for key, value in values.items():
        nested = _nested_class(cls, key) if key in _hints(cls) else None
        if nested is not None and isinstance(value, dict):
            found.update({f"{key}.{name}": inner for name, inner in leaves(nested, value).items()})
        else:
            found[key] = value
    return found


def lookup(config: Any, key: str) -> Any:
    """The value of a dotted setting name in a config (`lookup(config, "lora.rank")`)."""
    for name in key.split("."):
        config = getattr(config, name)
    return config


def _known_names(cls: type) -> list[str]:
    """Every setting of `cls` by dotted name (nested configs' fields as `lora.rank`)."""
    return sorted(flag.key for flag in _flags(cls))


def from_dict(cls: type, values: dict[str, Any], where: str = "config", _defaults: Any = MISSING) -> Any:
    """A config from a (nested) mapping over the defaults; unknown keys are an error listing the known ones.

    A nested config given as a dict changes only the fields it names (`{"lora": {"rank": 16}}` keeps the
    default alpha); sequences become the annotated list or tuple.
    """
    unknown = sorted(set(leaves(cls, values)) - set(_known_names(cls)))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(_known_names(cls))}")
    changes = {}
    for field in dataclasses.fields(cls):
        if field.name not in values:
            continue
        value = values[field.name]
        nested = _nested_class(cls, field.name)
        if nested is not None and isinstance(value, dict):
            try:
                value = from_dict(nested, value, where, _default_of(field, _defaults))
            except (TypeError, ValueError) as error:
                raise ValueError(f"{where}: {field.name}: {error}") from None
        elif isinstance(value, (list, tuple)):
            origin = typing.get_origin(_hints(cls)[field.name])
            value = tuple(value) if origin is tuple else list(value)
        changes[field.name] = value
    return cls(**changes) if _defaults is MISSING else dataclasses.replace(_defaults, **changes)


def to_argv(config: Any, written_by_caller: Sequence[str] = ()) -> list[str]:
    """The flags that reproduce `config` from the defaults: one per field that differs from its default.

    `written_by_caller` names fields the command takes by hand (positional arguments, `--prompt-map`): they
    are left out. Raises ValueError for any other differing field that no derived flag can set (one with
    `cli=False`, or None where the default is not None).
    """
    argv: list[str] = []
    for flag in _flags(type(config)):
        if flag.key in written_by_caller:
            continue
        value = lookup(config, flag.key)
        if flag.default is not MISSING and _same(value, flag.default):
            continue
        if not flag.option.cli:
            raise ValueError(f"{flag.key}={value!r}: {flag.owner} declares no flag for it")
        argv += flag.argv(value)
    return argv


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return list(value) == list(default)
    return value == default
