"""Fine-tuning pieces that need no model: settings, sampling, augmentation, loss, schedule, sharding rule."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paliseg.config import LoraConfig
from train import config as train_config
from train import data as train_data
from train import events, optim, sharding
from train import run as run_folder
from train.step import token_loss


def _config(**changes):
    values = {"data": ["/d"], "out": "/run", "init": "random", "preset": "tiny"}
    values.update(changes)
    return run_folder.resolve_config(values)


def test_resolve_layers_defaults_file_and_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"lr": 0.001, "steps": 7, "lora": {"rank": 4, "alpha": 2.0}}')
    config = run_folder.resolve_config(
        {"data": ["d"], "out": "r", "init": "random", "steps": 9, "lr": None, "lora": {"alpha": 8.0}}, path
    )
    assert (config.lr, config.steps, config.batch_size) == (0.001, 9, 8)
    assert (config.lora.rank, config.lora.alpha, config.lora.dropout) == (4, 8.0, 0.0)  # nested settings merge
    assert config.data[0].startswith("/") and config.out.startswith("/")  # recorded as absolute paths


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"batch_size": 6, "grad_accum": 4}, "multiple of --grad-accum"),
        ({"lr": -1.0}, "--lr must be more than 0, got -1"),
        ({"trainable": "head"}, "--trainable must be one of"),
        ({"lora": {"targets": ["q", "qq"]}}, r"lora: unknown LoRA targets \['qq'\]"),
        ({"lora": {"targets": []}}, "--lora-targets must be a non-empty subset"),
        ({"lora": {"rank": 0}}, "--lora-rank must be at least 1"),
        ({"b1": 1.0}, "--b1 must be less than 1, got 1"),
        ({"label_smoothing": 1.0}, "--label-smoothing"),
        ({"checkpoint": "/base.npz"}, "exactly one of --checkpoint BASE or --init random"),
        ({"preset": "huge"}, "--preset must be one of"),
        ({"data_weights": [1.0, 2.0]}, "2 values for 1 --data folders"),
        ({"warmup_fraction": 1.0}, "--warmup-fraction must be less than 1, got 1"),
        ({"grpo": {"group_size": 1}}, "--grpo-group-size must be at least 2, got 1"),
        ({"objective": "grpo", "grpo": {"keep": 8}}, r"--grpo-keep must be at most --grpo-group-size \(4\), got 8"),
    ],
)
def test_bad_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        _config(**changes)


def test_unknown_config_file_key_names_the_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"learning_rate": 0.1}')
    with pytest.raises(ValueError, match=r"c\.json: unknown setting\(s\) learning_rate"):
        run_folder.resolve_config({"data": ["d"], "out": "r", "init": "random"}, path)


def test_resume_refuses_changed_semantics_but_takes_execution_settings():
    saved = _config(lr=1e-3, data=["/d"])
    resumed = train_config.check_resume(saved, {"workers": 1, "lr": 1e-3, "data": ["/d"], "out": "/elsewhere"})
    assert resumed.workers == 1 and resumed.out == "/elsewhere" and resumed.lr == 1e-3
    with pytest.raises(ValueError, match=r"lr=0\.01 \(the run has 0\.001\)"):
        train_config.check_resume(saved, {"lr": 0.01})


def test_dtype_sets_the_base_weights_and_the_matmuls_and_old_base_dtype_files_still_load(tmp_path):

    tiny = run_folder.model_config(_config())
    assert (tiny.param_dtype, tiny.compute_dtype) == ("float32", "float32")  # the preset's (default unchanged)
    bf16 = run_folder.model_config(_config(dtype="bfloat16"))
    assert (bf16.param_dtype, bf16.compute_dtype, bf16.cache_dtype) == ("bfloat16",) * 3
    assert bf16.lora == tiny.lora and bf16.llm == tiny.llm
    (tmp_path / "old.json").write_text('{"base_dtype": "bfloat16"}')
    assert train_config.load_file(tmp_path / "old.json") == {"dtype": "bfloat16"}
    with pytest.raises(ValueError, match="dtype"):
        train_config.validate(_config(dtype="float16"))


def test_resume_compares_nested_settings():
    saved = _config(lora={"rank": 4})
    assert train_config.check_resume(saved, {"lora": {"rank": 4}, "workers": 2}).lora.rank == 4
    with pytest.raises(ValueError, match=r"lora\.alpha=2\.0 \(the run has 16\.0\)"):
        train_config.check_resume(saved, {"lora": {"alpha": 2.0}})


def test_a_run_folder_of_flat_lora_keys_still_loads(tmp_path):
    """Runs and config files written before the LoRA settings were nested (`lora_rank`, ...) load as before."""
    from train.run import Run

    config = _config(lora={"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": ["q", "img_fc1"]})
    model_cfg = run_folder.model_config(config)
    old = config.to_json()
    old.update({f"lora_{key}": value for key, value in old.pop("lora").items()})
    assert "lora" not in old and old["lora_rank"] == 4
    (tmp_path / "config.json").write_text(json.dumps({"train": old, "model": model_cfg.to_dict(), "data_sha256": {}}))
    run = Run(tmp_path)
    assert run.train_config == config and run.model_config == model_cfg
    (tmp_path / "c.json").write_text('{"lora_rank": 2, "lora_targets": ["v"]}')
    from_file = run_folder.resolve_config(
        {"data": ["d"], "out": "r", "init": "random", "lora": {"alpha": 4.0}}, tmp_path / "c.json"
    )
    assert from_file.lora == LoraConfig(rank=2, alpha=4.0, targets=("v",))
    (tmp_path / "both.json").write_text('{"lora_rank": 2, "lora": {"rank": 3}}')
    with pytest.raises(ValueError, match=r"both lora_rank and lora\.rank"):
        train_config.load_file(tmp_path / "both.json")


def test_augmentation_is_seeded_and_bounded():
    config = _config()
    image = np.random.default_rng(0).uniform(-1, 1, (8, 8, 3)).astype(np.float32)
    a = train_data.photometric(image, np.random.default_rng([0, 3, 5, 1]), config)
    b = train_data.photometric(image, np.random.default_rng([0, 3, 5, 1]), config)
    c = train_data.photometric(image, np.random.default_rng([0, 3, 5, 2]), config)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and a.min() >= -1 and a.max() <= 1 and a.dtype == np.float32
    still = train_data.photometric(
        image, np.random.default_rng(1), config.replace(brightness=0.0, contrast=0.0, saturation=0.0)
    )
    np.testing.assert_allclose(still, image, atol=1e-6)


def _reference_loss(logits, targets, mask, ls):
    """big_vision's formula, literally: one-hot smoothed targets over log_softmax."""
    vocab = logits.shape[-1]
    logp = jax.nn.log_softmax(logits)
    onehot = jax.nn.one_hot(targets, vocab)
    soft = onehot * (1 - ls) + (1 - onehot) * ls / (vocab - 1)
    token = -jnp.sum(logp * soft, -1)
    return jnp.mean(jnp.sum(token * mask, -1) / jnp.clip(jnp.sum(mask, -1), 1))


