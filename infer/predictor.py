"""Load a model once, then predict boxes and full-resolution masks for many images.

    from infer import Predictor
    predictor = Predictor.from_run("runs/r1", step="best")           # or an int, or "latest"
    predictor = Predictor.from_checkpoint("ckpt.npz", preset="paligemma-3b-224", tokenizer="tok.model")
    [prediction] = predictor.predict("wall.jpg", "segment crack")    # or lists of images and prompts
    prediction.mask, prediction.boxes, prediction.labels, prediction.text, prediction.objects

Decoding is `paliseg.decoding.predict_texts` (KV cache, greedy, the segmentation grammar for "segment"
prompts) in batches of `batch_size` (the last one padded, so one program is compiled per prompt-length
bucket); masks come from the VAE at each image's own resolution (`infer.prediction.from_text`).
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from infer.prediction import Prediction, from_text

if TYPE_CHECKING:
    from paliseg import decoding

BEST_FILE = "best.json"  # written into RUN_DIR by the sweep (`infer.sweep`)
DEFAULT_MAX_NEW_TOKENS = 128  # 5 objects of 4 loc + 16 seg + label tokens


def resolve_step(run_dir: str | os.PathLike, step: int | str | None) -> int:
    """"best" (RUN_DIR/best.json, written by `paliseg eval`), "latest"/None, or an int (0 = the base)."""
    from train import checkpoints

    if step == "best":
        path = Path(run_dir) / BEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no best step recorded yet; run `paliseg eval {run_dir} ...` first, or pass --step N")
        return int(json.loads(path.read_text(encoding="utf-8"))["step"])
    if step is None or step == "latest":
        steps = checkpoints.list_steps(run_dir)
        if not steps:
            raise FileNotFoundError(f"{run_dir}: no checkpoint yet")
        return steps[-1]
    try:
        return int(step)
    except ValueError:
        raise ValueError(f"step must be an integer, 'best' or 'latest', got {step!r}") from None


def load_step(run_dir: str | os.PathLike, step: int, frozen: dict | None = None):
    """(model config, params) of a run at `step`; step 0 is the base the run started from (the base
    checkpoint with zero-effect LoRA adapters, or the recorded seeded random init). `frozen`: the run's
    `train.checkpoints.frozen_params` when already loaded (used for steps > 0)."""
    from train import checkpoints

    if step != 0:
        return checkpoints.load_run(run_dir, step, frozen=frozen)
    from paliseg import model
    from train import params as param_sets

    config, model_cfg = checkpoints.read_run_config(run_dir)
    params = param_sets.join(*param_sets.initial(config, model_cfg))
    if model_cfg.lora.enabled:
        params = model.merge_lora(params, model_cfg.lora)
        model_cfg = model_cfg.replace(lora={"rank": 0})
    return model_cfg, params


def _as_image(image: Image.Image | str | os.PathLike) -> Image.Image:
    """A path read by `paliseg.images.read_image`, or a PIL image given directly treated the same way: in its
    displayed frame (its EXIF orientation applied) and RGB."""
    from paliseg import images

    return images.as_displayed_rgb(image) if isinstance(image, Image.Image) else images.read_image(image)


class Predictor:
    """A loaded model, tokenizer and mask VAE. `predict` is the whole path from pixels to masks."""

    def __init__(
        self,
        config,
        params: dict,
        tokenizer,
        vae_model=None,
        batch_size: int = 8,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        source: str = "<params>",
        step: int | None = None,
        constrain: bool | None = None,
    ):
        import vae

        if tokenizer.vocab_size > config.llm.vocab_size:
            raise ValueError(
                f"{tokenizer.path}: {tokenizer.vocab_size} pieces, more than the model's vocabulary ({config.llm.vocab_size}); "
                f"wrong tokenizer for {source}?"
            )
        import jax

        # One program serves every checkpoint: no recompute-in-backward (there is no backward), and the
        # params on one device whatever sharding they were restored with (a new sharding would retrace).
        self.config = config.replace(remat=False)
        self.params = jax.device_put(params, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        self.tokenizer = tokenizer
        self.vae = vae_model if vae_model is not None else vae.load()
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.source = source
        self.step = step  # the run step the params are from (from_run), else None
        self.constrain = constrain  # the segmentation grammar: None = for "segment ..." prompts (predict_texts)

    @classmethod
    def from_run(
        cls, run_dir: str | os.PathLike, step: int | str | None = "best", tokenizer=None, frozen: dict | None = None,
        **options: Any,
    ) -> "Predictor":
        """A run's checkpoint: `step` is "best" (recorded by `paliseg eval`), "latest", or a number (0 = base).
        `max_new_tokens` defaults to the run's --seq-len: no suffix it trained on was longer. `frozen`: the
        run's parameters that training never changes, when already loaded (`load_step`)."""
        from train import checkpoints

        number = resolve_step(run_dir, step)
        train_config, run_model = checkpoints.read_run_config(run_dir)
        tokenizer = _tokenizer(tokenizer or train_config.tokenizer, run_model)  # fails fast, before the params load
        config, params = load_step(run_dir, number, frozen)
        options.setdefault("max_new_tokens", train_config.seq_len)
        return cls(config, params, tokenizer, source=f"{run_dir} step {number}", step=number, **options)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, preset: str | None = None, tokenizer=None, **options: Any
    ) -> "Predictor":
        """A checkpoint file or folder (big_vision npz with `preset`, Hugging Face, or ours)."""
        from paliseg import checkpoints

        config, params = checkpoints.load(path, preset=preset)
        tokenizer = _tokenizer(tokenizer or checkpoints.default_tokenizer(path, config), config)
        return cls(config, params, tokenizer, source=str(path), **options)

    def decode_texts(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list["decoding.Decoded"]:
        """Preprocessed images ([S, S, 3] in [-1, 1], S = the config's image size) and prompts -> decoded
        texts with their objects' confidences, in batches of `batch_size` (a short last batch is padded
        with copies of its first item)."""
        from paliseg import decoding

        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        texts: list[decoding.Decoded] = []
        for start in range(0, len(images), self.batch_size):
            batch_images = list(images[start : start + self.batch_size])
            batch_prompts = list(prompts[start : start + self.batch_size])
            real = len(batch_images)
            batch_images += [batch_images[0]] * (self.batch_size - real)
            batch_prompts += [batch_prompts[0]] * (self.batch_size - real)
            decoded = decoding.predict_texts(
                self.config, self.params, self.tokenizer, np.stack(batch_images), batch_prompts,
                max_new_tokens=self.max_new_tokens, constrain=self.constrain,
            )  # fmt: skip
            texts += decoded[:real]
        return texts

    def preprocess(self, image: Image.Image) -> np.ndarray:
        from paliseg import images

        return images.preprocess(image, self.config.img.image_size)

    def predict(
        self,
        images: Image.Image | str | os.PathLike | Sequence[Image.Image | str | os.PathLike],
        prompts: str | Sequence[str],
        degenerate: collections.Counter | None = None,
    ) -> list[Prediction]:
        """One Prediction per image (PIL images or paths); `prompts` is one prompt for all or one per image.
        To ask several prompts about one image, pass the image once per prompt. Images are taken in their
        displayed frame, a PIL image's EXIF orientation applied too, so masks and boxes line up with the
        image as viewers show it."""
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        opened = [_as_image(image) for image in images]
        prompts = [prompts] * len(opened) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(opened):
            raise ValueError(f"{len(prompts)} prompts for {len(opened)} images")
        decoded = self.decode_texts([self.preprocess(image) for image in opened], prompts)
        return [
            from_text(item.text, prompt, image.width, image.height, self.vae, degenerate, item.chunk_scores)
            for item, prompt, image in zip(decoded, prompts, opened)
        ]


def _tokenizer(path: str | os.PathLike | None, config):
    from paliseg.tokenizer import Tokenizer

    if path is None:
        path = config.tokenizer_path
    if path is None:
        raise ValueError("this model needs its tokenizer: pass --tokenizer PATH (the PaliGemma SentencePiece model)")
    return Tokenizer(path)
