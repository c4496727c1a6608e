"""Train a mask VQ-VAE of the vae-oid architecture on synthetic shapes and real object crops.

Objective (VQ-VAE with an EMA codebook, as upstream AiT's `VectorQuantizerEMA`, plus a Dice term):
    loss = mean((decoder(z_q) - (2x - 1))^2) + dice_weight * dice(sigmoid(4 decoder(z_q)), x)
           + commitment * mean((z - sg(e))^2)
with z_q = z + sg(e - z) (straight-through). MSE alone lets the decoder erase thin objects (a crack is a few
percent of its crop, so predicting background costs little); the per-crop soft Dice makes every object's
overlap count the same, whatever its area. The decoder output stays in about [-1, 1], foreground > 0. The codebook is not trained by gradients: each code is the EMA
of the encoder outputs assigned to it (Laplace-smoothed counts). Every `restart_every` steps, codes whose
EMA usage fell below `dead_usage` are restarted on random encoder outputs of the batch, so all 128 codes
stay in use. The result is written in the vae-oid npz layout (`vae.model.save_npz`), indistinguishable
downstream from the released file.

Training is resumable: the full state (params, optimizer, EMA buffers, step) goes to `<out>.state` every
`save_every` steps. Batches depend only on (seed, step), so a resumed run sees the same data as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from metrics import aggregate, scoring
from paliseg import console, dataset, files
from paliseg.settings import setting
from vae import sources
from vae.masks import crop_to_64
from vae.model import (
    CODE_DIM,
    CODEBOOK_SIZE,
    MASK_SIZE,
    MaskDecoder,
    MaskEncoder,
    MaskVAE,
    embed,
    quantize,
    random_params,
    save_npz,
    soft_dice_loss,
)
from vae.synthetic import synthetic_crops

SYNTHETIC = "synthetic"  # the MASK_SOURCES name of the built-in shape generator


@dataclasses.dataclass(frozen=True)
class VaeTrainConfig:
    """The settings of `paliseg vae train`, which derives its flags from these declarations (paliseg.settings)."""

    steps: int = setting(4000, "optimizer steps", metavar="N")
    batch_size: int = setting(64, "crops per step", metavar="B")
    learning_rate: float = setting(
        1e-3, "peak learning rate (Adam; linear warmup, then cosine to 5% of it)", metavar="LR"
    )
    warmup_steps: int = setting(200, "steps of linear learning-rate warmup", metavar="N")
    commitment: float = setting(0.25, "weight of the commitment term (encoder outputs to their codes)", metavar="W")
    dice_weight: float = setting(1.0, "weight of the soft Dice term that keeps thin objects", metavar="W")
    ema_decay: float = setting(0.99, "decay of the codebook's exponential moving averages", metavar="D")
    restart_every: int = setting(100, "steps between dead-code restarts", metavar="N")
    dead_usage: float = setting(0.05, "EMA of assignments per step below which a code is restarted", metavar="U")
    synthetic_count: int = setting(6000, "synthetic crops drawn by the shape generator", metavar="N")
    min_box_pixels: int = setting(
        4, "skip real objects whose box is thinner than this on either side", metavar="PIXELS"
    )
    holdout_fraction: float = setting(
        0.05, "share of the crops kept out of training to report the round-trip IoU", metavar="F"
    )
    save_every: int = setting(250, "steps between resume states", metavar="N")
    seed: int = setting(0, "seeds the synthetic shapes, the holdout, batches and initialisation", metavar="S")


# ---------------------------------------------------------------------------------------------------------
# Data


def real_crops(path: str | os.PathLike, split: str | None, min_box_pixels: int) -> np.ndarray:
    """64x64 encoder inputs of every object of a converted dataset, COCO export or mask folder."""
    crops = []
    skipped: list[dataset.Skip] = []
    for sample in console.progress(
        sources.samples(path, split, skipped=skipped), desc=f"crops {Path(path).name}", unit="img"
    ):
        for mask, box in zip(sample.object_masks(), sample.boxes):
            x1, y1, x2, y2 = box
            if x2 - x1 >= min_box_pixels and y2 - y1 >= min_box_pixels:
                crops.append(crop_to_64(mask, box))
    if skipped:
        console.info(f"vae train: skipped {len(skipped)} record(s) of {path}: {dataset.skip_counts(skipped)}")
    return np.asarray(crops, np.float32).reshape(-1, MASK_SIZE, MASK_SIZE)


def build_pool(
    mask_sources: Sequence[str], config: VaeTrainConfig, split: str | None = "train"
) -> dict[str, np.ndarray]:
    """All training crops as uint8 (value * 255), by source name, deterministic for a given config."""
    pool = {}
    for source in mask_sources:
        if source == SYNTHETIC:
            crops = synthetic_crops(config.synthetic_count, seed=config.seed)
        else:
            kind = sources.kind_of(Path(source))
            crops = real_crops(source, split if kind in ("records", "coco-splits") else None, config.min_box_pixels)
        if not len(crops):
            raise ValueError(f"{source}: no object crops found")
        pool[source] = np.round(crops * 255).astype(np.uint8)
        console.info(f"vae train: {len(crops)} crops from {source}")
    return pool


def split_pool(pool: dict[str, np.ndarray], config: VaeTrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train crops, holdout crops): a `holdout_fraction` of every source is kept out of training.
    Batches sample the train crops uniformly, so a source's share is its crop count (tune it for
    synthetic shapes with `synthetic_count`)."""
    rng = np.random.default_rng(config.seed)
    train, holdout = [], []
    for crops in pool.values():
        order = rng.permutation(len(crops))
        cut = int(round(len(crops) * config.holdout_fraction))
        holdout.append(crops[order[:cut]])
        train.append(crops[order[cut:]])
    return np.concatenate(train), np.concatenate(holdout)


