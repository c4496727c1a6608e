"""The config and params to decode with: whole-tree transforms above the model, for what XLA:CPU needs (the
contractions' side of the same workarounds is `paliseg.model.kernels`).

- `for_inference` (`inference_config`): on CPU, one module per layer instead of the layer scan, each
  projection weight a `kernels.Matrices`;
- `unstack_layers`: the stacked layers split into per-layer buffers;
- `decoding_view` / `storage_view`: bfloat16 params read through a uint16 view under the scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from paliseg.config import SCANNED_STACKS, ModelConfig
from paliseg.model.kernels import Matrices
from paliseg.model.params import param_shapes, weight_layouts


def for_inference(config: ModelConfig, params: dict, *, consume: bool = False) -> tuple[ModelConfig, dict]:
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
    decoding_config = inference_config(config)
    if decoding_config == config:
        return config, params
    config = decoding_config
    layouts, shapes = weight_layouts(config), traverse_util.flatten_dict(param_shapes(config), sep="/")

    def as_stored(path: str, leaf):  # as the unscanned model stores it (see `Einsum.matrices`)
        return Matrices.of(leaf, layouts[path]) if isinstance(shapes.get(path), Matrices) else leaf

    return config, unstack_layers(params, consume=consume, convert=as_stored)


def inference_config(config: ModelConfig) -> ModelConfig:
    """The config `for_inference` decodes with on this backend (what `paliseg plan` plans for predict)."""
    if jax.default_backend() != "cpu" or not config.scan_layers or config.quantization.enabled:
        return config
    return config.replace(scan_layers=False)


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


def storage_view(params: dict) -> dict:
    """bfloat16 leaves reinterpreted as uint16 (same bits), for decoding with the layer scan (`decoding_view`).

    Inside a loop, XLA:CPU slices bfloat16 arrays by first converting the *whole* array to float32, which
    for the scanned (stacked) layer weights is a float32 copy of the model, hoisted out of every loop;
    integer slices are plain. Modules read every param through `layers.read`, which turns the slice they get
    back into bfloat16 (`kernels.from_storage`). Not differentiable.
    """
    return jax.tree.map(lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x, params)


def decoding_view(config: ModelConfig, params: dict) -> dict:
    """The params as the jitted decoder reads them: the `storage_view` under the layer scan. Unscanned layers
    (`for_inference` on CPU) have nothing to slice; a quantized model's bf16 leaves are small but for the
    embedding table, which the scan never slices (its view would be a 1.2 GB copy for PaliGemma 2 3B)."""
    return storage_view(params) if config.scan_layers and not config.quantization.enabled else params
