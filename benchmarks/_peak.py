"""Peaks measured in the calling benchmark's own process: this machine's matmul FLOP/s (so load and clocks
match), and memory: the process's resident set (VmRSS, and its high-water mark VmHWM, which Linux resets
on request so that one call's peak can be read) or an accelerator's allocator peak."""

from __future__ import annotations

import ctypes
import time
from pathlib import Path


def matmul_peak(size: int = 2048, reps: int = 10) -> tuple[float, float]:
    """(JAX, torch) best FLOP/s of a size x size float32 matmul on this CPU."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best_jax = min(timed(lambda: matmul(a).block_until_ready()) for _ in range(reps))
    t = torch.randn(size, size)
    torch.mm(t, t)
    best_torch = min(timed(lambda: torch.mm(t, t)) for _ in range(reps))
    flops = 2 * size**3
    return flops / best_jax, flops / best_torch


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def resident() -> tuple[int, int]:
    """(resident bytes now, their peak since the process started or `reset_resident_peak`): Linux's VmRSS
    and VmHWM."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM"))


def reset_resident_peak() -> None:
    """Start VmHWM again from the current resident size (Linux >= 4.0: `5` to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def release_free_memory() -> None:
    """Hand the blocks glibc's malloc keeps for reuse after they are freed back to the system
    (`malloc_trim(0)`), so that the resident set holds live memory only."""
    ctypes.CDLL(None).malloc_trim(0)


def device_peak() -> int | None:
    """The first device's allocator peak in bytes (`memory_stats()["peak_bytes_in_use"]`: GPU, TPU), or
    None where the backend keeps none (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if stats is None else int(stats["peak_bytes_in_use"])
