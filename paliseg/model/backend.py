"""The one seam for what XLA:CPU needs: the model's modules call these without knowing why.

Each function here computes exactly what its plain counterpart computes; only the way XLA is asked to do it
differs, for reasons measured on CPU (see each docstring). Nothing else in the model works around a backend.

- `for_inference`: on CPU, one module per layer instead of the layer scan, for decoding;
- `stored` / `storage_view` / `decoding_view`: bfloat16 params read through a uint16 view under the scan;
  `stored` also dequantizes a quantized weight (`paliseg.model.quantization`) where the layer reads it;
- `weight_einsum`: x @ weight, accumulated and returned in float32 before the cast back to x's dtype;
- `einsum_per_part`: a fused weight ([P, ...]) contracted one part at a time;
- `low_rank`: LoRA's (x @ a) @ b with its backward written out;
- `compiler_options`: XLA flags for the compiled training step and decoder.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

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


# The scanned (depth-stacked) subtrees of the param tree, and the prefix of each one's unscanned layers.
_SCANNED = {("llm", "layers"): "layers_", ("img", "Transformer", "encoderblock"): "encoderblock_"}


def for_inference(config, params: dict, *, consume: bool = False):
    """`(config, params)` to decode with. On CPU the layers are unscanned (`config.scan_layers=False`), each
    layer's params in buffers of their own; other backends keep the scan (and its shorter compile).

    Inside the layer scan XLA:CPU copies every layer's weights out of the stacked arrays before each matmul
    (a dynamic slice feeding the dot; with the `storage_view`, a bitcast too), which at one token per step
    is most of the work: the matmul itself reads each weight once. Separate bfloat16 buffers feed the
    matmuls directly. A quantized model keeps the scan: there each layer's weights are dequantized in its
    own iteration, where unscanned XLA may schedule every layer's dequantization at once (PaliGemma 2 3B
    nf4: 8.3 GB after a forward pass instead of 4.5 GB). With `consume`, each stacked leaf is deleted once
    split (memory grows by one leaf at most) and `params` must not be used again; otherwise they are left
    intact.
    """
    if jax.default_backend() != "cpu" or not config.scan_layers or config.quantization.enabled:
        return config, params
    return config.replace(scan_layers=False), unstack_layers(params, consume=consume)


def unstack_layers(params: dict, *, consume: bool = False) -> dict:
    """The tree of `scan_layers=False`: each stacked subtree [L, ...] split into L subtrees (`layers_0`, ...),
    one leaf at a time, through host views of the stacked buffers (no whole-leaf copy)."""
    params = dict(params)
    for path, prefix in _SCANNED.items():
        parent = params
        for key in path[:-1]:
            parent[key] = dict(parent[key])
            parent = parent[key]
        leaves, treedef = jax.tree.flatten(parent.pop(path[-1]))
        per_leaf = []
        for leaf in leaves:
            host = np.asarray(leaf)  # a view of the buffer on CPU
            per_leaf.append([jnp.asarray(host[i]) for i in range(host.shape[0])])
            del host
            if consume and isinstance(leaf, jax.Array):
                leaf.delete()
        for i, layer_leaves in enumerate(zip(*per_leaf)):
            parent[f"{prefix}{i}"] = jax.tree.unflatten(treedef, layer_leaves)
    return params


def weight_einsum(equation: str, x: jax.Array, weight: jax.Array, result_dtype=None) -> jax.Array:
    """`einsum(equation, x, weight)` in `result_dtype` (default: x's). x's `...` axes are its rows.

    Two XLA:CPU bfloat16 dot paths are slow. A dot whose result is bfloat16 runs 2-3x slower than one whose
    result is float32 (2048x16384 weight, 272 rows: 111 vs 320 ms), so the dot is asked for a float32 result
    and cast back. A dot with a single row (decoding one token at batch 1) takes a matrix-vector path that
    is ~8x slower than the same dot with two rows (58 vs 7.5 ms), so a single row is contracted beside a
    zero row that is dropped again. For float32 inputs both are the plain einsum.
    """
    dtype = result_dtype or x.dtype
    lhs, out = equation.split(",")[0], equation.split("->")[1]
    rows_at = lhs.index("...")
    if x.dtype == jnp.bfloat16 and math.prod(x.shape[rows_at : x.ndim + rows_at + 3 - len(lhs)]) == 1:
        padded = jnp.concatenate([x, jnp.zeros_like(x)], axis=rows_at)
        result = jnp.einsum(equation, padded, weight, preferred_element_type=jnp.float32)
        return jax.lax.index_in_dim(result, 0, out.index("..."), keepdims=True).astype(dtype)
    return jnp.einsum(equation, x, weight, preferred_element_type=jnp.float32).astype(dtype)


def einsum_per_part(equation: str, x: jax.Array, fused: jax.Array, *, batched: bool) -> tuple[jax.Array, ...]:
    """`weight_einsum(equation, x, fused[p])` for each part p of a fused weight (parts on axis 0).

    For training (`batched=False`) each part is contracted on its own: each part is contiguous, so no
    transposed copy of the weight, and the results are never stacked (a stacked [P, ...] result costs a
    padded, transposed copy of its gradient in every layer of the backward pass on XLA:CPU). For inference
    with unscanned layers (`batched=True`, see `for_inference`), slicing a part out costs XLA:CPU a float32
    round trip and a copy of the part, which outweighs a one-token matmul and, scheduled early, keeps every
    layer's copies alive at once (2.4 GB for PaliGemma 3B's prefill); there all parts are contracted as one
    batch over P ('P...D,PDF->P...F') and the small results split."""
    if not batched:
        return tuple(weight_einsum(equation, x, fused[p]) for p in range(fused.shape[0]))
    lhs, rest = equation.split(",")
    weight_axes, out = rest.split("->")
    batched_result = weight_einsum(
        f"P{lhs},P{weight_axes}->P{out}", jnp.broadcast_to(x, fused.shape[:1] + x.shape), fused
    )
    return tuple(batched_result)


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
