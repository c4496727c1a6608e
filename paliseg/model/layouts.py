"""What each weight's axes mean (`WeightLayout`), read off the einsum that contracts it.

Every matmul against a weight is written where it is used, as an einsum over the weight in its checkpoint
layout (`layers.Einsum`), as in google-deepmind/gemma's `layers.Einsum` and big_vision's `models/ppp/gemma.py`:

    q = Einsum((N, D, H), "...D,NDH->...NH", ("q",), name="q_einsum")(x)

The equation also describes the weight: the module creates its param boxed with the `WeightLayout` read off
the equation (`with_layout`, a flax `AxisMetadata` like `nn.with_partitioning`), `nn.scan` prepends the
layer axis `L` to it, and `paliseg.model.weight_layouts` collects the boxes of an abstract init. So the
forward pass, the initialiser, LoRA (`paliseg.model.merge_lora`) and anything else that needs to know which
axes of a weight are contracted (e.g. per-output-channel quantisation scales) read one description.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from flax.core import meta

from paliseg.config import LoraConfig

LAYERS = "L"  # the axis nn.scan stacks layers on
PARTS = "P"  # the leading axis of a fused weight


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """One letter per axis of a weight (`axes`, e.g. `LPKDH` for Gemma's scanned `kv_einsum/w`); `inputs`:
    the axes contracted with x's trailing axes (in x's order); `outputs`: the axes the result keeps (in its
    order); the others (`L`, `P`) are batch axes. `targets` names the LoRA target (`LoraConfig.targets`)
    of each part: one per index of `P`, or one for an unfused weight; () when LoRA never adapts it."""

    axes: str
    inputs: str
    outputs: str
    targets: tuple[str, ...] = ()

    @classmethod
    def of(cls, equation: str, targets: tuple[str, ...] = ()) -> WeightLayout:
        """The layout of the weight (second operand) of `...<x axes>,<weight axes>->[P]...<result axes>`."""
        operands, _, result = equation.partition("->")
        x_axes, _, axes = operands.partition(",")
        leading, dots, outputs = result.partition("...")
        inputs, parts = x_axes.removeprefix("..."), PARTS if axes.startswith(PARTS) else ""
        described = sorted(axes) == sorted(parts + inputs + outputs)
        if not (x_axes.startswith("...") and dots and leading == parts and described):
            raise ValueError(
                f"{equation!r} does not describe a weight: expected '...<x>,<weight>->...<result>' (fused: "
                "'...<x>,P<weight>->P...<result>'), the weight's axes being x's and the result's"
            )
        return cls(axes, inputs, outputs, tuple(targets))

    @property
    def fused(self) -> bool:
        return PARTS in self.axes

    @property
    def batch(self) -> str:
        """The axes neither contracted nor kept (`L`, `P`), in order."""
        return "".join(c for c in self.axes if c not in self.inputs + self.outputs)

    @property
    def contracted(self) -> tuple[int, ...]:
        """The indices of the axes contracted with the input: reduce over these for per-output scales."""
        return tuple(self.axes.index(c) for c in self.inputs)

    def adapted_parts(self, lora: LoraConfig) -> tuple[int, ...]:
        """The parts `lora` adapts (indices into `targets`)."""
        return tuple(i for i, target in enumerate(self.targets) if lora.adapts(target))

    def initializer(self, distribution: str = "truncated_normal") -> nn.initializers.Initializer:
        """Variance scaling by fan-in over the input axes, each part of a fused weight on its own."""
        index = lambda letters: tuple(self.axes.index(c) for c in letters)  # noqa: E731
        return nn.initializers.variance_scaling(
            1.0, "fan_in", distribution, index(self.inputs), index(self.outputs), index(self.batch)
        )

    def lora_delta(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """A@B laid out like the weight, for LoRA's A [<batch> <inputs> R] and B [<batch> R <outputs>]
        (`P` then counts the adapted parts only)."""
        batch = self.batch
        return jnp.einsum(f"{batch}{self.inputs}R,{batch}R{self.outputs}->{self.axes}", a, b)


class LayoutBox(struct.PyTreeNode, meta.AxisMetadata):
    """A param boxed with its layout (only in what `init` returns; `apply` reads plain arrays)."""

    value: Any
    layout: WeightLayout = struct.field(pytree_node=False)

    def unbox(self) -> Any:
        return self.value

    def replace_boxed(self, val: Any) -> LayoutBox:
        return self.replace(value=val)

    def add_axis(self, index: int, params: dict) -> LayoutBox:  # nn.scan stacked the layers on axis `index`
        axes = self.layout.axes
        return self.replace(layout=dataclasses.replace(self.layout, axes=axes[:index] + LAYERS + axes[index:]))

    def remove_axis(self, index: int, params: dict) -> LayoutBox:
        axes = self.layout.axes
        return self.replace(layout=dataclasses.replace(self.layout, axes=axes[:index] + axes[index + 1 :]))


def with_layout(init: nn.initializers.Initializer, layout: WeightLayout) -> nn.initializers.Initializer:
    """`init` whose result is boxed with `layout`, for `paliseg.model.weight_layouts`."""
    return lambda *args: LayoutBox(init(*args), layout)
