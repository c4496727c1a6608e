"""The mask loss beside the token loss (`paliseg train --mask-loss-weight W`, train.step.mask_loss): it is the
Dice (or BCE) of the masks the seg-code distributions decode to, reaches only the seg positions, equals the
decoded ground-truth tokens' loss when the distributions are one-hot, leaves W = 0 runs as they were, and a
run with it resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_masked_dataset, read_losses, tiny_config

import vae
from paliseg import tokens as codec
from paliseg.tokenizer import Tokenizer
from train import commands as train_commands
from train import config as train_config
from train import data as train_data
from train import optim
from train import params as param_sets
from train import run as run_folder
from train import step as train_step
from vae.model import SOFT_MASK_SCALE, MaskDecoder

MASK_LOSS = train_config.TrainConfig(data=["d"], out="o", init="random", mask_loss_weight=1.0)


@pytest.fixture(scope="module")
def masked(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, VAE path): 4 train records of one rectangle each, tokens of a random VAE."""
    root = tmp_path_factory.mktemp("masked")
    vae_path = vae.write_random_npz(root / "vae.npz", seed=0)
    return make_masked_dataset(root / "data", vae_path), vae_path


def _train_data(data: Path, **changes) -> tuple[train_data.TrainData, Tokenizer]:
    config = tiny_config(data, "/unused", augment=False, **changes)
    tokenizer = Tokenizer(run_folder.model_config(config).tokenizer_path)
    return train_data.TrainData(config, tokenizer, 16), tokenizer


def _micro(batch: dict) -> dict:
    """The first micro-batch of a [grad_accum, micro, ...] batch."""
    return {key: jnp.asarray(value[0]) for key, value in batch.items()}


def _numpy_loss(drawn: np.ndarray, targets: np.ndarray, valid: np.ndarray, kind: str) -> float:
    """The mask loss from decoded logits [B, K, 64, 64], written out in numpy (float64)."""
    z = SOFT_MASK_SCALE * drawn.astype(np.float64)
    if kind == "dice":
        soft = 1.0 / (1.0 + np.exp(-z))
        overlap = (soft * targets).sum(axis=(2, 3))
        per_mask = 1.0 - (2.0 * overlap + 1.0) / (soft.sum(axis=(2, 3)) + targets.sum(axis=(2, 3)) + 1.0)
    else:
        per_mask = (np.maximum(z, 0) - z * targets + np.log1p(np.exp(-np.abs(z)))).mean(axis=(2, 3))
    per_example = (per_mask * valid).sum(axis=1) / np.maximum(valid.sum(axis=1), 1.0)
    return float(per_example.mean())


