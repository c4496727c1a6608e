"""The settings of `paliseg predict`, `paliseg eval` and `paliseg serve`, from which `infer.commands` derives
their flags (`paliseg.settings`), and which `infer.sweep.evaluate_run` and `infer.serve` take.

Apart from the commands' machinery so that registering the command line loads no jax, fastapi or model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from paliseg import settings
from paliseg.config import DTYPES, PRESETS, QUANTIZED_DTYPES
from paliseg.settings import setting

# Metrics the best checkpoint can be chosen by (all: higher is better), keys of `metrics.aggregate`.
METRICS = ("miou", "mdice", "ciou", "box_miou", "box_acc50", "box_acc75", "p10", "p50", "p90")

# The argument groups of the commands' --help.
MODEL = "model (--run or --checkpoint)"
DECODING = "weights and decoding"
INPUTS_OUTPUTS = "inputs and outputs"
SCORED = "what is scored"
SERVER = "server"


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Which model `paliseg predict` and `paliseg serve` load: a run's checkpoint, or any checkpoint."""

    run_dir: Path | None = setting(
        None, "a `paliseg train` run folder", flag="--run", metavar="RUN_DIR", group=MODEL, exclusive="model",
        required=True,
    )  # fmt: skip
    checkpoint: Path | None = setting(
        None, "a checkpoint file or folder: a big_vision .npz (or its first .part0 piece), a Hugging Face folder, "
        "or a paliseg checkpoint", metavar="PATH", group=MODEL, exclusive="model", required=True,
    )  # fmt: skip
    step: str | None = setting(
        None, "the run's step: a number (0: the base before fine-tuning), best (the step `paliseg eval` chose) or "
        "latest (default: best if recorded, else latest)", metavar="N|best|latest", group=MODEL,
    )  # fmt: skip
    preset: str | None = setting(
        None, "model sizes of a big_vision .npz (default: the one preset they fit)", metavar="NAME",
        choices=tuple(PRESETS), group=MODEL,
    )  # fmt: skip
    tokenizer: Path | None = setting(
        None, "SentencePiece model (default: the run's or checkpoint's)", metavar="TOK", group=MODEL
    )


