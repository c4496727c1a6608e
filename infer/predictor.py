"""Load a model once, then predict boxes and full-resolution masks for many images.

    from infer import Predictor
    predictor = Predictor.from_run("runs/r1", step="best")           # or an int, or "latest"; the run's VAE
    predictor = Predictor.from_checkpoint("ckpt.npz", preset="paligemma-3b-224", tokenizer="tok.model")
    predictor = Predictor.from_checkpoint("hf_folder/", dtype="float32")   # weights and matmuls in float32
    predictor = Predictor.from_checkpoint("hf_folder/", quantize="nf4")    # projection weights in 4 bits
    [prediction] = predictor.predict("wall.jpg", "segment crack")    # or lists of images and prompts
    prediction.mask, prediction.boxes, prediction.labels, prediction.text, prediction.objects

Decoding is `paliseg.decoding.predict_texts` (KV cache, greedy, the segmentation grammar for "segment"
prompts; with `samples=G` the consensus of G sampled answers, `infer.consensus`) in batches of `batch_size`
(the last one padded, so one program is compiled per prompt-length bucket); masks come from the VAE at each
image's own resolution (`infer.prediction.from_texts`).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from infer.prediction import Prediction, from_texts

if TYPE_CHECKING:
    from paliseg import decoding
    from train.run import Run

DEFAULT_MAX_NEW_TOKENS = 128  # 5 objects of 4 loc + 16 seg + label tokens


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
        mesh=None,
        samples: int = 1,
        temperature: float = 0.7,
        seed: int = 0,
    ):
        """`mesh`: decode each batch split over its devices, of every process (`train.sharding.make_mesh`;
        `paliseg eval` across devices and hosts); the batch size is rounded up to a multiple of them. None:
        one device. `samples` > 1: each answer is the consensus of that many answers sampled at `temperature`
        (`infer.consensus`; the same `seed` for every batch), not the greedy one."""
        import vae

        if tokenizer.vocab_size > config.llm.vocab_size:
            raise ValueError(
                f"{tokenizer.path}: {tokenizer.vocab_size} pieces, more than the model's vocabulary ({config.llm.vocab_size}); "
                f"wrong tokenizer for {source}?"
            )
        import jax

        from paliseg.model import inference
        from train import sharding

        # One program serves every checkpoint: no recompute-in-backward (there is no backward), and the
        # params on one device whatever sharding they were restored with (a new sharding would retrace),
        # laid out as decoding on this backend wants them (the caller's params are left intact); with a
        # mesh, then copied to each of its devices.
        params = jax.device_put(params, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
        self.config, self.params = inference.for_inference(config.replace(remat=False), params)
        self.mesh = mesh
        if mesh is not None:
            self.params = sharding.place(self.params, jax.tree.map(lambda _: sharding.replicated(mesh), self.params))
            batch_size = -(-batch_size // mesh.size) * mesh.size
        self.tokenizer = tokenizer
        self.vae = vae_model if vae_model is not None else vae.load()
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.source = source
        self.step = step  # the run step the params are from (from_run), else None
        self.constrain = constrain  # the segmentation grammar: None = for "segment ..." prompts (predict_texts)
        self.samples, self.temperature, self.seed = samples, temperature, seed

    @classmethod
    def from_run(
        cls,
        run_dir: str | os.PathLike | Run,
        step: int | str | None = "best",
        tokenizer=None,
        frozen: dict | None = None,
        dtype: str | None = None,
        quantize: str | None = None,
        **options: Any,
    ) -> Predictor:
        """A run's checkpoint (`run_dir`: a folder or an open `train.run.Run`): `step` is "best" (recorded by
        `paliseg eval`), "latest", or a number (0 = the base). `max_new_tokens` defaults to the run's
        --seq-len: no suffix it trained on was longer. Without `vae_model`, the VAE of the run's data
        (`vae.identity.resolve`). `frozen`: the run's parameters that training never changes, when
        already loaded elsewhere (an open Run keeps its own). `dtype`: "float32" or "bfloat16" for the
        weights and matmuls (default: the run's model config). `quantize`: "int8" or "nf4", the projection
        weights stored quantized (`paliseg.model.quantization`; default: as the run trained, which a run on
        a quantized base records)."""
        from train.run import Run

        run = Run.open(run_dir)
        number = run.resolve_step(step)
        tokenizer = _tokenizer(
            tokenizer or run.train_config.tokenizer, run.model_config
        )  # fails fast, before the params load
        if options.get("vae_model") is None:
            import vae
            from vae import identity

            options["vae_model"] = vae.load(identity.resolve(run.vae, recorded_by=f"run {run.dir}").path)
        trained = run.model_config.quantization
        if quantize is not None and trained.enabled and quantize != trained.format:
            raise ValueError(
                f"run {run.dir} was trained on a {trained.format} base: its adapters fit that base, not a "
                f"{quantize} one; drop --quantize (the run's base is used)"
            )
        config, params = run.load(number, frozen=frozen)
        if dtype is not None and config.with_dtype(dtype) != config:
            import jax.numpy as jnp

            from paliseg.model import quantization

            config = config.with_dtype(dtype)
            params = quantization.cast(params, jnp.dtype(dtype))
        config, params = _quantized(config, params, quantize)
        options.setdefault("max_new_tokens", run.train_config.seq_len)
        return cls(config, params, tokenizer, source=f"{run.dir} step {number}", step=number, **options)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        preset: str | None = None,
        tokenizer=None,
        dtype: str | None = None,
        quantize: str | None = None,
        **options: Any,
    ) -> Predictor:
        """A checkpoint file or folder (big_vision npz with `preset`, Hugging Face, or ours). `dtype`:
        "float32" or "bfloat16" for the weights and matmuls (default: the preset's, bfloat16 for Hugging Face
        folders, the recorded one for ours). `quantize`: "int8" or "nf4", the projection weights quantized
        as they load (`paliseg.model.quantization`)."""
        from paliseg import checkpoints

        changes = {} if quantize is None else {"quantization": {"format": quantize}}  # quantized as it loads
        config, params = checkpoints.load(path, preset=preset, dtype=dtype, **changes)
        tokenizer = _tokenizer(tokenizer or checkpoints.default_tokenizer(path, config), config)
        return cls(config, params, tokenizer, source=str(path), **options)

    def decode_texts(
        self, images: Sequence[np.ndarray], prompts: Sequence[str], batch_size: int | None = None
    ) -> list[decoding.Decoded]:
        """Preprocessed images ([S, S, 3] in [-1, 1], S = the config's image size) and prompts -> decoded
        texts with their objects' confidences, in batches of `batch_size` (default: the predictor's; with a
        mesh, a multiple of its devices; a short last batch is padded with copies of its first item)."""

        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        size = batch_size or self.batch_size
        texts: list[decoding.Decoded] = []
        for start in range(0, len(images), size):
            chunk = images[start : start + size]
            decoded = self.decode_batch(
                padded(chunk, size)[self.local_rows(size)], padded(prompts[start : start + size], size)
            )
            texts += decoded[: len(chunk)]
        return texts

    def local_rows(self, size: int) -> slice:
        """The rows of a batch of `size` whose images this process loads (`decode_batch`)."""
        from train import sharding

        return slice(None) if self.mesh is None else sharding.local_rows(size)

    def decode_batch(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[decoding.Decoded]:
        """One batch: this process's rows of preprocessed images (`local_rows` of the batch) and every row's
        prompt -> every row's decoded text."""
        from paliseg import decoding
        from train import sharding

        pixels = np.stack(images)
        if self.mesh is not None:
            pixels = sharding.global_rows(pixels, self.mesh)
        sampling = {}
        if self.samples > 1:
            import jax

            sampling = {"sampling": decoding.Sampling(self.temperature, 1.0), "rng": jax.random.key(self.seed),
                        "samples_per_prompt": self.samples}  # fmt: skip
        decoded = decoding.predict_texts(
            self.config, self.params, self.tokenizer, pixels, prompts, max_new_tokens=self.max_new_tokens,
            constrain=self.constrain, **sampling,
        )  # fmt: skip
        if self.samples == 1:
            return decoded
        from infer import consensus

        codebook = np.asarray(self.vae.params["codebook"])
        answers = []
        for row in range(len(prompts)):
            group = decoded[row * self.samples : (row + 1) * self.samples]
            answers.append(decoding.Decoded(*consensus.consensus([item.text for item in group], codebook)))
        return answers

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
        return from_texts(
            [(item.text, prompt, image.width, image.height) for item, prompt, image in zip(decoded, prompts, opened)],
            self.vae,
            degenerate,
            [item.chunk_scores for item in decoded],
        )


def padded(rows: Sequence, size: int) -> list:
    """`rows` filled up to `size` with copies of the first: a short last batch runs the same program."""
    return list(rows) + [rows[0]] * (size - len(rows))


def _quantized(config, params: dict, quantize: str | None) -> tuple[Any, dict]:
    """(config, params) with the projection weights quantized in `quantize` (None: as they are)."""
    if quantize is None or config.quantization.format == quantize:
        return config, params
    from paliseg.model import quantize_params

    config = config.replace(quantization={"format": quantize})
    return config, quantize_params(params, config)


def _tokenizer(path: str | os.PathLike | None, config):
    from paliseg.tokenizer import Tokenizer

    if path is None:
        path = config.tokenizer_path
    if path is None:
        raise ValueError("this model needs its tokenizer: pass --tokenizer PATH (the PaliGemma SentencePiece model)")
    return Tokenizer(path)
