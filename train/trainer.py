"""The training run: data + base model -> checkpoints, metrics and TensorBoard events in RUN_DIR.

Order matters for the user: everything that can be wrong with the settings or the data (bad values,
missing files, examples longer than --seq-len, a batch that does not split over the devices) is checked
before the base model is loaded or anything is compiled. The step is compiled once; its inputs always have
the same shapes and shardings, so it never recompiles.

Outputs (process 0 writes the files; every process takes part in saving the sharded checkpoints):
    RUN_DIR/config.json (see train.run), RUN_DIR/checkpoints/<step>/ (see train.checkpoints),
    RUN_DIR/metrics.csv (step, loss, lr, grad_norm, examples_per_s, elapsed_s), RUN_DIR/tb/ (TensorBoard).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from paliseg import console, files
from paliseg.tokenizer import Tokenizer
from train import checkpoints as run_checkpoints
from train import data as train_data
from train import events, optim, sharding
from train import params as param_sets
from train import run as run_folder
from train import step as train_step
from train.config import TrainConfig

METRICS_FILE = "metrics.csv"
METRIC_FIELDS = ("step", "loss", "lr", "grad_norm", "examples_per_s", "elapsed_s")


def tokenizer_path(config: TrainConfig, model_cfg) -> str:
    """--tokenizer, else the one shipped in the base checkpoint's folder, else the preset's bundled one."""
    if config.tokenizer:
        return config.tokenizer
    if config.checkpoint:
        from paliseg import checkpoints

        path = checkpoints.default_tokenizer(config.checkpoint, model_cfg)
    else:
        path = model_cfg.tokenizer_path
    if path is None:
        raise ValueError(f"preset {config.preset} needs --tokenizer PATH (the PaliGemma SentencePiece model)")
    return str(Path(path).absolute())


def load_tokenizer(config: TrainConfig, model_cfg) -> Tokenizer:
    path = config.tokenizer
    tokenizer = Tokenizer(path)
    if tokenizer.vocab_size > model_cfg.llm.vocab_size:
        raise ValueError(
            f"{path}: {tokenizer.vocab_size} pieces, more than the model's vocabulary "
            f"({model_cfg.llm.vocab_size}) of preset {config.preset}"
        )
    return tokenizer


def check_out_folder(config: TrainConfig, resume: bool) -> Path:
    out = Path(config.out)
    has_run = (out / run_folder.CONFIG_FILE).exists() or (out / run_checkpoints.CHECKPOINTS).exists()
    if resume and not (out / run_folder.CONFIG_FILE).exists():
        raise FileNotFoundError(f"--resume: {out / run_folder.CONFIG_FILE} not found; nothing to resume")
    if not resume and has_run:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    return out


class MetricsLog:
    """metrics.csv and TensorBoard events; on resume both drop whatever was logged after the checkpoint."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool, fields: tuple[str, ...] = METRIC_FIELDS):
        self.enabled, self.fields = enabled, fields
        if not enabled:
            return
        self.path = run_dir / METRICS_FILE
        kept = []
        if self.path.exists():
            with open(self.path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= start_step]
        with files.atomic_open(self.path, "w") as handle:
            writer = csv.DictWriter(handle, fields)
            writer.writeheader()
            writer.writerows(kept)
        self.handle = open(self.path, "a", newline="")  # noqa: SIM115 (open for the run; close())
        self.csv = csv.DictWriter(self.handle, fields)
        self.tb = events.ScalarWriter(run_dir / "tb", purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.csv.writerow(row)
        self.handle.flush()
        for key in self.fields:
            if key not in ("step", "elapsed_s"):
                self.tb.scalar(f"train/{key}", row[key], int(row["step"]))
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.handle.close()
            self.tb.close()


@dataclasses.dataclass
class Start:
    """Where a run starts, placed on its mesh: the frozen params, the trainable set at step 0 (GRPO's KL
    reference), the train state (fresh from it, or restored) and the trees' shardings."""

    frozen: Any
    initial: Any
    state: Any
    frozen_shardings: Any
    state_shardings: Any


def sharded_start(config: TrainConfig, model_cfg, tx, mesh, checkpoints, start_step: int) -> Start:
    """The params and state of step `start_step` (0: fresh), split over `mesh` (`train.sharding`)."""
    frozen_shapes, trainable_shapes = param_sets.abstract(config, model_cfg)
    frozen_shardings = sharding.tree_shardings(frozen_shapes, mesh)
    state_shapes = jax.eval_shape(lambda p: train_step.init_state(p, tx), trainable_shapes)
    state_shardings = sharding.tree_shardings(state_shapes, mesh)
    frozen, initial = param_sets.initial(config, model_cfg, (frozen_shardings, state_shardings["params"]))
    if start_step:
        abstract = jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, state_shardings
        )
        state = run_checkpoints.restore_state(checkpoints, start_step, abstract)
    else:
        state = jax.jit(lambda p: train_step.init_state(p, tx), out_shardings=state_shardings)(initial)
    return Start(frozen, initial, state, frozen_shardings, state_shardings)


