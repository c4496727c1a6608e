"""The training loop, one for every objective: data + base model -> checkpoints and metrics in RUN_DIR.

The loop owns what every run needs: the run folder (refusing to overwrite, exact `--resume`), the
tokenizer, the data, the VAE record, the mesh, the optimizer, the sharded start, config.json, the
metrics log, the progress bar, the NaN guard and the checkpoint cadence. An objective (`train.supervised`,
`train.grpo`, chosen by `--objective` in `train.commands`) supplies only its step: what one optimizer
step computes from the batch the loop hands it.

Order matters for the user: everything that can be wrong with the settings or the data (bad values,
missing files, examples longer than --seq-len, a batch that does not split over the devices) is checked
before the base model is loaded or anything is compiled. The step is compiled once; its inputs always have
the same shapes and shardings, so it never recompiles.

Outputs (process 0 writes the files; every process takes part in saving the sharded checkpoints):
    RUN_DIR/config.json (see train.run), RUN_DIR/checkpoints/<step>/ (see train.checkpoints),
    RUN_DIR/metrics.csv (the objective's fields, one row per --log-every steps), RUN_DIR/tb/ (TensorBoard).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils

import vae
from paliseg import checkpoints as base_checkpoints
from paliseg import console, files
from paliseg.config import ModelConfig
from paliseg.tokenizer import Tokenizer
from train import checkpoints as run_checkpoints
from train import data as train_data
from train import events, optim, sharding
from train import params as param_sets
from train import run as run_folder
from train import step as train_step
from train.config import TrainConfig
from vae import identity


@dataclasses.dataclass
class Start:
    """Where a run starts, placed on its mesh: the frozen params, the trainable set at step 0 (GRPO's KL
    reference), the train state (fresh from it, or restored) and the trees' shardings."""

    frozen: Any
    initial: Any
    state: Any
    frozen_shardings: Any
    state_shardings: Any


@dataclasses.dataclass(frozen=True)
class Context:
    """What the loop has read and checked before an objective is built (nothing the size of the model yet)."""

    config: TrainConfig
    model_cfg: ModelConfig
    tokenizer: Tokenizer
    data: train_data.TrainData
    recorded_vae: identity.VaeIdentity | None  # the VAE that wrote the data's seg tokens, as the run records it
    mesh: jax.sharding.Mesh

    def load_vae(self) -> vae.MaskVAE:
        """The VAE that wrote the data's seg tokens (`recorded_vae`, found where it is recorded), for an
        objective that decodes the model's seg tokens into masks."""
        return vae.load(data_vae_path(self.recorded_vae))


def data_vae_path(recorded: identity.VaeIdentity | None) -> Path:
    """The file of the VAE that wrote the data's seg tokens (`recorded`, found where it is recorded)."""
    return identity.resolve(recorded, recorded_by="the --data folders").path


