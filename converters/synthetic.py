"""Synthetic shapes in Roboflow's COCO layout: a dataset anyone can make offline, with a known right answer.

    from converters import synthetic
    synthetic.write_synthetic_coco("shapes", n_train=400, n_valid=40, config=synthetic.ShapesConfig(), seed=0)
    # shapes/train/*.jpg + shapes/train/_annotations.coco.json, shapes/valid/... (the `paliseg convert` input)

Each image is a light, greyish, blotchy, noisy background (a wall) with one or a few non-overlapping shapes
(`ellipse`, `rectangle`, `triangle`, `crack`: a thin wandering band) painted in dark colours whose hue is
random and unrelated to the class, so a model has to learn the shape, not the colour. Dark on light, like
marks on a wall, because a small model trained from scratch learns to find such shapes within minutes on a
CPU, while shapes that may be lighter or darker than their background take it far longer (what the demo
needs: `paliseg demo`). Every shape is a polygon; the pixels painted
for it are exactly pycocotools' rasterisation of the polygon written to the JSON (the same rounded
coordinates), so the ground truth the pipeline reads back is what was drawn.

The JSON is what a Roboflow instance-segmentation export holds: category 0 is a placeholder named after
the project (`supercategory: "none"`, used by no annotation), the classes are 1..N; annotations carry
polygon `segmentation`, `bbox` [x, y, w, h] (the polygon's extent), `area` (pixels) and `iscrowd: 0`.

Deterministic: image `i` of a split depends only on (seed, split, i), so growing a split keeps its first
images. Run as a script to make a dataset by hand: `python -m converters.synthetic OUT --train 400`.
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import io
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from paliseg import files, records

# A shape is darker than the background around it by at least this much luminance (0-255): the shapes are
# plainly visible, the task is learning where and what they are.
MIN_CONTRAST = 40.0
_PLACEMENT_TRIES = 200
_DATE = "2025-01-01T00:00:00+00:00"  # fixed, so a dataset is byte-identical for a seed


@dataclasses.dataclass(frozen=True)
class SyntheticObject:
    class_name: str
    polygon: tuple[float, ...]  # COCO flat [x1, y1, x2, y2, ...] in pixels, rounded as written to the JSON
    mask: np.ndarray = dataclasses.field(repr=False, compare=False)  # bool HxW: the painted pixels

    @property
    def bbox_xywh(self) -> tuple[float, float, float, float]:
        xs, ys = self.polygon[0::2], self.polygon[1::2]
        return min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)


@dataclasses.dataclass(frozen=True)
class SyntheticImage:
    pixels: np.ndarray  # uint8 HxWx3
    objects: tuple[SyntheticObject, ...]


# ---------------------------------------------------------------------------------------------- shapes
# Each returns polygon vertices (N x 2, x then y) centred near (0, 0) with extent about `scale` pixels.


def _ellipse(rng: np.random.Generator, scale: float) -> np.ndarray:
    radii = scale / 2 * rng.uniform([0.55, 0.35], [1.0, 0.8])
    angles = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    return _rotate(np.stack([radii[0] * np.cos(angles), radii[1] * np.sin(angles)], 1), rng.uniform(0, math.pi))


def _rectangle(rng: np.random.Generator, scale: float) -> np.ndarray:
    half = scale / 2 * rng.uniform([0.5, 0.3], [1.0, 0.75])
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
    return _rotate(corners, rng.uniform(-0.5, 0.5))


def _triangle(rng: np.random.Generator, scale: float) -> np.ndarray:
    # Corners on a circle, at least 70 degrees apart: no slivers, every triangle plainly a triangle.
    while True:
        angles = np.sort(rng.uniform(0, 2 * math.pi, 3))
        gaps = np.diff(np.append(angles, angles[0] + 2 * math.pi))
        if gaps.min() > math.radians(70):
            return scale / 2 * np.stack([np.cos(angles), np.sin(angles)], 1)


def _crack(rng: np.random.Generator, scale: float) -> np.ndarray:
    """A thin band along a smooth random walk: the outline of a crack (left edge, then right edge back)."""
    steps = 10
    turns = np.cumsum(rng.normal(0, 0.25, steps)) + rng.uniform(0, 2 * math.pi)
    spine = np.concatenate([[[0.0, 0.0]], np.cumsum(np.stack([np.cos(turns), np.sin(turns)], 1), 0)])
    spine *= scale / max(np.ptp(spine, axis=0).max(), 1e-6)
    spine -= spine.mean(0)
    tangents = np.gradient(spine, axis=0)
    normals = np.stack([-tangents[:, 1], tangents[:, 0]], 1) / np.linalg.norm(tangents, axis=1, keepdims=True)
    half_width = scale * rng.uniform(0.035, 0.06) * rng.uniform(0.7, 1.0, (len(spine), 1))
    return np.concatenate([spine + normals * half_width, (spine - normals * half_width)[::-1]])


SHAPES: dict[str, Callable[[np.random.Generator, float], np.ndarray]] = {
    "ellipse": _ellipse,
    "rectangle": _rectangle,
    "triangle": _triangle,
    "crack": _crack,
}


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


# ---------------------------------------------------------------------------------------------- images


def _rasterise(polygon: Sequence[float], size: int) -> np.ndarray:
    rle = mask_utils.frPyObjects([list(polygon)], size, size)
    return mask_utils.decode(mask_utils.merge(rle)).astype(bool)


def _texture(rng: np.random.Generator, size: int, colour: np.ndarray, amplitude: float) -> np.ndarray:
    """A colour with smooth light and dark blotches (a bicubic-upsampled random grid) and per-pixel noise."""
    cells = int(rng.integers(3, 7))
    blotches = ndimage.zoom(rng.normal(0, amplitude, (cells, cells, 1)), (size / cells, size / cells, 1), order=3)
    return colour + blotches[:size, :size] + rng.normal(0, amplitude / 4, (size, size, 1))


def _light_greyish(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(150, 215) + rng.normal(0, 6, 3)


def _luminance(colour: np.ndarray) -> float:
    return float(colour @ np.array([0.299, 0.587, 0.114]))


def _dark_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A dark colour of any hue, clearly darker than the background."""
    while True:
        colour = 255 * np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.3, 0.9), rng.uniform(0.1, 0.4)))
        if _luminance(background) - _luminance(colour) >= MIN_CONTRAST:
            return colour


