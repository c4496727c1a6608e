"""The quantized frozen base (int8, NF4): the formats' error bounds, the model's forward over quantized weights,
LoRA training over them (only the adapters change; exact resume; FSDP), the flags, and old run folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import make_dataset, read_losses, tiny_config

from paliseg import config, model
from paliseg.cli.main import build_parser
from paliseg.config import QuantizationConfig
from paliseg.model import quantization
from paliseg.model.quantization import NF4_BLOCK, NF4_LEVELS
from train import commands as train_commands
from train import config as train_config
from train import optim
from train import run as run_folder
from train import step as train_step
from train.run import Run

REPO = Path(__file__).resolve().parents[1]

# (per-layer shape, contracted axes): one and two contracted axes, in front, in the middle and last; sizes
# that are not multiples of the NF4 block; a leading (scanned layer) axis on some.
LAYOUTS = [
    ((3, 96, 200), (-2,)),  # [L, D, F], D contracted, 96 = 1.5 blocks
    ((2, 4, 40, 72), (-3, -2)),  # [L, N, H, D] (attn_vec: N and H contracted)
    ((130, 6, 8), (-3,)),  # [D, N, H] (SigLIP's query kernel: D first)
    ((2, 2, 1, 64, 16), (-2,)),  # [L, P, K, D, H] (a fused kv weight)
]


def _weight(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * jnp.linspace(0.1, 3.0, shape[-1])


@pytest.mark.parametrize("shape, axes", LAYOUTS)
def test_int8_error_is_at_most_half_a_step_of_its_channel(shape, axes):
    weight = _weight(shape)
    quantized = quantization.quantize(weight, QuantizationConfig("int8"), axes)
    assert quantized.codes.dtype == jnp.int8 and quantized.shape == shape
    restored = quantized.dequantize()
    step = jnp.max(jnp.abs(weight), axis=axes, keepdims=True) / 127  # one scale per output channel
    np.testing.assert_array_equal(np.asarray(quantized.scales), np.asarray(step))
    assert bool(jnp.all(jnp.abs(restored - weight) <= step / 2 * (1 + 1e-6)))
    assert float(jnp.max(jnp.abs(restored - weight) / step)) > 0.4  # the bound is tight, not vacuous


@pytest.mark.parametrize("shape, axes", LAYOUTS)
def test_nf4_value_lies_in_its_codes_bin(shape, axes):
    weight = _weight(shape, seed=1)
    quantized = quantization.quantize(weight, QuantizationConfig("nf4"), axes)
    assert quantized.codes.dtype == jnp.uint8 and quantized.shape == shape
    inputs = int(np.prod([shape[a] for a in axes]))
    assert quantized.codes.shape[-2:] == (-(-inputs // NF4_BLOCK), NF4_BLOCK // 2)  # two codes per byte
    restored = np.asarray(quantized.dequantize())
    # the same blocks by hand: contracted axes last and flattened, split into blocks of 64 (zero-padded)
    k = len(axes)
    rows = np.moveaxis(np.asarray(weight), axes, tuple(range(-k, 0))).reshape(-1, inputs)
    back = np.moveaxis(restored, axes, tuple(range(-k, 0))).reshape(-1, inputs)
    pad = -inputs % NF4_BLOCK
    blocks = np.pad(rows, ((0, 0), (0, pad))).reshape(rows.shape[0], -1, NF4_BLOCK)
    restored_blocks = np.pad(back, ((0, 0), (0, pad))).reshape(blocks.shape)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    x, level = blocks / absmax, restored_blocks / absmax
    np.testing.assert_allclose(np.min(np.abs(level[..., None] - NF4_LEVELS), -1), 0, atol=1e-6)  # a level
    nearest = np.min(np.abs(x[..., None] - NF4_LEVELS), -1)
    assert np.all(np.abs(x - level) <= nearest + 1e-6)  # and the nearest one: x lies in that level's bin
    assert np.all(np.abs(blocks - restored_blocks) <= absmax * np.max(np.diff(NF4_LEVELS)) / 2 + 1e-6)


def test_nf4_double_scales_stay_within_half_a_step_of_each_channel():
    weight = _weight((3, 256, 96), seed=2)
    single = quantization.quantize(weight, QuantizationConfig("nf4"), (-2,))
    double = quantization.quantize(weight, QuantizationConfig("nf4", double_scales=True), (-2,))
    assert double.scales.dtype == jnp.int8 and double.scale_stats.shape == (3, 96, 2)
    np.testing.assert_array_equal(np.asarray(single.codes), np.asarray(double.codes))
    scales = quantization._dequantize_scales(double.scales, double.scale_stats)
    step = double.scale_stats[..., 1:]
    assert bool(jnp.all(jnp.abs(scales - single.scales) <= step / 2 * (1 + 1e-5) + 1e-7))
    error = jnp.abs(double.dequantize() - weight).max() / jnp.abs(weight).max()
    assert float(error) < 0.2


def _inputs(cfg, batch=2, length=10, seed=0):
    rng = np.random.default_rng(seed)
    size = cfg.img.image_size
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    tokens = rng.integers(0, cfg.llm.vocab_size, (batch, length)).astype(np.int32)
    mask_ar = (np.arange(length) >= 4).astype(np.int32)[None].repeat(batch, 0)
    return images, tokens, mask_ar, np.ones_like(tokens)


@pytest.mark.parametrize(
    "preset, quant",
    [
        ("tiny", QuantizationConfig("int8")),
        pytest.param(
            "tiny-pg2", QuantizationConfig("nf4", skip_vision=True, double_scales=True), marks=pytest.mark.slow
        ),
    ],
)
def test_quantized_forward_is_the_forward_on_the_dequantized_weights(preset, quant):
    plain = config.preset(preset).replace(lora={"rank": 4, "targets": ("q", "v", "down", "img_q")})
    params = model.init_params(plain, jax.random.key(0))
    # LoRA B is zero at init: give the adapters an effect, so they are part of what is compared
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(path) else x, params
    )
    cfg = plain.replace(quantization=quant)
    quantized = model.quantize_params(params, cfg)
    # the load-time transform gives the tree the quantized model creates
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), model.param_shapes(cfg))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), quantized) == shapes
    flat = traverse_util.flatten_dict(quantized, sep="/")
    names = {path for path, leaf in flat.items() if quantization.is_quantized(leaf)}
    assert "llm/layers/mlp/linear" in names and "llm/embedder/input_embedding" not in names
    assert any(name.startswith("img/") for name in names) == (not quant.skip_vision)
    assert not any("lora" in name or "norm" in name or "bias" in name for name in names)

    inputs = _inputs(cfg)
    logits = model.forward(cfg, quantized, *inputs)
    reference = model.forward(plain, quantization.dequantize_params(quantized), *inputs)
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)
    # and it is not the unquantized model's output: the weights did change
    assert float(jnp.abs(logits - model.forward(plain, params, *inputs)).max()) > 1e-4


@pytest.mark.slow
def test_unscanned_inference_and_bf16_compute_read_quantized_weights():
    from paliseg.model import inference

    plain = config.preset("tiny").with_dtype("bfloat16")
    cfg = plain.replace(quantization={"format": "nf4"})
    quantized = model.init_params(cfg, jax.random.key(1))  # created quantized by the model itself
    inputs = _inputs(cfg)
    reference = model.forward(
        plain, quantization.cast(quantization.dequantize_params(quantized), jnp.bfloat16), *inputs
    )
    unscanned = cfg.replace(scan_layers=False)  # the layout for_inference gives unquantized models on CPU
    layers = inference.unstack_layers(quantized)  # each layer's codes and scales apart
    np.testing.assert_allclose(model.forward(cfg, quantized, *inputs), reference, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(model.forward(unscanned, layers, *inputs), reference, rtol=2e-2, atol=2e-2)
    assert model.for_inference(cfg, quantized)[0] == cfg  # quantized: the scan dequantizes layer by layer


def test_a_checkpoint_loads_quantized_leaf_by_leaf(tmp_path):
    from paliseg import checkpoints

    plain_cfg = config.preset("tiny")
    path = checkpoints.export_big_vision(tmp_path / "base.npz", model.init_params(plain_cfg, jax.random.key(3)))
    _, plain = checkpoints.load(path, preset="tiny")
    cfg, loaded = checkpoints.load(path, preset="tiny", quantization={"format": "int8"})
    assert cfg.quantization == QuantizationConfig("int8")
    expected = model.quantize_params(plain, cfg)
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, loaded, expected)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "set")


def test_lora_step_over_a_quantized_base_trains_only_the_adapters(dataset):
    config_ = tiny_config(dataset, "/unused", augment=False, warmup_fraction=0.0, quantization={"format": "int8"})
    model_cfg = run_folder.model_config(config_)
    assert model_cfg.quantization.format == "int8"
    frozen, trainable = run_folder.initial_params(config_, model_cfg)
    flat_trainable = traverse_util.flatten_dict(trainable, sep="/")
    assert flat_trainable and all(name.endswith(("_lora_a", "_lora_b")) for name in flat_trainable)
    assert any(quantization.is_quantized(leaf) for leaf in traverse_util.flatten_dict(frozen).values())
    tx = optim.optimizer(config_)
    step = jax.jit(train_step.make_train_step(config_, model_cfg, tx, optim.schedule(config_)))
    from paliseg.tokenizer import Tokenizer
    from train import data as train_data

    batch = train_data.TrainData(config_, Tokenizer(model_cfg.tokenizer_path), model_cfg.img.image_size).batch(0)
    state = train_step.init_state(trainable, tx)
    before = jax.tree.map(np.asarray, (state["params"], frozen))
    opt_leaves = jax.tree.leaves(state["opt_state"])
    adapters = sum(x.size for x in jax.tree.leaves(trainable))
    assert 2 * adapters <= sum(x.size for x in opt_leaves) <= 2 * adapters + 4  # Adam's moments, counters
    for _ in range(2):  # step 1 moves B away from zero; only then does A get a gradient
        state, metrics = step(state, frozen, batch)
    assert np.isfinite(float(metrics["loss"]))
    for old, new in zip(jax.tree.leaves(before[0]), jax.tree.leaves(state["params"])):
        assert not np.array_equal(old, np.asarray(new))
    jax.tree.map(np.testing.assert_array_equal, before[1], jax.tree.map(np.asarray, frozen))


@pytest.mark.slow
def test_resume_over_a_quantized_checkpoint_gives_the_uninterrupted_losses_and_loads_quantized(dataset, tmp_path):
    from paliseg import checkpoints

    base_cfg = run_folder.model_config(tiny_config(dataset, "/unused")).replace(lora={"rank": 0})
    base = checkpoints.export_big_vision(tmp_path / "base.npz", model.init_params(base_cfg, jax.random.key(7)))
    settings = dict(init=None, checkpoint=str(base), quantization={"format": "nf4"}, steps=4, save_every=2)
    whole = train_commands.run(tiny_config(dataset, tmp_path / "whole", **settings))
    cut = tiny_config(dataset, tmp_path / "cut", **settings)
    train_commands.run(cut, stop_after=3)  # interrupted after step 3: the last checkpoint is step 2
    second = train_commands.run(cut, resume=True)
    assert second["start_step"] == 2 and second["losses"] == whole["losses"][2:]  # bit-identical
    assert read_losses(tmp_path / "cut") == read_losses(tmp_path / "whole")

    run = Run(tmp_path / "whole")
    assert run.model_config.quantization == QuantizationConfig("nf4")
    model_cfg, params = run.load(4)  # the adapters stay beside the quantized base they trained over
    assert model_cfg.lora.enabled and model_cfg.quantization.format == "nf4"
    flat = traverse_util.flatten_dict(params, sep="/")
    assert quantization.is_quantized(flat["llm/layers/mlp/linear"]) and "llm/layers/mlp/linear_lora_a" in flat

    from infer.predictor import Predictor

    predictor = Predictor.from_run(run, 4)
    assert predictor.config.quantization.format == "nf4"
    with pytest.raises(ValueError, match="trained on a nf4 base"):
        Predictor.from_run(run, 4, quantize="int8")


def test_flags_parse_and_validate():
    parser = build_parser()
    args = parser.parse_args(
        ["train", "--data", "d", "--out", "o", "--init", "random", "--base-dtype", "nf4",
         "--quantization-skip-vision", "--quantization-double-scales"]
    )  # fmt: skip
    from paliseg import settings

    resolved = run_folder.resolve_config(settings.given(args, train_config.TrainConfig))
    assert resolved.quantization == QuantizationConfig("nf4", skip_vision=True, double_scales=True)
    assert run_folder.model_config(resolved).quantization == resolved.quantization
    argv = settings.to_argv(resolved)
    assert argv[argv.index("--base-dtype") + 1] == "nf4" and "--quantization-double-scales" in argv
    with pytest.raises(ValueError, match="needs --trainable lora"):
        run_folder.resolve_config(
            dict(data=["d"], out="o", init="random", trainable="all", quantization={"format": "int8"})
        )
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "d", "--out", "o", "--base-dtype", "int4"])
    for command in (["predict", "--image", "x.png"], ["serve"]):
        assert parser.parse_args([*command, "--checkpoint", "c", "--quantize", "int8"]).quantize == "int8"
    assert parser.parse_args(["eval", "run", "--data", "d", "--out", "o", "--quantize", "nf4"]).quantize == "nf4"


def test_old_config_files_still_load(tmp_path):
    # base_dtype once named the float dtype; as the new flag, a quantized one means the quantization format
    old = train_config.from_dict({"data": ["d"], "out": "o", "base_dtype": "bfloat16", "lora_rank": 4})
    assert old.dtype == "bfloat16" and old.quantization == QuantizationConfig() and old.lora.rank == 4
    assert train_config.from_dict({"base_dtype": "int8"}).quantization.format == "int8"
    with pytest.raises(ValueError, match=r"both base_dtype and quantization\.format"):
        train_config.from_dict({"base_dtype": "int8", "quantization": {"format": "nf4"}})
    # a run folder written before quantization existed: no quantization key in either config
    train = train_config.TrainConfig(data=["d"], out=str(tmp_path), init="random", preset="tiny").to_json()
    del train["quantization"]
    model_cfg = run_folder.model_config(train_config.from_dict(train)).to_dict()
    del model_cfg["quantization"]
    (tmp_path / "config.json").write_text(json.dumps({"train": train, "model": model_cfg, "data_sha256": {}}))
    run = Run(tmp_path)
    assert not run.model_config.quantization.enabled and not run.train_config.quantization.enabled


_SHARDED_RUN = """
import sys
sys.path.insert(0, {tests!r})
import jax
assert len(jax.devices()) == 8, jax.devices()
from helpers import tiny_config
from train import commands as train_commands
config = tiny_config({data!r}, {out!r}, steps=3, save_every=2, batch_size=8, mesh_fsdp=4, quantization={{"format": "nf4"}})
train_commands.run(config, stop_after=2)
train_commands.run(config, resume=True)  # restores the sharded checkpoint of step 2
"""


@pytest.mark.slow
def test_fsdp_over_a_quantized_base_matches_one_device(tmp_path):
    data = make_dataset(tmp_path / "data")
    single = train_commands.run(tiny_config(data, tmp_path / "single", steps=3, save_every=2, batch_size=8,
                                     quantization={"format": "nf4"}))  # fmt: skip
    script = _SHARDED_RUN.format(tests=str(REPO / "tests"), data=str(data), out=str(tmp_path / "sharded"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = read_losses(tmp_path / "sharded")
    for step, loss in enumerate(single["losses"], start=1):
        assert sharded[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_decoding_a_quantized_model_gives_the_dequantized_models_tokens():
    from paliseg import decoding

    plain = config.preset("tiny")
    cfg = plain.replace(quantization={"format": "nf4"})
    quantized = model.init_params(cfg, jax.random.key(2))
    images, tokens, mask_ar, mask_input = _inputs(cfg)
    kwargs = dict(max_new_tokens=6, eos_id=-1)
    ours = decoding.generate(cfg, quantized, images, tokens, mask_ar * 0, mask_input, **kwargs)
    reference = decoding.generate(plain, quantization.dequantize_params(quantized), images, tokens, mask_ar * 0,
                                  mask_input, **kwargs)  # fmt: skip
    np.testing.assert_array_equal(ours.tokens, reference.tokens)
    np.testing.assert_allclose(ours.logprobs, reference.logprobs, rtol=1e-4, atol=1e-4)
