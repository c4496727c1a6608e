"""How the model's modules read their params (`read`, `Module`) and contract their weights (`Einsum`).

The tree `apply` is given may hold a param otherwise than the computation uses it: a projection weight
quantized (`paliseg.model.quantization`), or any bfloat16 param as the uint16 storage view the decoder
slices under the layer scan (`inference.storage_view`). `read` turns either back, and `Module.param`
returns every param read, so a module body only calls `self.param` and computes with what it gets.

Every matmul against a weight is an `Einsum` written where it is used, over the weight in its checkpoint
layout, e.g. `Einsum((N, D, H), "...D,NDH->...NH", ("q",), name="q_einsum")(x)`; the equation also gives
the weight's `WeightLayout` (`paliseg.model.layouts`), and `kernels.weight_einsum` computes it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from paliseg.config import QuantizationConfig
from paliseg.model import kernels, quantization
from paliseg.model.layouts import WeightLayout, with_layout


def read(param):
    """`param` as the model computes with it: a quantized weight dequantized (float32), a storage view's
    uint16 bits as their bfloat16 (`kernels.from_storage`), anything else as it is."""
    if quantization.is_quantized(param):
        return param.dequantize()
    return kernels.from_storage(param)


class Module(nn.Module):
    """A flax module whose `self.param` returns the param `read`. The model's modules derive from it, so
    under the layer scan each layer reads its own slice of the stored params (one layer dequantized or
    bitcast at a time)."""

    @nn.nowrap
    def param(self, name: str, init_fn, *init_args, **init_kwargs):
        return read(super().param(name, init_fn, *init_args, **init_kwargs))


class Einsum(Module):
    """`einsum(equation, x, w)` in compute dtype over the weight `w` [shape] this module owns, plus an
    optional bias over the result's trailing axes (flax's Dense layouts: SigLIP has biases, Gemma none).

    With `quantization` on, the weight is created quantized (`paliseg.model.quantization`) and read
    (dequantized) here, where it is used; decoding on CPU may store the weight as `kernels.Matrices`
    (`matrices`, set for the unscanned layers `inference.for_inference` makes).
    A fused weight leads with its parts axis and returns one result per part, a tuple: `...D,PKDH->P...KH`
    runs as `...D,KDH->...KH` on each part (`kernels.weight_einsum`). `targets` names the
    parts for LoRA (`WeightLayout`; the adapters are `lora.LoRA`, which wraps this module).
    """

    shape: tuple[int, ...]
    equation: str
    targets: tuple[str, ...] = ()
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    weight_name: str = "w"
    bias: bool = False
    quantization: QuantizationConfig = QuantizationConfig()
    matrices: bool = False  # the weight stored as `kernels.Matrices`

    @property
    def layout(self) -> WeightLayout:
        return WeightLayout.of(self.equation, self.targets)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, ...]:
        layout = self.layout
        path = "/".join((*self.scope.path, self.weight_name))
        init = quantization.initializer(layout.initializer(), self.quantization, path, layout)
        init = with_layout(kernels.Matrices.initializer(init, layout) if self.matrices else init, layout)
        weight = self.param(self.weight_name, init, self.shape, jnp.dtype(self.param_dtype))
        dtype = jnp.dtype(self.compute_dtype)
        y = kernels.weight_einsum(self.equation, x.astype(dtype), weight)
        if self.bias:
            shape = tuple(self.shape[layout.axes.index(c)] for c in layout.outputs)
            y = y + self.param("bias", nn.initializers.zeros, shape, jnp.dtype(self.param_dtype)).astype(dtype)
        return y
