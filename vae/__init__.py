"""The mask VQ-VAE: 64x64 masks <-> 16 seg tokens, and full-resolution masks <-> tokens via boxes.

    import vae
    model = vae.load()                        # models/vae-oid.npz if present, else the bundled VAE
    seg = vae.mask_to_tokens(model, mask, box_xyxy)           # 16 ints in [0, 128)
    mask = vae.tokens_to_mask(model, seg, locs, width, height)  # bool [height, width]
    decoded = vae.text_masks(text, width, height, model)        # model text -> objects, masks, union

Tokens belong to the VAE that wrote them: `vae.identity` records a VAE by its SHA-256 and picks the VAE a
dataset's or run's tokens need (`vae.identity.resolve`).

A library: imports no pipeline stage.
"""

from vae.masks import (
    DegenerateBoxWarning,
    mask_to_tokens,
    masks_to_tokens,
    tokens_to_mask,
    tokens_to_masks,
)
from vae.model import MaskVAE, load, write_random_npz
from vae.text import TextMasks, text_masks, texts_masks

__all__ = [
    "DegenerateBoxWarning",
    "MaskVAE",
    "TextMasks",
    "load",
    "mask_to_tokens",
    "masks_to_tokens",
    "text_masks",
    "texts_masks",
    "tokens_to_mask",
    "tokens_to_masks",
    "write_random_npz",
]