def _place(
    rng: np.random.Generator, class_name: str, taken: np.ndarray, config: ShapesConfig
) -> SyntheticObject | None:
    """A shape at a random place inside the image, its box on the grid, one pixel clear of the other shapes."""
    size, grid = config.image_size, config.grid
    for _ in range(_PLACEMENT_TRIES):
        outline = _snap_extent(SHAPES[class_name](rng, rng.uniform(*config.object_scale) * size), grid)
        room = size - outline.max(0)
        if np.any(room < 0):
            continue
        offset = grid * rng.integers(0, room // grid + 1)
        polygon = tuple(round(float(v), 2) for v in (outline + offset).ravel())
        mask = _rasterise(polygon, size)
        # 8-connected clearance: shapes never touch, not even at a corner (mask folders split by
        # 8-connected components)
        if mask.sum() >= 12 and not np.any(ndimage.binary_dilation(mask, np.ones((3, 3), bool)) & taken):
            return SyntheticObject(class_name, polygon, mask)
    return None


def _snap_extent(outline: np.ndarray, grid: int) -> np.ndarray:
    """The outline stretched a little (under half a grid step) so its extent is (0, 0)..(w, h), with w and h
    whole multiples of `grid` pixels."""
    low = outline.min(0)
    extent = outline.max(0) - low
    snapped = np.maximum(np.round(extent / grid), 1) * grid
    return (outline - low) * (snapped / np.maximum(extent, 1e-6))


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """What the images look like: side in pixels, classes, shapes per image (min, max), each shape's size as
    a share (min, max) of the image side, and the grid (pixels) that box edges lie on.

    Boxes always fall on pixel edges (as with annotation tools that store whole-pixel coordinates), so the
    loc tokens of an N-pixel image take N + 1 of their 1024 values. A coarser `grid` leaves fewer still
    (N / grid + 1): that is what lets a model trained from scratch on a CPU learn where shapes are within
    minutes, which the demo needs; the masks inside the boxes stay free-form."""

    image_size: int = 64
    classes: tuple[str, ...] = tuple(SHAPES)
    objects_per_image: tuple[int, int] = (1, 1)
    object_scale: tuple[float, float] = (0.3, 0.7)
    grid: int = 1

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "objects_per_image", tuple(self.objects_per_image))
        object.__setattr__(self, "object_scale", tuple(self.object_scale))
        unknown = sorted(set(self.classes) - set(SHAPES))
        if unknown or not self.classes:
            raise ValueError(f"unknown shape classes {unknown or '(none)'}; choose from: {', '.join(SHAPES)}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {self.image_size}")
        if not 1 <= self.objects_per_image[0] <= self.objects_per_image[1]:
            raise ValueError(f"objects_per_image must be (min, max) with 1 <= min <= max, got {self.objects_per_image}")
        if not 0.1 <= self.object_scale[0] <= self.object_scale[1] <= 0.9:
            raise ValueError(f"object_scale must be (min, max) with 0.1 <= min <= max <= 0.9, got {self.object_scale}")
        if not 1 <= self.grid <= self.image_size // 4:
            raise ValueError(f"grid must be between 1 and a quarter of the image side, got {self.grid}")