def batch_at(train: np.ndarray, step: int, config: VaeTrainConfig) -> np.ndarray:
    """The batch of `step`: uniform sample + one of the 8 flips/rotations each (masks have no up)."""
    rng = np.random.default_rng([config.seed, step])
    batch = train[rng.integers(0, len(train), config.batch_size)].astype(np.float32) / 255.0
    flips = rng.integers(0, 8, config.batch_size)
    for i, flip in enumerate(flips):
        crop = np.rot90(batch[i], flip % 4)
        batch[i] = crop[:, ::-1] if flip >= 4 else crop
    return batch


# ---------------------------------------------------------------------------------------------------------
# The step


def init_state(config: VaeTrainConfig, first_batch: np.ndarray) -> dict:
    params = random_params(config.seed)
    latents = MaskEncoder().apply({"params": params["encoder"]}, jnp.asarray(first_batch)).reshape(-1, CODE_DIM)
    rng = np.random.default_rng(config.seed)
    # Codes start on encoder outputs, so none begins dead far away from the data.
    codebook = np.asarray(latents)[rng.choice(len(latents), CODEBOOK_SIZE, replace=len(latents) < CODEBOOK_SIZE)]
    trainable = {"encoder": params["encoder"], "decoder": params["decoder"]}
    return {
        "step": np.zeros((), np.int32),
        "params": trainable,
        "opt_state": make_optimizer(config).init(trainable),
        "codebook": codebook,
        "ema_sum": codebook.copy(),
        "ema_count": np.ones(CODEBOOK_SIZE, np.float32),
        "rng": np.asarray(jax.random.key_data(jax.random.key(config.seed))),
    }


def make_optimizer(config: VaeTrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        config.learning_rate,
        config.warmup_steps,
        max(config.steps, config.warmup_steps + 1),
        config.learning_rate * 0.05,
    )
    return optax.adam(schedule)


def _forward(params, codebook, batch):
    latents = MaskEncoder().apply({"params": params["encoder"]}, batch)
    codes = quantize(latents, codebook)  # [B, 16]
    quantized = embed(codes, codebook)
    straight_through = latents + jax.lax.stop_gradient(quantized - latents)
    logits = MaskDecoder().apply({"params": params["decoder"]}, straight_through)
    return latents, quantized, codes, logits


@functools.lru_cache(maxsize=4)
def make_train_step(config: VaeTrainConfig):
    """The jit-compiled step for `config` (cached: a resumed run in the same process compiles nothing)."""
    optimizer = make_optimizer(config)

    def loss_fn(params, codebook, batch):
        latents, quantized, codes, logits = _forward(params, codebook, batch)
        reconstruction = jnp.mean((logits - (2.0 * batch - 1.0)) ** 2)
        dice = jnp.mean(soft_dice_loss(logits, batch))
        commitment = jnp.mean((latents - jax.lax.stop_gradient(quantized)) ** 2)
        flat = latents.reshape(-1, CODE_DIM)
        loss = reconstruction + config.dice_weight * dice + config.commitment * commitment
        return loss, (reconstruction, dice, commitment, flat, codes.reshape(-1), logits)

    @jax.jit
    def train_step(state, batch):
        (loss, (reconstruction, dice, commitment, flat, codes, logits)), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(state["params"], state["codebook"], batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)

        decay = config.ema_decay
        onehot = jax.nn.one_hot(codes, CODEBOOK_SIZE, dtype=jnp.float32)
        flat = jax.lax.stop_gradient(flat)
        count = decay * state["ema_count"] + (1 - decay) * onehot.sum(0)
        ema_sum = decay * state["ema_sum"] + (1 - decay) * onehot.T @ flat
        total = count.sum()
        smoothed = (count + 1e-5) / (total + CODEBOOK_SIZE * 1e-5) * total
        codebook = ema_sum / smoothed[:, None]

        # Dead-code restart: move rarely used codes onto random encoder outputs of this batch.
        rng, pick = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        restart = (state["step"] % config.restart_every == config.restart_every - 1) & (count < config.dead_usage)
        replacement = flat[jax.random.randint(pick, (CODEBOOK_SIZE,), 0, flat.shape[0])]
        codebook = jnp.where(restart[:, None], replacement, codebook)
        ema_sum = jnp.where(restart[:, None], replacement, ema_sum)
        count = jnp.where(restart, 1.0, count)

        usage = onehot.mean(0)
        perplexity = jnp.exp(-jnp.sum(usage * jnp.log(usage + 1e-10)))
        predicted, target = logits > 0, batch > 0.5
        iou = jnp.sum(predicted & target) / jnp.maximum(jnp.sum(predicted | target), 1)
        new_state = {
            "step": state["step"] + 1, "params": params, "opt_state": opt_state, "codebook": codebook,
            "ema_sum": ema_sum, "ema_count": count, "rng": jax.random.key_data(rng),
        }  # fmt: skip
        metrics = {
            "loss": loss, "reconstruction": reconstruction, "dice": dice, "commitment": commitment, "perplexity": perplexity,
            "batch_iou": iou, "restarted": restart.sum(),
        }  # fmt: skip
        return new_state, metrics

    return train_step


