"""The fine-tuning configuration: one typed dataclass, resolved as defaults < `--config FILE` < flags.

The resolved configuration is written to RUN_DIR/config.json and is the run's identity: `--resume` reads
it back and refuses flags that would change what the run computes (a resumed run must produce exactly the
losses of an uninterrupted one), while flags that only change how it runs (workers, logging) may differ.
Every value is checked here, before any data is read or anything is compiled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from paliseg import settings
from paliseg.config import (
    DTYPES,
    IMG_LORA_TARGETS,
    LLM_LORA_TARGETS,
    PRESETS,
    QUANTIZED_DTYPES,
    LoraConfig,
    QuantizationConfig,
)
from paliseg.settings import setting

TRAINABLE_SETS = ("lora", "attn", "all")
OPTIMIZERS = ("adamw", "sgd")
OBJECTIVES = ("supervised", "grpo")
# Settings a run started from another run's checkpoint (--init-run) takes from that run unless given.
INHERITED_FROM_INIT_RUN = ("preset", "dtype", "tokenizer", "seq_len")

# Settings that change how a run executes but not what it computes: a resumed run may change them.
# (`out` too: a run folder may be moved.)
EXECUTION_FIELDS = frozenset({"out", "workers", "prefetch", "log_every", "save_every", "mesh_fsdp"})


# The argument groups of `paliseg train --help`.
INPUTS = "data, model and run folder"
MODEL = "model"
TRAINED = "what is trained"
OPTIMISATION = "optimisation"
GRPO = "reinforcement fine-tuning (--objective grpo)"
EXECUTION = "execution"


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
    """Group-relative policy optimisation with the mask-IoU reward (`train.grpo`): flags --grpo-*."""

    group_size: int = setting(4, "completions sampled per image and prompt (G); advantages are relative to them",
                              metavar="G", at_least=2)  # fmt: skip
    temperature: float = setting(1.0, "sampling temperature of the completions", metavar="T", above=0)
    top_p: float = setting(
        1.0, "sampling nucleus of the completions (1 keeps every token)", metavar="P", above=0, at_most=1
    )
    max_new_tokens: int | None = setting(
        None,
        "decoding budget of each completion (default: --seq-len, as paliseg eval decodes)",
        metavar="N",
        at_least=2,
    )
    clip_epsilon: float = setting(0.2, "PPO clip range of the probability ratio", metavar="EPS", above=0)
    kl_coef: float = setting(
        0.04,
        "weight of the KL penalty (k3 estimator) to the frozen starting policy; 0 skips it",
        metavar="BETA",
        at_least=0,
    )
    updates_per_batch: int = setting(
        1, "optimizer updates on each batch of completions (ratios against the policy that sampled them)",
        metavar="K", at_least=1)  # fmt: skip
    box_weight: float = setting(
        0.0, "reward = mask IoU + this weight x the Hungarian-matched box mIoU", metavar="W", at_least=0
    )
    keep: int | None = setting(
        None, "update on only K of each group's G completions, the K/2 best and K/2 worst rewarded (max-variance "
        "down-sampling, PODS): sampling is cheap, updates are not, so a larger G costs little (default: all G)",
        metavar="K", at_least=2)  # fmt: skip


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; `paliseg train` derives its flags from these declarations (paliseg.settings)."""

    data: list[str] = setting([], "converted data folder (repeatable)", metavar="DIR", items="repeated", group=INPUTS)
    data_weights: list[float] | None = setting(
        None,
        "sampling weight of each --data folder (default: proportional to size)",
        metavar="W1,W2",
        above=0,
        group=INPUTS,
    )
    balance_prompts: bool = setting(
        False, "sample every prompt equally often (e.g. the small drywall set as often as cracks)", group=INPUTS
    )
    split: str = setting("train", "annotation split to train on", metavar="SPLIT", group=INPUTS)
    objective: str = setting(
        "supervised",
        "supervised: cross-entropy on the data's suffixes; grpo: reinforcement fine-tuning with the "
        "per-image mask IoU `paliseg eval` reports as the reward (start from a trained run: --init-run)",
        choices=OBJECTIVES,
        group=INPUTS,
    )
    checkpoint: str | None = setting(
        None,
        "base PaliGemma checkpoint (big_vision npz, HF safetensors, or ours)",
        metavar="BASE",
        group=INPUTS,
        exclusive="base",
    )
    init: str | None = setting(
        None,
        "start from a seeded random model instead (tiny demo runs)",
        choices=("random",),
        group=INPUTS,
        exclusive="base",
    )
    init_run: str | None = setting(
        None,
        "start from a checkpoint of this `paliseg train` run (LoRA merged in); its preset, dtype, tokenizer "
        "and seq-len apply unless given",
        metavar="RUN",
        group=INPUTS,
        exclusive="base",
    )
    init_step: str = setting(
        "best",
        "the --init-run step: best (recorded by paliseg eval), latest or a number; recorded as a number",
        metavar="STEP",
        group=INPUTS,
    )
    tokenizer: str | None = setting(
        None,
        "SentencePiece model (default: the preset's; the tiny presets bundle one, "
        "the 3B presets need paligemma_tokenizer.model)",
        metavar="PATH",
        group=INPUTS,
    )
    out: str = setting("", "run folder (config, checkpoints, metrics)", metavar="RUN_DIR", required=True, group=INPUTS)

    preset: str = setting("paligemma-3b-224", "model preset", metavar="NAME", choices=tuple(PRESETS), group=MODEL)
    seq_len: int = setting(
        128,
        "text tokens per example: bos + prefix + newline + suffix + eos, padded; longer examples are an error",
        metavar="N",
        at_least=8,
        group=MODEL,
    )
    dtype: str | None = setting(
        None,
        "dtype of the frozen base's weights and of the matmuls (default: the preset's; trainable parameters "
        "are float32)",
        choices=DTYPES,
        group=MODEL,
    )
    remat: bool = setting(
        True, "recompute activations in the backward pass, trading compute for memory", negatable=True, group=MODEL
    )
    # --base-dtype int8|nf4, --quantization-skip-vision, --quantization-double-scales
    quantization: QuantizationConfig = setting(QuantizationConfig(), group=MODEL)

    trainable: str = setting(
        "lora",
        "parameter set: LoRA adapters, the Gemma attention, or every parameter",
        choices=TRAINABLE_SETS,
        group=TRAINED,
    )
    lora: LoraConfig = setting(LoraConfig(rank=8), group=TRAINED)  # --lora-rank, --lora-alpha, ...

    steps: int = setting(200, "optimizer steps", metavar="N", at_least=1, group=OPTIMISATION)
    batch_size: int = setting(
        8, "examples per optimizer step, over all devices and hosts", metavar="B", at_least=1, group=OPTIMISATION
    )
    grad_accum: int = setting(
        1,
        "micro-batches per step; each holds batch_size / grad_accum examples",
        metavar="K",
        at_least=1,
        group=OPTIMISATION,
    )
    optimizer: str = setting("adamw", "optimizer", choices=OPTIMIZERS, group=OPTIMISATION)
    lr: float = setting(3e-4, "peak learning rate", metavar="LR", above=0, group=OPTIMISATION)
    warmup_fraction: float = setting(
        0.1,
        "share of the steps in linear warmup, then cosine to --min-lr-ratio * --lr",
        metavar="F",
        at_least=0,
        below=1,
        group=OPTIMISATION,
    )
    min_lr_ratio: float = setting(
        0.0, "final lr of the cosine, relative to --lr", metavar="F", at_least=0, at_most=1, group=OPTIMISATION
    )
    b1: float = setting(0.9, "AdamW beta1", metavar="B1", at_least=0, below=1, group=OPTIMISATION)
    b2: float = setting(0.999, "AdamW beta2", metavar="B2", at_least=0, below=1, group=OPTIMISATION)
    momentum: float = setting(0.0, "SGD momentum", metavar="M", at_least=0, below=1, group=OPTIMISATION)
    weight_decay: float = setting(
        0.0, "decoupled weight decay (AdamW), on matrices only", metavar="WD", at_least=0, group=OPTIMISATION
    )
    grad_clip: float = setting(1.0, "global-norm clip; 0 disables it", metavar="NORM", at_least=0, group=OPTIMISATION)
    label_smoothing: float = setting(
        0.0,
        "label smoothing (big_vision's refcoco_seg uses 0.3)",
        metavar="LS",
        at_least=0,
        below=1,
        group=OPTIMISATION,
    )
    seg_label_smoothing: float = setting(
        0.0,
        "at seg positions, the true code keeps 1 - S and S goes to the codes nearest to it in the run's VAE "
        "codebook (a near code draws a similar mask), so a near miss costs less than a far one; other positions "
        "keep --label-smoothing",
        metavar="S",
        at_least=0,
        below=1,
        group=OPTIMISATION,
    )
    mask_loss_weight: float = setting(
        0.0,
        "loss = token loss + W x mask loss: each object's seg-token distributions (teacher-forced) as expected "
        "codebook vectors, drawn by the run's frozen VAE decoder and compared with the ground-truth mask in the "
        "object's box (the data's mask files); 0 trains on tokens only",
        metavar="W",
        at_least=0,
        group=OPTIMISATION,
    )
    mask_loss: str = setting(
        "dice",
        "the mask loss of --mask-loss-weight: soft Dice or per-pixel binary cross-entropy, on the decoded 64x64 mask",
        choices=("dice", "bce"),
        group=OPTIMISATION,
    )
    mask_loss_codes: str = setting(
        "straight-through",
        "what the mask loss decodes at each seg position: the most likely code, with the gradient of the "
        "expected one (straight-through: the loss is that of the mask greedy decoding draws), or the expected "
        "code vector (probabilities x codebook)",
        choices=("straight-through", "expected"),
        group=OPTIMISATION,
    )
    seed: int = setting(0, "seeds data order, augmentation, adapters, dropout", metavar="S", group=OPTIMISATION)
    augment: bool = setting(
        True, "turn off the photometric augmentation (brightness, contrast, saturation)", group=OPTIMISATION
    )
    brightness: float = setting(
        0.2,
        "augmentation: largest brightness offset (on [0, 1] pixel values)",
        metavar="F",
        at_least=0,
        below=1,
        group=OPTIMISATION,
    )
    contrast: float = setting(
        0.2, "augmentation: contrast factors drawn from 1 +- F", metavar="F", at_least=0, below=1, group=OPTIMISATION
    )
    saturation: float = setting(
        0.2, "augmentation: saturation factors drawn from 1 +- F", metavar="F", at_least=0, below=1, group=OPTIMISATION
    )
    augment_geometric: bool = setting(
        False,
        "token-aware geometric augmentation (train.augment): zoom in or out and shift each image, padding with its "
        "mean colour; the loc tokens follow the boxes and the run's VAE re-encodes the seg tokens from the moved "
        "masks, so the suffix describes the pixels the model sees",
        group=OPTIMISATION,
    )
    augment_flip: bool = setting(
        False,
        "mirror half of the images left-right, with their boxes and masks (train.augment); this breaks prompts "
        "that say left or right",
        group=OPTIMISATION,
    )
    augment_min_scale: float = setting(
        0.8,
        "--augment-geometric: smallest zoom, drawn log-uniformly up to --augment-max-scale (below 1 the image "
        "shrinks inside a padded frame, above 1 the frame shows a crop of it)",
        metavar="S",
        above=0,
        group=OPTIMISATION,
    )
    augment_max_scale: float = setting(
        1.25, "--augment-geometric: largest zoom", metavar="S", above=0, group=OPTIMISATION
    )
    augment_max_shift: float = setting(
        0.1,
        "--augment-geometric: largest shift of the image along each axis, as a fraction of the frame",
        metavar="F",
        at_least=0,
        below=0.5,
        group=OPTIMISATION,
    )
    augment_min_visible: float = setting(
        0.3,
        "--augment-geometric: an object cut by the frame stays in the suffix, as its visible part, when at least "
        "this fraction of its mask's pixels is in the frame (of its box's area for a box-only object); else it "
        "is dropped",
        metavar="F",
        above=0,
        at_most=1,
        group=OPTIMISATION,
    )

    grpo: GrpoConfig = setting(GrpoConfig(), group=GRPO)  # --grpo-group-size, --grpo-kl-coef, ...

    save_every: int = setting(25, "checkpoint every N steps, all kept", metavar="N", at_least=1, group=EXECUTION)
    log_every: int = setting(1, "write metrics every N steps", metavar="N", at_least=1, group=EXECUTION)
    workers: int = setting(
        2,
        "data-loading processes (grain workers; 0: load in the training process)",
        metavar="N",
        at_least=0,
        group=EXECUTION,
    )
    prefetch: int = setting(
        2, "batches each loading process prepares at a time", metavar="N", at_least=1, group=EXECUTION
    )
    mesh_fsdp: int = setting(
        1,
        "devices that share one copy of the model (FSDP); the others replicate it (data parallel)",
        metavar="N",
        at_least=1,
        group=EXECUTION,
    )

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_fraction * (self.steps + 1)))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# --- `paliseg plan` (train.plan) ---------------------------------------------------------------------------

