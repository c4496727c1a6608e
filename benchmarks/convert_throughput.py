"""Conversion throughput on the real exports, and SAM box prompting: one image embedding per image vs per box.

    .venv/bin/python benchmarks/convert_throughput.py [--roboflow ../shared/data/roboflow] [--sam-model tiny|vit_b]

1. `paliseg convert` (in process) of the full cracks valid split (polygons -> pycocotools masks) and the
   full drywall valid split (boxes, `--box-masks fill`), after a short warm-up that compiles the VAE batch
   shapes: images/s for each, everything included (decode, masks, VAE encode, PNG and JSONL writes).
2. SAM on the first `--sam-images` drywall valid images with all their boxes, same model, same run:
   `BoxSegmenter.masks_for_boxes` with every box of an image at once (one embedding per image) vs called
   once per box (the encoder re-run per box, as the peer project did). Random weights: the timing is the
   architecture's, the masks are meaningless. `tiny` is the test model; `vit_b` is the real ViT-B
   architecture (random weights, no download) for an encoder of realistic cost.
Prints the ratio (per-box time / per-image time) last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import vae  # noqa: E402
from converters import sam  # noqa: E402
from converters.convert import ConvertConfig, convert  # noqa: E402
from converters.sources import IssueLog  # noqa: E402
from paliseg import allocator, images  # noqa: E402


def convert_rate(source: Path, work: Path, name: str, vae_path: Path, **options) -> tuple[int, float]:
    """(images converted, seconds)."""
    summary = convert(ConvertConfig([source], work / name, vae=vae_path, **options), IssueLog())
    images = sum(s["images"] for s in summary["splits"].values())
    rate = images / summary["seconds"]
    print(
        f"convert {name}: {images} images, {summary['seconds']:.2f} s, {rate:.1f} images/s "
        f"({sum(s['objects'] for s in summary['splits'].values())} objects)"
    )
    return images, summary["seconds"]


def sam_ratio(drywall_valid: Path, model_type: str, count: int) -> float:
    import torch

    torch.manual_seed(0)
    segmenter = sam.BoxSegmenter(sam.build_sam(model_type).eval())
    data = json.loads((drywall_valid / "_annotations.coco.json").read_text())
    boxes_of: dict = {}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        boxes_of.setdefault(a["image_id"], []).append((x, y, x + w, y + h))
    chosen = [i for i in data["images"] if i["id"] in boxes_of][:count]
    pictures = [np.asarray(images.read_image(drywall_valid / i["file_name"])) for i in chosen]
    boxes = [boxes_of[i["id"]] for i in chosen]
    n_boxes = sum(map(len, boxes))

    segmenter.masks_for_boxes(pictures[0], boxes[0][:1])  # warm-up (allocations, lazy init)
    start = time.perf_counter()
    batched = [segmenter.masks_for_boxes(image, b) for image, b in zip(pictures, boxes)]
    per_image = time.perf_counter() - start
    start = time.perf_counter()
    one_by_one = [
        np.stack([segmenter.masks_for_boxes(image, [box])[0] for box in b]) for image, b in zip(pictures, boxes)
    ]
    per_box = time.perf_counter() - start
    same = all(np.array_equal(a, b) for a, b in zip(batched, one_by_one))
    print(f"SAM {model_type} (random weights), {len(pictures)} drywall images, {n_boxes} boxes:")
    print(f"  one embedding per image: {per_image:.2f} s ({len(pictures) / per_image:.2f} images/s)")
    print(f"  one embedding per box:   {per_box:.2f} s ({len(pictures) / per_box:.2f} images/s)")
    print(f"  identical masks: {same}")
    return per_box / per_image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roboflow", type=Path, default=REPO.parent / "shared" / "data" / "roboflow")
    parser.add_argument("--vae", type=Path, help="VAE npz (default: a random one; weights do not change the timing)")
    parser.add_argument("--sam-model", choices=sam.MODEL_TYPES, default="tiny")
    parser.add_argument("--sam-images", type=int, default=20)
    args = parser.parse_args()
    allocator.ensure()  # PALISEG_TUNE_MALLOC=1, as for the `paliseg` command (paliseg/allocator.py)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        vae_path = args.vae or vae.write_random_npz(work / "vae.npz")
        convert_rate(args.roboflow / "drywall" / "valid", work, "warm-up", vae_path, box_masks="fill", limit=40)
        cracks = convert_rate(args.roboflow / "cracks" / "valid", work, "cracks-valid (polygons)", vae_path)
        drywall = convert_rate(
            args.roboflow / "drywall" / "valid", work, "drywall-valid (fill)", vae_path, box_masks="fill"
        )
        print(f"convert overall: {(cracks[0] + drywall[0]) / (cracks[1] + drywall[1]):.1f} images/s")
    ratio = sam_ratio(args.roboflow / "drywall" / "valid", args.sam_model, args.sam_images)
    print(f"SAM per-box / per-image time ratio ({args.sam_model}): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