@pytest.mark.parametrize(
    ("kind", "codes"), [("dice", "straight-through"), ("bce", "straight-through"), ("dice", "expected")]
)
def test_mask_loss_equals_a_direct_numpy_computation(masked, kind, codes):
    rng = np.random.default_rng(0)
    model = vae.load(masked[1])
    size, length, vocab, slots = 2, 40, 160, 2
    seg_ids = rng.permutation(vocab)[: codec.SEG_CODES].astype(np.int32)
    logits = rng.normal(0, 3, (size, length, vocab)).astype(np.float32)
    positions = np.stack([rng.permutation(length)[: slots * 16].reshape(slots, 16) for _ in range(size)])
    batch = {
        "seg_positions": positions.astype(np.int32),
        "target_masks": rng.uniform(0, 1, (size, slots, 64, 64)).astype(np.float32),
        "target_objects": np.asarray([[1, 1], [1, 0]], np.float32),
    }
    got = train_step.mask_loss(
        jnp.asarray(logits), batch, train_step.seg_inputs(MASK_LOSS, model, seg_ids), kind, codes
    )

    at_segs = logits[np.arange(size)[:, None, None], positions][..., seg_ids].astype(np.float64)  # [B, K, 16, 128]
    probs = np.exp(at_segs - at_segs.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    codebook = np.asarray(model.params["codebook"], np.float64)
    vectors = codebook[at_segs.argmax(-1)] if codes == "straight-through" else probs @ codebook
    grid = jnp.asarray(vectors.reshape(size * slots, 4, 4, -1), jnp.float32)
    drawn = np.asarray(MaskDecoder().apply({"params": model.params["decoder"]}, grid)).reshape(size, slots, 64, 64)
    expected = _numpy_loss(drawn, batch["target_masks"], batch["target_objects"], kind)
    assert expected > 0.01
    np.testing.assert_allclose(float(got), expected, rtol=1e-4)


def test_targets_and_gradient_reach_only_the_seg_positions(masked):
    data, vae_path = masked
    train, tokenizer = _train_data(data, mask_loss_weight=1.0)
    batch = _micro(train.batch(0))
    tokens, loss_mask = np.asarray(batch["tokens"]), np.asarray(batch["mask_loss"])
    slots = train_data.mask_loss_fields(48)["target_objects"][0][0]
    assert batch["seg_positions"].shape == (4, slots, 16) and batch["target_masks"].shape == (4, slots, 64, 64)
    np.testing.assert_array_equal(batch["target_objects"], [[1.0] + [0.0] * (slots - 1)] * 4)  # one object each
    is_seg = np.isin(tokens[:, 1:], tokenizer.seg_ids) & (loss_mask[:, 1:] == 1)  # the targets that are seg tokens
    for row in range(4):
        np.testing.assert_array_equal(np.flatnonzero(is_seg[row]), batch["seg_positions"][row, 0])
        assert np.asarray(batch["target_masks"][row, 0]).mean() > 0.8  # the box holds a filled rectangle

    vocab = tokenizer.vocab_size
    logits = jax.random.normal(jax.random.key(0), (*tokens[:, 1:].shape, vocab))
    grads = jax.grad(train_step.mask_loss)(
        logits, batch, train_step.seg_inputs(MASK_LOSS, vae.load(vae_path), tokenizer.seg_ids)
    )
    reached = np.abs(np.asarray(grads)).sum(axis=-1) > 0
    np.testing.assert_array_equal(reached, is_seg)  # loc, label, eos and prompt positions get no gradient
    is_loc = np.isin(tokens[:, 1:], tokenizer.loc_ids) & (loss_mask[:, 1:] == 1)
    assert is_loc.sum() == 16 and not reached[is_loc].any()
    other_columns = np.setdiff1d(np.arange(vocab), tokenizer.seg_ids)
    assert not np.asarray(grads)[..., other_columns].any()  # only the seg codes' logits


@pytest.mark.parametrize("codes", ["straight-through", "expected"])
def test_one_hot_distributions_give_the_loss_of_the_decoded_ground_truth_tokens(masked, codes):
    data, vae_path = masked
    train, tokenizer = _train_data(data, mask_loss_weight=1.0)
    example_ids = train.example_ids(0)[0]
    batch = _micro(train.batch(0))
    targets = np.asarray(batch["tokens"][:, 1:])
    logits = 1e4 * jax.nn.one_hot(targets, tokenizer.vocab_size)  # the seg codes' softmax: the teacher's code
    model = vae.load(vae_path)
    got = train_step.mask_loss(logits, batch, train_step.seg_inputs(MASK_LOSS, model, tokenizer.seg_ids), codes=codes)

    segs = [codec.parse_suffix(train.examples[int(i)].record.suffix).objects[0].seg for i in example_ids]
    drawn = model.decode(np.asarray(segs))[:, None]  # [B, 1 object, 64, 64]
    masks = np.asarray(batch["target_masks"][:, :1])
    np.testing.assert_allclose(float(got), _numpy_loss(drawn, masks, np.ones((4, 1)), "dice"), rtol=1e-5)


def _step_inputs(data: Path, weight: float, trainable: str):
    """(config, model config, jitted step, initial state, frozen params, batch of step 0, tokenizer)."""
    config = tiny_config(data, "/unused", augment=False, mask_loss_weight=weight, trainable=trainable)
    model_cfg = run_folder.model_config(config)
    frozen, params = run_folder.initial_params(config, model_cfg)
    tx = optim.optimizer(config)
    step = jax.jit(train_step.make_train_step(config, model_cfg, tx, optim.schedule(config)))
    tokenizer = Tokenizer(model_cfg.tokenizer_path)
    batch = train_data.TrainData(config, tokenizer, model_cfg.img.image_size).batch(0)
    return config, model_cfg, step, train_step.init_state(params, tx), frozen, batch, tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("trainable", ["lora", "attn", "all"])
def test_the_loss_is_the_token_loss_plus_w_times_the_mask_loss(masked, trainable):
    data, vae_path = masked
    config, model_cfg, step, state, frozen, batch, tokenizer = _step_inputs(data, 0.0, trainable)
    assert set(batch) == {"image", *train_data.TEXT_FIELDS}  # W = 0: the batch and the step of before
    token_only, plain = step(state, frozen, batch)
    assert set(plain) == {"loss", "grad_norm", "lr"}
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0), 0)  # step 0, micro-batch 0
    full = param_sets.join(frozen, state["params"])
    direct, parts = train_step.example_loss(config, model_cfg, full, _micro(batch), key)
    assert parts == {}
    np.testing.assert_allclose(float(plain["loss"]), float(direct), rtol=1e-6)  # the token loss, as before

    _, _, step, state, frozen, batch, _ = _step_inputs(data, 0.5, trainable)
    seg = train_step.seg_inputs(MASK_LOSS, vae.load(vae_path), tokenizer.seg_ids)
    new_state, both = step(state, frozen, batch, seg)
    np.testing.assert_allclose(float(both["token_loss"]), float(plain["loss"]), rtol=1e-6)
    assert float(both["mask_loss"]) > 0.01
    np.testing.assert_allclose(
        float(both["loss"]), float(both["token_loss"]) + 0.5 * float(both["mask_loss"]), rtol=1e-6
    )
    pairs = zip(jax.tree.leaves(token_only["params"]), jax.tree.leaves(new_state["params"]))
    assert any(not np.array_equal(a, b) for a, b in pairs)  # the mask loss reaches the trainable set


