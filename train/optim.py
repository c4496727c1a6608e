"""Optimizer and learning-rate schedule (optax), built only over the trainable parameters.

The schedule is big_vision's `decay_type="cosine"` with `warmup_percent`: linear from 0 to `lr` over the
warmup steps, then a cosine to `min_lr_ratio * lr` at the last step. Clipping is by global norm, before the
optimizer. AdamW's weight decay is decoupled (optax: multiplied by the learning rate) and applies to
matrices only, never to norms or biases.
"""

from __future__ import annotations

import jax
import optax

from train.config import TrainConfig


def schedule(config: TrainConfig, updates_per_step: int = 1) -> optax.Schedule:
    """The learning rate of the update made at 0-based step `count` (with `updates_per_step` > 1, as GRPO's
    updates per batch, a step's updates share its learning rate).

    As the colab, the schedule spans steps + 1 points and update k (1-based) uses its value at k: no update
    is wasted at lr 0 (the first gets lr/warmup), and the last one still moves (min_lr_ratio 0 is reached
    one step after the end)."""
    total = config.steps + 1
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=config.warmup_steps,
        decay_steps=max(total, config.warmup_steps + 1),
        end_value=config.lr * config.min_lr_ratio,
    )
    return lambda count: base(count // updates_per_step + 1)


def _is_matrix(params):
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def optimizer(config: TrainConfig, updates_per_step: int = 1) -> optax.GradientTransformation:
    lr = schedule(config, updates_per_step)
    if config.optimizer == "adamw":
        update = optax.adamw(lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=_is_matrix)
    else:
        update = optax.sgd(lr, momentum=config.momentum or None)
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), update)
    return update
