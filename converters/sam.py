"""Masks for box-only objects from segment-anything, prompted with every box of an image at once.

The image encoder (the expensive part: ViT-H is ~0.5 s/image on a GPU) runs ONCE per image; all its boxes
go through the prompt encoder and mask decoder in one batch. (The peer project re-ran the encoder for every
box.) Each box gets SAM's three candidate masks; the one with the best predicted IoU is kept, clipped to the
box, and cleaned of specks and small holes, because SAM's upsampled logits leave both at thin structures.

`tiny` is a small random-weight SAM for tests and benchmarks: the code path is SAM's, the masks are noise.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from segment_anything import SamPredictor
from segment_anything.build_sam import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from converters.config import SAM_MODEL_TYPES as MODEL_TYPES
from converters.geometry import box_mask

# Boxes decoded per mask-decoder call: bounds memory (each box gives 3 full-resolution masks).
BOXES_PER_CALL = 32
# Components and holes below this fraction of the box area (and at least MIN_CLEAN_PIXELS) are removed.
CLEAN_FRACTION = 0.002
MIN_CLEAN_PIXELS = 4


def build_tiny_sam(img_size: int = 256, embed_dim: int = 64, depth: int = 2, prompt_dim: int = 32) -> Sam:
    """A SAM with segment-anything's own modules at toy size (random weights unless a state dict is loaded)."""
    patch = 16
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size,
            patch_size=patch,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=2,
            mlp_ratio=2,
            out_chans=prompt_dim,
            qkv_bias=True,
            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(depth - 1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(img_size // patch, img_size // patch),
            input_image_size=(img_size, img_size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=64, num_heads=2),
            transformer_dim=prompt_dim,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def _builder(model_type: str):
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown SAM model {model_type!r}; choose from {', '.join(MODEL_TYPES)}")
    return build_tiny_sam if model_type == "tiny" else sam_model_registry[model_type]


def build_sam(model_type: str) -> Sam:
    """The architecture of `model_type` with random weights."""
    return _builder(model_type)()


def load_sam(checkpoint: str | Path, model_type: str = "vit_h", device: str | None = None) -> Sam:
    """A SAM from a checkpoint (the official `sam_vit_*.pth` state dicts), on `device` (default: cuda if any)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: SAM checkpoint not found")
    model = build_sam(model_type)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as error:  # torch.load fails in many ways (pickle, zip, struct) on a file that is not a checkpoint
        detail = " ".join(str(error).split()) or type(error).__name__
        detail = detail if len(detail) <= 300 else detail[:300] + "..."
        raise ValueError(f"{checkpoint}: not a SAM {model_type} checkpoint ({detail})") from None
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()


class BoxSegmenter:
    """SAM box prompting: one image embedding per image, all its boxes in one batch."""

    def __init__(self, model: Sam):
        self.predictor = SamPredictor(model)

    @torch.no_grad()
    def masks_for_boxes(self, image: np.ndarray, boxes_xyxy: Sequence[Sequence[float]]) -> np.ndarray:
        """RGB uint8 [H, W, 3] and N pixel boxes (x1, y1, x2, y2) -> bool [N, H, W], each inside its box."""
        height, width = image.shape[:2]
        boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
        if not len(boxes):
            return np.zeros((0, height, width), bool)
        self.predictor.set_image(image)
        device = self.predictor.device
        chosen = []
        for start in range(0, len(boxes), BOXES_PER_CALL):
            prompts = self.predictor.transform.apply_boxes_torch(
                torch.as_tensor(boxes[start : start + BOXES_PER_CALL], device=device), (height, width)
            )
            masks, scores, _ = self.predictor.predict_torch(None, None, boxes=prompts, multimask_output=True)
            best = scores.argmax(dim=1)
            chosen.append(masks[torch.arange(len(best), device=device), best].cpu().numpy())
        self.predictor.reset_image()
        return np.stack([clean_mask(m, box) for m, box in zip(np.concatenate(chosen), boxes)])


def clean_mask(mask: np.ndarray, box_xyxy: Sequence[float]) -> np.ndarray:
    """Clip a mask to its box, then drop specks and fill holes smaller than a small fraction of the box."""
    inside = box_mask(box_xyxy, mask.shape[1], mask.shape[0])
    mask = mask & inside
    min_pixels = max(MIN_CLEAN_PIXELS, int(CLEAN_FRACTION * inside.sum()))
    mask = _drop_small_components(mask, min_pixels)
    holes = _drop_small_components(inside & ~mask, min_pixels)  # background parts worth keeping
    return inside & ~holes


def _drop_small_components(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if not count:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]
