"""Synthetic object masks for VAE training: ellipses, polygons, thin curved lines (cracks), bands (taping).

Each shape is drawn at a realistic pixel scale on its own canvas, then cropped to its tight box and resized
to 64x64 exactly as real objects are (`vae.masks.crop_to_64`), so the VAE learns the crop statistics it
will see: objects touch their box edges, thin lines stay thin relative to their box, long strips get
squeezed by the aspect-ratio change.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from vae.masks import crop_to_64, tight_box
from vae.model import MASK_SIZE

SHAPES = ("ellipse", "polygon", "crack", "band", "blobs")


def _canvas(size: tuple[int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("L", size, 0)
    return image, ImageDraw.Draw(image)


def _ellipse_points(cx, cy, rx, ry, angle, count=48) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, count, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return list(zip(cx + c * x - s * y, cy + s * x + c * y))


def _smooth_path(rng: np.random.Generator, start, length: float, step: float, wiggle: float) -> np.ndarray:
    """A random walk with momentum: the heading drifts slowly, like a crack or a hand-drawn curve."""
    count = max(int(length / step), 2)
    heading = rng.uniform(0, 2 * np.pi)
    turn = 0.0
    points = [np.asarray(start, dtype=np.float64)]
    for _ in range(count):
        turn = 0.7 * turn + rng.normal(0, wiggle)
        heading += turn
        points.append(points[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
    return np.asarray(points)


def draw_shape(rng: np.random.Generator, kind: str) -> np.ndarray:
    """One full-resolution bool mask containing a single synthetic object of `kind`."""
    size = int(rng.integers(96, 640))
    image, draw = _canvas((size, size))
    centre = size / 2
    if kind == "ellipse":
        rx, ry = rng.uniform(0.05, 0.45, 2) * size
        draw.polygon(_ellipse_points(centre, centre, rx, ry, rng.uniform(0, np.pi)), fill=255)
    elif kind == "polygon":
        count = int(rng.integers(3, 13))
        angles = np.sort(rng.uniform(0, 2 * np.pi, count))
        radii = rng.uniform(0.15, 0.45, count) * size
        draw.polygon(list(zip(centre + radii * np.cos(angles), centre + radii * np.sin(angles))), fill=255)
    elif kind == "crack":
        width = int(rng.integers(1, max(2, size // 40) + 1))
        path = _smooth_path(rng, (centre, centre), rng.uniform(0.3, 1.5) * size, size / 40, rng.uniform(0.02, 0.3))
        draw.line([tuple(p) for p in path], fill=255, width=width, joint="curve")
        for _ in range(int(rng.integers(0, 4))):  # branches leave the main crack at random points
            start = path[int(rng.integers(0, len(path)))]
            branch = _smooth_path(rng, start, rng.uniform(0.1, 0.5) * size, size / 40, 0.2)
            draw.line([tuple(p) for p in branch], fill=255, width=max(1, width - 1), joint="curve")
    elif kind == "band":
        length, width = rng.uniform(0.4, 1.4) * size, rng.uniform(0.02, 0.2) * size
        angle = rng.choice([0.0, np.pi / 2, rng.uniform(0, np.pi)])
        for offset in range(int(rng.choice([1, 1, 1, 2]))):  # sometimes two crossing strips (a joint)
            a = angle + offset * np.pi / 2
            dx, dy = np.cos(a) * length / 2, np.sin(a) * length / 2
            draw.line([(centre - dx, centre - dy), (centre + dx, centre + dy)], fill=255, width=max(1, int(width)))
    elif kind == "blobs":
        for _ in range(int(rng.integers(2, 6))):
            cx, cy = rng.uniform(0.2, 0.8, 2) * size
            rx, ry = rng.uniform(0.03, 0.2, 2) * size
            draw.polygon(_ellipse_points(cx, cy, rx, ry, rng.uniform(0, np.pi)), fill=255)
    else:
        raise ValueError(f"unknown synthetic shape {kind!r}; choose from {', '.join(SHAPES)}")
    return np.asarray(image) > 0


def synthetic_crops(count: int, seed: int = 0) -> np.ndarray:
    """`count` 64x64 encoder inputs in [0, 1], shapes drawn uniformly from SHAPES."""
    rng = np.random.default_rng(seed)
    crops = np.zeros((count, MASK_SIZE, MASK_SIZE), np.float32)
    filled = 0
    while filled < count:
        mask = draw_shape(rng, SHAPES[int(rng.integers(len(SHAPES)))])
        box = tight_box(mask)
        if box is not None:
            crops[filled] = crop_to_64(mask, box)
            filled += 1
    return crops