def run(config: TrainConfig, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Train (or continue) the run described by `config`; returns a summary. `stop_after` ends this session
    after that many steps in total, as an interruption would (tests use it to check resumption)."""
    if config.objective == "grpo":
        from train import grpo

        return grpo.run(config, resume, stop_after)
    out = check_out_folder(config, resume)
    saved_steps = run_checkpoints.list_steps(out) if resume else []
    start_step = saved_steps[-1] if saved_steps else 0  # a run killed before its first save starts over
    if start_step >= config.steps:
        return run_summary(out, config, start_step, start_step, [])
    model_cfg = param_sets.model_config(config)
    config = config.replace(tokenizer=tokenizer_path(config, model_cfg))  # recorded in config.json
    tokenizer = load_tokenizer(config, model_cfg)
    data = train_data.TrainData(config, tokenizer, model_cfg.img.image_size, jax.process_index(), jax.process_count())
    if resume:
        run_folder.Run(out).check_same_data(data.digests)
    data_vae = None if resume else run_folder.data_vae(config.data)  # a resumed run keeps its record
    mesh = sharding.make_mesh(config.mesh_fsdp)
    sharding.check_batch(config.batch_size, config.grad_accum, mesh)
    is_main = jax.process_index() == 0
    if is_main:
        console.info(
            f"train: {len(data)} examples from {', '.join(config.data)}; preset {config.preset}, "
            f"trainable {config.trainable}"
            + (f" over a {config.quantization.format} base" if config.quantization.enabled else "")
            + f", {mesh.devices.size} device(s) "
            f"(data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']}), {jax.process_count()} process(es)"
        )

    tx = optim.optimizer(config)
    lr_schedule = optim.schedule(config)
    checkpoints = run_checkpoints.manager(out)
    start = sharded_start(config, model_cfg, tx, mesh, checkpoints, start_step)
    frozen, state, frozen_shardings, state_shardings = (
        start.frozen,
        start.state,
        start.frozen_shardings,
        start.state_shardings,
    )
    del start  # the starting trainable set is in the fresh state, or not needed after a restore
    if not start_step and is_main and not resume:
        out.mkdir(parents=True, exist_ok=True)
        run_folder.write_config(out, config, model_cfg, data.digests, data_vae)

    step_fn = train_step.jit_train_step(
        config,
        model_cfg,
        tx,
        lr_schedule,
        in_shardings=(state_shardings, frozen_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
    )
    meta = {
        "base_checkpoint": config.checkpoint,
        "init": config.init,
        "preset": config.preset,
        "trainable": config.trainable,
        "train_config": config.to_json(),
        "model_config": model_cfg.to_dict(),
    }
    end_step = config.steps if stop_after is None else min(config.steps, stop_after)
    log = MetricsLog(out, start_step, is_main)
    bar = console.progress_bar("train", total=config.steps, unit="step") if is_main else None
    if bar is not None:
        bar.update(start_step)
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    last_time, last_step, pending = started, start_step, None

    def record(done_step: int, metrics) -> None:
        nonlocal last_time, last_step
        values = {key: float(value) for key, value in jax.device_get(metrics).items()}
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"step {done_step}: the loss is {values['loss']}; lower --lr or check the data")
        now = time.perf_counter()
        row = {
            "step": done_step,
            **values,
            "elapsed_s": now - started,
            "examples_per_s": (done_step - last_step) * config.batch_size / max(now - last_time, 1e-9),
        }
        last_time, last_step = now, done_step
        history.append(row)
        if done_step % config.log_every == 0 or done_step == end_step:
            log.write(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", ex_s=f"{row['examples_per_s']:.1f}")

    try:
        for step, local_batch in data.iterate(start_step, end_step):
            state, metrics = step_fn(state, frozen, sharding.global_batch(local_batch, mesh))
            if pending is not None:
                record(*pending)  # the previous step's metrics: fetched while this step runs
            pending = (step + 1, metrics)
            if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
                record(*pending)
                pending = None
                run_checkpoints.save(
                    checkpoints,
                    step + 1,
                    state,
                    {
                        **meta,
                        "step": step + 1,
                        "data_position": {"step": step + 1, "examples_seen": (step + 1) * config.batch_size},
                    },
                )
        if pending is not None:
            record(*pending)
        checkpoints.wait_until_finished()
    finally:
        checkpoints.close()
        log.close()
        if bar is not None:
            bar.close()
    return run_summary(out, config, start_step, end_step, history)


def run_summary(
    out: Path, config: TrainConfig, start_step: int, end_step: int, history: list[dict[str, float]]
) -> dict[str, Any]:
    losses = [row["loss"] for row in history]
    timed = history[1:] or history  # the first step includes the compilation
    return {
        "run_dir": str(out),
        "start_step": start_step,
        "end_step": end_step,
        "steps": config.steps,
        "losses": losses,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "examples_per_s": float(np.mean([row["examples_per_s"] for row in timed])) if timed else None,
        "checkpoint_steps": run_checkpoints.list_steps(out),
    }
