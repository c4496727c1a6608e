"""`paliseg` subcommands of this stage (registered by paliseg.cli.main)."""
from __future__ import annotations
import argparse
import sys

_PENDING = {
    'vae': ('Mask VQ-VAE: train your own, measure the token round-trip ceiling, download vae-oid.npz.', 3),
}


def _pending(args: argparse.Namespace) -> int:
    issue = _PENDING[args.command][1]
    print(f"paliseg {args.command}: not implemented yet (tracked in issue {issue})", file=sys.stderr)
    return 2


def register(subparsers) -> None:
    for name, (help_text, _) in _PENDING.items():
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        parser.set_defaults(run=_pending)
