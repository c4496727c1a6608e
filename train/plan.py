"""`paliseg plan`: the memory and the time of a training step, or of decoding, before a GPU is rented.

Nothing the size of the model is allocated. The program `paliseg train` compiles (`train.supervised.jit_step`
for the `train.loop.layout` of the run's params and state on its mesh), or the decoder `paliseg predict` and
`serve` run (`paliseg.decoding`, in the predictor's layout), is lowered on ShapeDtypeStructs and compiled,
and XLA's own buffer assignment (`compiled.memory_analysis()`) gives the bytes per device:

    peak = arguments (params, optimizer state, batch) + temporaries + results that reuse no donated buffer

The compiler is this host's. On the device planned for, that is the allocation XLA makes there
(benchmarks/gpu_check.py puts it beside the allocator's measured peak); planned on a CPU for a GPU, it is
XLA:CPU's buffer assignment of the same program, which differs where the two compilers fuse and schedule
differently. The peak's parts: the params and the optimizer state (the shards one device holds), the batch,
and the activations, what `jax.vjp` keeps of one micro-batch for the backward pass (part of the
temporaries, which also hold the gradients, the recomputed layer and the logits).

FLOPs: XLA's cost analysis counts a loop's body once, so the layer scan would count one layer. The step is
lowered once more with the layers unrolled and without remat, for one micro-batch: the model's FLOPs as
MFU counts them (recomputation is not useful work), times --grad-accum. Step time = FLOPs / (devices x MFU
x the accelerator's bf16 peak).

The largest batch for a memory budget (`largest`): the peak grows with the micro-batch almost linearly, so
two compiles give the slope and a few more the largest micro-batch whose peak fits while the next one's
does not (each checked by its own compile).

Decoding: `paliseg.decoding.generate` for the model `paliseg predict` decodes with (a run's adapters folded
into its base, `train.run.merges_lora`; this backend's layout, `inference.inference_config`), prompts padded to
a multiple of 16 and the segmentation grammar on, as predict decodes "segment ..." prompts: the weights, the
KV cache (2 x layers x batch x kv heads x (image + prompt + new tokens) x head dim) and the temporaries.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paliseg import checkpoints, decoding, model
from paliseg import settings as paliseg_settings
from paliseg.config import ModelConfig
from paliseg.model import inference
from train import data as train_data
from train import loop, optim, sharding, supervised
from train import params as param_sets
from train import run as run_folder
from train import step as train_step
from train.config import ACCELERATORS, Accelerator, PlanConfig, TrainConfig

GIB = 2**30


def accelerator(name: str) -> Accelerator:
    """The accelerator of that name (case, spaces and dashes aside: "rtx4090", "tpu-v5e")."""
    key = _normalized(name)
    for known in ACCELERATORS:
        if _normalized(known.name) == key:
            return known
    raise ValueError(
        f"unknown accelerator {name!r}; --accelerator is one of: {', '.join(a.name for a in ACCELERATORS)}"
    )


def accelerator_of(device_kind: str) -> Accelerator | None:
    """The accelerator a `jax.Device.device_kind` names ("NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 4090"),
    or None (a CPU, or a device the table lacks)."""
    for known in ACCELERATORS:
        if re.search(rf"\b{re.escape(known.name)}\b", device_kind, re.IGNORECASE):
            return known
    return None


def _normalized(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def parse_memory(text: str) -> int:
    """Bytes of a device memory size: "24GB", "80 GiB", "512MB", "1.5T" (GB and GiB alike: 2^30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([MGT])(?:i?B)?)?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"--device-memory {text!r}: expected a size such as 24GB or 80GiB")
    return int(float(match[1]) * 2 ** {"M": 20, "G": 30, "T": 40}[(match[2] or "G").upper()])


