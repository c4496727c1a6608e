"""Fine-tuning end to end on the tiny preset: trainable sets, gradient accumulation, exact resumption,
errors before compilation, the CLI, and the loader the later stages use."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_dataset, read_losses, tiny_config

from paliseg import files, model, records
from paliseg.cli.main import main
from train import checkpoints as run_checkpoints
from train import commands as train_commands
from train import data as train_data
from train import optim
from train import params as param_sets
from train import run as run_folder
from train import step as train_step
from train.run import Run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "set")


def _tokenizer(config):
    from paliseg.tokenizer import Tokenizer

    return Tokenizer(run_folder.model_config(config).tokenizer_path)


@pytest.mark.slow
def test_resume_gives_the_losses_of_an_uninterrupted_run(dataset, tmp_path):
    whole = train_commands.run(tiny_config(dataset, tmp_path / "whole"))
    assert whole["checkpoint_steps"] == [3, 6] and len(whole["losses"]) == 6

    assert json.loads((tmp_path / "whole" / "config.json").read_text())["vae"] is None  # no conversion.json

    config = tiny_config(dataset, tmp_path / "cut")
    recorded = {"sha256": "1" * 64, "path": "/first/vae.npz"}
    files.write_json(dataset / records.CONVERSION_FILE, {"vae": recorded})
    try:
        first = train_commands.run(config, stop_after=4)  # "interrupted" after step 4; the last checkpoint is step 3
        assert first["checkpoint_steps"] == [3]
        files.write_json(dataset / records.CONVERSION_FILE, {"vae": {"sha256": "2" * 64, "path": "/other.npz"}})
        meta_file = tmp_path / "cut" / "checkpoints" / "3" / "meta" / "metadata"
        meta = json.loads(meta_file.read_text())
        assert meta["data_state"] == {"global_next_index": 12}  # step 3 of 4 examples
        meta_file.write_text(json.dumps({**meta, "data_state": {"global_next_index": 8}}))
        with pytest.raises(ValueError, match="checkpoint 3: its data state"):
            train_commands.run(config, resume=True)
        del meta["data_state"]  # as a checkpoint written before data states were saved: resumes from its step
        meta_file.write_text(json.dumps(meta))
        second = train_commands.run(config, resume=True)
    finally:
        (dataset / records.CONVERSION_FILE).unlink()
    assert second["start_step"] == 3
    assert second["losses"] == whole["losses"][3:]  # bit-identical
    assert read_losses(tmp_path / "cut") == read_losses(tmp_path / "whole")  # the step-4 row was redone once

    saved = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert saved["train"]["init"] == "random" and saved["model"]["lora"]["rank"] == 8
    assert saved["vae"] == recorded  # the data's VAE when the run started; --resume keeps it

    annotations = records.annotations_path(dataset, "train")
    original = annotations.read_bytes()
    try:
        annotations.write_bytes(original.replace(b"segment crack", b"segment cracks"))
        with pytest.raises(ValueError, match="changed since the run started"):
            train_commands.run(config.replace(steps=8), resume=True)
    finally:
        annotations.write_bytes(original)


def test_trainable_sets_hold_only_their_parameters_in_float32(dataset):
    names = {}
    for trainable in ("lora", "attn", "all"):
        config = tiny_config(dataset, "/unused", trainable=trainable)
        frozen, train = param_sets.abstract(config, run_folder.model_config(config))
        flat = {"/".join(k): v for k, v in _flatten(train).items()}
        names[trainable] = set(flat)
        assert all(v.dtype == jnp.float32 for v in flat.values())
        assert not set(_flatten(frozen)) & set(_flatten(train))
    assert names["lora"] and all(n.endswith(("_lora_a", "_lora_b")) for n in names["lora"])
    assert names["attn"] == {
        "llm/layers/attn/q_einsum/w",
        "llm/layers/attn/kv_einsum/w",
        "llm/layers/attn/attn_vec_einsum/w",
    }
    assert len(names["all"]) > len(names["attn"]) and not any("lora" in n for n in names["all"])


def _flatten(tree):
    from flax import traverse_util

    return traverse_util.flatten_dict(tree)


def _step_inputs(dataset, **changes):
    config = tiny_config(dataset, "/unused", augment=False, **changes)
    model_cfg = run_folder.model_config(config)
    frozen, trainable = run_folder.initial_params(config, model_cfg)
    tx = optim.optimizer(config)
    step = jax.jit(train_step.make_train_step(config, model_cfg, tx, optim.schedule(config)))
    from paliseg.tokenizer import Tokenizer

    data = train_data.TrainData(config, Tokenizer(model_cfg.tokenizer_path), model_cfg.img.image_size)
    return step, train_step.init_state(trainable, tx), frozen, data.batch(0)


@pytest.mark.slow
def test_gradient_accumulation_equals_the_full_batch(dataset):
    # SGD: the update is lr * gradient, so the parameters compare the gradients themselves (Adam's first
    # step, lr * g / (|g| + eps), would amplify rounding in near-zero gradients).
    step1, state1, frozen, batch1 = _step_inputs(dataset, grad_accum=1, warmup_fraction=0.0, optimizer="sgd", lr=1.0)
    step2, state2, _, batch2 = _step_inputs(dataset, grad_accum=2, warmup_fraction=0.0, optimizer="sgd", lr=1.0)
    np.testing.assert_array_equal(batch1["tokens"].reshape(-1, 48), batch2["tokens"].reshape(-1, 48))
    new1, metrics1 = step1(state1, frozen, batch1)
    new2, metrics2 = step2(state2, frozen, batch2)
    np.testing.assert_allclose(metrics1["loss"], metrics2["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics1["grad_norm"], metrics2["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(new1["params"]), jax.tree_util.tree_leaves(new2["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_lora_step_updates_adapters_and_no_recompile(dataset):
    step, state, frozen, batch = _step_inputs(dataset, warmup_fraction=0.0)
    before = jax.tree_util.tree_map(np.asarray, state["params"])
    for _ in range(2):  # step 1 moves B away from zero; only then does A get a gradient
        state, metrics = step(state, frozen, batch)
    assert step._cache_size() == 1  # one compilation for every step
    changed = [
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(state["params"]))
    ]
    assert all(changed) and int(state["step"]) == 2 and float(metrics["loss"]) > 0


def test_examples_longer_than_seq_len_fail_before_compiling(dataset, tmp_path, capsys):
    code = main(
        [
            "train",
            "--data",
            str(dataset),
            "--init",
            "random",
            "--preset",
            "tiny",
            "--seq-len",
            "12",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "do not fit --seq-len 12" in err and "_annotations.train.jsonl:1:" in err
    assert not (tmp_path / "run").exists()


def test_unusable_records_and_a_missing_split_fail_before_compiling(tmp_path, capsys):
    data = make_dataset(tmp_path / "set", count=4)
    (data / "images" / "1.png").unlink()
    (data / "images" / "2.png").write_bytes(b"not an image")
    argv = ["train", "--data", str(data), "--init", "random", "--preset", "tiny", "--out", str(tmp_path / "run")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "2 record(s) cannot be trained on (missing_image: 1, unreadable_image: 1;" in err
    assert "_annotations.train.jsonl:2: image" in err and "_annotations.train.jsonl:3: image" in err
    assert main([*argv, "--split", "valid"]) == 1
    assert f"{data}: no split 'valid'; found: train" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_existing_run_is_not_overwritten(dataset, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    code = main(
        ["train", "--data", str(dataset), "--init", "random", "--preset", "tiny", "--out", str(tmp_path / "run")]
    )
    assert code == 1 and "already holds a run; pass --resume" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_trains_loss_falls_and_load_run_merges_lora(dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(
        [
            "train",
            "--data",
            str(dataset),
            "--init",
            "random",
            "--preset",
            "tiny",
            "--seq-len",
            "48",
            "--trainable",
            "lora",
            "--steps",
            "12",
            "--batch-size",
            "4",
            "--lr",
            "1e-2",
            "--save-every",
            "6",
            "--no-augment",
            "--out",
            str(run_dir),
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint_steps"] == [6, 12] and result["last_loss"] < result["first_loss"]
    assert run_checkpoints.list_steps(run_dir) == [6, 12]
    assert any((run_dir / "tb").iterdir())

    merged_cfg, merged = Run(run_dir).load(12)
    lora_cfg, with_adapters = Run(run_dir).load(12, merge_lora=False)
    assert not merged_cfg.lora.enabled and lora_cfg.lora.enabled
    assert not any("lora" in "/".join(k) for k in _flatten(merged))
    batch = train_data.TrainData(
        tiny_config(dataset, run_dir, augment=False),
        __import__("paliseg.tokenizer").tokenizer.Tokenizer(merged_cfg.tokenizer_path),
        merged_cfg.img.image_size,
    ).batch(0)
    inputs = [batch[k][0] for k in ("image", "tokens", "mask_ar", "mask_input")]
    np.testing.assert_allclose(
        model.forward(merged_cfg, merged, *inputs),
        model.forward(lora_cfg, with_adapters, *inputs),
        rtol=2e-4,
        atol=2e-4,
    )


@pytest.mark.slow
def test_lora_from_a_base_checkpoint_keeps_the_base_and_records_it(dataset, tmp_path):
    from paliseg import checkpoints as model_checkpoints
    from paliseg.checkpoints.tree import flatten

    base_cfg = run_folder.model_config(tiny_config(dataset, "/unused")).replace(lora={"rank": 0})
    base = model.init_params(base_cfg, jax.random.key(7))
    path = model_checkpoints.export_big_vision(tmp_path / "base.npz", base)
    config = tiny_config(dataset, tmp_path / "run", init=None, checkpoint=str(path), steps=2, save_every=2)
    train_commands.run(config)

    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["checkpoint"] == str(path) and saved["init"] is None
    _, params = Run(tmp_path / "run").load(2, merge_lora=False)
    _, shared = Run(tmp_path / "run").load(2, merge_lora=False, frozen=Run(tmp_path / "run").frozen_params())
    jax.tree.map(np.testing.assert_array_equal, params, shared)  # a sweep's one read of the base: the same params
    flat, base_flat = flatten(params), flatten(base)
    for name, value in base_flat.items():  # the frozen base is exactly the file's
        np.testing.assert_array_equal(np.asarray(flat[name]), np.asarray(value), err_msg=name)
    adapters_b = [v for k, v in flat.items() if k.endswith("_lora_b")]
    assert adapters_b and all(np.abs(np.asarray(v)).max() > 0 for v in adapters_b)  # trained away from zero
