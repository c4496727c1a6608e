"""`paliseg convert` and `paliseg validate` (registered by paliseg.cli.main; heavy imports in the handlers)."""

from __future__ import annotations

import argparse
import dataclasses

from converters.config import ConvertConfig
from paliseg import settings
from paliseg.settings import setting

_CONVERT_HELP = (
    "Convert Roboflow exports (COCO, YOLO, PaliGemma JSONL, mask folders) into annotation JSONL with loc + seg tokens."
)
_CONVERT_EPILOG = """\
inputs (detected per split, or forced with --format):
  coco       <split>/_annotations.coco.json beside the images; polygons, RLE, or boxes (segmentation: [])
  yolo       data.yaml + <split>/images + <split>/labels (normalised boxes and/or polygons)
  paligemma  [dataset/]_annotations.<split>.jsonl with image/prefix/suffix (boxes as loc tokens)
  masks      <stem>_mask.png beside the image, in <split>_masks/, or in <split>/masks/; connected
             components become instances (class: --mask-class, else the export's only COCO class)
  SRC may also be one split folder (e.g. cracks/valid). Several SRCs are written into one DIR.

outputs (--output-format jsonl, the default):
  DIR/_annotations.<split>.jsonl      one record per image and prompt: image, prefix, suffix, mask, provenance
  DIR/images/<split>/<export>/...     hard links to the source images (copies across file systems)
  DIR/masks/<split>/<export>/<stem>.<prompt>.png   ground truth: union of the prompt's objects, 0/255
  DIR/conversion.json                 the summary printed at the end, and the SHA-256 of the VAE that wrote
                                      the seg tokens (train, eval, predict and `vae ceiling` use that VAE)
  --output-format tfds: the same records as a TFDS dataset instead (dataset_info.json, paliseg-<split>.tfrecord-*
  and .array_record-* shards; `tfds.builder_from_directory(DIR)`), plus conversion.json; both: the two side by
  side. Every paliseg command reads either. DIR appears only when the conversion is finished.

behaviour:
  Every prompt of an export's classes gets a record for every image of that export: images without the
  class are kept as negatives (empty suffix, empty mask) unless --no-negatives. Each object's box is its
  geometry's extent (polygon vertices as COCO's bbox; raster masks' pixel extent; else the annotated box);
  box-only objects get masks from SAM (--box-masks sam, one image embedding per image, all boxes batched)
  or the box itself (fill). Objects are sorted top-to-bottom, left-to-right. Bad items (missing/corrupt
  images, unknown categories, zero-area boxes, malformed lines, ...) are skipped and counted with file
  and position; --strict stops at the first one instead.

Apache Beam (--beam, the last flag; what follows it are Beam pipeline options): the same conversion as a
  pipeline, each worker loading SAM and the VAE once; the records equal a run in this process. Paths (the
  exports, DIR, checkpoints) must be readable and writable by every worker.

examples:
  paliseg convert ~/data/cracks ~/data/drywall --out data \\
      --prompt-map 'NewCracks*=segment crack' drywall-join='segment taping area' \\
      --label-map 'NewCracks*=crack' drywall-join=taping --box-masks fill
  paliseg validate data
  paliseg convert ~/data/boxes --out data-tfds --output-format both --sam-checkpoint models/sam_vit_b.pth \\
      --sam-model vit_b --beam --direct_running_mode=multi_processing --direct_num_workers=2"""

_VALIDATE_HELP = "Check every record of a converted dataset (images, masks, token counts, boxes)."
_VALIDATE_EPILOG = """\
checks, per record of every DIR/_annotations.<split>.jsonl:
  the line is a JSON record with image, prefix, suffix and mask; the image decodes; the mask exists and has
  the image's size; the suffix parses into objects of exactly 4 loc + 16 seg tokens with y2 > y1, x2 > x1;
  an empty suffix has an empty mask and a non-empty suffix a non-empty mask.

output: one `file:line: message` per problem, then a table per split; exit status 1 if anything is wrong.

example:
  paliseg validate data --json | jq .splits"""


@dataclasses.dataclass(frozen=True)
class ValidateSettings:
    """`paliseg validate DIR`."""

    directory: str = setting(cli=False)  # the positional DIR
    splits: list[str] | None = setting(None, "check only these splits (default: all)", metavar="SPLIT", items="spaced")


def register(subparsers) -> None:
    convert = subparsers.add_parser(
        "convert",
        help=_CONVERT_HELP,
        description=_CONVERT_HELP,
        epilog=_CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("sources", nargs="+", metavar="SRC", help="Roboflow export folder(s), or split folder(s)")
    convert.add_argument(
        "--prompt-map",
        nargs="+",
        action="extend",
        default=[],
        metavar="CLASS=PROMPT",
        help="prompt for a class (CLASS may be a glob, e.g. 'NewCracks*'); default 'segment <class>'",
    )
    convert.add_argument(
        "--label-map",
        nargs="+",
        action="extend",
        default=[],
        metavar="CLASS=LABEL",
        help="label written after each object's tokens; default the class name",
    )
    settings.add_arguments(convert, ConvertConfig)  # the other settings: --out, --format, --objects, ...
    convert.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    convert.add_argument(
        "--beam",
        nargs=argparse.REMAINDER,
        metavar="PIPELINE_OPTION",
        help="run on Apache Beam with these pipeline options (the rest of the line; default runner: DirectRunner)",
    )
    convert.set_defaults(run=_run_convert)

    validate = subparsers.add_parser(
        "validate",
        help=_VALIDATE_HELP,
        description=_VALIDATE_HELP,
        epilog=_VALIDATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    validate.add_argument("directory", metavar="DIR", help="a converted dataset folder")
    settings.add_arguments(validate, ValidateSettings)
    validate.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    validate.set_defaults(run=_run_validate)


def _run_convert(args: argparse.Namespace) -> int:
    from converters.convert import convert, parse_map, summary_text
    from paliseg import console

    given = settings.given(args, ConvertConfig)
    config = settings.from_dict(
        ConvertConfig,
        {
            **given,
            "sources": args.sources,
            "prompt_map": parse_map(args.prompt_map, "--prompt-map"),
            "label_map": parse_map(args.label_map, "--label-map"),
            "beam": args.beam,
        },
        "flags",
    )
    summary = convert(config)
    console.report(summary, summary_text(summary), args.json)
    return 0


def _run_validate(args: argparse.Namespace) -> int:
    from converters.validate import result_json, result_text, validate
    from paliseg import console

    config = settings.from_args(args, ValidateSettings, directory=args.directory)
    checks = validate(config.directory, config.splits)
    result = result_json(checks)
    console.report(result, result_text(checks), args.json)
    return 0 if result["ok"] else 1
