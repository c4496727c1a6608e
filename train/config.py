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

from paliseg.config import IMG_LORA_TARGETS, LLM_LORA_TARGETS, PRESETS

TRAINABLE_SETS = ("lora", "attn", "all")
OPTIMIZERS = ("adamw", "sgd")
DTYPES = ("bfloat16", "float16", "float32")

# Settings that change how a run executes but not what it computes: a resumed run may change them.
# (`out` too: a run folder may be moved.)
EXECUTION_FIELDS = frozenset({"out", "workers", "prefetch", "log_every", "save_every", "mesh_fsdp"})


@dataclasses.dataclass
class TrainConfig:
    # Inputs and outputs.
    data: list[str] = dataclasses.field(default_factory=list)
    data_weights: list[float] | None = None  # sampling weight per --data folder; None: proportional to size
    balance_prompts: bool = False  # sample every prompt ("segment crack", "segment taping area") equally
    split: str = "train"
    checkpoint: str | None = None  # base PaliGemma checkpoint (big_vision npz, HF safetensors, or ours)
    init: str | None = None  # "random": no base checkpoint, a seeded random model (tiny demo runs)
    tokenizer: str | None = None  # SentencePiece model; None: the preset's default
    out: str = ""
    # Model.
    preset: str = "paligemma-3b-224"
    seq_len: int = 128  # text tokens per example: bos + prefix + "\n" + suffix + eos, padded
    base_dtype: str | None = None  # dtype of the frozen base; None: the preset's (trainable ones are float32)
    remat: bool = True  # recompute activations in the backward pass (memory for compute)
    # What is trained.
    trainable: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    # Gemma projections q,k,v,o,gate,up,down; add img_q,img_k,img_v,img_o,img_fc1,img_fc2 to adapt SigLIP too.
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: list(LLM_LORA_TARGETS))
    # Optimisation.
    steps: int = 200
    batch_size: int = 8  # examples per optimizer step, over all devices and hosts
    grad_accum: int = 1  # micro-batches per step; each holds batch_size / grad_accum examples
    optimizer: str = "adamw"
    lr: float = 3e-4
    warmup_fraction: float = 0.1  # linear warmup over this share of the steps, then cosine to min_lr_ratio*lr
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    momentum: float = 0.0  # SGD only
    weight_decay: float = 0.0  # decoupled (AdamW), on matrices only
    grad_clip: float = 1.0  # global-norm clipping; 0 disables it
    label_smoothing: float = 0.0
    seed: int = 0
    # Input pipeline.
    augment: bool = True  # photometric: brightness, contrast, saturation
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    workers: int = 4
    prefetch: int = 2
    # Checkpoints, logging, devices.
    save_every: int = 25
    log_every: int = 1
    mesh_fsdp: int = 1  # devices per FSDP group; the rest of the devices form the data axis

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_fraction * (self.steps + 1)))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


_FIELDS = {field.name: field for field in dataclasses.fields(TrainConfig)}


def from_dict(values: dict[str, Any], where: str = "config") -> TrainConfig:
    """Build a config from a mapping, rejecting unknown keys with the list of known ones."""
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
    return TrainConfig(**values)


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings of a JSON config file (keys are TrainConfig fields, e.g. {"lr": 1e-4, "steps": 500})."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object of settings")
    from_dict(values, str(path))  # unknown keys fail here, naming the file
    return values


