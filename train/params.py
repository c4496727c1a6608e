"""Trainable sets: which parameters are trained, and the (frozen, trainable) split of the tree.

The step differentiates only with respect to the trainable part, so only it has gradients and optimizer
state; the frozen base is an argument of the compiled step (never copied, never updated) in its own dtype
(bf16 for the real presets). Trainable parameters are float32.

- `lora`: the adapters (`*_lora_a`, `*_lora_b`) the model creates inside its projections when LoRA is on.
- `attn`: big_vision's colab recipe, every Gemma attention weight (`llm/layers/attn/...`).
- `all`: everything (full fine-tuning; the demo's tiny model trained from scratch).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from paliseg import config as model_configs
from paliseg import model
from paliseg.model import lora
from train.config import TrainConfig

Params = dict[str, Any]


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
    as_float32 = lambda leaf: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), leaf)  # noqa: E731 (`Matrices` too)
    train = {k: as_float32(v) for k, v in flat.items() if is_trainable(trainable, k)}
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