def make_image(rng: np.random.Generator, config: ShapesConfig = ShapesConfig()) -> SyntheticImage:
    """One image: a textured background and its shapes, painted one pixel apart."""
    size = config.image_size
    background = _light_greyish(rng)
    pixels = _texture(rng, size, background, amplitude=rng.uniform(8, 25))
    taken = np.zeros((size, size), bool)
    objects = []
    for _ in range(int(rng.integers(config.objects_per_image[0], config.objects_per_image[1] + 1))):
        obj = _place(rng, str(rng.choice(list(config.classes))), taken, config)
        if obj is None:
            break  # the image is full: fewer objects rather than overlapping ones
        fill = _texture(rng, size, _dark_colour(rng, background), amplitude=rng.uniform(4, 10))
        pixels[obj.mask] = fill[obj.mask]
        taken |= obj.mask
        objects.append(obj)
    return SyntheticImage(np.clip(np.round(pixels), 0, 255).astype(np.uint8), tuple(objects))


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: independent of every other image, so splits can grow."""
    return np.random.default_rng([seed, records.split_order(split)[0], index])


# ---------------------------------------------------------------------------------------------- COCO


def _encode(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpg":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def coco_split(
    out_dir: str | Path,
    split: str,
    count: int,
    config: ShapesConfig,
    seed: int,
    project: str,
    image_format: str,
    overwrite: bool,
    on_image: Callable[[], None] | None = None,
    box_only: bool = False,
) -> dict:
    """Write one split folder (images + `_annotations.coco.json`); returns its COCO dict. `box_only`: boxes
    without polygons (`segmentation: []`), as Roboflow exports box-annotated data (the drywall set)."""
    folder = Path(out_dir) / split
    categories = [{"id": 0, "name": project, "supercategory": "none"}]
    categories += [{"id": i, "name": name, "supercategory": project} for i, name in enumerate(config.classes, start=1)]
    category_ids = {c["name"]: c["id"] for c in categories[1:]}
    images, annotations = [], []
    for index in range(count):
        sample = make_image(image_rng(seed, split, index), config)
        name = f"{split}_{index:05d}.{image_format}"
        files.write_bytes(folder / name, _encode(sample.pixels, image_format), overwrite=overwrite)
        images.append(
            {
                "id": index,
                "license": 1,
                "file_name": name,
                "height": config.image_size,
                "width": config.image_size,
                "date_captured": _DATE,
            }
        )
        for obj in sample.objects:
            annotations.append(
                {
                    "id": len(annotations),
                    "image_id": index,
                    "category_id": category_ids[obj.class_name],
                    "bbox": list(obj.bbox_xywh),
                    "area": int(obj.mask.sum()),
                    "segmentation": [] if box_only else [list(obj.polygon)],
                    "iscrowd": 0,
                }
            )
        if on_image is not None:
            on_image()
    coco = {
        "info": {
            "year": "2025",
            "version": "1",
            "description": f"paliseg synthetic shapes (seed {seed})",
            "contributor": "paliseg",
            "url": "",
            "date_created": _DATE,
        },
        "licenses": [{"id": 1, "url": "https://creativecommons.org/publicdomain/zero/1.0/", "name": "CC0 1.0"}],
        "categories": categories,
        "images": images,
        "annotations": annotations,
    }
    files.write_json(folder / records.COCO_ANNOTATIONS_FILE, coco, overwrite=overwrite)
    return coco


def write_synthetic_coco(
    out_dir: str | Path,
    n_train: int,
    n_valid: int,
    config: ShapesConfig = ShapesConfig(),
    seed: int = 0,
    project: str = "shapes",
    image_format: str = "jpg",
    overwrite: bool = False,
    on_image: Callable[[], None] | None = None,
    box_only: bool = False,
) -> dict[str, int]:
    """Write OUT/train and OUT/valid as a Roboflow COCO export; returns {split: number of images}.

    `on_image` is called after each image (a progress bar's update). Existing files are refused unless
    `overwrite`. `box_only` writes boxes without polygons (SAM or `--box-masks fill` gives their masks). `image_format` "jpg" is what Roboflow exports (lossy: the painted pixels blur a little at the
    edges); "png" keeps them exact."""
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if project in config.classes:
        raise ValueError(f"the project name {project!r} must differ from the class names (it is the placeholder)")
    counts = {records.TRAIN_SPLIT: n_train, records.VALID_SPLIT: n_valid}
    for split, count in counts.items():
        coco_split(out_dir, split, count, config, seed, project, image_format, overwrite, on_image, box_only)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m converters.synthetic",
        description="Write a synthetic-shapes dataset as a Roboflow COCO export (OUT/train, OUT/valid).",
        epilog="example:\n  python -m converters.synthetic shapes --train 400 --valid 40 --size 64 --seed 0\n"
        "  paliseg convert shapes --out shapes_data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", help="output folder (its train/ and valid/ must not exist yet, unless --overwrite)")
    parser.add_argument("--train", type=int, default=400, help="training images (default 400)")
    parser.add_argument("--valid", type=int, default=40, help="validation images (default 40)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", default=",".join(SHAPES), help=f"comma-separated (default {','.join(SHAPES)})")
    parser.add_argument(
        "--objects", type=int, nargs=2, default=(1, 1), metavar=("MIN", "MAX"), help="shapes per image (default 1 1)"
    )
    parser.add_argument(
        "--scale",
        type=float,
        nargs=2,
        default=(0.3, 0.7),
        metavar=("MIN", "MAX"),
        help="shape size as a share of the image side (default 0.3 0.7)",
    )
    parser.add_argument("--grid", type=int, default=1, help="box edges on multiples of this many pixels (default 1)")
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    config = ShapesConfig(
        args.size,
        tuple(c.strip() for c in args.classes.split(",") if c.strip()),
        tuple(args.objects),
        tuple(args.scale),
        args.grid,
    )
    counts = write_synthetic_coco(
        args.out, args.train, args.valid, config, args.seed, image_format=args.format, overwrite=args.overwrite
    )
    print(f"wrote {counts['train']} train and {counts['valid']} valid images to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
