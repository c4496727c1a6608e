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
    """`train.step.jit_train_step` with the shardings of its arguments (state, frozen, batch, and where
    needed the seg-code losses' inputs, replicated) and results on `mesh`: the program `paliseg train` runs
    (and `train.plan` plans)."""
    seg = (sharding.replicated(mesh),) if train_step.needs_seg_inputs(config) else ()
    return train_step.jit_train_step(
        config,
        model_cfg,
        tx,
        lr_schedule,
        in_shardings=(state_shardings, frozen_shardings, sharding.batch_sharding(mesh), *seg),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
    )


class Supervised:
    """The token loss's optimizer step (`train.loop.Objective`), with the mask loss when asked."""

    name = "train"
    updates_per_step = 1

    def __init__(self, context: Context):
        self.context = context
        self.fields = FIELDS
        self.seg_inputs: tuple = ()  # the step's last argument where `train.step.needs_seg_inputs`
        if train_step.needs_seg_inputs(context.config):  # from the VAE that wrote the data's seg tokens
            model = context.load_vae()
            self.vae_source = model.source
            self.seg_inputs = (train_step.seg_inputs(context.config, model, context.tokenizer.seg_ids),)
        if context.config.mask_loss_weight > 0:
            self.fields = FIELDS[:2] + train_step.MASK_LOSS_METRICS + FIELDS[2:]

    def describe(self) -> str:
        config = self.context.config
        described = f"batch {config.batch_size} in {config.grad_accum} micro-batch(es)"
        if config.mask_loss_weight:
            described += (
                f"; + {config.mask_loss_weight:g} x {config.mask_loss} mask loss ({config.mask_loss_codes} codes) "
                f"through the VAE {self.vae_source}"
            )
        if config.seg_label_smoothing:
            described += f"; seg label smoothing {config.seg_label_smoothing:g} by the codebook of {self.vae_source}"
        return described

    def compile(self, tx, lr_schedule, start: Start) -> None:
        self.frozen = start.frozen
        context = self.context
        replicated = sharding.replicated(context.mesh)
        self.seg_inputs = sharding.place(self.seg_inputs, jax.tree.map(lambda _: replicated, self.seg_inputs))
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
        return self.step_fn(state, self.frozen, sharding.global_batch(batch, self.context.mesh), *self.seg_inputs)

    def postfix(self, row: dict[str, float]) -> dict[str, str]:
        masks = {"mask": f"{row['mask_loss']:.4f}"} if "mask_loss" in row else {}
        return {"loss": f"{row['loss']:.4f}", **masks, "lr": f"{row['lr']:.2e}", "ex_s": f"{row['examples_per_s']:.1f}"}

    def summarize(self, history: list[dict[str, float]]) -> dict[str, Any]:
        return {}