@pytest.mark.slow
def test_a_run_with_the_mask_loss_records_it_and_resumes_exactly(masked, tmp_path):
    data, _ = masked
    changes = dict(mask_loss_weight=0.5, mask_loss="bce", trainable="all", steps=4, batch_size=2, save_every=2)
    whole = train_commands.run(tiny_config(data, tmp_path / "whole", **changes))
    cut = tiny_config(data, tmp_path / "cut", **changes)
    train_commands.run(cut, stop_after=3)  # interrupted after step 3; the last checkpoint is step 2
    resumed = train_commands.run(cut, resume=True)
    assert resumed["start_step"] == 2 and resumed["losses"] == whole["losses"][2:]  # bit-identical
    assert read_losses(tmp_path / "cut") == read_losses(tmp_path / "whole")
    saved = json.loads((tmp_path / "cut" / "config.json").read_text())["train"]
    assert saved["mask_loss_weight"] == 0.5 and saved["mask_loss"] == "bce"
    assert saved["mask_loss_codes"] == "straight-through"
    header = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["step", "loss", "token_loss", "mask_loss"]
    with pytest.raises(ValueError, match="started with other settings"):
        train_config.check_resume(run_folder.Run(tmp_path / "cut").train_config, {"mask_loss_weight": 1.0})


def test_settings_refuse_a_negative_weight_and_grpo():
    with pytest.raises(ValueError, match="mask-loss-weight"):
        train_config.validate(train_config.TrainConfig(data=["d"], out="o", init="random", mask_loss_weight=-1.0))
    grpo = train_config.TrainConfig(data=["d"], out="o", init_run="r", objective="grpo", mask_loss_weight=1.0)
    with pytest.raises(ValueError, match="loss of --objective supervised"):
        train_config.validate(grpo)


def test_a_missing_mask_is_refused_before_training_only_with_the_mask_loss(masked, tmp_path):
    data = Path(shutil.copytree(masked[0], tmp_path / "data"))
    (data / "masks" / "train_1.png").unlink()
    assert len(_train_data(data)[0]) == 4  # the token loss reads no mask
    with pytest.raises(ValueError, match="cannot be trained on \\(missing_mask: 1"):
        _train_data(data, mask_loss_weight=1.0)
