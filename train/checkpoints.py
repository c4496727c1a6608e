"""A run folder's checkpoints (orbax), and the loader the later stages use.

    RUN_DIR/config.json              the resolved TrainConfig and ModelConfig ({"train": ..., "model": ...}),
                                     and the SHA-256 of each folder's annotations ("data_sha256")
    RUN_DIR/checkpoints/<step>/state trainable params + optimizer state + step (orbax, sharded, atomic)
    RUN_DIR/checkpoints/<step>/meta  JSON: step, data position, base checkpoint, both configs

Every checkpoint is kept (the sweep scores each). The data position is the step itself: the input pipeline
is a pure function of the step (see `train.data`), so nothing else is needed to resume exactly.

`load_run(run_dir, step)` rebuilds the full parameter tree of a step: the base (the run's base checkpoint,
or the seeded random init of `--init random`) with the trained parameters put in, LoRA adapters folded
into the base by default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from paliseg import files
from paliseg.config import ModelConfig
from train import config as train_config

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"


def manager(run_dir: str | os.PathLike) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=None, cleanup_tmp_directories=True)  # a killed save's leftovers
    return ocp.CheckpointManager(Path(run_dir).absolute() / CHECKPOINTS, options=options, item_names=("state", "meta"))


def save(checkpoints: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Start writing a checkpoint (asynchronously after a copy to host memory; `wait_until_finished`)."""
    checkpoints.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore_state(checkpoints: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    """The saved state of `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings)."""
    restored = checkpoints.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]


def list_steps(run_dir: str | os.PathLike) -> list[int]:
    """The steps that have a complete checkpoint, in increasing order."""
    if not (Path(run_dir) / CHECKPOINTS).is_dir():
        return []
    return sorted(ocp.path.step.checkpoint_steps(Path(run_dir).absolute() / CHECKPOINTS))


def write_run_config(run_dir: str | os.PathLike, config: train_config.TrainConfig, model_cfg: ModelConfig,
                     data_digests: dict[str, str] | None = None) -> None:
    files.write_json(Path(run_dir) / CONFIG_FILE,
                     {"train": config.to_json(), "model": model_cfg.to_dict(), "data_sha256": data_digests or {}})


def check_same_data(run_dir: str | os.PathLike, digests: dict[str, str]) -> None:
    """Refuse to resume on changed annotations: the sampler would draw other examples than the run did."""
    saved = json.loads((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8")).get("data_sha256", {})
    changed = sorted(folder for folder, digest in saved.items() if digests.get(folder) != digest)
    if changed:
        raise ValueError(f"--resume: the annotations of {', '.join(changed)} changed since the run started; "
                         "resuming would not continue the same run. Start a new run in another --out folder.")


def read_run_config(run_dir: str | os.PathLike) -> tuple[train_config.TrainConfig, ModelConfig]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {run_dir} a `paliseg train` run folder?")
    data = json.loads(path.read_text(encoding="utf-8"))
    return train_config.from_dict(data["train"], str(path)), ModelConfig.from_dict(data["model"])


def frozen_params(run_dir: str | os.PathLike) -> dict:
    """The parameters that no checkpoint of the run holds, because training never changes them: the base
    checkpoint (or the seeded random init) minus the trainable set; empty for `--trainable all`. Every step
    of a run shares them, so a sweep reads them once and passes them to each `load_run`."""
    from train import params as param_sets

    config, model_cfg = read_run_config(run_dir)
    return {} if config.trainable == "all" else param_sets.initial(config, model_cfg)[0]


def load_run(
    run_dir: str | os.PathLike, step: int | None = None, merge_lora: bool = True, frozen: dict | None = None
) -> tuple[ModelConfig, dict]:
    """(model config, full params) of a run's checkpoint `step` (default: the latest).

    With `merge_lora` (default) the adapters are folded into the base and the returned config has LoRA
    off, so the params run at the base model's speed; otherwise the config keeps LoRA and the tree holds
    the adapters. `frozen` is the run's `frozen_params`, when already in memory (else they are loaded).
    """
    from paliseg import model
    from train import params as param_sets

    config, model_cfg = read_run_config(run_dir)
    steps = list_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"{run_dir}: no checkpoint yet")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"{run_dir}: no checkpoint at step {step}; saved steps: {', '.join(map(str, steps))}")
    _, trainable_shapes = param_sets.abstract(config, model_cfg)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract_state = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                                            {"step": jax.ShapeDtypeStruct((), "int32"), "params": trainable_shapes})
    with ocp.PyTreeCheckpointer() as checkpointer:  # only the params: no optimizer state in memory
        restored = checkpointer.restore(Path(run_dir).absolute() / CHECKPOINTS / str(step) / "state",
                                        args=ocp.args.PyTreeRestore(
                                            item=abstract_state, partial_restore=True,
                                            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)))
    trainable = restored["params"]
    params = param_sets.join(frozen_params(run_dir) if frozen is None else frozen, trainable)
    if merge_lora and model_cfg.lora.enabled:
        params = model.merge_lora(params, model_cfg.lora)
        model_cfg = model_cfg.replace(lora={"rank": 0})
    return model_cfg, params
