"""The geometric augmentation's effect on the demo's task: the demo's supervised recipe as it is and with
`--augment-geometric` (and `--augment-flip` unless --no-flip: the shapes' prompts say nothing of left or
right), same steps, seed and data, scored as `mask_loss_gain.py` scores (each run's best step picked on the
demo's 48 valid images, the figures on the larger valid split). The change in mask mIoU is printed last.

    .venv/bin/paliseg demo --out demo_out          # once: the data, and the run as it is
    .venv/bin/python benchmarks/augment_gain.py --demo demo_out [--min-scale 0.8 --max-scale 1.25] [--no-flip]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mask_loss_gain import arguments, compare, output_folder


def main() -> None:
    parser = arguments(__doc__, "augment_gain")
    parser.add_argument("--min-scale", type=float, default=0.8, help="--augment-min-scale")
    parser.add_argument("--max-scale", type=float, default=1.25, help="--augment-max-scale")
    parser.add_argument("--max-shift", type=float, default=0.1, help="--augment-max-shift")
    parser.add_argument("--no-flip", action="store_true", help="without --augment-flip")
    args = parser.parse_args()
    changes = {"augment_geometric": True, "augment_flip": not args.no_flip, "augment_min_scale": args.min_scale,
               "augment_max_scale": args.max_scale, "augment_max_shift": args.max_shift}  # fmt: skip
    label = (f"the geometric augmentation (zoom {args.min_scale:g}..{args.max_scale:g}, shift {args.max_shift:g}"
             + ("" if args.no_flip else ", flip") + ")")  # fmt: skip
    compare(Path(args.demo), output_folder(args, "augment_gain"), changes, label, args)


if __name__ == "__main__":
    main()
