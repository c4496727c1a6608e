"""`paliseg <command>`: one entry point, one subcommand per pipeline step.

Each stage owns its subcommands in `<stage>/commands.py` (`register(subparsers)`), whose top level stays
light (argparse only) so `paliseg --help` answers instantly; the heavy imports happen in the handler.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from paliseg import __version__, allocator

# Order is the pipeline's: the order `--help` lists them in.
_STAGE_COMMAND_MODULES = (
    "converters.commands",  # convert, validate
    "vae.commands",  # vae {train,ceiling,encode,download}
    "train.commands",  # train
    "train.plan_commands",  # plan
    "infer.commands",  # predict, eval, serve
    "metrics.commands",  # score, visualize
    "paliseg.cli.demo",  # demo
)

_EPILOG = """\
the pipeline:
  paliseg convert ROBOFLOW_EXPORT --out DATA      Roboflow COCO/YOLO/JSONL/mask folders -> annotation JSONL
  paliseg validate DATA                           check every record before training
  paliseg train --data DATA --out RUN ...         LoRA (or full) fine-tuning, checkpoints every N steps
  paliseg eval RUN --data DATA --out REPORT       score every checkpoint, pick the best, plots and canvases
  paliseg predict --run RUN --image IMG ...       boxes and full-resolution masks for new images
  paliseg serve --run RUN                         a web page to try the model, an HTTP API (batched)
  paliseg demo                                    all of the above, offline, on bundled data

Every command that reports results accepts --json (result on stdout, messages on stderr).
Run `paliseg COMMAND --help` for a command's inputs and outputs."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paliseg",
        description="PaliGemma token-based segmentation: prompt in, boxes and full-resolution masks out.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"paliseg {__version__}")
    parser.add_argument(
        "--max-image-pixels", type=int, default=None, metavar="N",
        help="refuse images of more than N pixels, a decompression-bomb guard (default: $PALISEG_MAX_IMAGE_PIXELS, "
        "else 89478485, about 9500x9500); goes before the command",
    )  # fmt: skip
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _STAGE_COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `paliseg` command (`argv` None: this process's arguments); returns the exit status."""
    if argv is None:  # a command of its own, not a call from Python: PALISEG_TUNE_MALLOC=1 (allocator.py)
        allocator.ensure()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    from paliseg import images

    try:
        with images.pixel_limit(args.max_image_pixels):
            return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        # Bad input: one clear line naming the file, not a traceback.
        print(f"paliseg {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
