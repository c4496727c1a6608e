"""Image preprocessing: squash to the preset's resolution, RGB, [-1, 1]."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from paliseg.images import preprocess


def test_values_map_to_minus_one_one_and_shape_is_square():
    pixels = np.zeros((30, 50, 3), np.uint8)
    pixels[:, 25:] = 255
    out = preprocess(Image.fromarray(pixels), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    assert out.min() == -1.0 and out.max() == 1.0
    # squashed, not cropped: the left half stays black, the right half white
    assert (out[:, :7] == -1).all() and (out[:, 9:] == 1).all()


def test_grey_and_alpha_become_rgb():
    grey = Image.fromarray(np.full((8, 8), 128, np.uint8), mode="L")
    rgba = Image.fromarray(np.full((8, 8, 4), 255, np.uint8), mode="RGBA")
    np.testing.assert_allclose(preprocess(grey, 8), 128 / 127.5 - 1, atol=1e-6)
    assert preprocess(rgba, 4).shape == (4, 4, 3)
    assert preprocess(np.full((8, 8, 3), 255, np.uint8), 8).min() == 1.0


def test_shrinking_is_antialiased():
    # a one-pixel checkerboard shrunk 4x averages to grey rather than aliasing to black or white
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    out = preprocess(Image.fromarray(board), 16)
    assert np.abs(out).max() < 0.1


def test_non_uint8_arrays_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((4, 4, 3), np.float32), 4)
