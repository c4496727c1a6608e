"""`paliseg vae ...`: train a mask VAE, measure the token round-trip ceiling, download vae-oid.npz, encode.

Registered by paliseg.cli.main. Light at the top (argparse, paliseg.settings): `register` reads the
`vae train` flags from vae.training.VaeTrainConfig, and the handlers import the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from paliseg import settings
from paliseg.settings import setting
from vae.ceiling import OBJECT_MODES

_VAE_HELP = "the VAE npz (vae-oid layout); default: models/vae-oid.npz if present, else the bundled VAE"


@dataclasses.dataclass(frozen=True)
class TrainOutput:
    """Where `paliseg vae train` reads and writes (its training settings: vae.training.VaeTrainConfig)."""

    out: Path = setting(help="output npz", metavar="OUT", required=True)
    split: str = setting("train", "split of converted datasets / COCO exports with split folders", metavar="SPLIT")
    float16: bool = setting(False, "store the weights as float16 (half the size)")


@dataclasses.dataclass(frozen=True)
class CeilingSettings:
    """`paliseg vae ceiling DATASET`."""

    dataset: Path = setting(cli=False)  # the positional DATASET
    vae: Path | None = setting(
        None, "the VAE npz (vae-oid layout); default: a converted dataset's own (see below), else "
        "models/vae-oid.npz if present, else the bundled VAE", metavar="NPZ")  # fmt: skip
    allow_vae_mismatch: bool = setting(
        False, "use --vae even though its SHA-256 differs from the dataset's recorded VAE (a warning, not an error)"
    )
    split: str | None = setting(None, "split to score (default: valid if present, else the first)", metavar="SPLIT")
    objects: str = setting(
        "instance", "one token group per object, or one per image for the union", choices=OBJECT_MODES
    )
    limit: int | None = setting(None, "score only the first N images", metavar="N", at_least=1)
    canvas: Path | None = setting(None, "write ground truth | round-trip canvases here", metavar="DIR")
    canvas_count: int = setting(8, "images on the canvas (the worst half and a spread)", metavar="N", at_least=1)


@dataclasses.dataclass(frozen=True)
class DownloadSettings:
    """`paliseg vae download`."""

    dir: Path | None = setting(None, "target folder (default: ./models or $PALISEG_MODELS)", metavar="DIR")


@dataclasses.dataclass(frozen=True)
class EncodeSettings:
    """`paliseg vae encode MASK_PNG`."""

    mask: Path = setting(cli=False)  # the positional MASK_PNG
    box: list[float] | None = setting(
        None, "pixel box X1 Y1 X2 Y2 (default: the tight box of the whole mask)", metavar="N", items="spaced"
    )
    vae: Path | None = setting(None, _VAE_HELP, metavar="NPZ")


_TRAIN_EPILOG = """\
MASK_SOURCES (any mix; batches sample all their object crops uniformly):
  synthetic                      built-in shapes: ellipses, polygons, thin curved cracks, taping bands, blobs
  DIR with _annotations.*.jsonl  a converted dataset: each suffix object's box cropped from the record mask
  DIR with _annotations.coco.json (or train/ valid/ folders holding one): a Roboflow COCO export
  DIR of *.png                   a mask folder: every connected component is an object

output: OUT (vae-oid.npz layout, loadable by every paliseg command via --vae), OUT.state (resume state).

example:
  paliseg vae train synthetic ~/data/cracks-masks ~/data/drywall \\
      --out runs/vae/my-vae.npz --steps 4000 --float16
  paliseg vae train ... --out runs/vae/my-vae.npz --resume      # continue after an interruption"""

_CEILING_EPILOG = """\
For every image: ground-truth mask -> (loc, seg) tokens -> mask, scored with metrics.masks.iou at full
resolution. It is the best mIoU any model can reach with these tokens. Each object is encoded from its
box crop (its instance mask for COCO and mask folders; the union mask for converted datasets, which store
no per-object masks). --objects merged encodes each image's union as one object in its tight box.

DATASET: a converted dataset (_annotations.<split>.jsonl), a Roboflow COCO export (folder with
_annotations.coco.json, or with split folders), or a folder of mask PNGs. Records of a converted dataset
that `paliseg eval` would skip (missing or unreadable image or mask, ...) are skipped and counted here too.

VAE: a converted dataset is scored with the VAE it was converted with (its SHA-256 is in
DATASET/conversion.json; found at its recorded path, models/vae-oid.npz or bundled); a --vae of another
SHA-256 is refused unless --allow-vae-mismatch. Other sources: --vae, else the default VAE.

example:
  paliseg vae ceiling ~/data/cracks/valid --json
  paliseg vae ceiling data/cracks --split valid --vae models/vae-oid.npz --canvas runs/ceiling"""


