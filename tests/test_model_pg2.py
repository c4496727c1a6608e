"""PaliGemma 2 in the model: the presets' trees are big_vision's, LoRA trains on the tiny Gemma 2 preset, and a
LoRA step on the real paligemma2-3b-224 shapes traces and lowers (abstract params: nothing is allocated)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paliseg import config as cfgs
from paliseg import model
from paliseg.checkpoints.tree import flatten
from paliseg.model import lora
from train import optim
from train import params as param_sets
from train import run as run_folder
from train import step as train_step


def test_paligemma2_3b_tree_is_big_vision_checkpoint_tree():
    shapes = {k: tuple(v.shape) for k, v in flatten(model.param_shapes(cfgs.preset("paligemma2-3b-224"))).items()}
    expected = {
        "img/head/kernel": (1152, 2304),
        "llm/embedder/input_embedding": (257152, 2304),
        "llm/layers/attn/q_einsum/w": (26, 8, 2304, 256),
        "llm/layers/attn/kv_einsum/w": (26, 2, 4, 2304, 256),
        "llm/layers/attn/attn_vec_einsum/w": (26, 8, 256, 2304),
        "llm/layers/mlp/gating_einsum": (26, 2, 2304, 9216),
        "llm/layers/mlp/linear": (26, 9216, 2304),
        "llm/layers/pre_attention_norm/scale": (26, 2304),
        "llm/layers/post_attention_norm/scale": (26, 2304),
        "llm/layers/pre_ffw_norm/scale": (26, 2304),
        "llm/layers/post_ffw_norm/scale": (26, 2304),
    }
    assert {k: shapes[k] for k in expected} == expected
    assert not any("qkv_einsum" in k for k in shapes)
    # PaliGemma 1 has no post-norms
    assert not any("post_" in k for k in flatten(model.param_shapes(cfgs.preset("paligemma-3b-224"))))


def test_paligemma2_28b_scales_queries_by_width_per_head():
    assert cfgs.preset("paligemma2-28b-448").llm.query_scale == pytest.approx(1 / 12)
    assert cfgs.preset("paligemma2-10b-224").llm.query_scale == pytest.approx(1 / 16)


def _tiny_lora():
    return cfgs.preset("tiny-pg2").replace(lora={"rank": 4, "alpha": 8.0})


def _batch(config, batch: int = 2, length: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    size = config.img.image_size
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    tokens = rng.integers(3, config.llm.vocab_size, (batch, length)).astype(np.int32)
    mask_ar = np.zeros((batch, length), np.int32)
    mask_ar[:, 4:] = 1
    return images, tokens, mask_ar, np.ones_like(tokens)


@pytest.mark.slow
def test_lora_on_gemma2_starts_as_identity_and_merges_exactly():
    config = _tiny_lora()
    base_config = config.replace(lora={"rank": 0})
    base, adapters = lora.split_params(model.init_params(config, jax.random.key(0)))
    images, tokens, mask_ar, mask_input = _batch(config)
    reference = model.forward(base_config, base, images, tokens, mask_ar, mask_input)
    np.testing.assert_array_equal(
        model.forward(config, lora.join_params(base, adapters), images, tokens, mask_ar, mask_input), reference
    )
    keys = iter(jax.random.split(jax.random.key(2), 64))
    trained = lora.join_params(base, jax.tree.map(lambda x: 0.2 * jax.random.normal(next(keys), x.shape), adapters))
    adapted = model.forward(config, trained, images, tokens, mask_ar, mask_input)
    assert np.abs(adapted - reference).max() > 0.1
    merged = model.merge_lora(trained, config)
    np.testing.assert_allclose(
        model.forward(base_config, merged, images, tokens, mask_ar, mask_input), adapted, atol=2e-4, rtol=1e-4
    )


def _train_config(preset: str):
    return run_folder.resolve_config(
        {"data": ["/d"], "out": "/run", "init": "random", "preset": preset, "warmup_fraction": 0.0, "lr": 3e-3}
    )


def _step_batch(images, tokens, mask_ar, mask_input):
    """One micro-batch ([grad_accum=1, B, ...]); the loss is on the suffix."""
    mask_loss = mask_ar.copy()
    return {
        "image": images[None],
        "tokens": tokens[None],
        "mask_ar": mask_ar[None],
        "mask_input": mask_input[None],
        "mask_loss": mask_loss[None],
    }


@pytest.mark.slow
def test_lora_training_lowers_the_loss_on_tiny_pg2():
    config = _train_config("tiny-pg2")
    model_cfg = run_folder.model_config(config)
    assert model_cfg.llm.post_norms and model_cfg.lora.enabled
    frozen, trainable = param_sets.random_init(config, model_cfg)
    tx = optim.optimizer(config)
    step = jax.jit(train_step.make_train_step(config, model_cfg, tx, optim.schedule(config)))
    state = train_step.init_state(trainable, tx)
    batch = _step_batch(*_batch(model_cfg, length=16))
    losses = []
    for _ in range(8):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05, losses


def test_lora_step_on_paligemma2_3b_shapes_lowers():
    """The real 3B step traces through every Gemma 2 feature and lowers to XLA, on abstract params only."""
    config = _train_config("paligemma2-3b-224")
    model_cfg = run_folder.model_config(config)
    frozen, trainable = param_sets.abstract(config, model_cfg)
    assert flatten(frozen)["llm/layers/post_ffw_norm/scale"].shape == (26, 2304)
    tx = optim.optimizer(config)
    state = jax.eval_shape(lambda t: train_step.init_state(t, tx), trainable)
    size, length = model_cfg.img.image_size, 16
    batch = {
        "image": jax.ShapeDtypeStruct((1, 1, size, size, 3), jnp.float32),
        **{
            k: jax.ShapeDtypeStruct((1, 1, length), jnp.int32) for k in ("tokens", "mask_ar", "mask_input", "mask_loss")
        },
    }
    step = train_step.jit_train_step(config, model_cfg, tx, optim.schedule(config))
    step.lower(state, frozen, batch)  # raises if any shape or dtype does not fit
    new_state, metrics = jax.eval_shape(step, state, frozen, batch)
    assert metrics["loss"].shape == ()
    assert jax.tree.map(lambda x: x.shape, new_state["params"]) == jax.tree.map(lambda x: x.shape, trainable)


def test_tiny_pg2_round_trips_through_every_checkpoint_format(tmp_path):
    from paliseg import checkpoints

    config = cfgs.preset("tiny-pg2")
    params = model.init_params(config, jax.random.key(3))
    reference = flatten(params)
    exported = {
        "big_vision": checkpoints.export_big_vision(tmp_path / "bv.npz", params),
        "paliseg": checkpoints.save(tmp_path / "native", params, config),
        "hf": checkpoints.export_hf(tmp_path / "hf", params, config),
    }
    for kind, path in exported.items():
        loaded_config, loaded = checkpoints.load(path, preset="tiny-pg2", param_dtype="float32")
        assert loaded_config.llm == config.llm, kind
        assert flatten(loaded).keys() == reference.keys(), kind
        for key, value in flatten(loaded).items():
            np.testing.assert_array_equal(value, reference[key], err_msg=f"{kind}: {key}")


def test_hf_gemma2_config_takes_transformers_defaults_where_absent():
    """A hub-style config.json that omits Gemma2Config's defaults reads as PaliGemma 2 3B with Hugging Face's
    soft-cap and window, the checkpoint's (not big_vision's) choices."""
    from paliseg.checkpoints import config_from_hf

    hf = {"model_type": "paligemma", "text_config": {"model_type": "gemma2", "vocab_size": 257216}}
    llm = config_from_hf(hf).llm
    preset = cfgs.preset("paligemma2-3b-224").llm
    assert llm == preset.__class__(**{**preset.__dict__, "vocab_size": 257216, "final_logits_softcap": 30.0,
                                      "sliding_window": 4096})  # fmt: skip
    hf["text_config"]["layer_types"] = ["full_attention", "sliding_attention"] * 13
    with pytest.raises(ValueError, match="layer_types"):
        config_from_hf(hf)
    hf["text_config"]["layer_types"] = ["full_attention"] * 26
    assert config_from_hf(hf).llm.sliding_window is None