def gib(size: int) -> str:
    """Bytes as people read them: GiB, or MiB below one GiB."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2**20:.1f} MiB"


@dataclasses.dataclass(frozen=True)
class Buffers:
    """XLA's buffer assignment of a compiled program: bytes per device."""

    arguments: int
    temporaries: int
    outputs: int  # results that reuse no donated argument's buffer

    @classmethod
    def of(cls, compiled: jax.stages.Compiled) -> Buffers:
        stats = compiled.memory_analysis()
        return cls(
            stats.argument_size_in_bytes,
            stats.temp_size_in_bytes,
            stats.output_size_in_bytes - stats.alias_size_in_bytes,
        )

    @property
    def peak(self) -> int:
        return self.arguments + self.temporaries + self.outputs


def device_bytes(tree: Any) -> int:
    """Bytes of the leaves of `tree` one device holds (its shard, for leaves with a sharding)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding_ = getattr(leaf, "sharding", None)
        shape = leaf.shape if sharding_ is None else sharding_.shard_shape(leaf.shape)
        total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
    return total


# --- the training step ----------------------------------------------------------------------------------


def batch_shapes(config: TrainConfig, model_cfg: ModelConfig, mesh=None) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch the loop hands the step (`train.data.TrainData`): [grad_accum, micro_batch, ...]."""
    lead = (config.grad_accum, config.micro_batch_size)
    size = model_cfg.img.image_size
    placed = {} if mesh is None else {"sharding": sharding.batch_sharding(mesh)}
    mask_loss = train_data.mask_loss_fields(config.seq_len) if config.mask_loss_weight else {}
    return {
        "image": jax.ShapeDtypeStruct((*lead, size, size, 3), jnp.float32, **placed),
        **{key: jax.ShapeDtypeStruct((*lead, config.seq_len), jnp.int32, **placed) for key in train_data.TEXT_FIELDS},
        **{key: jax.ShapeDtypeStruct((*lead, *shape), dtype, **placed) for key, (shape, dtype) in mask_loss.items()},
    }


