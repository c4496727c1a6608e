"""`paliseg convert` on Apache Beam vs in this process: box-only images masked by SAM, images/s.

    .venv/bin/python benchmarks/convert_scaling.py [--images 16] [--sam-model vit_b]

Box-only synthetic images (`converters.synthetic`, 2-3 boxes each), masked by SAM with random weights of the
smallest real architecture (vit_b: the encoder's cost is the architecture's; no download), converted three
times into fresh folders: in this process, then with `--beam` on the DirectRunner with 1 and 2 worker
processes (`--direct_running_mode=multi_processing`). Each figure is the conversion's own (images / its
whole run: reading the export, loading SAM and the VAE, the pipeline's start, writing the outputs), and the
records are checked equal to the first run's. Prints Beam with 2 workers / in this process last: what Beam
costs on one machine (on more machines, workers add their cores).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import vae  # noqa: E402
from converters import sam, synthetic  # noqa: E402
from converters.convert import ConvertConfig, convert  # noqa: E402
from converters.sources import IssueLog  # noqa: E402
from paliseg import dataset  # noqa: E402


def box_only_export(root: Path, count: int) -> Path:
    synthetic.write_synthetic_coco(
        root, n_train=count, n_valid=0, seed=0, config=synthetic.ShapesConfig(256, ("ellipse", "rectangle"), (2, 3)),
        box_only=True,
    )  # fmt: skip
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="box-only images to convert (default 16)")
    parser.add_argument("--sam-model", default="vit_b", choices=("tiny", "vit_b"))
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory(prefix="convert_scaling_") as tmp:
        work = Path(tmp)
        export = box_only_export(work / "boxes", args.images)
        torch.manual_seed(0)
        checkpoint = work / "sam.pth"
        torch.save(sam.build_sam(args.sam_model).state_dict(), checkpoint)
        settings = dict(
            vae=vae.write_random_npz(work / "vae.npz"), sam_checkpoint=checkpoint, sam_model=args.sam_model,
            sam_device="cpu",
        )  # fmt: skip
        runs = {
            "in this process": None,
            "beam, 1 worker": ["--direct_running_mode=multi_processing", "--direct_num_workers=1"],
            "beam, 2 workers": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
        }
        rates, expected = {}, None
        for index, (name, options) in enumerate(runs.items()):
            out = work / f"out-{index}"
            summary = convert(ConvertConfig([export], out, beam=options, **settings), IssueLog())
            converted = sorted(dataset.read_records(out, "train"), key=lambda r: (r.image, r.prefix))
            expected = converted if expected is None else expected
            rates[name] = summary["images_per_second"]
            print(
                f"{name:16s} {summary['splits']['train']['images']} images ({summary['splits']['train']['objects']} "
                f"SAM masks) in {summary['seconds']:.1f} s: {rates[name]:.3f} images/s; records equal the first "
                f"run's: {converted == expected}",
                flush=True,
            )
        print(f"SAM {args.sam_model} (random weights), {torch.get_num_threads()} torch threads in this process")
        print(f"beam 2 workers / in this process: {rates['beam, 2 workers'] / rates['in this process']:.2f}")


if __name__ == "__main__":
    main()
