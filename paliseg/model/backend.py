"""The one seam for what XLA:CPU needs: the model's modules call these without knowing why.

Each function here computes exactly what its plain counterpart computes; only the way XLA is asked to do it
differs, for reasons measured on CPU (see each docstring). Nothing else in the model works around a backend.

- `stored` / `storage_view` / `inference_view`: bfloat16 params read through a uint16 view at inference;
  `stored` also dequantizes a quantized weight (`paliseg.model.quantization`) where the layer reads it;
- `weight_einsum`: x @ weight, accumulated and returned in float32 before the cast back to x's dtype;
- `einsum_per_part`: a fused weight ([P, ...]) contracted one part at a time;
- `low_rank`: LoRA's (x @ a) @ b with its backward written out;
- `train_compiler_options`: XLA flags for the compiled training step.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from paliseg.model import quantization

# XLA:CPU has no bf16 matmul: it converts each layer's bf16 weights to f32, and loop-invariant code motion
# hoists those converts out of the layer scan, materialising an f32 copy of every layer at once (+10 GB for
# the 3B model's LoRA step; measured with `compiled.memory_analysis()`). Left in the loop, each layer's copy
# lives for one iteration, at no measurable cost in step time (f32 `mid` model: within noise).
_CPU_TRAIN_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def train_compiler_options() -> dict[str, str] | None:
    """Options for `jax.jit(..., compiler_options=...)` of the training step on this backend."""
    return dict(_CPU_TRAIN_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


def storage_view(params):
    """bfloat16 leaves reinterpreted as uint16 (same bits), for inference.

    XLA:CPU slices and gathers bfloat16 arrays by first converting the *whole* array to float32, which for
    the scanned (stacked) layer weights is a float32 copy of the model, hoisted out of every loop; integer
    slices are plain. Modules read every param through `stored`, which turns the slice they get back into
    bfloat16. Inside jit XLA materialises this bitcast as a copy, so large models should be converted
    once, outside jit and in place (`inference_view`). Not differentiable.
    """
    return jax.tree.map(lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x, params)


def stored(x: jax.Array | quantization.QuantizedWeight) -> jax.Array:
    """A param as read from a tree that may be a `storage_view`; a quantized weight dequantized (float32)."""
    if quantization.is_quantized(x):
        return x.dequantize()
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def inference_view(params: dict) -> dict:
    """Consumes `params` (bf16 buffers are donated and reused in place): `storage_view` without a copy."""
    return jax.tree.map(lambda x: _as_uint16(x) if x.dtype == jnp.bfloat16 else x, params)


@functools.partial(jax.jit, donate_argnums=0)
def _as_uint16(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.uint16)


def weight_einsum(equation: str, x: jax.Array, weight: jax.Array, result_dtype=None) -> jax.Array:
    """`einsum(equation, x, weight)` in `result_dtype` (default: x's); `equation` starts with `...` (x's rows).

    Two XLA:CPU bfloat16 dot paths are slow. A dot whose result is bfloat16 runs 2-3x slower than one whose
    result is float32 (2048x16384 weight, 272 rows: 111 vs 320 ms), so the dot is asked for a float32 result
    and cast back. A dot with a single row (decoding one token at batch 1) takes a matrix-vector path that
    is ~8x slower than the same dot with two rows (58 vs 7.5 ms), so a single row is contracted beside a
    zero row that is dropped again. For float32 inputs both are the plain einsum.
    """
    if x.dtype == jnp.bfloat16 and math.prod(x.shape[: x.ndim - _contracted_axes(equation)]) == 1:
        rows = jnp.concatenate([x[None], jnp.zeros_like(x)[None]])
        return jnp.einsum(equation, rows, weight, preferred_element_type=jnp.float32)[0].astype(result_dtype or x.dtype)
    return jnp.einsum(equation, x, weight, preferred_element_type=jnp.float32).astype(result_dtype or x.dtype)


def _contracted_axes(equation: str) -> int:
    """How many trailing axes of x `equation` ('...IJ,<weight>->...') names: x's other axes are its rows."""
    return len(equation.split(",")[0].removeprefix("..."))


def einsum_per_part(equation: str, x: jax.Array, fused: jax.Array) -> tuple[jax.Array, ...]:
    """`weight_einsum(equation, x, fused[p])` for each part p of a fused weight (parts on axis 0).

    Each part is contiguous, so no transposed copy of the weight, and the results are never stacked: a
    stacked [P, ...] result costs a padded, transposed copy of its gradient in every layer of the backward
    pass on XLA:CPU."""
    return tuple(weight_einsum(equation, x, fused[p]) for p in range(fused.shape[0]))


@jax.custom_vjp
def low_rank(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """(x @ a) @ b for x [M, I], a [I, R], b [R, O]: a LoRA update.

    Its gradients are written out so that the large operands (x, the output gradient) are contracted over
    their leading axis as the *left* operand of each weight-gradient matmul ('MR,MO->RO'). Autodiff's own
    order ('MO,MR->OR', then a transpose) makes XLA:CPU write a transposed copy of the output gradient in
    every layer and run ~5x slower on that matmul.
    """
    return (x @ a) @ b


def _low_rank_forward(x, a, b):
    h = x @ a
    return h @ b, (x, a, b, h)


def _low_rank_backward(residuals, grad):
    x, a, b, h = residuals
    grad_h = grad @ b.T
    grad_b = jnp.einsum("MR,MO->RO", h, grad)
    grad_a = jnp.einsum("MR,MI->RI", grad_h, x).T
    return grad_h @ a.T, grad_a, grad_b


low_rank.defvjp(_low_rank_forward, _low_rank_backward)
