"""Supervised fine-tuning (`paliseg train`, `--objective supervised`): teacher-forced cross-entropy on the
suffix tokens (`train.step`), one compiled step per batch of the loop (`train.loop`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from train import sharding
from train import step as train_step
from train.loop import Context, Start

FIELDS = ("step", "loss", "lr", "grad_norm", "examples_per_s", "elapsed_s")


class Supervised:
    """The token loss's optimizer step (`train.loop.Objective`)."""

    name = "train"
    fields = FIELDS
    updates_per_step = 1

    def __init__(self, context: Context):
        self.context = context

    def describe(self) -> str:
        config = self.context.config
        return f"batch {config.batch_size} in {config.grad_accum} micro-batch(es)"

    def compile(self, tx, lr_schedule, start: Start) -> None:
        mesh = self.context.mesh
        self.frozen = start.frozen
        self.step_fn = train_step.jit_train_step(
            self.context.config,
            self.context.model_cfg,
            tx,
            lr_schedule,
            in_shardings=(start.state_shardings, start.frozen_shardings, sharding.batch_sharding(mesh)),
            out_shardings=(start.state_shardings, sharding.replicated(mesh)),
        )

    def step(self, step: int, state: Any, example_ids: np.ndarray, batch: dict[str, np.ndarray]) -> tuple[Any, dict]:
        return self.step_fn(state, self.frozen, sharding.global_batch(batch, self.context.mesh))

    def postfix(self, row: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}", "ex_s": f"{row['examples_per_s']:.1f}"}

    def summarize(self, history: list[dict[str, float]]) -> dict[str, Any]:
        return {}
