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
                              metavar="G")  # fmt: skip
    temperature: float = setting(1.0, "sampling temperature of the completions", metavar="T")
    top_p: float = setting(1.0, "sampling nucleus of the completions (1 keeps every token)", metavar="P")
    max_new_tokens: int | None = setting(
        None, "decoding budget of each completion (default: --seq-len, as paliseg eval decodes)", metavar="N"
    )
    clip_epsilon: float = setting(0.2, "PPO clip range of the probability ratio", metavar="EPS")
    kl_coef: float = setting(
        0.04, "weight of the KL penalty (k3 estimator) to the frozen starting policy; 0 skips it", metavar="BETA"
    )
    updates_per_batch: int = setting(
        1, "optimizer updates on each batch of completions (ratios against the policy that sampled them)",
        metavar="K")  # fmt: skip
    box_weight: float = setting(0.0, "reward = mask IoU + this weight x the Hungarian-matched box mIoU", metavar="W")
    keep: int | None = setting(
        None, "update on only K of each group's G completions, the K/2 best and K/2 worst rewarded (max-variance "
        "down-sampling, PODS): sampling is cheap, updates are not, so a larger G costs little (default: all G)",
        metavar="K")  # fmt: skip


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; `paliseg train` derives its flags from these declarations (paliseg.settings)."""

    data: list[str] = setting([], "converted data folder (repeatable)", metavar="DIR", items="repeated", group=INPUTS)
    data_weights: list[float] | None = setting(
        None, "sampling weight of each --data folder (default: proportional to size)", metavar="W1,W2", group=INPUTS
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

    steps: int = setting(200, "optimizer steps", metavar="N", group=OPTIMISATION)
    batch_size: int = setting(
        8, "examples per optimizer step, over all devices and hosts", metavar="B", group=OPTIMISATION
    )
    grad_accum: int = setting(
        1, "micro-batches per step; each holds batch_size / grad_accum examples", metavar="K", group=OPTIMISATION
    )
    optimizer: str = setting("adamw", "optimizer", choices=OPTIMIZERS, group=OPTIMISATION)
    lr: float = setting(3e-4, "peak learning rate", metavar="LR", group=OPTIMISATION)
    warmup_fraction: float = setting(
        0.1,
        "share of the steps in linear warmup, then cosine to --min-lr-ratio * --lr",
        metavar="F",
        group=OPTIMISATION,
    )
    min_lr_ratio: float = setting(0.0, "final lr of the cosine, relative to --lr", metavar="F", group=OPTIMISATION)
    b1: float = setting(0.9, "AdamW beta1", metavar="B1", group=OPTIMISATION)
    b2: float = setting(0.999, "AdamW beta2", metavar="B2", group=OPTIMISATION)
    momentum: float = setting(0.0, "SGD momentum", metavar="M", group=OPTIMISATION)
    weight_decay: float = setting(
        0.0, "decoupled weight decay (AdamW), on matrices only", metavar="WD", group=OPTIMISATION
    )
    grad_clip: float = setting(1.0, "global-norm clip; 0 disables it", metavar="NORM", group=OPTIMISATION)
    label_smoothing: float = setting(
        0.0, "label smoothing (big_vision's refcoco_seg uses 0.3)", metavar="LS", group=OPTIMISATION
    )
    seed: int = setting(0, "seeds data order, augmentation, adapters, dropout", metavar="S", group=OPTIMISATION)
    augment: bool = setting(
        True, "turn off the photometric augmentation (brightness, contrast, saturation)", group=OPTIMISATION
    )
    brightness: float = setting(
        0.2, "augmentation: largest brightness offset (on [0, 1] pixel values)", metavar="F", group=OPTIMISATION
    )
    contrast: float = setting(0.2, "augmentation: contrast factors drawn from 1 +- F", metavar="F", group=OPTIMISATION)
    saturation: float = setting(
        0.2, "augmentation: saturation factors drawn from 1 +- F", metavar="F", group=OPTIMISATION
    )

    grpo: GrpoConfig = setting(GrpoConfig(), group=GRPO)  # --grpo-group-size, --grpo-kl-coef, ...

    save_every: int = setting(25, "checkpoint every N steps, all kept", metavar="N", group=EXECUTION)
    log_every: int = setting(1, "write metrics every N steps", metavar="N", group=EXECUTION)
    workers: int = setting(4, "image-loading threads", metavar="N", group=EXECUTION)
    prefetch: int = setting(2, "batches loaded ahead", metavar="N", group=EXECUTION)
    mesh_fsdp: int = setting(
        1,
        "devices that share one copy of the model (FSDP); the others replicate it (data parallel)",
        metavar="N",
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
    """Raise ValueError naming every bad setting; nothing here touches data or devices."""
    problems: list[str] = []

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    need(bool(config.data), "at least one --data folder is required")
    need(bool(config.out), "--out RUN_DIR is required")
    need(
        sum(source is not None for source in (config.checkpoint, config.init, config.init_run)) == 1,
        "give exactly one of --checkpoint BASE or --init random (or --init-run RUN)",
    )
    need(config.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}")
    need(
        config.init_step in ("best", "latest") or config.init_step.isdigit(),
        f"--init-step must be best, latest or a step number, got {config.init_step!r}",
    )
    if config.objective == "grpo":
        grpo = config.grpo
        need(
            grpo.group_size >= 2,
            f"--grpo-group-size must be at least 2 (advantages compare samples), got {grpo.group_size}",
        )
        need(grpo.temperature > 0, f"--grpo-temperature must be positive (sampling), got {grpo.temperature}")
        need(0 < grpo.top_p <= 1, f"--grpo-top-p must be in (0, 1], got {grpo.top_p}")
        need(
            grpo.max_new_tokens is None or grpo.max_new_tokens >= 2,
            f"--grpo-max-new-tokens must be at least 2, got {grpo.max_new_tokens}",
        )
        need(grpo.clip_epsilon > 0, f"--grpo-clip-epsilon must be positive, got {grpo.clip_epsilon}")
        need(grpo.kl_coef >= 0, f"--grpo-kl-coef must be >= 0, got {grpo.kl_coef}")
        need(grpo.updates_per_batch >= 1, f"--grpo-updates-per-batch must be at least 1, got {grpo.updates_per_batch}")
        need(grpo.box_weight >= 0, f"--grpo-box-weight must be >= 0, got {grpo.box_weight}")
        need(
            grpo.keep is None or 2 <= grpo.keep <= grpo.group_size,
            f"--grpo-keep must be between 2 and --grpo-group-size ({grpo.group_size}), got {grpo.keep}",
        )
        need(config.grad_accum == 1, "--objective grpo takes --grad-accum 1 (lower --batch-size or --grpo-group-size)")
    need(config.init in (None, "random"), f"--init must be 'random', got {config.init!r}")
    if config.data_weights is not None:
        need(
            len(config.data_weights) == len(config.data),
            f"--data-weights has {len(config.data_weights)} values for {len(config.data)} --data folders",
        )
        need(all(w > 0 and math.isfinite(w) for w in config.data_weights), "--data-weights must be positive")
    need(
        not (config.balance_prompts and config.data_weights is not None),
        "--balance-prompts and --data-weights are exclusive (prompts or folders set the sampling weights)",
    )
    need(config.preset in PRESETS, f"--preset must be one of {', '.join(PRESETS)}, got {config.preset!r}")
    need(config.trainable in TRAINABLE_SETS, f"--trainable must be one of {', '.join(TRAINABLE_SETS)}")
    need(config.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
    need(config.dtype in (None, *DTYPES), f"--dtype must be one of {', '.join(DTYPES)}")
    need(
        not config.quantization.enabled or config.trainable == "lora",
        f"--base-dtype {config.quantization.format} stores the frozen base quantized: it needs --trainable lora",
    )
    need(config.seq_len >= 8, f"--seq-len must be at least 8, got {config.seq_len}")
    need(config.steps >= 1, f"--steps must be at least 1, got {config.steps}")
    need(config.batch_size >= 1, f"--batch-size must be at least 1, got {config.batch_size}")
    need(config.grad_accum >= 1, f"--grad-accum must be at least 1, got {config.grad_accum}")
    if config.batch_size >= 1 and config.grad_accum >= 1:
        need(
            config.batch_size % config.grad_accum == 0,
            f"--batch-size {config.batch_size} must be a multiple of --grad-accum {config.grad_accum}",
        )
    need(config.lr > 0 and math.isfinite(config.lr), f"--lr must be positive, got {config.lr}")
    need(0 <= config.warmup_fraction < 1, f"--warmup-fraction must be in [0, 1), got {config.warmup_fraction}")
    need(0 <= config.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {config.min_lr_ratio}")
    need(0 <= config.b1 < 1 and 0 <= config.b2 < 1, "--b1 and --b2 must be in [0, 1)")
    need(0 <= config.momentum < 1, f"--momentum must be in [0, 1), got {config.momentum}")
    need(config.weight_decay >= 0, f"--weight-decay must be >= 0, got {config.weight_decay}")
    need(config.grad_clip >= 0, f"--grad-clip must be >= 0 (0 disables it), got {config.grad_clip}")
    need(0 <= config.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {config.label_smoothing}")
    need(config.lora.rank >= 1, f"--lora-rank must be at least 1, got {config.lora.rank}")
    need(config.lora.alpha > 0, f"--lora-alpha must be positive, got {config.lora.alpha}")
    need(0 <= config.lora.dropout < 1, f"--lora-dropout must be in [0, 1), got {config.lora.dropout}")
    need(
        bool(config.lora.targets),  # LoraConfig itself refuses unknown targets
        f"--lora-targets must be a non-empty subset of {','.join(LLM_LORA_TARGETS + IMG_LORA_TARGETS)}",
    )
    for name in ("brightness", "contrast", "saturation"):
        need(0 <= getattr(config, name) < 1, f"--{name} must be in [0, 1), got {getattr(config, name)}")
    need(config.workers >= 1, f"--workers must be at least 1, got {config.workers}")
    need(config.prefetch >= 1, f"--prefetch must be at least 1, got {config.prefetch}")
    need(config.save_every >= 1, f"--save-every must be at least 1, got {config.save_every}")
    need(config.log_every >= 1, f"--log-every must be at least 1, got {config.log_every}")
    need(config.mesh_fsdp >= 1, f"--mesh-fsdp must be at least 1, got {config.mesh_fsdp}")
    if problems:
        raise ValueError("bad training settings:\n  " + "\n  ".join(problems))
