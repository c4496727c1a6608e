"""Checkpoint formats: big_vision npz, ours (orbax), exports; round trips give identical parameters."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from paliseg import checkpoints, model
from paliseg import config as cfgs
from paliseg.checkpoints.tree import flatten
from paliseg.files import OutputExistsError

SMALL = cfgs.preset("tiny").replace(
    img={"width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2, "image_size": 16},
    llm={"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "head_dim": 8},
)


LORA = SMALL.replace(lora={"rank": 2, "targets": ("q", "v", "img_fc1")})


@pytest.fixture(scope="module")
def lora_params():
    return model.init_params(LORA, jax.random.key(1))


@pytest.fixture(scope="module")
def params(lora_params):
    return model.split_params(lora_params)[0]


def _assert_identical(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        assert fa[key].dtype == fb[key].dtype, key
        np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=key)


def test_big_vision_npz_round_trip_stores_bf16_as_void(params, tmp_path):
    bf16 = SMALL.replace(param_dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    path = checkpoints.export_big_vision(tmp_path / "ckpt.npz", params16)
    with np.load(path) as raw:
        assert raw["llm/layers/attn/q_einsum/w"].dtype == np.dtype("V2")  # as numpy writes bf16
        assert "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel" in raw.files
    _, loaded = checkpoints.load(path, preset="tiny", **_sizes(bf16))
    _assert_identical(loaded, params16)


def _sizes(config):
    return {"img": config.img.__dict__, "llm": config.llm.__dict__, "param_dtype": config.param_dtype}


def test_big_vision_npz_with_params_prefix(params, tmp_path):
    flat = {f"params/{k}": np.asarray(v) for k, v in flatten(params).items()}
    flat["params/llm/final_norm/scale"] = flat["params/llm/final_norm/scale"].astype(ml_dtypes.bfloat16)
    np.savez(tmp_path / "prefixed.npz", **flat)
    _, loaded = checkpoints.load(tmp_path / "prefixed.npz", preset="tiny", **_sizes(SMALL))
    _assert_identical(loaded, params)


def test_npz_needs_a_preset_and_must_match_it(params, tmp_path):
    path = checkpoints.export_big_vision(tmp_path / "ckpt.npz", params)
    with pytest.raises(ValueError, match="pass a preset"):
        checkpoints.load(path)
    with pytest.raises(ValueError) as error:
        checkpoints.load(path, preset="tiny")  # the real tiny preset has other sizes
    assert "wrong shapes" in str(error.value)
    assert "MultiHeadDotProductAttention_0/key/kernel: (1, 32, 2, 16), expected (2, 96, 4, 24)" in str(error.value)


def test_exports_do_not_overwrite(params, tmp_path):
    path = checkpoints.export_big_vision(tmp_path / "ckpt.npz", params)
    with pytest.raises(OutputExistsError):
        checkpoints.export_big_vision(path, params)
    checkpoints.export_big_vision(path, params, overwrite=True)


def test_native_round_trip_keeps_config_lora_and_tokenizer(lora_params, tmp_path):
    config, params = LORA.replace(remat=True), lora_params
    path = checkpoints.save(tmp_path / "run" / "step_10", params, config)
    assert json.loads((path / "paliseg.json").read_text())["config"]["lora"]["rank"] == 2
    assert checkpoints.kind_of(path) == "paliseg"
    loaded_config, loaded = checkpoints.load(path)
    assert loaded_config == config
    _assert_identical(loaded, params)
    assert checkpoints.default_tokenizer(path, loaded_config) == path / "tokenizer.model"
    with pytest.raises(OutputExistsError):
        checkpoints.save(path, params, config)


def test_hf_export_refuses_unmerged_lora(lora_params, tmp_path):
    config, params = LORA, lora_params
    with pytest.raises(ValueError, match="merge_lora"):
        checkpoints.export_hf(tmp_path / "hf", params, config)
    merged = model.merge_lora(params, config)
    folder = checkpoints.export_hf(tmp_path / "hf", merged, SMALL)
    loaded_config, loaded = checkpoints.load(folder, param_dtype="float32")
    # posemb_init is only how a fresh model starts; a loaded one is read as SigLIP's default
    assert loaded_config.llm == SMALL.llm and loaded_config.img == dataclasses.replace(SMALL.img, posemb_init="normal")
    _assert_identical(loaded, merged)


def test_unknown_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        checkpoints.load(tmp_path / "missing.npz", preset="tiny")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not a checkpoint"):
        checkpoints.load(tmp_path / "folder")