@dataclasses.dataclass(frozen=True)
class DecodingSettings:
    """How the weights load and the texts and masks decode, in `paliseg predict`, `eval` and `serve`."""

    dtype: str | None = setting(
        None, "weights and matmuls (default: the run's or preset's; bfloat16 for a Hugging Face folder); float32 "
        "decodes token for token as transformers does on a float32 checkpoint", choices=DTYPES, group=DECODING,
    )  # fmt: skip
    quantize: str | None = setting(
        None, "store the projection weights quantized as they load: int8 (per-output-channel scales) or nf4 "
        "(4-bit NormalFloat, blocks of 64); matmuls stay in --dtype (default: a run trained with --base-dtype "
        "is loaded with that base, anything else unquantized)", choices=QUANTIZED_DTYPES, group=DECODING,
    )  # fmt: skip
    max_new_tokens: int | None = setting(
        None, "decoding budget per image (default: the run's --seq-len, else 128; an object is ~22 tokens)",
        metavar="T", at_least=1, group=DECODING,
    )  # fmt: skip
    samples: int = setting(
        1, "each answer the consensus of G answers sampled at --temperature (their median boxes and codebook-mean "
        "seg codes, `infer.consensus`): better masks than greedy decoding for G times the decoding; 1: greedy",
        metavar="G", at_least=1, group=DECODING,
    )  # fmt: skip
    temperature: float = setting(0.7, "the sampling temperature of --samples", metavar="T", above=0, group=DECODING)
    vae: Path | None = setting(
        None, "mask VAE (default: the one the run's data was converted with; for a plain checkpoint "
        "models/vae-oid.npz, else the bundled one)", metavar="NPZ", group=DECODING,
    )  # fmt: skip
    allow_vae_mismatch: bool = setting(
        False, "use --vae even though its SHA-256 differs from the recorded VAE's (a warning, not an error)",
        group=DECODING,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class PredictSettings:
    """`paliseg predict`: boxes and full-resolution masks for images and prompts (`infer.outputs`)."""

    model: ModelSettings = setting(prefix=False)
    image: Path = setting(
        help="one image, a folder of images (recursive), or annotation records (each record's own prompt; its "
        "ground truth is drawn and scored)", metavar="IMG|DIR|JSONL", group=INPUTS_OUTPUTS,
    )  # fmt: skip
    prompt: tuple[str, ...] = setting(
        (), "prompt, e.g. 'segment crack'; repeat it to ask several about every image (for records: keep only "
        "those with one of these prompts)", metavar="TEXT", items="repeated", group=INPUTS_OUTPUTS,
    )  # fmt: skip
    out: Path | None = setting(None, "output folder (required unless --raw)", metavar="DIR", group=INPUTS_OUTPUTS)
    raw: bool = setting(
        False, "print the decoded texts, one line per image and prompt (without --out: write nothing)",
        group=INPUTS_OUTPUTS,
    )  # fmt: skip
    canvas: bool = setting(True, "do not draw canvases", group=INPUTS_OUTPUTS)
    overwrite: bool = setting(False, "replace an earlier prediction set in --out", group=INPUTS_OUTPUTS)
    decoding: DecodingSettings = setting(DecodingSettings(), prefix=False)
    batch_size: int = setting(8, "images per decoding batch", metavar="B", at_least=1, group=DECODING)
    constrain: bool = setting(
        True, "decode freely, without the segmentation grammar that prompts starting with 'segment' get otherwise",
        group=DECODING,
    )  # fmt: skip

    def __post_init__(self):
        settings.check(self)
        if self.out is None and not self.raw:
            raise ValueError("--out DIR is required (or --raw alone: print the decoded texts, write nothing)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """`paliseg eval`: score the checkpoints of a run on a split and record the best (`infer.sweep`)."""

    run_dir: Path = setting(cli=False)  # the command's positional RUN_DIR (a folder or an open train.run.Run)
    data: Path = setting(help="converted data (`paliseg convert`)", metavar="DIR", group=INPUTS_OUTPUTS)
    split: str = setting("valid", "split to score", metavar="SPLIT", group=INPUTS_OUTPUTS)
    limit: int | None = setting(None, "score only the first K records", metavar="K", at_least=1, group=INPUTS_OUTPUTS)
    out: Path = setting(help="report folder", metavar="REPORT_DIR", group=INPUTS_OUTPUTS)
    canvases: int = setting(
        4, "how many of the best checkpoint's best and worst images to draw", metavar="N", at_least=0,
        group=INPUTS_OUTPUTS,
    )  # fmt: skip
    overwrite: bool = setting(False, "replace a report of another run in REPORT_DIR", group=INPUTS_OUTPUTS)
    steps: str = setting(
        "all", "checkpoints to score: all, or step numbers, 0 being the base", metavar="all|N,M", group=SCORED
    )
    metric: str = setting("miou", "metric that picks the best checkpoint", choices=METRICS, group=SCORED)
    base: bool = setting(True, "do not score step 0 (the base)", group=SCORED)
    ceiling: bool = setting(True, "do not score the token round-trip ceiling", group=SCORED)
    decoding: DecodingSettings = setting(DecodingSettings(), prefix=False)
    batch_size: int = setting(8, "images per decoding batch", metavar="B", at_least=1, group=DECODING)

    def __post_init__(self):
        settings.check(self)
        parse_steps(self.steps)

    @property
    def requested_steps(self) -> str | list[int]:
        """--steps as "all" or the step numbers."""
        return parse_steps(self.steps)


def parse_steps(text: str) -> str | list[int]:
    """'all', or comma-separated step numbers -> "all" or the numbers."""
    if text == "all":
        return "all"
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--steps must be 'all' or comma-separated step numbers, got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """How requests are batched and what one request may hold (`infer.serve.create_app`)."""

    max_batch: int = setting(
        8, "image/prompt pairs decoded together at most (the largest batch size)", metavar="B", at_least=1,
        group=SERVER,
    )  # fmt: skip
    max_wait_ms: float = setting(
        10.0, "how long a request waits for others to share its batch, in milliseconds", metavar="T", at_least=0,
        group=SERVER,
    )  # fmt: skip
    max_image_mb: float = setting(20.0, "largest upload, in MiB", metavar="MB", above=0, group=SERVER)
    max_prompts: int = setting(8, "prompts per request", metavar="N", at_least=1, group=SERVER)
    max_prompt_chars: int = setting(
        128, "characters per prompt (a longer prompt compiles programs of its own)", metavar="N",
        at_least=1, group=SERVER,
    )  # fmt: skip

    def __post_init__(self):
        settings.check(self)

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 2**20)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeSettings:
    """`paliseg serve`: one loaded model behind a web page and a JSON API (`infer.serve`)."""

    model: ModelSettings = setting(prefix=False)
    decoding: DecodingSettings = setting(DecodingSettings(), prefix=False)
    host: str = setting("127.0.0.1", "address to listen on; 127.0.0.1 is this machine only", metavar="HOST",
                        group=SERVER)  # fmt: skip
    port: int = setting(8000, "port; 0 picks any free port (printed)", metavar="PORT", at_least=0, at_most=65535,
                        group=SERVER)  # fmt: skip
    server: ServeConfig = setting(ServeConfig(), prefix=False)  # --max-batch, --max-wait-ms, ...
    prompt: tuple[str, ...] = setting(
        (), "a prompt the page suggests (repeatable; a run's data prompts are suggested too)", metavar="TEXT",
        items="repeated", group=SERVER,
    )  # fmt: skip
    access_log: bool = setting(True, "do not log every request", group=SERVER)

    def __post_init__(self):
        settings.check(self)