# The run settings a plan reads: those that change what the step computes, or holds in memory.
PLANNED_SETTINGS = (
    "checkpoint", "init_run", "init_step", "preset", "seq_len", "dtype", "remat", "quantization", "trainable",
    "lora", "batch_size", "grad_accum", "optimizer", "mesh_fsdp",
)  # fmt: skip
PLAN = "plan (`paliseg plan`, `paliseg train --plan`)"


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A device the plan knows: its dense bfloat16 peak (datasheet, without sparsity) and its memory."""

    name: str
    bf16_flops: float
    memory_gib: float  # the nominal size, which cards report in GiB


ACCELERATORS = (
    Accelerator("H100", 989e12, 80),  # SXM
    Accelerator("H200", 989e12, 141),
    Accelerator("A100", 312e12, 80),
    Accelerator("L4", 121e12, 24),
    Accelerator("RTX 4090", 165e12, 24),  # bf16 with float32 accumulation, as XLA asks for it
    Accelerator("TPU v5e", 197e12, 16),
)


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """What `paliseg plan` (and `paliseg train --plan`) assumes beyond the run's settings (`train.plan`)."""

    predict: bool = setting(
        False,
        "plan decoding (`paliseg predict`, `serve`: weights + KV cache) instead of a training step; --batch-size is "
        "then the decode batch (predict's --batch-size, serve's --max-batch)",
        group=PLAN,
    )
    max_new_tokens: int | None = setting(
        None, "--predict: tokens decoded per image (default: --seq-len, as predict decodes for a run)", metavar="N",
        at_least=1, group=PLAN)  # fmt: skip
    prompt_len: int = setting(
        16, "--predict: prompt tokens (padded to a multiple of 16, as predict pads them)", metavar="N", at_least=1,
        group=PLAN)  # fmt: skip
    accelerator: str = setting(
        "H100", f"the device the step time is for: {', '.join(a.name for a in ACCELERATORS)}", metavar="NAME",
        group=PLAN)  # fmt: skip
    mfu: float = setting(
        0.4, "model FLOPs utilisation the step time assumes: the share of the device's bf16 peak", metavar="F",
        above=0, at_most=1, group=PLAN)  # fmt: skip
    device_memory: str | None = setting(
        None, "memory of one device, e.g. 24GB (GB and GiB both mean 2^30 bytes here, as cards are sold): find "
        "the largest batch that fits it", metavar="SIZE", group=PLAN)  # fmt: skip
    margin: float = setting(
        0.1, "share of --device-memory left free (CUDA context, allocator fragmentation)", metavar="F", at_least=0,
        below=1, group=PLAN)  # fmt: skip
    devices: int | None = setting(
        None, "devices to plan for (default: this host's; on a CPU host, that many CPU devices)", metavar="N",
        at_least=1, group=PLAN)  # fmt: skip


