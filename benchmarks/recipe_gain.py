"""Any change to the demo's supervised recipe, measured as `mask_loss_gain.py` measures the mask loss: the
recipe as it is and with `--set SETTING=VALUE ...` (`paliseg train`'s settings by their config names, e.g.
`seg_label_smoothing=0.1`, `seed=1` for a seed repeat, `steps=2800 lr=0.004` for another schedule), same
data, each run's best step picked on the demo's 48 valid images and scored on the larger valid split. The
change in mask mIoU is printed last.

    .venv/bin/paliseg demo --out demo_out          # once: the data, and the run as it is
    .venv/bin/python benchmarks/recipe_gain.py --demo demo_out --set seed=1 [--name seed1]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mask_loss_gain import arguments, compare, output_folder


def setting(text: str) -> tuple[str, object]:
    """`name=value`, the value read as JSON where it is JSON (numbers, true/false), else as a string."""
    name, separator, value = text.partition("=")
    if not separator or not name:
        raise SystemExit(f"--set {text!r}: expected SETTING=VALUE, e.g. seed=1")
    try:
        return name.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return name.replace("-", "_"), value


def main() -> None:
    parser = arguments(__doc__, "recipe_gain")
    parser.add_argument("--set", nargs="+", required=True, metavar="SETTING=VALUE", help="the recipe's changes")
    args = parser.parse_args()
    changes = dict(setting(text) for text in args.set)
    label = ", ".join(f"{name}={value}" for name, value in changes.items())
    compare(Path(args.demo), output_folder(args, "recipe_gain"), changes, label, args)


if __name__ == "__main__":
    main()