@pytest.mark.parametrize("ls", [0.0, 0.3])
def test_token_loss_matches_big_vision(ls):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 5, 11)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (3, 5)))
    mask = jnp.asarray([[0, 1, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_allclose(
        token_loss(logits, targets, mask, ls), _reference_loss(logits, targets, mask, ls), rtol=1e-5
    )


def test_schedule_reproduces_big_vision_colab_values():
    # finetune_paligemma.ipynb (PaliGemma 1): 64 steps (a 65-point schedule), base 0.03, cosine, 10% warmup
    # (6 steps); it printed these lrs for steps 1, 6, 7 and 64. Our update k (1-based) is count k - 1.
    lr = optim.schedule(_config(steps=64, lr=0.03, warmup_fraction=0.1))
    assert [round(float(lr(k - 1)), 5) for k in (1, 6, 7, 64)] == [0.005, 0.03, 0.02998, 0.00002]


def test_sgd_and_clipping():
    config = _config(optimizer="sgd", lr=0.5, warmup_fraction=0.0, steps=10, grad_clip=1.0)
    tx = optim.optimizer(config)
    params = {"w": jnp.ones((2, 2))}
    grads = {"w": jnp.full((2, 2), 10.0)}  # norm 20 -> clipped to 1
    updates, _ = tx.update(grads, tx.init(params), params)
    first_lr = float(optim.schedule(config)(0))
    assert 0.45 < first_lr <= 0.5  # no warmup: near the peak from the first update
    np.testing.assert_allclose(updates["w"], -first_lr * 10.0 / 20.0, rtol=1e-6)


def test_fsdp_rule_splits_the_largest_divisible_axis_never_the_layer_axis():
    assert sharding.param_spec("llm/layers/attn/q_einsum/w", (18, 8, 2048, 256), 4) == jax.sharding.PartitionSpec(
        None, None, "fsdp", None
    )
    assert sharding.param_spec("llm/layers/mlp/linear", (16, 3, 5), 4) == jax.sharding.PartitionSpec(None, None, None)
    assert sharding.param_spec("llm/embedder/input_embedding", (257152, 2048), 8) == jax.sharding.PartitionSpec(
        "fsdp", None
    )
    assert sharding.param_spec("opt/0/mu/img/head/kernel", (1152, 2048), 1) == jax.sharding.PartitionSpec(None, None)
    # Optimizer-state paths carry the parameter path, so the layer axis is recognised there too.
    assert sharding.param_spec("1/0/mu/llm/layers/attn/q_einsum/w_lora_a", (4, 64, 8), 4) == jax.sharding.PartitionSpec(
        None, "fsdp", None
    )
    assert math.prod(sharding.make_mesh(1).devices.shape) == len(jax.devices())


def test_crc32c_known_value():
    assert events.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


@pytest.mark.oracle
@pytest.mark.slow
def test_event_files_read_back_with_tensorflow(tmp_path):
    import tensorflow as tf

    writer = events.ScalarWriter(tmp_path, purge_step=4)
    writer.scalar("train/loss", 1.25, 4)
    writer.scalar("train/loss", 0.5, 5)
    writer.close()
    read = list(tf.compat.v1.train.summary_iterator(str(writer.path)))  # checks both CRCs of every record
    assert read[0].file_version == "brain.Event:2" and read[0].step == 4
    assert read[1].session_log.status == tf.compat.v1.SessionLog.START and read[1].step == 4
    assert [(e.step, e.summary.value[0].tag, e.summary.value[0].simple_value) for e in read[2:]] == [
        (4, "train/loss", 1.25),
        (5, "train/loss", 0.5),
    ]