# Run folders and config files written before the LoRA settings were nested: flat key -> nested field.
_LEGACY_KEYS = {"lora_rank": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_targets": "targets"}


def _upgrade_legacy(values: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` with the flat LoRA keys of older config files moved into `lora`, and `base_dtype` (before
    --dtype also set the matmuls') renamed `dtype` (a run's model config records what it computed in);
    a quantized `base_dtype` (int8, nf4: as the flag --base-dtype) is `quantization.format`."""
    if values.get("base_dtype") in QUANTIZED_DTYPES:
        quantization = dict(values.get("quantization") or {})
        if quantization.get("format") is not None:
            raise ValueError(f"{where}: both base_dtype and quantization.format are given")
        quantization["format"] = values["base_dtype"]
        values = {**{key: value for key, value in values.items() if key != "base_dtype"}, "quantization": quantization}
    if "base_dtype" in values:
        if "dtype" in values:
            raise ValueError(f"{where}: both base_dtype and dtype are given")
        values = {("dtype" if key == "base_dtype" else key): value for key, value in values.items()}
    flat = {key: values[key] for key in _LEGACY_KEYS if key in values}
    if not flat:
        return values
    lora = dict(values.get("lora") or {})
    for key, value in flat.items():
        if _LEGACY_KEYS[key] in lora:
            raise ValueError(f"{where}: both {key} and lora.{_LEGACY_KEYS[key]} are given")
        lora[_LEGACY_KEYS[key]] = value
    return {**{key: value for key, value in values.items() if key not in flat}, "lora": lora}


def from_dict(values: dict[str, Any], where: str = "config") -> TrainConfig:
    """Build a config from a mapping (nested: {"lora": {"rank": 16}}; the flat keys of older files too),
    rejecting unknown keys with the list of known ones."""
    return settings.from_dict(TrainConfig, _upgrade_legacy(values, where), where)


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings of a JSON config file (keys are TrainConfig fields, e.g. {"lr": 1e-4, "lora": {"rank": 16}})."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object of settings")
    values = _upgrade_legacy(values, str(path))
    from_dict(values, str(path))  # unknown keys fail here, naming the file
    return values


def merge(overrides: dict[str, Any], config_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """The settings of the config file, then the explicitly given overrides on top (nested like the config,
    as `settings.given` returns them; None means 'not given'); `train.run.resolve_config` completes them."""
    values = load_file(config_file) if config_file is not None else {}
    return settings.merge(values, overrides)


def finish(values: dict[str, Any]) -> TrainConfig:
    """The checked config of merged `values`, its paths made absolute."""
    config = absolute_paths(from_dict(values))
    validate(config)
    return config


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """Paths made absolute, so config.json says exactly which data and base checkpoint a run used."""

    def absolute(path: str | None) -> str | None:
        return None if path is None else os.path.abspath(os.path.expanduser(path))

    return config.replace(
        data=[absolute(d) for d in config.data],
        checkpoint=absolute(config.checkpoint),
        init_run=absolute(config.init_run),
        tokenizer=absolute(config.tokenizer),
        out=absolute(config.out) if config.out else "",
    )


def check_resume(saved: TrainConfig, requested: dict[str, Any]) -> TrainConfig:
    """The saved run config, with execution-only settings taken from `requested` (nested like the config).

    Any other explicitly requested value that differs from the saved one is an error: resuming with a
    different learning rate, batch or data would silently produce a run nobody asked for.
    """
    asked = absolute_paths(from_dict(settings.merge(saved.to_json(), requested)))
    conflicts = []
    changes = {}
    for key, value in settings.leaves(TrainConfig, requested).items():
        if value is None:
            continue
        if key in EXECUTION_FIELDS:
            changes[key] = getattr(asked, key)
        elif settings.lookup(asked, key) != settings.lookup(saved, key):
            conflicts.append(f"{key}={settings.lookup(asked, key)!r} (the run has {settings.lookup(saved, key)!r})")
    if conflicts:
        raise ValueError(
            "--resume: the run was started with other settings: "
            + "; ".join(conflicts)
            + ". Resume without them, or start a new run in another --out folder."
        )
    config = saved.replace(**changes)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Raise ValueError naming every bad setting: those the fields' declarations refuse (choices, bounds),
    then what depends on several settings. Nothing here touches data or devices."""
    problems = settings.refusals(config)

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    need(bool(config.data), "at least one --data folder is required")
    need(bool(config.out), "--out RUN_DIR is required")
    need(
        sum(source is not None for source in (config.checkpoint, config.init, config.init_run)) == 1,
        "give exactly one of --checkpoint BASE or --init random (or --init-run RUN)",
    )
    need(
        config.init_step in ("best", "latest") or config.init_step.isdigit(),
        f"--init-step must be best, latest or a step number, got {config.init_step!r}",
    )
    if config.objective == "grpo":
        grpo = config.grpo
        need(
            grpo.keep is None or grpo.keep <= grpo.group_size,
            f"--grpo-keep must be at most --grpo-group-size ({grpo.group_size}), got {grpo.keep}",
        )
        need(config.grad_accum == 1, "--objective grpo takes --grad-accum 1 (lower --batch-size or --grpo-group-size)")
        need(
            not config.mask_loss_weight,
            "--mask-loss-weight is a loss of --objective supervised; GRPO's reward is the mask IoU",
        )
        need(
            not config.seg_label_smoothing,
            "--seg-label-smoothing is a loss of --objective supervised; GRPO's reward is the mask IoU",
        )
    need(
        config.augment_min_scale <= config.augment_max_scale,
        f"--augment-min-scale {config.augment_min_scale} is above --augment-max-scale {config.augment_max_scale}",
    )
    need(
        config.objective != "grpo" or not (config.augment_geometric or config.augment_flip),
        "--augment-geometric and --augment-flip are for --objective supervised: GRPO's reward compares the "
        "completions with the untransformed ground truth",
    )
    if config.data_weights is not None:
        need(
            len(config.data_weights) == len(config.data),
            f"--data-weights has {len(config.data_weights)} values for {len(config.data)} --data folders",
        )
        need(all(math.isfinite(w) for w in config.data_weights), "--data-weights must be finite")
    need(
        not (config.balance_prompts and config.data_weights is not None),
        "--balance-prompts and --data-weights are exclusive (prompts or folders set the sampling weights)",
    )
    need(
        not config.quantization.enabled or config.trainable == "lora",
        f"--base-dtype {config.quantization.format} stores the frozen base quantized: it needs --trainable lora",
    )
    if config.batch_size >= 1 and config.grad_accum >= 1:
        need(
            config.batch_size % config.grad_accum == 0,
            f"--batch-size {config.batch_size} must be a multiple of --grad-accum {config.grad_accum}",
        )
    need(math.isfinite(config.lr), f"--lr must be finite, got {config.lr}")
    need(config.lora.rank >= 1, f"--lora-rank must be at least 1, got {config.lora.rank}")
    need(config.lora.alpha > 0, f"--lora-alpha must be positive, got {config.lora.alpha}")
    need(0 <= config.lora.dropout < 1, f"--lora-dropout must be in [0, 1), got {config.lora.dropout}")
    need(
        bool(config.lora.targets),  # LoraConfig itself refuses unknown targets
        f"--lora-targets must be a non-empty subset of {','.join(LLM_LORA_TARGETS + IMG_LORA_TARGETS)}",
    )
    if problems:
        raise ValueError("bad training settings:\n  " + "\n  ".join(problems))


@dataclasses.dataclass(frozen=True)
class ProcessSettings:
    """How this process joins the others of a job over several hosts (`jax.distributed`; `paliseg train` and
    `paliseg eval`): not a setting of the run."""

    distributed: bool = setting(
        False, "multi-host: call jax.distributed.initialize() and let it find the peers", group=EXECUTION
    )
    coordinator: str | None = setting(None, "multi-host: address of process 0", metavar="HOST:PORT", group=EXECUTION)
    num_processes: int | None = setting(
        None, "multi-host: number of processes", metavar="N", at_least=1, group=EXECUTION
    )
    process_id: int | None = setting(None, "multi-host: this process's index", metavar="I", at_least=0, group=EXECUTION)

    def __post_init__(self):
        settings.check(self)
        explicit = (self.coordinator, self.num_processes, self.process_id)
        if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
            raise ValueError("multi-host needs all of --coordinator, --num-processes and --process-id")

    @property
    def joins(self) -> bool:
        return self.distributed or self.coordinator is not None
