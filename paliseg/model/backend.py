"""The one seam for what XLA:CPU needs: the model's modules call these without knowing why.

Each function here computes exactly what its plain counterpart computes; only the way XLA is asked to do it
differs, for reasons measured on CPU (see each docstring). Nothing else in the model works around a backend.

- `for_inference`: on CPU, one module per layer instead of the layer scan, each weight a `Matrices`;
- `stored` / `storage_view` / `decoding_view`: bfloat16 params read through a uint16 view under the scan;
  `stored` also dequantizes a quantized weight (`paliseg.model.quantization`) where the layer reads it;
- `weight_einsum`: x @ weight, accumulated in float32 before the cast back to x's dtype, for a weight in
  any of these forms; a fused weight ([P, ...]) contracted one part at a time;
- `low_rank`: LoRA's (x @ a) @ b with its backward written out;
- `compiler_options`: XLA flags for the compiled training step and decoder.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from paliseg.config import SCANNED_STACKS
from paliseg.model import quantization

# XLA:CPU has no bf16 matmul: it converts each layer's bf16 weights to f32, and loop-invariant code motion
# hoists those converts out of the layer scan, materialising an f32 copy of every layer at once (+10 GB for
# the 3B model's LoRA step; measured with `compiled.memory_analysis()`). Left in the loop, each layer's copy
# lives for one iteration, at no measurable cost in step time (f32 `mid` model: within noise).
_CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def compiler_options() -> dict[str, str] | None:
    """Options for `jax.jit(..., compiler_options=...)` of the training step and the decoder on this backend
    (both run loops whose invariants XLA:CPU would hoist as whole-array copies; see `paliseg.decoding`)."""
    return dict(_CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


def storage_view(params):
    """bfloat16 leaves reinterpreted as uint16 (same bits), for decoding with the layer scan (`decoding_view`).

    Inside a loop, XLA:CPU slices bfloat16 arrays by first converting the *whole* array to float32, which
    for the scanned (stacked) layer weights is a float32 copy of the model, hoisted out of every loop;
    integer slices are plain. Modules read every param through `stored`, which turns the slice they get back
    into bfloat16. Inside jit XLA materialises this bitcast as a copy. Not differentiable.
    """
    return jax.tree.map(lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x, params)


def stored(x: jax.Array | quantization.QuantizedWeight) -> jax.Array:
    """A param as read from a tree that may be a `storage_view`; a quantized weight dequantized (float32)."""
    if quantization.is_quantized(x):
        return x.dequantize()
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def decoding_view(config, params: dict) -> dict:
    """The params as the jitted decoder reads them: the `storage_view` under the layer scan. Unscanned layers
    (`for_inference` on CPU) have nothing to slice; a quantized model's bf16 leaves are small but for the
    embedding table, which the scan never slices (its view would be a 1.2 GB copy for PaliGemma 2 3B)."""
    return storage_view(params) if config.scan_layers and not config.quantization.enabled else params


def for_inference(config, params: dict, *, consume: bool = False):
    """`(config, params)` to decode with. On CPU the layers are unscanned (`config.scan_layers=False`), each
    layer's params in buffers of their own, and the projection weights `Matrices`; other backends keep
    the scan (and its shorter compile) and the checkpoint's layouts.

    Inside the layer scan XLA:CPU copies every layer's weights out of the stacked arrays before each matmul
    (a dynamic slice feeding the dot; with the `storage_view`, a bitcast too), which at one token per step
    is most of the work: the matmul itself reads each weight once. Separate buffers feed the matmuls
    directly. A quantized model keeps the scan: there each layer's weights are dequantized in its own
    iteration, where unscanned XLA may schedule every layer's dequantization at once (PaliGemma 2 3B nf4:
    8.3 GB after a forward pass instead of 4.5 GB). With `consume`, each stacked leaf is deleted once split
    and converted (memory grows by one leaf at most) and `params` must not be used again; otherwise they are
    left intact.
    """
    if jax.default_backend() != "cpu" or not config.scan_layers or config.quantization.enabled:
        return config, params
    from paliseg.model import param_shapes, weight_layouts  # the package imports this module

    config = config.replace(scan_layers=False)
    layouts, shapes = weight_layouts(config), traverse_util.flatten_dict(param_shapes(config), sep="/")

    def as_stored(path: str, leaf):  # as the unscanned model stores it (see `Einsum.matrices`)
        return Matrices.of(leaf, layouts[path]) if isinstance(shapes.get(path), Matrices) else leaf

    return config, unstack_layers(params, consume=consume, convert=as_stored)


def unstack_layers(params: dict, *, consume: bool = False, convert=None) -> dict:
    """The tree of `scan_layers=False`: each stacked leaf [L, ...] split into L leaves (`layers_0/...`), through
    host views of the stacked buffers (no whole-leaf copy). `convert(path, leaf)` gives what to store for
    each leaf of the new tree (default: the leaf), as each stacked leaf is split: with `consume`, which
    deletes each stacked leaf once split, memory grows by one leaf's layers at most."""
    convert = convert or (lambda path, leaf: leaf)
    out = {}
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        stack = next((s for s in SCANNED_STACKS if path.startswith(s + "/")), None)
        if stack is None:
            out[path] = convert(path, leaf)
            continue
        arrays, treedef = jax.tree.flatten(leaf)  # a quantized weight's codes and scales are stacked alike
        hosts = [np.asarray(array) for array in arrays]  # views of the buffers on CPU
        for i in range(hosts[0].shape[0]):
            # converted on the host: device temporaries of XLA:CPU outlived the loop (+2.4 GB for one 3B leaf)
            layer_path = f"{stack}_{i}{path[len(stack) :]}"
            layer = convert(layer_path, jax.tree.unflatten(treedef, [h[i] for h in hosts]))
            out[layer_path] = jax.tree.map(jnp.asarray, layer)
        del hosts
        for array in arrays if consume else ():
            if isinstance(array, jax.Array):
                array.delete()
    return traverse_util.unflatten_dict(out, sep="/")


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
    def of(cls, weight: jax.Array, layout) -> Matrices:
        """`weight` (a jax or numpy array) laid out by `layout` (a `WeightLayout` without the layer axis),
        copied part by part."""
        xp = np if isinstance(weight, np.ndarray) else jnp  # a host array stays on the host
        axes = layout.axes.removeprefix("P")
        order = [axes.index(c) for c in layout.outputs + layout.inputs]
        output_shape = tuple(weight.shape[layout.axes.index(c)] for c in layout.outputs)
        parts = tuple(weight) if layout.fused else (weight,)
        return cls(tuple(xp.transpose(p, order).reshape(math.prod(output_shape), -1) for p in parts), output_shape)

    @classmethod
    def initializer(cls, init, layout):
        """`init` whose result is `Matrices`: the model's own params match what `for_inference` makes."""
        return lambda *args: cls.of(init(*args), layout)


def weight_einsum(equation: str, x: jax.Array, weight, result_dtype=None) -> jax.Array | tuple[jax.Array, ...]:
    """`einsum(equation, x, weight)` in `result_dtype` (default: x's), x's `...` axes being its rows, for a
    weight as the checkpoint stores it (also through `stored`) or as `Matrices`. A fused weight (equation
    `...D,PKDH->P...KH`) gives a tuple, one result per part.

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
    weight = stored(weight).astype(x.dtype)
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