def register(subparsers) -> None:
    from vae.training import VaeTrainConfig  # only optax more: vae/__init__ has loaded jax already

    parser = subparsers.add_parser(
        "vae",
        help="Mask VQ-VAE: train your own, measure the token round-trip ceiling, download vae-oid.npz.",
        description="The mask VQ-VAE that turns an object mask into 16 seg tokens and back (big_vision's "
        "vae-oid.npz architecture).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands: train, ceiling, download, encode (see `paliseg vae SUBCOMMAND --help`)",
    )
    commands = parser.add_subparsers(dest="vae_command", metavar="SUBCOMMAND")
    parser.set_defaults(run=lambda args: (parser.print_help(), 2)[1])

    train = commands.add_parser(
        "train",
        help="train a VAE of the vae-oid architecture on your masks and synthetic shapes",
        description="Train a mask VQ-VAE (EMA codebook of 128 codes, straight-through estimator, dead-code "
        "restarts) on object crops, and write it in the vae-oid.npz layout. Resumable; progress bar on stderr.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_TRAIN_EPILOG,
    )
    train.add_argument("sources", nargs="+", metavar="MASK_SOURCES", help="see below")
    settings.add_arguments(train, TrainOutput)
    settings.add_arguments(train, VaeTrainConfig)  # a flag per field: --steps, --batch-size, ...
    train.add_argument("--resume", action="store_true", help="continue from OUT.state")
    train.add_argument("--overwrite", action="store_true", help="replace OUT (and start over) if it exists")
    train.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    train.set_defaults(run=_run_train)

    ceiling = commands.add_parser(
        "ceiling",
        help="score the mask -> tokens -> mask round trip: the best mIoU any model could reach",
        description="Measure how much of each ground-truth mask survives the token representation (loc "
        "quantisation, 64x64 crop, 16 codes), per prompt.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_CEILING_EPILOG,
    )
    ceiling.add_argument("dataset", type=Path, metavar="DATASET")
    settings.add_arguments(ceiling, CeilingSettings)
    ceiling.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    ceiling.set_defaults(run=_run_ceiling)

    download = commands.add_parser(
        "download",
        help="fetch big_vision's vae-oid.npz into models/ and check it",
        description="Download the released mask VAE (gs://big_vision/paligemma/vae-oid.npz) into models/ "
        "(or --dir), resumably; record its SHA-256 in models/SHA256SUMS (later runs verify it), and check "
        "that it loads: every key and shape of the vae-oid layout.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  paliseg vae download\n  paliseg vae ceiling data/cracks --vae models/vae-oid.npz",
    )
    settings.add_arguments(download, DownloadSettings)
    download.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    download.set_defaults(run=_run_download)

    encode = commands.add_parser(
        "encode",
        help="print the loc + seg tokens of a mask PNG",
        description="Encode one mask PNG (foreground > 127) as `<loc..>x4<seg..>x16`, for the given box or the "
        "mask's tight box, and report the round-trip IoU of that object.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  paliseg vae encode masks/a.segment_crack.png --box 10 20 300 90",
    )
    encode.add_argument("mask", type=Path, metavar="MASK_PNG")
    settings.add_arguments(encode, EncodeSettings)
    encode.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    encode.set_defaults(run=_run_encode)


def _run_train(args: argparse.Namespace) -> int:
    import numpy as np

    from paliseg import console
    from vae import training

    config = settings.from_args(args, training.VaeTrainConfig)
    output = settings.from_args(args, TrainOutput)
    summary = training.train(
        args.sources, output.out, config, resume=args.resume, overwrite=args.overwrite,
        dtype=np.float16 if output.float16 else np.float32, split=output.split,
    )  # fmt: skip
    miou = "n/a" if summary["holdout_miou"] is None else f"{summary['holdout_miou']:.4f}"  # None: no held-out crop
    human = (
        f"wrote {summary['out']} after {summary['steps']} steps: held-out 64x64 round-trip mIoU "
        f"{miou} on {summary['holdout_crops']} crops, "
        f"{summary['holdout_codes_used']}/128 codes used"
    )
    console.report(summary, human, args.json)
    return 0


