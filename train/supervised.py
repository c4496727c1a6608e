"""Supervised fine-tuning (`paliseg train`, `--objective supervised`): teacher-forced cross-entropy on the
suffix tokens, plus with --mask-loss-weight the mask loss through the run's frozen VAE decoder
(`train.step`), one compiled step per batch of the loop (`train.loop`)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from train import sharding
from train import step as train_step
from train.loop import Context, Start

FIELDS = ("step", "loss", "lr", "grad_norm", "examples_per_s", "elapsed_s")


def jit_step(config, model_cfg, tx, lr_schedule, mesh, frozen_shardings, state_shardings):
    """`train.step.jit_train_step` with the shardings of its arguments (state, frozen, batch, and with
    --mask-loss-weight the mask VAE, replicated) and results on `mesh`: the program `paliseg train` runs
    (and `train.plan` plans)."""
    mask_vae = (sharding.replicated(mesh),) if config.mask_loss_weight else ()
    return train_step.jit_train_step(
        config,
        model_cfg,
        tx,
        lr_schedule,
        in_shardings=(state_shardings, frozen_shardings, sharding.batch_sharding(mesh), *mask_vae),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
    )


class Supervised:
    """The token loss's optimizer step (`train.loop.Objective`), with the mask loss when asked."""

    name = "train"
    updates_per_step = 1

    def __init__(self, context: Context):
        self.context = context
        self.fields = FIELDS
        self.mask_vae: tuple = ()  # the step's last argument with --mask-loss-weight
        if context.config.mask_loss_weight > 0:  # the VAE that wrote the data's tokens decodes the model's
            model = context.load_vae()
            self.vae_source = model.source
            self.mask_vae = (train_step.mask_vae(model, context.tokenizer.seg_ids),)
            self.fields = FIELDS[:2] + train_step.MASK_LOSS_METRICS + FIELDS[2:]

    def describe(self) -> str:
        config = self.context.config
        described = f"batch {config.batch_size} in {config.grad_accum} micro-batch(es)"
        if config.mask_loss_weight:
            described += (
                f"; + {config.mask_loss_weight:g} x {config.mask_loss} mask loss ({config.mask_loss_codes} codes) "
                f"through the VAE {self.vae_source}"
            )
        return described

    def compile(self, tx, lr_schedule, start: Start) -> None:
        self.frozen = start.frozen
        context = self.context
        replicated = sharding.replicated(context.mesh)
        self.mask_vae = sharding.place(self.mask_vae, jax.tree.map(lambda _: replicated, self.mask_vae))
        self.step_fn = jit_step(
            context.config,
            context.model_cfg,
            tx,
            lr_schedule,
            context.mesh,
            start.frozen_shardings,
            start.state_shardings,
        )

    def step(self, step: int, state: Any, example_ids: np.ndarray, batch: dict[str, np.ndarray]) -> tuple[Any, dict]:
        return self.step_fn(state, self.frozen, sharding.global_batch(batch, self.context.mesh), *self.mask_vae)

    def postfix(self, row: dict[str, float]) -> dict[str, str]:
        masks = {"mask": f"{row['mask_loss']:.4f}"} if "mask_loss" in row else {}
        return {"loss": f"{row['loss']:.4f}", **masks, "lr": f"{row['lr']:.2e}", "ex_s": f"{row['examples_per_s']:.1f}"}

    def summarize(self, history: list[dict[str, float]]) -> dict[str, Any]:
        return {}
