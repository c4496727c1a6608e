"""`paliseg demo`: every stage end to end, offline, on bundled data."""

from __future__ import annotations

import argparse
import sys


def _pending(args: argparse.Namespace) -> int:
    print("paliseg demo: not implemented yet (tracked in issue 8)", file=sys.stderr)
    return 2


def register(subparsers) -> None:
    help_text = "Run the whole pipeline offline on bundled data: convert, train a tiny model, eval, predict."
    parser = subparsers.add_parser("demo", help=help_text, description=help_text)
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--quick", action="store_true", help="a shorter run (under 3 minutes on 2 cores)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    parser.set_defaults(run=_pending)
