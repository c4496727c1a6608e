"""Trainable sets: which parameters are trained, and the (frozen, trainable) split of the tree.

The step differentiates only with respect to the trainable part, so only it has gradients and optimizer
state; the frozen base is an argument of the compiled step (never copied, never updated) in its own dtype
(bf16 for the real presets). Trainable parameters are float32.

- `lora`: the adapters (`*_lora_a`, `*_lora_b`) the model creates inside its projections when LoRA is on.
- `attn`: big_vision's colab recipe, every Gemma attention weight (`llm/layers/attn/...`).
- `all`: everything (full fine-tuning; the demo's tiny model trained from scratch).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from paliseg import config as model_configs
from paliseg import model
from paliseg.model import lora
from train import sharding
from train.config import TrainConfig

Params = dict[str, Any]


def model_config(config: TrainConfig) -> model_configs.ModelConfig:
    """The model a run trains: the preset (or the --init-run's model) in the run's --dtype, with LoRA on for
    `--trainable lora`, the run's remat and quantized base (--base-dtype)."""
    if config.init_run:  # the model that run trained (an HF folder's config, say), not only its preset
        from train.run import Run

        base = Run(config.init_run).model_config.with_dtype(config.dtype)
    else:
        base = model_configs.preset(config.preset).with_dtype(config.dtype)
    lora_config = config.lora if config.trainable == "lora" else dataclasses.replace(config.lora, rank=0)
    return dataclasses.replace(base, lora=lora_config, remat=config.remat, quantization=config.quantization)


def is_trainable(trainable: str, name: str) -> bool:
    if trainable == "lora":
        return lora.is_lora_path(name)
    if trainable == "attn":
        return name.startswith("llm/layers/attn/") and not lora.is_lora_path(name)
    return True


def split(params: Params, trainable: str) -> tuple[Params, Params]:
    """(frozen, trainable) nested dicts; the trainable leaves cast to float32."""
    flat = traverse_util.flatten_dict(params, sep="/")
    frozen = {k: v for k, v in flat.items() if not is_trainable(trainable, k)}
    train = {k: jnp.asarray(v, jnp.float32) for k, v in flat.items() if is_trainable(trainable, k)}
    if not train:
        raise ValueError(f"--trainable {trainable}: no parameter of the model is in this set")
    return traverse_util.unflatten_dict(frozen, sep="/"), traverse_util.unflatten_dict(train, sep="/")


def join(frozen: Params, trainable: Params) -> Params:
    return lora.join_params(frozen, trainable)


def abstract(config: TrainConfig, model_cfg: model_configs.ModelConfig) -> tuple[Params, Params]:
    """The (frozen, trainable) trees as ShapeDtypeStructs, without allocating anything."""
    return _abstract(model_cfg, config.trainable)


@functools.lru_cache(maxsize=8)
def _abstract(model_cfg: model_configs.ModelConfig, trainable: str) -> tuple[Params, Params]:
    # Cached: tracing the model costs seconds, and a sweep asks once per checkpoint.
    return jax.eval_shape(lambda key: split(model.init_params(model_cfg, key), trainable), jax.random.key(0))


def random_init(
    config: TrainConfig, model_cfg: model_configs.ModelConfig, shardings: Any = None
) -> tuple[Params, Params]:
    """(frozen, trainable) from the model's initialisers, seeded by `config.seed`, created already sharded."""
    init = jax.jit(lambda key: split(model.init_params(model_cfg, key), config.trainable), out_shardings=shardings)
    return init(jax.random.key(config.seed))


def initial(config: TrainConfig, model_cfg: model_configs.ModelConfig, shardings: Any = None) -> tuple[Params, Params]:
    """(frozen, trainable) at step 0: the base checkpoint (or the --init-run's checkpoint, its LoRA merged)
    with fresh LoRA adapters (seeded), or a seeded random model for `--init random`. `shardings` is a
    (frozen, trainable) pair of NamedSharding trees. A quantized base (`model_cfg.quantization`) is
    quantized as it loads (the random init creates it quantized)."""
    if config.init == "random":
        return random_init(config, model_cfg, shardings)
    base = _base_params(config, model_cfg)
    if config.trainable != "lora":
        frozen, trainable = split(base, config.trainable)
        return sharding.place((frozen, trainable), shardings)
    # Only the adapters are initialised: jit drops the base's initialisers, whose results are unused.
    adapters = jax.jit(
        lambda key: split(model.init_params(model_cfg, key), "lora")[1],
        out_shardings=None if shardings is None else shardings[1],
    )(jax.random.key(config.seed))
    return sharding.place(base, None if shardings is None else shardings[0]), adapters


def _base_params(config: TrainConfig, model_cfg: model_configs.ModelConfig) -> Params:
    """The full tree a run starts from, without adapters: --checkpoint, or --init-run at --init-step."""
    if config.init_run:
        from train.run import Run

        run = Run(config.init_run)
        _, base = run.load(run.resolve_step(config.init_step))  # LoRA merged: the policy that run reached
        return jax.tree_util.tree_map(lambda x: jnp.asarray(x, model_cfg.param_dtype), base)
    from paliseg import checkpoints

    _, base = checkpoints.load(
        config.checkpoint,
        preset=config.preset,
        vocab_size=model_cfg.llm.vocab_size,
        param_dtype=model_cfg.param_dtype,
        lora={"rank": 0},
        quantization=model_cfg.quantization,  # quantized leaf by leaf as it loads
    )
    return base
