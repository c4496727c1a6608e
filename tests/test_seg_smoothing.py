"""Seg label smoothing by codebook distance (`paliseg train --seg-label-smoothing S`, train.step): each seg
position's target keeps 1 - S on the true code and gives S to its nearest codes; other positions, and S = 0,
keep the token loss as it was; a run records it and GRPO refuses it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_masked_dataset, tiny_config

import vae
from train import commands as train_commands
from train import config as train_config
from train import plan as train_plan
from train import step as train_step

VOCAB, SEG_IDS = 12, np.array([3, 5, 7, 9], np.int32)  # a small vocabulary whose seg codes are 4 of its ids


def test_code_targets_follow_the_distance_between_codebook_vectors():
    codebook = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    targets = train_step.seg_code_targets(codebook, 0.2)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.diag(targets), 0.8)
    # code 0: squared distances 1, 4, 18 to codes 1, 2, 3; its nearest is at 1, so weights e^-1, e^-4, e^-18
    weights = np.exp(-np.array([1.0, 4.0, 18.0]))
    np.testing.assert_allclose(targets[0, 1:], 0.2 * weights / weights.sum(), rtol=1e-5)
    np.testing.assert_array_equal(train_step.seg_code_targets(codebook, 0.0), np.eye(4, dtype=np.float32))


def _case(seed: int = 0):
    """Logits [2, 5, VOCAB], targets with seg codes and other tokens, a loss mask and code targets."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 5, VOCAB)).astype(np.float32)
    targets = np.array([[3, 9, 1, 5, 0], [7, 2, 3, 11, 9]], np.int32)
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], np.int32)
    code_targets = train_step.seg_code_targets(rng.normal(size=(4, 3)), 0.3)
    return logits, targets, mask, code_targets


def _numpy_loss(logits, targets, mask, code_targets) -> float:
    """The smoothed token loss written out per position in numpy (float64)."""
    logp = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(axis=-1, keepdims=True))
    per_example = []
    for row in range(len(targets)):
        nll = []
        for position, target in enumerate(targets[row]):
            if target in SEG_IDS:
                soft = code_targets[list(SEG_IDS).index(target)]
                nll.append(-(soft * logp[row, position, SEG_IDS]).sum())
            else:
                nll.append(-logp[row, position, target])
        per_example.append((np.array(nll) * mask[row]).sum() / mask[row].sum())
    return float(np.mean(per_example))


def test_the_smoothed_loss_equals_a_direct_numpy_computation():
    logits, targets, mask, code_targets = _case()
    seg = {"seg_ids": jnp.asarray(SEG_IDS), "code_targets": jnp.asarray(code_targets)}
    got = train_step.token_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), seg=seg)
    np.testing.assert_allclose(float(got), _numpy_loss(logits, targets, mask, code_targets), rtol=1e-5)


def test_zero_smoothing_is_the_token_loss_and_other_positions_keep_their_gradient():
    logits, targets, mask, code_targets = _case(1)
    plain = train_step.token_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    exact = {"seg_ids": jnp.asarray(SEG_IDS), "code_targets": jnp.eye(4)}
    same = train_step.token_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), seg=exact)
    np.testing.assert_allclose(float(same), float(plain), rtol=1e-6)

    smoothed = {"seg_ids": jnp.asarray(SEG_IDS), "code_targets": jnp.asarray(code_targets)}
    grads = [
        jax.grad(train_step.token_loss)(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), seg=seg)
        for seg in (None, smoothed)
    ]
    is_seg = np.isin(targets, SEG_IDS)
    np.testing.assert_allclose(grads[1][~is_seg], grads[0][~is_seg], rtol=1e-6)  # loc, label, eos: as before
    assert not np.allclose(grads[1][is_seg], grads[0][is_seg])
    # where the target is a seg code, the smoothing's mass goes to the other codes' logits only
    other = np.setdiff1d(np.arange(VOCAB), SEG_IDS)
    np.testing.assert_allclose(grads[1][is_seg][:, other], grads[0][is_seg][:, other], rtol=1e-5)


@pytest.mark.slow
def test_a_run_records_the_smoothing_and_plans_it(tmp_path):
    vae_path = vae.write_random_npz(tmp_path / "vae.npz", seed=0)
    data = make_masked_dataset(tmp_path / "data", vae_path)
    plain = train_commands.run(tiny_config(data, tmp_path / "plain", steps=2, save_every=2))
    smoothed_config = tiny_config(data, tmp_path / "smoothed", steps=2, save_every=2, seg_label_smoothing=0.2)
    smoothed = train_commands.run(smoothed_config)
    assert smoothed["losses"][0] > plain["losses"][0]  # the soft targets' cross-entropy is higher at the start
    saved = json.loads((tmp_path / "smoothed" / "config.json").read_text())["train"]
    assert saved["seg_label_smoothing"] == 0.2
    assert train_plan.train_flops(smoothed_config) > 0  # `paliseg plan` lowers the step with the code targets


def test_grpo_refuses_seg_smoothing():
    grpo = train_config.TrainConfig(data=["d"], out="o", init_run="r", objective="grpo", seg_label_smoothing=0.1)
    with pytest.raises(ValueError, match="seg-label-smoothing is a loss of --objective supervised"):
        train_config.validate(grpo)
