"""Reading images, the one way every stage does it, and preprocessing them for the model.

Every image and mask paliseg reads (convert, validate, train, predict, eval, score, visualize, the VAE
tools) goes through `read_image` / `read_mask` here, so they all agree on the frame and the pixels:

- Orientation: phones store most photos sideways with an EXIF orientation tag that every viewer applies.
  The reader applies it too (all 8 values, as PIL's `ImageOps.exif_transpose`), so images, masks, boxes
  and canvases are all in the *displayed* frame, the one the user sees and annotation tools draw on. A
  missing or invalid tag counts as 1 (as stored). `read_header` gives the displayed size without decoding
  (orientations 5-8 swap width and height) and the stored size and tag, for the converters.
- Kinds: CMYK and palette images (with or without transparency) become RGB; grey (`L`, `1`) is stacked to
  three channels; 16-bit grey (`I;16`, `I;16B`, `I`, as PIL opens 16-bit PNG and TIFF) is scaled to 8 bits
  (65535 -> 255), not clipped to white. Transparent pixels are composited over white in pictures (the
  colour stored under a transparent pixel is arbitrary, often black, and would otherwise show as dark
  blotches the model never saw in training) and over black in masks (a transparent pixel is unpainted).
- Size limit: an image of more pixels than `max_image_pixels()` is refused before it is decoded, as a
  decompression-bomb guard. The default is PIL's figure (89,478,485 pixels, about 9500x9500); raise it with
  `paliseg --max-image-pixels N`, the environment variable PALISEG_MAX_IMAGE_PIXELS, or
  `set_max_image_pixels`. This check replaces PIL's own global one (turned off on import), which would warn
  (DecompressionBombWarning) or fail at twice the figure without naming the file.
- Errors: a file that cannot be read raises `ImageReadError` (a ValueError), `PATH: cannot read image:
  REASON`, after a full decode (a truncated file is caught here, not later); over the size limit, its
  subclass `ImageTooLargeError`. Stages that skip unreadable inputs catch it and count the skip.
- Bytes: `decode_image` reads an image file's content held in memory (an upload) the same way, naming it
  as its caller says, and can restrict the decoders tried. Every reader here also takes a
  `paliseg.files.StoredFile` (an image or mask held inside a TFDS dataset) wherever it takes a path.

Preprocessing for the model, as big_vision's fine-tuning colab: the aspect ratio is not kept (boxes are
normalised per axis, so the loc tokens stay exact), bilinear resampling with antialiasing (PIL filters
over the whole source footprint when shrinking, like `tf.image.resize(..., antialias=True)`), then
`x / 127.5 - 1`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from paliseg.files import StoredFile

ImageFile = str | os.PathLike | StoredFile  # what the readers here read: a file, or one held in a dataset

ORIENTATION_TAG = 0x0112  # EXIF Orientation
# What turns the stored pixels into the displayed ones, per orientation value (ImageOps.exif_transpose's table).
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # displayed width = stored height

MAX_PIXELS_ENV = "PALISEG_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS default (1024**3 // 4 // 3)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WHITE, _BLACK = (255, 255, 255), (0, 0, 0)
# Errors PIL raises for files it cannot parse or decode (plugins use all of these).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)

Image.MAX_IMAGE_PIXELS = None  # `_check_pixels` below is the limit (see the module docstring)
_max_pixels: int | None = None  # set_max_image_pixels; None: the environment variable, else the default


class ImageReadError(ValueError):
    """An image (or mask) file that cannot be read: `PATH: cannot read image: REASON`."""

    def __init__(self, path: ImageFile, reason: str):
        super().__init__(f"{path}: cannot read image: {reason}")
        self.path = Path(str(path))
        self.reason = reason


class ImageTooLargeError(ImageReadError):
    """An image of more pixels than `max_image_pixels()`, refused before it is decoded."""


def _positive(value: int | str, source: str) -> int:
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(f"{source} must be a positive number of pixels, got {value!r}")
    return limit


def set_max_image_pixels(limit: int | None) -> None:
    """Set the largest image (width x height) the reader decodes; None: PALISEG_MAX_IMAGE_PIXELS, else the default."""
    global _max_pixels
    _max_pixels = None if limit is None else _positive(limit, "--max-image-pixels")


@contextlib.contextmanager
def pixel_limit(limit: int | None) -> Iterator[None]:
    """`set_max_image_pixels(limit)` for the block (None: the setting stays), the previous setting after it."""
    previous = _max_pixels
    if limit is not None:
        set_max_image_pixels(limit)
    try:
        yield
    finally:
        set_max_image_pixels(previous)


def max_image_pixels() -> int:
    """The limit in force (see `set_max_image_pixels`)."""
    if _max_pixels is not None:
        return _max_pixels
    from_env = os.environ.get(MAX_PIXELS_ENV)
    return DEFAULT_MAX_IMAGE_PIXELS if not from_env else _positive(from_env, MAX_PIXELS_ENV)


def _check_pixels(path: ImageFile, size: tuple[int, int]) -> None:
    limit = max_image_pixels()
    if size[0] * size[1] > limit:
        raise ImageTooLargeError(
            path,
            f"{size[0]}x{size[1]} is {size[0] * size[1]:,} pixels, over the limit of {limit:,} (a guard against "
            f"decompression bombs); raise it with `paliseg --max-image-pixels N` or {MAX_PIXELS_ENV}=N",
        )


def orientation(image: Image.Image) -> int:
    """The image's EXIF orientation, 1..8; 1 (as stored) when the tag is missing or invalid."""
    value = image.getexif().get(ORIENTATION_TAG, 1)
    return value if value in ORIENTATION_TRANSPOSE else 1


