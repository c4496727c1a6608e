"""A training run folder as one object: what later stages (eval, predict, the demo) read from RUN_DIR.

    RUN_DIR/config.json              the resolved TrainConfig and ModelConfig ({"train": ..., "model": ...}),
                                     the SHA-256 of each folder's annotations ("data_sha256") and the
                                     identity of the VAE that wrote their seg tokens ("vae", or null)
    RUN_DIR/checkpoints/<step>/      trainable params + optimizer state (orbax, `train.checkpoints`)
    RUN_DIR/metrics.csv, tb/         the training metrics (`train.loop`)
    RUN_DIR/best.json                the best step, recorded by `paliseg eval` (`record_best`)

    run = Run("runs/r1")                  # config.json parsed once
    run.train_config, run.model_config    # TrainConfig, ModelConfig
    run.steps                             # [25, 50, ...]: steps with a complete checkpoint
    run.resolve_step("best")              # "best", "latest"/None or an int -> a step (0 = the base)
    model_cfg, params = run.load(50)      # full tree, LoRA folded into the base (merge_lora=False keeps it;
                                          # so does a run on a quantized base)
    run.vae                               # vae.identity.VaeIdentity of the data's VAE, or None

Step 0 is the base the run started from: the base checkpoint with zero-effect LoRA adapters, or the seeded
random init of `--init random`. To export a merged model: `paliseg.checkpoints.save(path, params, model_cfg)`.

Where a new run starts lives here too, since a run may start from another run's checkpoint (--init-run):
`resolve_config` (its settings), `model_config` (the model it trains), `initial_params` (its step 0).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from paliseg import checkpoints as base_checkpoints
from paliseg import config as model_configs
from paliseg import console, files, model
from paliseg.config import ModelConfig
from train import checkpoints, sharding
from train import config as train_config
from train import params as param_sets
from vae import identity

CONFIG_FILE = "config.json"
BEST_FILE = "best.json"
METRICS_FILE = "metrics.csv"


def is_run(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / CONFIG_FILE).is_file()


def write_config(
    run_dir: str | os.PathLike,
    config: train_config.TrainConfig,
    model_cfg: ModelConfig,
    data_digests: dict[str, str],
    vae: identity.VaeIdentity | None,
) -> None:
    """RUN_DIR/config.json at the start of a run (see the module docstring); a resumed run keeps it."""
    files.write_json(Path(run_dir) / CONFIG_FILE, {
        "train": config.to_json(), "model": model_cfg.to_dict(), "data_sha256": data_digests,
        "vae": None if vae is None else vae.to_json()})  # fmt: skip


def data_vae(folders: list[str]) -> identity.VaeIdentity | None:
    """The VAE recorded by the conversion of the --data folders, which must agree; None (with a note on
    stderr) when none recorded one. Folders converted before the record existed are named on stderr."""
    recorded = {folder: identity.of_data(folder) for folder in folders}
    known = {folder: vae for folder, vae in recorded.items() if vae is not None}
    digests = {vae.sha256 for vae in known.values()}
    if len(digests) > 1:
        listed = "; ".join(f"{folder}: {vae.sha256}" for folder, vae in known.items())
        raise ValueError(
            f"the --data folders were converted with different VAEs ({listed}); their seg tokens "
            "do not mean the same masks. Convert them with one VAE (paliseg convert --vae PATH)"
        )
    unknown = [folder for folder, vae in recorded.items() if vae is None]
    if unknown:
        console.info(
            f"note: no VAE is recorded in the conversion.json of {', '.join(unknown)} (converted by an "
            "older paliseg, or not by `paliseg convert`); "
            + (
                "the run records the VAE of the others"
                if known
                else "the run records none, so eval and predict use --vae or the default VAE"
            )
        )
    return next(iter(known.values()), None)


class Run:
    """A `paliseg train` run folder, its config.json read once; checkpoints and the frozen base on demand."""

    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir)
        path = self.dir / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; is {run_dir} a `paliseg train` run folder?")
        content = path.read_bytes()
        try:
            data = json.loads(content)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        self.config_sha256 = hashlib.sha256(content).hexdigest()  # what a cached prediction depends on
        self.train_config = train_config.from_dict(data["train"], str(path))
        self.model_config = ModelConfig.from_dict(data["model"])
        self.data_sha256: dict[str, str] = data.get("data_sha256", {})
        self.vae = None if data.get("vae") is None else identity.VaeIdentity.from_json(data["vae"], str(path))
        self._frozen: dict | None = None

    @classmethod
    def open(cls, run: Run | str | os.PathLike) -> Run:
        """`run` itself when it is already a Run, else the run in that folder."""
        return run if isinstance(run, Run) else cls(run)

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"

    @property
    def steps(self) -> list[int]:
        """The steps that have a complete checkpoint, in increasing order (read anew: training may go on)."""
        return checkpoints.list_steps(self.dir)

    def check_same_data(self, digests: dict[str, str]) -> None:
        """Refuse to resume on changed annotations: the sampler would draw other examples than the run did."""
        changed = sorted(folder for folder, digest in self.data_sha256.items() if digests.get(folder) != digest)
        if changed:
            raise ValueError(
                f"--resume: the annotations of {', '.join(changed)} changed since the run started; "
                "resuming would not continue the same run. Start a new run in another --out folder."
            )

    # --- the best step ----------------------------------------------------------------------------------

    @property
    def best_path(self) -> Path:
        return self.dir / BEST_FILE

    @property
    def best(self) -> dict[str, Any] | None:
        """What `record_best` recorded (step, metric, value, the report...), or None."""
        return json.loads(self.best_path.read_text(encoding="utf-8")) if self.best_path.is_file() else None

    def record_best(self, best: dict[str, Any]) -> None:
        """Record the best step (`best["step"]` and how it was chosen) for `resolve_step("best")`."""
        files.write_json(self.best_path, best)

    def resolve_step(self, step: int | str | None) -> int:
        """ "best" (recorded by `paliseg eval`), "latest"/None, or an int (0 = the base)."""
        if step == "best":
            best = self.best
            if best is None:
                raise FileNotFoundError(
                    f"{self.best_path}: no best step recorded yet; run `paliseg eval {self.dir} ...` "
                    "first, or pass --step N"
                )
            return int(best["step"])
        if step is None or step == "latest":
            steps = self.steps
            if not steps:
                raise FileNotFoundError(f"{self.dir}: no checkpoint yet")
            return steps[-1]
        try:
            return int(step)
        except ValueError:
            raise ValueError(f"step must be an integer, 'best' or 'latest', got {step!r}") from None

    # --- parameters -------------------------------------------------------------------------------------

    def frozen_params(self) -> dict:
        """The parameters no checkpoint holds, because training never changes them: the base checkpoint (or
        the seeded random init) minus the trainable set; empty for `--trainable all`. Every step shares
        them: loaded once, then kept."""
        if self._frozen is None:
            all_trainable = self.train_config.trainable == "all"
            self._frozen = {} if all_trainable else initial_params(self.train_config, self.model_config)[0]
        return self._frozen

    def load(
        self, step: int | None = None, merge_lora: bool = True, frozen: dict | None = None
    ) -> tuple[ModelConfig, dict]:
        """(model config, full params) of checkpoint `step` (default: the latest; 0: the base).

        With `merge_lora` (default) the adapters are folded into the base and the returned config has LoRA
        off, so the params run at the base model's speed; otherwise the config keeps LoRA and the tree holds
        the adapters. A run trained on a quantized base (--base-dtype) always keeps its adapters beside that
        very base: folding them in would quantize the sum anew. `frozen`: the run's `frozen_params`, when
        already in memory elsewhere.
        """
        step = self.resolve_step(None) if step is None else step
        if step == 0:
            base, trainable = initial_params(self.train_config, self.model_config)
            if self._frozen is None and frozen is None and self.train_config.trainable != "all":
                self._frozen = base
        else:
            steps = self.steps
            if step not in steps:
                raise ValueError(
                    f"{self.dir}: no checkpoint at step {step}; saved steps: " + (", ".join(map(str, steps)) or "none")
                )
            _, trainable_shapes = param_sets.abstract(self.train_config, self.model_config)
            trainable = checkpoints.restore_params(self.dir, step, trainable_shapes)
            base = self.frozen_params() if frozen is None else frozen
        params = param_sets.join(base, trainable)
        model_cfg = self.model_config
        if merge_lora and merges_lora(model_cfg):
            params = model.merge_lora(params, model_cfg)
            model_cfg = model_cfg.replace(lora={"rank": 0})
        return model_cfg, params


def merges_lora(model_cfg: ModelConfig) -> bool:
    """Whether `Run.load` folds a run's adapters into its base by default: LoRA on, over a base that is not
    quantized (folded into a quantized base, the sum would be quantized anew)."""
    return model_cfg.lora.enabled and not model_cfg.quantization.enabled


# --- where a new run starts -------------------------------------------------------------------------------


def resolve_config(requested: dict[str, Any], config_file: str | os.PathLike | None = None) -> train_config.TrainConfig:
    """A new run's settings: defaults, then the config file, then the `requested` flags (nested as
    `settings.given` returns them; None: not given), then for an --init-run the settings of
    INHERITED_FROM_INIT_RUN that are not given, taken from that run, and --init-step resolved to a number
    (config.json then names the exact starting point even if the other run's best step changes later)."""
    values = train_config.merge(requested, config_file)
    if values.get("init_run"):
        run = Run(values["init_run"])
        inherited = {
            key: getattr(run.train_config, key)
            for key in train_config.INHERITED_FROM_INIT_RUN
            if values.get(key) is None
        }
        step = run.resolve_step(values.get("init_step", "best"))
        if step and step not in run.steps:
            raise ValueError(f"--init-step {step}: {run.dir} has no checkpoint at that step (saved: {run.steps})")
        values = {**values, **inherited, "init_step": str(step)}
    return train_config.finish(values)


def model_config(config: train_config.TrainConfig) -> ModelConfig:
    """The model a run trains: the preset (or the --init-run's model) in the run's --dtype, with LoRA on for
    `--trainable lora`, the run's remat and quantized base (--base-dtype)."""
    if config.init_run:  # the model that run trained (an HF folder's config, say), not only its preset
        base = Run(config.init_run).model_config.with_dtype(config.dtype)
    else:
        base = model_configs.preset(config.preset).with_dtype(config.dtype)
    lora_config = config.lora if config.trainable == "lora" else dataclasses.replace(config.lora, rank=0)
    return dataclasses.replace(base, lora=lora_config, remat=config.remat, quantization=config.quantization)


def initial_params(
    config: train_config.TrainConfig, model_cfg: ModelConfig, shardings: Any = None
) -> tuple[dict, dict]:
    """(frozen, trainable) at step 0: the base checkpoint (or the --init-run's checkpoint, its LoRA merged)
    with fresh LoRA adapters (seeded), or a seeded random model for `--init random`. `shardings` is a
    (frozen, trainable) pair of NamedSharding trees. A quantized base (`model_cfg.quantization`) is
    quantized as it loads (the random init creates it quantized)."""
    if config.init == "random":
        return param_sets.random_init(config, model_cfg, shardings)
    base = _base_params(config, model_cfg)
    if config.trainable != "lora":
        frozen, trainable = param_sets.split(base, config.trainable)
        return sharding.place((frozen, trainable), shardings)
    # Only the adapters are initialised: jit drops the base's initialisers, whose results are unused.
    adapters = jax.jit(
        lambda key: param_sets.split(model.init_params(model_cfg, key), "lora")[1],
        out_shardings=None if shardings is None else shardings[1],
    )(jax.random.key(config.seed))
    return sharding.place(base, None if shardings is None else shardings[0]), adapters


def _base_params(config: train_config.TrainConfig, model_cfg: ModelConfig) -> dict:
    """The full tree a run starts from, without adapters: --checkpoint, or --init-run at --init-step."""
    if config.init_run:
        run = Run(config.init_run)
        _, base = run.load(run.resolve_step(config.init_step))  # LoRA merged: the policy that run reached
        return jax.tree_util.tree_map(lambda x: jnp.asarray(x, model_cfg.param_dtype), base)
    _, base = base_checkpoints.load(
        config.checkpoint,
        preset=config.preset,
        vocab_size=model_cfg.llm.vocab_size,
        param_dtype=model_cfg.param_dtype,
        lora={"rank": 0},
        quantization=model_cfg.quantization,  # quantized leaf by leaf as it loads
    )
    return base