class Objective(Protocol):
    """One kind of optimizer step. Built from the `Context` (it may check and load what it needs there),
    then compiled once the params are placed; `step` runs one optimizer step on the batch of that step."""

    name: str  # the progress bar's label
    fields: tuple[str, ...]  # the columns of metrics.csv

    def __init__(self, context: Context) -> None: ...

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per loop step (the lr schedule counts updates)."""

    def describe(self) -> str:
        """The objective's part of the run's first line on stderr."""

    def compile(self, tx: optax.GradientTransformation, lr_schedule: optax.Schedule, start: Start) -> None:
        """Compile the step for `start`'s shardings; keep what the step needs (the frozen params...)."""

    def step(self, step: int, state: Any, example_ids: np.ndarray, batch: dict[str, np.ndarray]) -> tuple[Any, dict]:
        """(new state, metrics) of loop step `step` on this process's batch ([grad_accum, local, ...]);
        the metrics may still be on the device (the loop fetches them while the next step runs)."""

    def postfix(self, row: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows of a metrics row."""

    def summarize(self, history: list[dict[str, float]]) -> dict[str, Any]:
        """The objective's additions to the run's summary."""


def tokenizer_path(config: TrainConfig, model_cfg: ModelConfig) -> str:
    """--tokenizer, else the one shipped in the base checkpoint's folder, else the preset's bundled one."""
    if config.tokenizer:
        return config.tokenizer
    if config.checkpoint:
        path = base_checkpoints.default_tokenizer(config.checkpoint, model_cfg)
    else:
        path = model_cfg.tokenizer_path
    if path is None:
        raise ValueError(f"preset {config.preset} needs --tokenizer PATH (the PaliGemma SentencePiece model)")
    return str(Path(path).absolute())


def load_tokenizer(config: TrainConfig, model_cfg: ModelConfig) -> Tokenizer:
    """The run's tokenizer (`config.tokenizer`, resolved), refused when it has more pieces than the model."""
    tokenizer = Tokenizer(config.tokenizer)
    if tokenizer.vocab_size > model_cfg.llm.vocab_size:
        raise ValueError(
            f"{config.tokenizer}: {tokenizer.vocab_size} pieces, more than the model's vocabulary "
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

    def __init__(self, run_dir: Path, start_step: int, enabled: bool, fields: tuple[str, ...]):
        self.enabled, self.fields = enabled, fields
        if not enabled:
            return
        self.path = run_dir / run_folder.METRICS_FILE
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


@dataclasses.dataclass(frozen=True)
class Layout:
    """The frozen params and the train state as ShapeDtypeStructs split over the mesh (`sharding` set):
    what `sharded_start` fills and the step is compiled for. `train.plan` plans from it, allocating nothing."""

    frozen: Any
    state: Any

    @property
    def frozen_shardings(self) -> Any:
        return jax.tree.map(lambda leaf: leaf.sharding, self.frozen)

    @property
    def state_shardings(self) -> Any:
        return jax.tree.map(lambda leaf: leaf.sharding, self.state)


def layout(config: TrainConfig, model_cfg: ModelConfig, tx, mesh) -> Layout:
    """The run's params and state on `mesh` (`train.sharding`), as shapes."""

    def placed(shapes):
        shardings = sharding.tree_shardings(shapes, mesh)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

    frozen_shapes, trainable_shapes = param_sets.abstract(config, model_cfg)
    return Layout(
        placed(frozen_shapes), placed(jax.eval_shape(lambda p: train_step.init_state(p, tx), trainable_shapes))
    )


def sharded_start(config: TrainConfig, model_cfg: ModelConfig, tx, mesh, checkpoints, start_step: int) -> Start:
    """The params and state of step `start_step` (0: fresh), split over `mesh` (`train.sharding`)."""
    shapes = layout(config, model_cfg, tx, mesh)
    frozen_shardings, state_shardings = shapes.frozen_shardings, shapes.state_shardings
    frozen, initial = run_folder.initial_params(config, model_cfg, (frozen_shardings, state_shardings["params"]))
    if start_step:
        state = run_checkpoints.restore_state(checkpoints, start_step, shapes.state)
    else:
        state = jax.jit(lambda p: train_step.init_state(p, tx), out_shardings=state_shardings)(initial)
    return Start(frozen, initial, state, frozen_shardings, state_shardings)


def run(
    config: TrainConfig, objective_type: type[Objective], resume: bool = False, stop_after: int | None = None
) -> dict[str, Any]:
    """Train (or continue) the run described by `config` with `objective_type`'s step; returns a summary.
    `stop_after` ends this session after that many steps in total, as an interruption would (tests use it
    to check resumption)."""
    out = check_out_folder(config, resume)
    if jax.process_count() > 1:  # every process has looked at --out before process 0 writes to it
        multihost_utils.sync_global_devices("paliseg train: --out checked")
    saved_steps = run_checkpoints.list_steps(out) if resume else []
    start_step = saved_steps[-1] if saved_steps else 0  # a run killed before its first save starts over
    if start_step >= config.steps:
        return run_summary(out, config, start_step, start_step, [])
    model_cfg = run_folder.model_config(config)
    config = config.replace(tokenizer=tokenizer_path(config, model_cfg))  # recorded in config.json
    tokenizer = load_tokenizer(config, model_cfg)
    process, processes = jax.process_index(), jax.process_count()
    saved = run_folder.Run(out) if resume else None  # config.json read once
    recorded_vae = saved.vae if resume else run_folder.data_vae(config.data)
    moves_masks = config.augment_geometric or config.augment_flip  # re-encoded with the run's VAE
    vae_path = data_vae_path(recorded_vae) if moves_masks else None
    data = train_data.TrainData(config, tokenizer, model_cfg.img.image_size, process, processes, vae_path)
    if resume:
        saved.check_same_data(data.digests)
    if start_step:
        data.check_state(run_checkpoints.restore_meta(out, start_step).get("data_state"), start_step)
    mesh = sharding.make_mesh(config.mesh_fsdp)
    sharding.check_batch(config.batch_size, config.grad_accum, mesh)
    objective = objective_type(Context(config, model_cfg, tokenizer, data, recorded_vae, mesh))
    is_main = process == 0
    if is_main:
        console.info(
            f"{objective.name}: {len(data)} examples from {', '.join(config.data)}; preset {config.preset}, "
            f"trainable {config.trainable}"
            + (f" over a {config.quantization.format} base" if config.quantization.enabled else "")
            + f"; {objective.describe()}; {mesh.devices.size} device(s) "
            f"(data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']}), {processes} process(es)"
        )

    tx = optim.optimizer(config, objective.updates_per_step)
    checkpoints = run_checkpoints.manager(out)
    start = sharded_start(config, model_cfg, tx, mesh, checkpoints, start_step)
    if not start_step and is_main and not resume:
        out.mkdir(parents=True, exist_ok=True)
        run_folder.write_config(out, config, model_cfg, data.digests, recorded_vae)
    objective.compile(tx, optim.schedule(config, objective.updates_per_step), start)
    state = start.state
    del start  # the objective keeps what its step needs; the rest (a fresh run's initial set) can go

    meta = {
        "base_checkpoint": config.checkpoint, "init": config.init, "init_run": config.init_run,
        "init_step": config.init_step, "preset": config.preset, "trainable": config.trainable,
        "objective": config.objective, "train_config": config.to_json(), "model_config": model_cfg.to_dict(),
    }  # fmt: skip
    end_step = config.steps if stop_after is None else min(config.steps, stop_after)
    log = MetricsLog(out, start_step, is_main, objective.fields)
    bar = console.progress_bar(objective.name, total=config.steps, unit="step") if is_main else None
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
            bar.set_postfix(objective.postfix(row))

    try:
        for step, example_ids, batch in data.iterate(start_step, end_step):
            state, metrics = objective.step(step, state, example_ids, batch)
            if pending is not None:
                record(*pending)  # the previous step's metrics: fetched while this step runs
            pending = (step + 1, metrics)
            if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
                record(*pending)
                pending = None
                run_checkpoints.save(
                    checkpoints, step + 1, state, {**meta, "step": step + 1, "data_state": data.state(step + 1)}
                )
        if pending is not None:
            record(*pending)
        checkpoints.wait_until_finished()
    finally:
        checkpoints.close()
        log.close()
        if bar is not None:
            bar.close()
    return {**run_summary(out, config, start_step, end_step, history), **objective.summarize(history)}


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