def displayed_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) as shown, of a stored (width, height) with this orientation (5-8 swap them)."""
    return (size[1], size[0]) if orientation in SWAPPING_ORIENTATIONS else tuple(size)


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    """What the file header says: the stored (width, height) and the EXIF orientation (1 if none)."""

    stored_size: tuple[int, int]
    orientation: int

    @property
    def displayed_size(self) -> tuple[int, int]:
        return displayed_size(self.stored_size, self.orientation)


def read_header(path: ImageFile, decode: bool = False) -> ImageHeader:
    """The header of an image file, `ImageReadError` if unreadable or over the size limit. Cheap (no pixel
    decoding, except PNGs, where PIL looks for a late EXIF chunk) unless `decode`: then every pixel is
    decoded too, so that a truncated file fails here."""

    def header(image: Image.Image) -> ImageHeader:
        if decode:
            image.load()
        return ImageHeader(image.size, orientation(image))

    return _with_open(path, header)


def _with_open(
    path: ImageFile | io.BytesIO,
    use: Callable[[Image.Image], object],
    name: str | os.PathLike | None = None,
    formats: Sequence[str] | None = None,
):
    """`use(image)` on the opened file (or bytes), with every failure turned into an ImageReadError naming
    it (`name`, default `path`); `formats`: the PIL decoders to try (None: all)."""
    name = path if name is None else name
    try:
        if isinstance(path, StoredFile):
            path = io.BytesIO(path.read_bytes())
        with Image.open(path, formats=None if formats is None else tuple(formats)) as image:
            _check_pixels(name, image.size)
            return use(image)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(name, "file not found") from None
    except UnidentifiedImageError:  # PIL's message names a BytesIO by its repr; the name is in front already
        raise ImageReadError(name, "cannot identify image file") from None
    except _DECODE_ERRORS as error:
        raise ImageReadError(name, str(error) or type(error).__name__) from error


def _displayed(image: Image.Image) -> Image.Image:
    """The decoded image turned to its displayed frame (the same image when no turn is needed). The turned
    copy loses its orientation tag (`exif_transpose` does that), so that it is never turned twice."""
    image.load()
    return image if orientation(image) == 1 else ImageOps.exif_transpose(image)


def _eight_bit(image: Image.Image, mode: str, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode -> 8-bit `mode` ("RGB" or "L"): 16-bit scaled, transparency composited over `background`."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    if image.has_transparency_data:
        under = Image.new("RGBA", image.size, (*background, 255))
        image = Image.alpha_composite(under, image.convert("RGBA"))
    return image.convert(mode)


def read_image(path: ImageFile, mode: str = "RGB") -> Image.Image:
    """The image at `path` in its displayed frame as an 8-bit "RGB" (photos) or "L" (grey) PIL image, every
    pixel decoded; `ImageReadError` naming the file otherwise. See the module docstring for the kinds."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"read_image mode must be 'RGB' or 'L', got {mode!r}")
    return _with_open(path, lambda image: _eight_bit(_displayed(image), mode, _WHITE))


def decode_image(data: bytes, name: str, mode: str = "RGB", formats: Sequence[str] | None = None) -> Image.Image:
    """An image file's content (e.g. an upload) read as `read_image` reads a file; errors name `name`.
    `formats` restricts the PIL decoders tried (e.g. ("JPEG", "PNG")), None tries every one."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"decode_image mode must be 'RGB' or 'L', got {mode!r}")
    return _with_open(io.BytesIO(data), lambda image: _eight_bit(_displayed(image), mode, _WHITE), name, formats)


def read_mask(path: ImageFile) -> np.ndarray:
    """A mask file (any mode) as a boolean HxW array in its displayed frame: foreground is grey > 127, with
    transparent pixels as background."""
    return _with_open(path, lambda image: np.asarray(_eight_bit(_displayed(image), "L", _BLACK)) > 127)


def as_displayed_rgb(image: Image.Image) -> Image.Image:
    """A PIL image given directly (not a path) as the reader would give it: EXIF orientation applied, RGB."""
    return _eight_bit(_displayed(image), "RGB", _WHITE)


def preprocess(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """An RGB PIL image (or uint8 HxW[xC] array) -> float32 [size, size, 3] in [-1, 1]. Images are taken as
    they are: read them with `read_image` (or `as_displayed_rgb`) first."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8, got {image.dtype}")
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, np.float32) / 127.5 - 1.0
