"""The loss and the one compiled training step.

Loss as big_vision (`trainers/proj/paligemma/train.py`): the model reads `tokens[:, :-1]`, the targets are
`tokens[:, 1:]`, token losses are averaged over `mask_loss[:, 1:]` (the suffix and its eos) per example,
then over the batch. Label smoothing gives the target `1 - ls` and every other class `ls / (V - 1)`; it is
computed from logsumexp and the logit sum, so no [B, T, V] one-hot or log-prob array is built.

The step takes a batch shaped [grad_accum, micro_batch, ...], scans over the micro-batches summing
gradients (so memory is one micro-batch's), averages them, and applies the optimizer. Gradients exist only
for the trainable parameters. Dropout keys derive from (seed, step, micro-batch): nothing random is carried
in the state, so a resumed run draws the same masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from paliseg import model
from paliseg.config import ModelConfig
from paliseg.model import backend
from train import params as param_sets
from train.config import TrainConfig

State = dict[str, Any]  # {"step": int32 [], "params": trainable tree, "opt_state": optax state}


def token_loss(logits: jax.Array, targets: jax.Array, mask_loss: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example mean of the masked token cross-entropies, then the batch mean. logits [B,T,V] float32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - lse
    if label_smoothing > 0:
        vocab = logits.shape[-1]
        other_logp = (jnp.sum(logits, axis=-1) - vocab * lse - target_logp) / (vocab - 1)
        token_nll = -((1.0 - label_smoothing) * target_logp + label_smoothing * other_logp)
    else:
        token_nll = -target_logp
    mask = mask_loss.astype(jnp.float32)
    per_example = jnp.sum(token_nll * mask, axis=-1) / jnp.clip(jnp.sum(mask, axis=-1), 1.0)
    return jnp.mean(per_example)


def example_loss(
    model_cfg: ModelConfig, full_params, batch: dict[str, jax.Array], rng: jax.Array, label_smoothing: float
) -> jax.Array:
    """The training loss of one micro-batch ([B, ...] arrays) under the full parameter tree."""
    logits = model.forward(
        model_cfg,
        full_params,
        batch["image"],
        batch["tokens"][:, :-1],
        batch["mask_ar"][:, :-1],
        batch["mask_input"][:, :-1],
        train=True,
        rng=rng,
    )
    return token_loss(logits, batch["tokens"][:, 1:], batch["mask_loss"][:, 1:], label_smoothing)


def init_state(trainable, tx: optax.GradientTransformation) -> State:
    return {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": tx.init(trainable)}


def make_train_step(
    config: TrainConfig, model_cfg: ModelConfig, tx: optax.GradientTransformation, lr_schedule: optax.Schedule
) -> Callable[[State, Any, dict[str, jax.Array]], tuple[State, dict]]:
    """step(state, frozen, batch) -> (new state, metrics {loss, grad_norm, lr}); not yet jit-compiled."""
    base_key = jax.random.key(config.seed)

    def micro_loss(trainable, frozen, micro, rng):
        return example_loss(model_cfg, param_sets.join(frozen, trainable), micro, rng, config.label_smoothing)

    grad_fn = jax.value_and_grad(micro_loss)

    def step(state: State, frozen, batch: dict[str, jax.Array]):
        step_key = jax.random.fold_in(base_key, state["step"])

        def accumulate(carry, micro_and_index):
            loss_sum, grad_sum = carry
            micro, index = micro_and_index
            loss, grads = grad_fn(state["params"], frozen, micro, jax.random.fold_in(step_key, index))
            return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

        accum = config.grad_accum
        zeros = jax.tree_util.tree_map(jnp.zeros_like, state["params"])
        (loss_sum, grad_sum), _ = jax.lax.scan(
            accumulate, (jnp.zeros((), jnp.float32), zeros), (batch, jnp.arange(accum))
        )
        grads = jax.tree_util.tree_map(lambda g: g / accum, grad_sum)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
        }
        metrics = {"loss": loss_sum / accum, "grad_norm": optax.global_norm(grads), "lr": lr_schedule(state["step"])}
        return new_state, metrics

    return step


def jit_train_step(
    config: TrainConfig,
    model_cfg: ModelConfig,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    **jit_kwargs,
) -> Callable:
    """`make_train_step` compiled as `paliseg train` runs it (the state donated, this backend's compiler
    options), so the benchmarks measure that very step; `jit_kwargs` (e.g. shardings) go to `jax.jit`."""
    return jax.jit(
        make_train_step(config, model_cfg, tx, lr_schedule),
        donate_argnums=(0,),
        compiler_options=backend.compiler_options(),
        **jit_kwargs,
    )