def holdout_scores(model: MaskVAE, holdout: np.ndarray) -> dict[str, float]:
    """Round trip of held-out 64x64 crops through the public API: mean per-crop IoU of decode > 0 vs
    crop > 0.5, and how many of the 128 codes they use."""
    crops = holdout.astype(np.float32) / 255.0
    tokens = model.encode(crops)
    predicted, target = model.decode(tokens) > 0, crops > 0.5
    scores = [scoring.score_image(p, t, "holdout", str(i)) for i, (p, t) in enumerate(zip(predicted, target))]
    miou = aggregate.summarize(scores)["overall"]["miou"]
    return {"holdout_miou": miou, "holdout_crops": len(crops), "holdout_codes_used": len(np.unique(tokens))}


# ---------------------------------------------------------------------------------------------------------
# The loop


def state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state")


def save_state(path: Path, state: dict, config: VaeTrainConfig, sources_used: Sequence[str]) -> None:
    payload = {
        "state": jax.tree.map(np.asarray, state),
        "config": json.dumps(dataclasses.asdict(config)),
        "sources": list(sources_used),
    }
    files.write_bytes(path, serialization.msgpack_serialize(serialization.to_state_dict(payload)))


def load_state(path: Path, template: dict, config: VaeTrainConfig, sources_used: Sequence[str]) -> dict:
    payload = serialization.msgpack_restore(path.read_bytes())
    saved = json.loads(payload["config"])
    if {k: v for k, v in saved.items() if k != "steps"} != {
        k: v for k, v in dataclasses.asdict(config).items() if k != "steps"
    }:
        raise ValueError(
            f"{path}: saved with a different training config {saved}; resume with the same options (only --steps may change)"
        )
    if list(payload["sources"].values() if isinstance(payload["sources"], dict) else payload["sources"]) != list(
        sources_used
    ):
        raise ValueError(f"{path}: saved with other MASK_SOURCES; resume with the same ones")
    return serialization.from_state_dict(template, payload["state"])


def train(
    mask_sources: Sequence[str],
    out: str | os.PathLike,
    config: VaeTrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    dtype: np.dtype = np.float32,
    split: str | None = "train",
) -> dict:
    """Train, write `out` (vae-oid layout) and return a summary (losses, codebook use, holdout IoU)."""
    out = Path(out)
    checkpoint = state_path(out)
    resuming = resume and checkpoint.exists()
    if out.exists() and not (overwrite or resuming):
        raise files.OutputExistsError(out)
    if checkpoint.exists() and not resume and not overwrite:
        raise FileExistsError(f"{checkpoint} exists: pass --resume to continue that run, or --overwrite to start over")
    pool = build_pool(mask_sources, config, split)
    train_crops, holdout = split_pool(pool, config)
    state = init_state(config, batch_at(train_crops, 0, config))
    if resuming:
        state = load_state(checkpoint, state, config, mask_sources)
        console.info(f"vae train: resumed at step {int(state['step'])} from {checkpoint}")
    train_step = make_train_step(config)
    metrics: dict = {}
    bar = console.progress_bar("vae train", total=config.steps, unit="step")
    bar.update(int(state["step"]))
    while int(state["step"]) < config.steps:
        step = int(state["step"])
        state, metrics = train_step(state, batch_at(train_crops, step, config))
        bar.update(1)
        if (step + 1) % 25 == 0:
            bar.set_postfix({k: f"{float(v):.3g}" for k, v in metrics.items() if k != "restarted"})
        if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
            save_state(checkpoint, state, config, mask_sources)
            if bar.disable:  # no bar off a terminal: logs get one line per save instead
                console.info(
                    f"vae train: step {step + 1}/{config.steps} "
                    + " ".join(f"{k} {float(v):.4g}" for k, v in metrics.items())
                )
    bar.close()
    params = {**jax.tree.map(np.asarray, state["params"]), "codebook": np.asarray(state["codebook"])}
    save_npz(out, params, dtype=dtype, overwrite=overwrite or resuming)
    return {
        "out": str(out),
        "steps": int(state["step"]),
        "train_crops": {name: len(crops) for name, crops in pool.items()},
        **{k: float(v) for k, v in metrics.items()},
        **holdout_scores(MaskVAE.from_npz(out), holdout),  # the written file, in its stored dtype
    }
