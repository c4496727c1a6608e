"""Device mesh and named shardings: data parallel x FSDP, on one CPU, one GPU or a TPU pod.

The mesh has axes ('data', 'fsdp'). Batches are split over both axes (every device gets its own examples);
parameters and optimizer state are split over 'fsdp' and replicated over 'data', so a group of `fsdp`
devices holds one copy of the model between them and XLA inserts the all-gathers and reduce-scatters.

Which axis of a parameter is split follows big_vision's `fsdp` strategy rather than a per-name table of
logical axes: the largest axis divisible by the FSDP size, never the leading layer axis of scanned blocks
(`paliseg.config.SCANNED_STACKS`: slicing a layer out of a split stack would gather it every iteration).
It needs no annotations in the model, and covers the LoRA adapters and the optimizer state (whose leaves
carry the parameter names in their paths) with the same rule. A parameter with no such axis is replicated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from paliseg.config import SCANNED_STACKS
from train.config import ProcessSettings

MESH_AXES = ("data", "fsdp")
BATCH_SPEC = PartitionSpec(None, MESH_AXES)  # batch arrays are [grad_accum, batch, ...]
ROWS_SPEC = PartitionSpec(MESH_AXES)  # GRPO's [rows, ...] arrays (prompts, samples): rows split over devices
_SCANNED = re.compile(rf"(^|/)({'|'.join(map(re.escape, SCANNED_STACKS))})(/|$)")


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over all devices (of every process) or the given ones."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % fsdp:
        raise ValueError(f"--mesh-fsdp {fsdp} does not divide the number of devices ({len(devices)})")
    return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), MESH_AXES)


def join_processes(processes: ProcessSettings) -> None:
    """Join the job's other processes (`jax.distributed.initialize`) when the settings ask for it; before
    anything is compiled.

    On CPUs the persistent compilation cache is turned off in a job of several processes: JAX keys a CPU
    executable by its device assignment, which differs per process, so only process 0 finds the programs
    it cached in an earlier run while the others compile theirs anew, and XLA:CPU does not always order
    the collectives of the two compilations alike: the processes then wait in different collectives for
    each other, forever (the two-process test hung so in 3 of 4 runs with a warm cache, 0 of 12 without).
    JAX strips the assignment from the key on GPUs; TPUs and GPUs keep the cache."""
    if not processes.joins:
        return
    jax.distributed.initialize(
        coordinator_address=processes.coordinator,
        num_processes=processes.num_processes,
        process_id=processes.process_id,
    )
    if jax.default_backend() == "cpu":
        jax.config.update("jax_enable_compilation_cache", False)


def path_name(key_path) -> str:
    """A pytree key path as big_vision's '/'-joined name, e.g. 'llm/layers/attn/q_einsum/w'."""
    parts = []
    for key in key_path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
    return "/".join(parts)


def param_spec(name: str, shape: Sequence[int], fsdp: int) -> PartitionSpec:
    axes: list[str | None] = [None] * len(shape)
    first = 1 if _SCANNED.search(name) else 0
    candidates = [axis for axis in range(first, len(shape)) if fsdp > 1 and shape[axis] % fsdp == 0]
    if candidates:
        axes[max(candidates, key=lambda axis: shape[axis])] = "fsdp"
    return PartitionSpec(*axes)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of arrays or ShapeDtypeStructs (parameters or optimizer state)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, param_spec(path_name(path), np.shape(leaf), fsdp)), tree
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch(batch_size: int, grad_accum: int, mesh: Mesh) -> None:
    devices = mesh.devices.size
    if (batch_size // grad_accum) % devices:
        raise ValueError(
            f"the micro-batch ({batch_size} / --grad-accum {grad_accum} = {batch_size // grad_accum}) "
            f"must be a multiple of the number of devices ({devices})"
        )


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of the batch -> global arrays sharded over the mesh (any number of hosts)."""
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in local.items():
        global_shape = (value.shape[0], value.shape[1] * jax.process_count(), *value.shape[2:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def global_rows(local: Any, mesh: Mesh) -> Any:
    """This process's rows of [N, ...] arrays (a tree; processes in order) -> global arrays, rows split over
    every device of the mesh."""
    return multihost_utils.host_local_array_to_global_array(local, mesh, ROWS_SPEC)


def local_rows(count: int) -> slice:
    """The rows of a [count, ...] batch that this process holds when `global_rows` splits it over every
    device (processes in order, each with the same number of devices)."""
    share = count // jax.process_count()
    return slice(jax.process_index() * share, (jax.process_index() + 1) * share)


def all_rows(array: Any) -> np.ndarray:
    """Every row, on every process: a global array's whole value, or this process's numpy rows concatenated
    with the other processes' (in process order). float64 rows travel as their bits: JAX (without x64) would
    round them to float32 across processes only, and a metric would then differ from one process's."""
    if isinstance(array, np.ndarray) and array.dtype == np.float64:
        bits = multihost_utils.process_allgather(np.ascontiguousarray(array).view(np.uint32), tiled=True)
        return np.asarray(bits).view(np.float64)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def place(tree: Any, shardings: Any) -> Any:
    """Host-local values that every process holds alike (a loaded checkpoint) as global arrays split as
    `shardings` (None: left as they are). Across processes each one builds only its devices' pieces
    (`jax.device_put` refuses devices of other processes)."""
    if shardings is None:
        return tree
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(
        lambda value, sharding: jax.make_array_from_callback(
            value.shape, sharding, lambda index: np.asarray(value[index])
        ),
        tree,
        shardings,
    )
