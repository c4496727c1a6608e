"""A run folder's checkpoints (orbax); `train.run.Run` is how the later stages read a run folder.

    RUN_DIR/checkpoints/<step>/state trainable params + optimizer state + step (orbax, sharded, atomic)
    RUN_DIR/checkpoints/<step>/meta  JSON: step, data state, base checkpoint, both configs

Every checkpoint is kept (the sweep scores each). The data state (`train.data.TrainData.state`) is where
the input pipeline resumes: it is a pure function of the step, so `--resume` reads exactly the batches an
uninterrupted run reads, whatever --workers; a checkpoint written before data states were saved has none
and resumes from its step.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

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


def restore_meta(run_dir: str | os.PathLike, step: int) -> dict[str, Any]:
    """The JSON saved with the checkpoint of `step`."""
    with manager(run_dir) as checkpoints:
        return checkpoints.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def list_steps(run_dir: str | os.PathLike) -> list[int]:
    """The steps that have a complete checkpoint, in increasing order."""
    if not (Path(run_dir) / CHECKPOINTS).is_dir():
        return []
    return sorted(ocp.path.step.checkpoint_steps(Path(run_dir).absolute() / CHECKPOINTS))


def restore_params(run_dir: str | os.PathLike, step: int, trainable_shapes: Any) -> Any:
    """The trainable params of checkpoint `step` (no optimizer state in memory), on the first device.

    The saved shapes are checked against `trainable_shapes` first: a checkpoint of another model config
    is refused with the names of the arrays that differ, before any array is read (a read that fails
    midway leaves orbax's other reads unfinished)."""
    path = Path(run_dir).absolute() / CHECKPOINTS / str(step) / "state"
    with contextlib.closing(ocp.PyTreeCheckpointHandler()) as handler:
        saved = traverse_util.flatten_dict(handler.metadata(path).tree.get("params", {}), sep="/")
    wanted = traverse_util.flatten_dict(trainable_shapes, sep="/")
    differ = [
        f"{name} {tuple(saved[name].shape) if name in saved else 'missing'} (the run's model: {tuple(shape.shape)})"
        for name, shape in wanted.items()
        if name not in saved or tuple(saved[name].shape) != tuple(shape.shape)
    ]
    if differ:
        raise ValueError(
            f"{path}: not a checkpoint of this run's model config; {len(differ)} parameter(s) differ, "
            f"e.g. {'; '.join(differ[:3])}"
        )
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # each process reads the whole tree
    abstract_state = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
        {"step": jax.ShapeDtypeStruct((), "int32"), "params": trainable_shapes},
    )
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            path,
            args=ocp.args.PyTreeRestore(
                item=abstract_state,
                partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
            ),
        )
    return restored["params"]
