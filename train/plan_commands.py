"""`paliseg plan`: memory and time of a training step or of decoding, before renting a GPU (registered by
paliseg.cli.main; the planning itself is train/plan.py). `paliseg train ... --plan` prints the same plan."""

from __future__ import annotations

import argparse

from paliseg import settings
from train.config import PLANNED_SETTINGS, PlanConfig, TrainConfig

_DESCRIPTION = """\
Plan a run before renting a GPU: the bytes per device of the training step `paliseg train` compiles (or,
with --predict, of the decoder `paliseg predict` and `serve` run), read from XLA's buffer assignment of that
very program lowered on abstract params (nothing the size of the model is allocated; ~15 s on two CPU
cores for the 3B model); the FLOPs of a step and the time they take on --accelerator at --mfu; and with
--device-memory, the largest batch that fits one device."""

_EPILOG = """\
what it reports (per device): parameters (frozen + trainable), optimizer state, batch, activations (what
the backward pass keeps), temporaries (XLA's, activations included) and the peak = arguments + temporaries
+ results. The compiler is this host's: on the GPU itself that is the allocation XLA makes there; from a
CPU it is XLA:CPU's assignment of the same program (docs/results.md compares both with measured peaks).

accelerators (dense bf16 peak, memory): H100 (989 TFLOP/s, 80 GiB), H200 (989, 141), A100 (312, 80),
L4 (121, 24), RTX 4090 (165, 24), TPU v5e (197, 16).

examples:
  paliseg plan --preset paligemma2-3b-224 --batch-size 32 --accelerator H100
  paliseg plan --preset paligemma2-10b-224 --base-dtype nf4 --batch-size 16 --device-memory 24GB
  paliseg plan --preset paligemma2-3b-224 --devices 4 --mesh-fsdp 4 --trainable all --device-memory 24GB
  paliseg plan --preset paligemma2-3b-224 --predict --batch-size 32 --max-new-tokens 128 --json
  paliseg train --data data/cracks --checkpoint BASE.npz --out runs/r1 --batch-size 16 --plan"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="Memory per device, FLOPs and step time of a training step (or of decoding), and the batch that fits a card.",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups = settings.add_arguments(parser, TrainConfig, only=PLANNED_SETTINGS)
    settings.add_arguments(parser, PlanConfig, groups)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON on stdout")
    parser.set_defaults(run=_plan)


def resolve(args: argparse.Namespace) -> tuple[TrainConfig, PlanConfig]:
    """The run a `paliseg plan` command line plans (its settings checked as `paliseg train` checks them; no
    data or run folder: the plan reads neither) and the plan's own settings."""
    from train import run as run_folder

    requested = settings.given(args, TrainConfig)
    placeholders = {"data": ["-"], "out": "-"}
    if not (requested.get("checkpoint") or requested.get("init_run")):
        placeholders["init"] = "random"  # the preset's shapes: all a plan needs of a base
    return run_folder.resolve_config(settings.merge(placeholders, requested)), plan_settings(args)


def plan_settings(args: argparse.Namespace) -> PlanConfig:
    """The plan's own settings given on a command line (`paliseg plan`'s, or `paliseg train --plan`'s)."""
    return settings.from_dict(PlanConfig, settings.given(args, PlanConfig), "plan settings")


def report(config: TrainConfig, plan_config: PlanConfig, as_json: bool) -> int:
    """Plan `config` (`train.plan`) and print the plan (`--json`: the JSON on stdout)."""
    import contextlib

    import jax

    if plan_config.devices is not None:
        # A CPU host plans for that many CPU devices, set before the backend starts; once it has started
        # (another command in this process), `plan` checks the devices there are.
        with contextlib.suppress(RuntimeError):
            jax.config.update("jax_num_cpu_devices", plan_config.devices)
    from paliseg import console
    from train import plan

    result = plan.plan(config, plan_config)
    console.report(result, plan.describe(result), as_json)
    return 0


def _plan(args: argparse.Namespace) -> int:
    config, plan_config = resolve(args)
    return report(config, plan_config, args.json)
