"""The settings of `paliseg convert`: `ConvertConfig`, from which `converters.commands` derives its flags.

Apart from `converters.convert` so that registering the command line does not load the conversion
machinery (scipy, pycocotools).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from converters.sources import FORMATS
from paliseg.settings import setting

# How a dataset's seg tokens are made (--objects): each object's from its own mask ("instance"), or from the
# prompt's union mask cropped to the object's box ("merged").
OBJECT_MODES = ("instance", "merged")
# What DIR gets (--output-format): the annotation JSONL with image and mask files, a TFDS dataset, or both.
OUTPUT_FORMATS = ("jsonl", "tfds", "both")
BOX_MASK_MODES = ("sam", "fill")
SAM_MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "tiny")  # tiny: the random test model of converters.sam


@dataclasses.dataclass
class ConvertConfig:
    sources: Sequence[str | Path] = setting(cli=False)  # the command's positional SRC arguments
    out: str | Path = setting(help="output dataset folder (must be empty or new)", metavar="DIR")
    format: str | None = setting(None, "skip detection and read only this format", choices=FORMATS)
    output_format: str = setting(
        "jsonl",
        "what DIR holds: jsonl (annotation JSONL + image and mask files), tfds (a TFDS dataset, tfrecord and "
        "array_record shards, for `tfds.builder_from_directory(DIR)`), or both",
        choices=OUTPUT_FORMATS,
    )
    # class name or glob -> prompt, label (the command parses --prompt-map / --label-map CLASS=VALUE)
    prompt_map: dict[str, str] = setting({}, cli=False)
    label_map: dict[str, str] = setting({}, cli=False)
    objects: str = setting(
        "instance",
        "instance: each object's tokens from its own mask; merged: from the prompt's "
        "union mask cropped to each box (the peer project's encoding, for comparison)",
        choices=OBJECT_MODES,
    )
    vae: str | Path | None = setting(
        None, "mask VAE npz (default: models/vae-oid.npz, else the bundled VAE)", metavar="PATH"
    )
    box_masks: str | None = setting(
        None,
        "masks for box-only objects: sam (default when --sam-checkpoint is given) or fill (the box)",
        choices=BOX_MASK_MODES,
    )
    sam_checkpoint: str | Path | None = setting(
        None, "segment-anything checkpoint (sam_vit_h_4b8939.pth, ...)", metavar="PATH"
    )
    sam_model: str = setting(
        "vit_h",
        "architecture of --sam-checkpoint (tiny: the random test model of converters.sam)",
        choices=SAM_MODEL_TYPES,
    )
    sam_device: str | None = setting(
        None, "torch device for SAM (default: cuda if available, else cpu)", metavar="DEVICE"
    )
    negatives: bool = setting(True, "drop records whose image has no object of the prompt")
    splits: Sequence[str] | None = setting(
        None, "convert only these splits (default: all)", metavar="SPLIT", items="spaced"
    )
    limit: int | None = setting(None, "convert only the first N images of each split", metavar="N", at_least=1)
    mask_class: str | None = setting(None, "class name of mask-folder objects", metavar="NAME")
    min_box_side: float = setting(
        2.0,
        "skip objects whose box is narrower or shorter than this, as annotation "
        "noise (Roboflow exports hold sub-pixel boxes in image corners)",
        metavar="PIXELS",
    )
    strict: bool = setting(False, "stop at the first bad item instead of skipping it")
    overwrite: bool = setting(False, "write into a non-empty DIR, replacing its files")
    # Apache Beam pipeline options (`--beam [OPTION ...]`, the command's own flag): None runs in this process.
    beam: Sequence[str] | None = setting(None, cli=False)
