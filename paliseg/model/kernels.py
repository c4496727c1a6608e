"""How the model's contractions run on XLA:CPU, below `layers.Einsum`: the modules call these without
knowing why.

Each function here computes exactly what its plain counterpart computes; only the way XLA is asked to do it
differs, for reasons measured on CPU (see each docstring). The whole-tree side of these workarounds (the
layers unscanned for decoding, the uint16 storage view) is `paliseg.model.inference`.

- `weight_einsum`: x @ weight, accumulated in float32 before the cast back to x's dtype, for a weight in
  its checkpoint layout or as `Matrices`; a fused weight ([P, ...]) contracted one part at a time; a single
  bfloat16 row contracted beside a zero row;
- `Matrices`: a weight as row-major [outputs, inputs] matrices, as the unscanned inference layers store it;
- `low_rank`: LoRA's (x @ a) @ b with its backward written out;
- `from_storage`: a param read back from the uint16 storage view (`inference.storage_view`);
- `compiler_options`: XLA flags for the compiled training step and decoder.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from paliseg.model.layouts import PARTS, WeightLayout

# XLA:CPU has no bf16 matmul: it converts each layer's bf16 weights to f32, and loop-invariant code motion
# hoists those converts out of the layer scan, materialising an f32 copy of every layer at once (+10 GB for
# the 3B model's LoRA step; measured with `compiled.memory_analysis()`). Left in the loop, each layer's copy
# lives for one iteration, at no measurable cost in step time (f32 `mid` model: within noise).
_CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def compiler_options() -> dict[str, str] | None:
    """Options for `jax.jit(..., compiler_options=...)` of the training step and the decoder on this backend
    (both run loops whose invariants XLA:CPU would hoist as whole-array copies; see `paliseg.decoding`)."""
    return dict(_CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


def from_storage(param):
    """`param` (an array, or a pytree of them such as `Matrices`) with each uint16 array read back as the
    bfloat16 whose bits it holds (`inference.storage_view`, which says why the decoder stores them so);
    other arrays as they are. Inside jit XLA materialises this bitcast as a copy, so it is applied to what
    a module uses: under the layer scan, one layer's slice."""
    return jax.tree.map(lambda x: jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x, param)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Matrices:
    """A weight as XLA:CPU's matrix-vector products read it fastest: each part (one, or each part of a fused
    weight) a row-major [outputs, inputs] matrix, as torch's `nn.Linear` stores it; `output_shape`: the
    result's trailing axes. `weight_einsum` contracts x's trailing input axes, flattened, with its rows.

    The checkpoint's layouts put the contracted axes first (`DF`, `NDH`, `NHD`). On two cores, one token's
    bfloat16 matmul against a 2048x16384 weight takes 7.0 ms in that layout and 4.2 ms as [16384, 2048];
    a fused [2, D, F] weight contracted as one batched dot 13.2 ms, its two separate matrices 8.5 ms; the
    attention projections 1.35 / 0.82 ms as [N, D, H] / [N, H, D] and 0.46 / 0.42 ms as flat matrices.
    """

    parts: tuple[jax.Array, ...]
    output_shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})

    @classmethod
    def of(cls, weight: jax.Array, layout: WeightLayout) -> Matrices:
        """`weight` (a jax or numpy array) laid out by `layout` (without the layer axis), copied part by part."""
        xp = np if isinstance(weight, np.ndarray) else jnp  # a host array stays on the host
        axes = layout.axes.removeprefix(PARTS)
        order = [axes.index(c) for c in layout.outputs + layout.inputs]
        output_shape = tuple(weight.shape[layout.axes.index(c)] for c in layout.outputs)
        parts = tuple(weight) if layout.fused else (weight,)
        return cls(tuple(xp.transpose(p, order).reshape(math.prod(output_shape), -1) for p in parts), output_shape)

    @classmethod
    def initializer(cls, init, layout: WeightLayout):
        """`init` whose result is `Matrices`: the model's own params match what `inference.for_inference` makes."""
        return lambda *args: cls.of(init(*args), layout)


def weight_einsum(equation: str, x: jax.Array, weight, result_dtype=None) -> jax.Array | tuple[jax.Array, ...]:
    """`einsum(equation, x, weight)` in `result_dtype` (default: x's), x's `...` axes being its rows, for a
    weight in its checkpoint layout or as `Matrices`. A fused weight (equation `...D,PKDH->P...KH`) gives a
    tuple, one result per part.

    A fused weight is contracted one part at a time: each part is contiguous, so no transposed copy of the
    weight, and the results are never stacked (a stacked [P, ...] result costs a padded, transposed copy of
    its gradient in every layer of the backward pass on XLA:CPU).
    """
    dtype = result_dtype or x.dtype
    if isinstance(weight, Matrices):
        inputs = len(equation.split(",")[0].removeprefix("..."))
        rows = x.reshape(x.shape[: x.ndim - inputs] + (-1,))
        results = tuple(
            _dot("...I,OI->...O", rows, part.astype(x.dtype), dtype).reshape(rows.shape[:-1] + weight.output_shape)
            for part in weight.parts
        )
        return results if "->P" in equation else results[0]
    weight = weight.astype(x.dtype)
    if "->P" in equation:
        return tuple(_dot(equation.replace("P", ""), x, part, dtype) for part in weight)
    return _dot(equation, x, weight, dtype)


def _dot(equation: str, x: jax.Array, weight: jax.Array, dtype) -> jax.Array:
    """The einsum in `dtype`, around two slow XLA:CPU bfloat16 dot paths.

    A dot whose result is bfloat16 runs 2-3x slower than one whose result is float32 (2048x16384 weight,
    272 rows: 111 vs 320 ms), so the dot is asked for a float32 result and cast back. A dot with a single
    row (decoding one token at batch 1) takes a matrix-vector path that is ~8x slower than the same dot
    with two rows (58 vs 7.5 ms), so a single row is contracted beside a zero row that is dropped again.
    For float32 inputs both are the plain einsum.
    """
    lhs, out = equation.split(",")[0], equation.split("->")[1]
    rows_at = lhs.index("...")
    if x.dtype == jnp.bfloat16 and math.prod(x.shape[rows_at : x.ndim + rows_at + 3 - len(lhs)]) == 1:
        padded = jnp.concatenate([x, jnp.zeros_like(x)], axis=rows_at)
        result = jnp.einsum(equation, padded, weight, preferred_element_type=jnp.float32)
        return jax.lax.index_in_dim(result, 0, out.index("..."), keepdims=True).astype(dtype)
    return jnp.einsum(equation, x, weight, preferred_element_type=jnp.float32).astype(dtype)


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