def seg_input_arguments(config: TrainConfig) -> tuple:
    """The step's last argument where the seg-code losses need one (`train.step.seg_inputs`, as shapes)."""
    return (train_step.seg_inputs_shapes(config),) if train_step.needs_seg_inputs(config) else ()


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The step `paliseg train` compiles for a run, with its arguments as shapes (`sharding` set)."""

    config: TrainConfig
    model_cfg: ModelConfig
    mesh: jax.sharding.Mesh
    layout: loop.Layout
    batch: dict[str, jax.ShapeDtypeStruct]
    jitted: Callable

    @classmethod
    def of(cls, config: TrainConfig, mesh: jax.sharding.Mesh) -> TrainStep:
        sharding.check_batch(config.batch_size, config.grad_accum, mesh)
        model_cfg = run_folder.model_config(config)
        tx = optim.optimizer(config)
        layout = loop.layout(config, model_cfg, tx, mesh)
        jitted = supervised.jit_step(
            config, model_cfg, tx, optim.schedule(config), mesh, layout.frozen_shardings, layout.state_shardings
        )
        return cls(config, model_cfg, mesh, layout, batch_shapes(config, model_cfg, mesh), jitted)

    def compile(self) -> jax.stages.Compiled:
        return self.jitted.lower(
            self.layout.state, self.layout.frozen, self.batch, *seg_input_arguments(self.config)
        ).compile()


def activation_bytes(config: TrainConfig, model_cfg: ModelConfig, examples: int) -> int:
    """Bytes `jax.vjp` keeps for the backward pass of `examples` examples (one device's micro-batch): the
    leaves of its backward function that are not the loss's own inputs (params, batch)."""
    frozen, trainable = param_sets.abstract(config, model_cfg)
    batch = batch_shapes(config.replace(batch_size=examples, grad_accum=1), model_cfg)
    micro = {key: jax.ShapeDtypeStruct(shape.shape[1:], shape.dtype) for key, shape in batch.items()}
    found = {}

    def backward(trainable, frozen, micro, *seg):
        def loss(params):
            full = param_sets.join(frozen, params)
            return train_step.example_loss(config, model_cfg, full, micro, jax.random.key(0), *seg)[0]

        _, vjp = jax.vjp(loss, trainable)
        inputs = {id(leaf) for leaf in jax.tree.leaves((trainable, frozen, micro, seg))}
        found["bytes"] = device_bytes([leaf for leaf in jax.tree.leaves(vjp) if id(leaf) not in inputs])

    jax.eval_shape(backward, trainable, frozen, micro, *seg_input_arguments(config))
    return found["bytes"]


def train_flops(config: TrainConfig) -> float:
    """The model's FLOPs of one optimizer step over all devices (see the module docstring)."""
    model_cfg = run_folder.model_config(config).replace(scan_layers=False, remat=False)
    micro = config.replace(batch_size=config.micro_batch_size, grad_accum=1)
    frozen, trainable = param_sets.abstract(micro, model_cfg)
    tx = optim.optimizer(micro)
    state = jax.eval_shape(lambda p: train_step.init_state(p, tx), trainable)
    step = train_step.jit_train_step(micro, model_cfg, tx, optim.schedule(micro))
    lowered = step.lower(state, frozen, batch_shapes(micro, model_cfg), *seg_input_arguments(config))
    return float(lowered.cost_analysis()["flops"]) * config.grad_accum


def train_peak(config: TrainConfig, mesh: jax.sharding.Mesh) -> int:
    return Buffers.of(TrainStep.of(config, mesh).compile()).peak


def train(config: TrainConfig, settings: PlanConfig, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """The plan of `config`'s training step on `mesh` (see the module docstring)."""
    device = accelerator(settings.accelerator)
    step = TrainStep.of(config, mesh)
    buffers = Buffers.of(step.compile())
    devices = mesh.devices.size
    state = step.layout.state
    flops = train_flops(config)
    seconds = flops / (devices * settings.mfu * device.bf16_flops)
    result = {
        "task": "train",
        **_describe_run(config, step.model_cfg),
        "grad_accum": config.grad_accum,
        "micro_batch": config.micro_batch_size,
        "remat": config.remat,
        "optimizer": config.optimizer,
        "devices": devices,
        "mesh": {"data": mesh.shape["data"], "fsdp": mesh.shape["fsdp"]},
        "compiled_for": jax.default_backend(),
        "bytes_per_device": {
            "params": device_bytes(step.layout.frozen) + device_bytes(state["params"]),
            "trainable_params": device_bytes(state["params"]),
            "optimizer_state": device_bytes(state["opt_state"]) + device_bytes(state["step"]),
            "batch": device_bytes(step.batch),
            "activations": activation_bytes(config, step.model_cfg, config.micro_batch_size // devices),
            "temporaries": buffers.temporaries,
            "outputs": buffers.outputs,
            "peak": buffers.peak,
        },
        "flops_per_step": flops,
        "accelerator": dataclasses.asdict(device),
        "mfu": settings.mfu,
        "step_seconds": seconds,
        "examples_per_second": config.batch_size / seconds,
    }
    if settings.device_memory is not None:
        result["fit"] = _train_fit(config, settings, mesh)
    return result


def _train_fit(config: TrainConfig, settings: PlanConfig, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """The largest micro-batch that fits the budget, and the --grad-accum that runs --batch-size in it."""
    budget, devices = _budget(settings), mesh.devices.size

    @functools.cache
    def peak(per_device: int) -> int:
        return train_peak(config.replace(batch_size=per_device * devices, grad_accum=1), mesh)

    per_device = largest(peak, budget)
    if per_device == 0:
        raise _nothing_fits(f"a micro-batch of {devices} (one example per device)", peak(1), settings, config)
    fit = {
        **_budget_fields(settings, budget),
        "largest_micro_batch": per_device * devices,
        "peak": peak(per_device),
        "next_peak": peak(per_device + 1),
    }
    for accum in range(1, config.batch_size + 1):  # the fewest micro-batches that fit --batch-size
        micro = config.batch_size // accum
        if config.batch_size % accum or micro % devices or micro > per_device * devices:
            continue
        at_batch = train_peak(config.replace(grad_accum=accum), mesh)  # the batch's own [accum, ...] input
        if at_batch <= budget:
            return {**fit, "batch_size": config.batch_size, "grad_accum": accum, "peak_at_batch": at_batch}
    return {**fit, "batch_size": config.batch_size, "grad_accum": None, "peak_at_batch": None}


# --- decoding (predict, serve) -----------------------------------------------------------------------------


def predict_model(config: TrainConfig) -> ModelConfig:
    """The model `paliseg predict` decodes a run of `config` with: the adapters folded into the base
    (unless it is quantized), no remat, this backend's layout."""
    model_cfg = run_folder.model_config(config)
    if run_folder.merges_lora(model_cfg):
        model_cfg = model_cfg.replace(lora={"rank": 0})
    return inference.inference_config(model_cfg.replace(remat=False))


def decode_inputs(model_cfg: ModelConfig, batch: int, prompt_len: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """(images, tokens, mask_ar, mask_input) as predict hands them to the decoder: `batch` images, prompts
    padded to a multiple of 16."""
    size = model_cfg.img.image_size
    text = jax.ShapeDtypeStruct((batch, decoding.prompt_length_bucket(prompt_len)), jnp.int32)
    return jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32), text, text, text


def predict_program(model_cfg: ModelConfig, batch: int, prompt_len: int, max_new_tokens: int) -> jax.stages.Lowered:
    """`generate` lowered as predict runs it (`decode_inputs`), under the segmentation grammar."""
    return decoding.lower_generate(
        model_cfg,
        model.param_shapes(model_cfg),
        *decode_inputs(model_cfg, batch, prompt_len),
        max_new_tokens=max_new_tokens,
        grammar=stand_in_grammar(model_cfg.llm.vocab_size),
    )


def stand_in_grammar(vocab_size: int) -> decoding.SegmentGrammar:
    """A segmentation grammar of the vocabulary's size: the decoder's program does not depend on its values.
    (It calls every token a loc token, so under it a row ends only where eos happens to win.)"""
    return decoding.SegmentGrammar(np.zeros(vocab_size, np.int32), np.full(vocab_size, -1, np.int32))


def kv_cache_bytes(model_cfg: ModelConfig, batch: int, prompt_len: int, max_new_tokens: int) -> int:
    llm = model_cfg.llm
    slots = model_cfg.num_image_tokens + decoding.prompt_length_bucket(prompt_len) + max_new_tokens - 1
    per_slot = 2 * llm.depth * llm.num_kv_heads * llm.head_dim * np.dtype(model_cfg.cache_dtype).itemsize
    return batch * slots * per_slot


def predict(config: TrainConfig, settings: PlanConfig) -> dict[str, Any]:
    """The plan of decoding `config.batch_size` images with the model a run of `config` trains."""
    model_cfg = predict_model(config)
    new_tokens = settings.max_new_tokens or config.seq_len
    batch = config.batch_size

    @functools.cache
    def buffers(rows: int) -> Buffers:
        return Buffers.of(predict_program(model_cfg, rows, settings.prompt_len, new_tokens).compile())

    planned = buffers(batch)
    result = {
        "task": "predict",
        **_describe_run(config, model_cfg),
        "prompt_len": decoding.prompt_length_bucket(settings.prompt_len),
        "max_new_tokens": new_tokens,
        "devices": 1,
        "compiled_for": jax.default_backend(),
        "bytes_per_device": {
            "params": device_bytes(model.param_shapes(model_cfg)),
            "inputs": device_bytes(decode_inputs(model_cfg, batch, settings.prompt_len)),
            "kv_cache": kv_cache_bytes(model_cfg, batch, settings.prompt_len, new_tokens),
            "temporaries": planned.temporaries,
            "outputs": planned.outputs,
            "peak": planned.peak,
        },
    }
    if settings.device_memory is not None:
        budget = _budget(settings)
        largest_batch = largest(lambda rows: buffers(rows).peak, budget)
        if largest_batch == 0:
            raise _nothing_fits("one image", buffers(1).peak, settings, config)
        result["fit"] = {
            **_budget_fields(settings, budget),
            "largest_batch": largest_batch,
            "peak": buffers(largest_batch).peak,
            "next_peak": buffers(largest_batch + 1).peak,
        }
    return result


# --- shared ---------------------------------------------------------------------------------------------


def largest(peak: Callable[[int], int], budget: int) -> int:
    """The largest n >= 1 with peak(n) <= budget (0 when even 1 does not fit), for a peak that grows with n
    (memoize `peak`: some n are asked twice). The first guess extends the line through n = 1 and 2; then
    steps up until one fails, and bisects."""
    if peak(1) > budget:
        return 0
    guess = 1 + (budget - peak(1)) // max(peak(2) - peak(1), 1)
    low, high = (guess, guess + 1) if peak(guess) <= budget else (1, guess)
    while peak(high) <= budget:
        low, high = high, high + 2 * (high - low)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if peak(middle) <= budget else (low, middle)
    return low


def _budget(settings: PlanConfig) -> int:
    return int(parse_memory(settings.device_memory) * (1 - settings.margin))


def _budget_fields(settings: PlanConfig, budget: int) -> dict[str, Any]:
    return {"device_memory": parse_memory(settings.device_memory), "margin": settings.margin, "budget": budget}


def _nothing_fits(smallest: str, need: int, settings: PlanConfig, config: TrainConfig) -> ValueError:
    """The error when even the smallest batch exceeds the budget, naming what to change."""
    changes = []
    if config.quantization.format != "nf4":
        needs_lora = "" if config.trainable == "lora" else " with --trainable lora"
        changes.append(f"--base-dtype nf4{needs_lora} (the frozen base's weights in 4 bits)")
    if not settings.predict and not config.remat:
        changes.append("--remat (recompute each layer in the backward pass instead of keeping its activations)")
    if not settings.predict:
        changes.append("--mesh-fsdp N over N devices (they share one copy of the params and optimizer state)")
    changes.append("fewer --max-new-tokens" if settings.predict else "a shorter --seq-len")
    return ValueError(
        f"nothing fits --device-memory {settings.device_memory} less the {settings.margin:.0%} margin "
        f"({gib(_budget(settings))} per device): {smallest} already needs {gib(need)}. Try " + "; ".join(changes)
    )


def _duration(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def _describe_run(config: TrainConfig, model_cfg: ModelConfig) -> dict[str, Any]:
    return {
        "preset": config.preset,
        "checkpoint": config.checkpoint,
        "trainable": config.trainable,
        "lora_rank": model_cfg.lora.rank,
        "base_dtype": config.quantization.format or model_cfg.param_dtype,
        "dtype": model_cfg.compute_dtype,
        "image_size": model_cfg.img.image_size,
        "image_tokens": model_cfg.num_image_tokens,
        "seq_len": config.seq_len,
        "batch_size": config.batch_size,
    }


def plan(config: TrainConfig, settings: PlanConfig) -> dict[str, Any]:
    """`paliseg plan`'s result for a run of `config` (decoding, with `settings.predict`): see the module
    docstring. Bad settings, and a --checkpoint of other sizes than the preset, fail before any compile."""
    accelerator(settings.accelerator)
    problems = paliseg_settings.refusals(settings)
    if problems:
        raise ValueError("bad plan settings:\n  " + "\n  ".join(problems))
    if settings.device_memory is not None:
        parse_memory(settings.device_memory)
    if config.checkpoint:  # the base as stored: no adapters, not quantized yet
        stored = run_folder.model_config(config).replace(lora={"rank": 0}, quantization={"format": None})
        checkpoints.check_sizes(config.checkpoint, stored, config.preset)
    if settings.predict:
        return predict(config, settings)
    available = jax.devices()
    count = settings.devices or len(available)
    if count > len(available):
        raise ValueError(
            f"--devices {count}: this host has {len(available)} {jax.default_backend()} device(s); a CPU host "
            "plans for any number (JAX_PLATFORMS=cpu)"
        )
    return train(config, settings, sharding.make_mesh(config.mesh_fsdp, available[:count]))


def describe(result: dict[str, Any]) -> str:
    """The plan as people read it: the settings, the bytes per device, the step's time and the fit."""
    memory = result["bytes_per_device"]
    lora = f" (LoRA rank {result['lora_rank']})" if result["lora_rank"] else ""
    if result["task"] == "predict":
        head = (
            f"plan of decoding: {result['preset']}, {result['base_dtype']} weights{lora and ' + LoRA adapters'}, "
            f"{result['dtype']} matmuls; batch {result['batch_size']}, {result['image_tokens']} image + "
            f"{result['prompt_len']} prompt tokens, {result['max_new_tokens']} new tokens; one device"
        )
        parts = [("weights", "params"), ("images, prompts", "inputs"), ("KV cache", "kv_cache"),
                 ("temporaries", "temporaries")]  # fmt: skip
        note = {"kv_cache": "part of the temporaries"}
    else:
        mesh = result["mesh"]
        head = (
            f"plan of a training step: {result['preset']}, trainable {result['trainable']}{lora} over a "
            f"{result['base_dtype']} base, {result['dtype']} matmuls{', remat' if result['remat'] else ''}; batch "
            f"{result['batch_size']} = {result['grad_accum']} x {result['micro_batch']}, {result['image_tokens']} "
            f"image + {result['seq_len']} text tokens; {result['devices']} device(s) (data {mesh['data']} x "
            f"fsdp {mesh['fsdp']})"
        )
        parts = [("parameters", "params"), ("optimizer state", "optimizer_state"), ("batch", "batch"),
                 ("activations", "activations"), ("temporaries", "temporaries")]  # fmt: skip
        note = {
            "params": f"trainable {gib(memory['trainable_params'])}",
            "activations": "kept for the backward pass; part of the temporaries",
        }
    lines = [head, f"  per device, as XLA:{result['compiled_for']} assigns the buffers:"]
    lines += [f"    {label:<16} {gib(memory[key]):>11}" + (f"  ({note[key]})" if key in note else "")
              for label, key in parts]  # fmt: skip
    lines.append(f"    {'peak':<16} {gib(memory['peak']):>11}")
    if result["task"] == "train":
        device = result["accelerator"]
        lines.append(
            f"  step: {result['flops_per_step'] / 1e12:.3g} TFLOP; on {result['devices']} x {device['name']} "
            f"({device['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, {device['memory_gib']:g} GiB) at "
            f"{result['mfu']:.0%} MFU: {_duration(result['step_seconds'])} per step, "
            f"{result['examples_per_second']:.4g} examples/s"
        )
    fit = result.get("fit")
    if fit is None:
        return "\n".join(lines)
    budget = f"{gib(fit['device_memory'])} less {fit['margin']:.0%} = {gib(fit['budget'])}"
    if result["task"] == "predict":
        lines.append(
            f"  fits {budget}: batches up to {fit['largest_batch']} ({gib(fit['peak'])}; "
            f"{fit['largest_batch'] + 1} needs {gib(fit['next_peak'])})"
        )
        return "\n".join(lines)
    lines.append(
        f"  fits {budget}: micro-batches up to {fit['largest_micro_batch']} ({gib(fit['peak'])}; one more "
        f"example per device needs {gib(fit['next_peak'])})"
    )
    if fit["grad_accum"] is None:
        lines.append(f"    no --grad-accum splits --batch-size {fit['batch_size']} into micro-batches that fit")
    else:
        lines.append(
            f"    --batch-size {fit['batch_size']}: --grad-accum {fit['grad_accum']} (peak {gib(fit['peak_at_batch'])})"
        )
    return "\n".join(lines)
