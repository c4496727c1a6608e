"""This machine's matmul peak, measured in the calling benchmark's own run (so load and clocks match)."""

from __future__ import annotations

import time


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