def _run_ceiling(args: argparse.Namespace) -> int:
    import collections
    import warnings

    import vae
    from paliseg import console, dataset
    from vae import ceiling, identity, sources

    config = settings.from_args(args, CeilingSettings, dataset=args.dataset)
    recorded = identity.of_data(config.dataset)  # None for exports and mask folders: nothing encoded yet
    model = vae.load(identity.resolve(recorded, config.vae, config.allow_vae_mismatch, str(config.dataset)).path)
    counts: collections.Counter = collections.Counter()
    results = []
    skipped: list[dataset.Skip] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", vae.DegenerateBoxWarning)  # counted and reported instead
        found = sources.samples(config.dataset, config.split, config.limit, skipped=skipped)
        for sample in console.progress(found, desc="round trip", unit="img"):
            results.append(ceiling.round_trip(model, sample, config.objects, counts))
    for skip in skipped:
        console.info(f"skipped {skip.where}: {skip.message}")
    if not results:
        raise ValueError(
            f"{config.dataset}: no images to score" + (f" ({len(skipped)} record(s) skipped)" if skipped else "")
        )
    summary = ceiling.summarize(results, counts)
    if skipped:
        summary["skipped_by_reason"] = dataset.skip_counts(skipped)
    summary.update(
        {"dataset": str(config.dataset), "split": config.split, "vae": model.source, "objects": config.objects}
    )
    if config.canvas is not None:
        summary["canvas"] = str(ceiling.write_canvas(config.canvas, results, config.canvas_count))
    rows = [[p, s["images"], s["objects"], s["miou"], s["ciou"]] for p, s in summary["prompts"].items()]
    overall = summary["overall"]
    rows.append(["all", overall["images"], overall["objects"], overall["miou"], overall["ciou"]])
    human = (
        f"round-trip ceiling of {config.dataset} ({config.objects} objects, VAE {model.source}):\n"
        + console.markdown_table(["prompt", "images", "objects", "mIoU", "cIoU"], rows)
        + (f"\ndegenerate boxes (empty masks): {dict(counts)}" if counts else "")
        + (f"\nskipped records: {summary['skipped_by_reason']}" if skipped else "")
        + (f"\ncanvas: {summary['canvas']}" if "canvas" in summary else "")
    )
    console.report(summary, human, args.json)
    return 0


def _run_download(args: argparse.Namespace) -> int:
    import vae
    from paliseg import console, downloads

    asset = next(a for a in downloads.ASSETS if a.name == "vae-oid.npz")
    directory = settings.from_args(args, DownloadSettings).dir or downloads.models_dir()
    try:
        path = downloads.fetch(asset, directory)
    except downloads.DownloadError as error:
        raise ValueError(str(error)) from error
    model = vae.load(path)  # checks every key and shape
    result = {"path": str(path), "sha256": downloads.sha256_of(path), "loaded": repr(model)}
    console.report(result, f"{path}: ok (sha256 {result['sha256']}, recorded in {directory / 'SHA256SUMS'})", args.json)
    return 0


def _run_encode(args: argparse.Namespace) -> int:
    import numpy as np

    import vae
    from metrics import masks as mask_metrics
    from paliseg import console, images
    from paliseg import tokens as codec
    from vae.masks import tight_box

    config = settings.from_args(args, EncodeSettings, mask=args.mask)
    if config.box is not None and len(config.box) != 4:
        raise ValueError(f"--box takes four numbers X1 Y1 X2 Y2, got {len(config.box)}")
    model = vae.load(config.vae)
    mask = images.read_mask(config.mask)
    height, width = mask.shape
    box = tuple(config.box) if config.box else tight_box(mask)
    if box is None:
        raise ValueError(f"{config.mask}: the mask is empty; pass --box")
    seg = vae.mask_to_tokens(model, mask, box)
    locs = codec.box_to_locs(box, width, height)
    text = codec.SegObject(locs, seg, "").to_text()
    pasted = vae.tokens_to_mask(model, seg, locs, width, height)
    x1, y1, x2, y2 = codec.locs_to_pixel_box(locs, width, height)
    inside = np.zeros_like(mask)
    inside[y1:y2, x1:x2] = True
    result = {
        "tokens": text,
        "locs": list(locs),
        "seg": list(seg),
        "box": list(box),
        "round_trip_iou": mask_metrics.iou(pasted, mask & inside),
    }
    console.report(result, f"{text}\nround-trip IoU inside the box: {result['round_trip_iou']:.4f}", args.json)
    return 0