def resolve(overrides: dict[str, Any], config_file: str | os.PathLike | None = None) -> TrainConfig:
    """Defaults, then the config file, then the explicitly given overrides (None means 'not given')."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(load_file(config_file))
    values.update({key: value for key, value in overrides.items() if value is not None})
    config = absolute_paths(from_dict(values))
    validate(config)
    return config


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """Paths made absolute, so config.json says exactly which data and base checkpoint a run used."""

    def absolute(path: str | None) -> str | None:
        return None if path is None else os.path.abspath(os.path.expanduser(path))

    return config.replace(data=[absolute(d) for d in config.data], checkpoint=absolute(config.checkpoint),
                          tokenizer=absolute(config.tokenizer), out=absolute(config.out) if config.out else "")


def check_resume(saved: TrainConfig, requested: dict[str, Any]) -> TrainConfig:
    """The saved run config, with execution-only settings taken from `requested`.

    Any other explicitly requested value that differs from the saved one is an error: resuming with a
    different learning rate, batch or data would silently produce a run nobody asked for.
    """
    conflicts = []
    changes = {}
    given = {key: value for key, value in requested.items() if value is not None and key in _FIELDS}
    given = {key: value for key, value in dataclasses.asdict(absolute_paths(saved.replace(**given))).items()
             if key in given}
    for key, value in given.items():
        if key in EXECUTION_FIELDS:
            changes[key] = value
        elif _normalise(value) != _normalise(getattr(saved, key)):
            conflicts.append(f"{key}={value!r} (the run has {getattr(saved, key)!r})")
    if conflicts:
        raise ValueError("--resume: the run was started with other settings: " + "; ".join(conflicts)
                         + ". Resume without them, or start a new run in another --out folder.")
    config = saved.replace(**changes)
    validate(config)
    return config


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def validate(config: TrainConfig) -> None:
    """Raise ValueError naming every bad setting; nothing here touches data or devices."""
    problems: list[str] = []

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    need(bool(config.data), "at least one --data folder is required")
    need(bool(config.out), "--out RUN_DIR is required")
    need((config.checkpoint is None) != (config.init is None),
         "give exactly one of --checkpoint BASE or --init random")
    need(config.init in (None, "random"), f"--init must be 'random', got {config.init!r}")
    if config.data_weights is not None:
        need(len(config.data_weights) == len(config.data),
             f"--data-weights has {len(config.data_weights)} values for {len(config.data)} --data folders")
        need(all(w > 0 and math.isfinite(w) for w in config.data_weights), "--data-weights must be positive")
    need(not (config.balance_prompts and config.data_weights is not None),
         "--balance-prompts and --data-weights are exclusive (prompts or folders set the sampling weights)")
    need(config.preset in PRESETS, f"--preset must be one of {', '.join(PRESETS)}, got {config.preset!r}")
    need(config.trainable in TRAINABLE_SETS, f"--trainable must be one of {', '.join(TRAINABLE_SETS)}")
    need(config.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
    need(config.base_dtype in (None, *DTYPES), f"base_dtype must be one of {', '.join(DTYPES)}")
    need(config.seq_len >= 8, f"--seq-len must be at least 8, got {config.seq_len}")
    need(config.steps >= 1, f"--steps must be at least 1, got {config.steps}")
    need(config.batch_size >= 1, f"--batch-size must be at least 1, got {config.batch_size}")
    need(config.grad_accum >= 1, f"--grad-accum must be at least 1, got {config.grad_accum}")
    if config.batch_size >= 1 and config.grad_accum >= 1:
        need(config.batch_size % config.grad_accum == 0,
             f"--batch-size {config.batch_size} must be a multiple of --grad-accum {config.grad_accum}")
    need(config.lr > 0 and math.isfinite(config.lr), f"--lr must be positive, got {config.lr}")
    need(0 <= config.warmup_fraction < 1, f"warmup_fraction must be in [0, 1), got {config.warmup_fraction}")
    need(0 <= config.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {config.min_lr_ratio}")
    need(0 <= config.b1 < 1 and 0 <= config.b2 < 1, "b1 and b2 must be in [0, 1)")
    need(0 <= config.momentum < 1, f"momentum must be in [0, 1), got {config.momentum}")
    need(config.weight_decay >= 0, f"--weight-decay must be >= 0, got {config.weight_decay}")
    need(config.grad_clip >= 0, f"--grad-clip must be >= 0 (0 disables it), got {config.grad_clip}")
    need(0 <= config.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {config.label_smoothing}")
    need(config.lora_rank >= 1, f"--lora-rank must be at least 1, got {config.lora_rank}")
    need(config.lora_alpha > 0, f"--lora-alpha must be positive, got {config.lora_alpha}")
    need(0 <= config.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {config.lora_dropout}")
    bad_targets = sorted(set(config.lora_targets) - set(LLM_LORA_TARGETS + IMG_LORA_TARGETS))
    need(bool(config.lora_targets) and not bad_targets,
         f"--lora-targets must be a non-empty subset of {','.join(LLM_LORA_TARGETS + IMG_LORA_TARGETS)}"
         + (f"; unknown: {','.join(bad_targets)}" if bad_targets else ""))
    for name in ("brightness", "contrast", "saturation"):
        need(0 <= getattr(config, name) < 1, f"{name} must be in [0, 1), got {getattr(config, name)}")
    need(config.workers >= 1, f"--workers must be at least 1, got {config.workers}")
    need(config.prefetch >= 1, f"--prefetch must be at least 1, got {config.prefetch}")
    need(config.save_every >= 1, f"--save-every must be at least 1, got {config.save_every}")
    need(config.log_every >= 1, f"--log-every must be at least 1, got {config.log_every}")
    need(config.mesh_fsdp >= 1, f"--mesh-fsdp must be at least 1, got {config.mesh_fsdp}")
    if problems:
        raise ValueError("bad training settings:\n  " + "\n  ".join(problems))
