"""Image preprocessing for the model: RGB, squashed to the preset's square resolution, mapped to [-1, 1].

As big_vision's fine-tuning colab: the aspect ratio is not kept (boxes are normalised per axis, so the loc
tokens stay exact), bilinear resampling with antialiasing (PIL filters over the whole source footprint
when shrinking, like `tf.image.resize(..., antialias=True)`), then `x / 127.5 - 1`. Grey images are
stacked to three channels and alpha is dropped.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def preprocess(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """A PIL image (or uint8 HxW[xC] array) -> float32 [size, size, 3] in [-1, 1]."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8, got {image.dtype}")
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, np.float32) / 127.5 - 1.0
