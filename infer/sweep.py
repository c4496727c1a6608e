"""The checkpoint sweep: score every checkpoint of a run on a whole split and record the best one.

    from infer import sweep
    from infer.config import EvalSettings
    result = sweep.evaluate_run(EvalSettings(run_dir="runs/r1", data="data/cracks", out="reports/r1"))
    result["best"]  # {"step": 30, "metric": "miou", "value": 0.41, ...}, also in runs/r1/best.json

What is scored, side by side:
- step 0, the base the run started from ("before fine-tuning": the base checkpoint with LoRA adapters that
  change nothing, or the run's seeded random init);
- every saved checkpoint (or the ones asked for);
- the token round-trip ceiling (`vae.ceiling.round_trip`): ground truth -> loc + seg tokens -> mask, the
  best any model can score with these tokens.

Decoded texts are cached per checkpoint (`infer.cache`): a re-run, or a run after a crash, decodes only what
no earlier run finished; scores are always recomputed from the cached texts (cheap: the VAE decoder and the
paste-back). A checkpoint that cannot be loaded or decoded (another config, a truncated file) is reported
and skipped; the sweep goes on. Records whose image or ground-truth mask cannot be read are counted skips
(`paliseg.dataset.check`).
The best checkpoint (by --metric over all prompts; ties broken by the other metrics, then the earlier
step) is recorded by the run (`train.run.Run.record_best`: RUN_DIR/best.json), which
`Predictor.from_run(run_dir, "best")` and `paliseg predict --step best` read.

Masks are decoded with the VAE of the run's data (`vae.identity.resolve`), checked before anything is written.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from infer import cache as prediction_cache
from infer.config import METRICS, EvalSettings
from infer.prediction import Prediction, from_texts, ground_truth, score
from infer.predictor import Predictor, padded
from metrics import aggregate, scoring
from paliseg import console, dataset, files, images
from paliseg.dataset import Item
from train.run import Run
from vae import identity

SWEEP_FILE = "sweep.json"  # REPORT_DIR's identity: which run, data and split it reports on
OWNED_FOLDERS = ("predictions", "steps", "ceiling", "plots", "canvases")  # what the sweep writes in REPORT_DIR
SCORE_CHUNK = 32  # images scored together: their ground truths held, a step's masks one VAE batch


def select_steps(requested: str | Sequence[int], saved: Sequence[int], base: bool) -> list[int]:
    """The steps to score, in order: "all" (every saved checkpoint) or the listed ones, with step 0 (the
    base) first when `base` is set or 0 is listed."""
    listed = list(saved) if requested == "all" else sorted({int(step) for step in requested})
    unknown = [step for step in listed if step != 0 and step not in saved]
    if unknown:
        raise ValueError(
            f"no checkpoint at step(s) {', '.join(map(str, unknown))}; saved steps: "
            + (", ".join(map(str, saved)) or "none")
        )
    return ([0] if base or 0 in listed else []) + [step for step in listed if step != 0]


@dataclasses.dataclass
class StepResult:
    step: int
    status: str  # "ok" or "failed"
    decoded: int = 0  # records decoded by this run
    cached: int = 0  # records whose text an earlier run had already decoded
    seconds: float = 0.0
    error: str | None = None
    summary: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        return "base" if self.step == 0 else "checkpoint"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"kind": self.kind}


def _fingerprint(
    run: Run,
    step: int,
    max_new_tokens: int | None,
    dtype: str | None = None,
    quantize: str | None = None,
    samples: int = 1,
    temperature: float | None = None,
) -> dict[str, Any]:
    """What a cached text depends on: the run's settings (config.json), the step, the decoding, and --dtype and
    --quantize when given (absent otherwise, so caches written before they existed stay valid)."""
    fingerprint = {
        "run_config_sha256": run.config_sha256,
        "step": step,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy; segmentation grammar for 'segment' prompts",
    }
    if samples > 1:
        fingerprint["decoding"] = (
            f"consensus of {samples} samples at temperature {temperature:g} (seed 0); segmentation grammar for "
            "'segment' prompts"
        )
    if dtype is not None:
        fingerprint["dtype"] = dtype
    if quantize is not None:
        fingerprint["quantize"] = quantize
    return fingerprint


def _claim(out_dir: Path, identity: dict[str, Any], overwrite: bool) -> None:
    """REPORT_DIR reports on one run, data folder and split: refuse to mix another one in, or with
    `overwrite` clear what the sweep wrote there before."""
    path = out_dir / SWEEP_FILE
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != identity:
            if not overwrite:
                raise FileExistsError(
                    f"{out_dir} holds the report of {previous.get('run_dir')} on {previous.get('data')} "
                    f"(split {previous.get('split')}); choose another --out, or pass --overwrite to replace it"
                )
            for name in OWNED_FOLDERS:
                shutil.rmtree(out_dir / name, ignore_errors=True)
    files.write_json(path, identity)


def decode_step(
    predictor_factory: Callable[[], Predictor],
    todo: Sequence[Item],
    cache: prediction_cache.PredictionCache | None,
    progress_desc: str,
) -> int:
    """Decode `todo` (the items the cache does not hold yet), appending each batch to the cache (None: on
    the processes that do not write the report). Each batch is split over the predictor's devices: this
    process loads only its rows' images. Returns how many were decoded."""
    if not todo:
        return 0
    predictor = predictor_factory()
    size = predictor.batch_size
    bar = console.progress_bar(progress_desc, total=len(todo), unit="image")
    try:
        for start in range(0, len(todo), size):
            batch = todo[start : start + size]
            rows = padded(batch, size)
            pixels = [
                predictor.preprocess(images.read_image(item.record.image_path))
                for item in rows[predictor.local_rows(size)]
            ]
            decoded = predictor.decode_batch(pixels, [item.record.prefix for item in rows])[: len(batch)]
            if cache is not None:
                cache.append(
                    {"key": item.key, "text": one.text, "chunk_scores": list(one.chunk_scores)}
                    for item, one in zip(batch, decoded)
                )
            bar.update(len(batch))
    finally:
        bar.close()
    return len(todo)


def agreed_todo(items: Sequence[Item], cache: prediction_cache.PredictionCache | None) -> list[Item]:
    """The items to decode: those the report writer's cache (process 0's) lacks, told to every process."""
    import jax
    from jax.experimental import multihost_utils

    missing = np.asarray([cache is not None and item.key not in cache for item in items], bool)
    if jax.process_count() > 1:
        missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
    return [item for item, needed in zip(items, missing) if needed]


def predictions_of(
    items: Sequence[Item],
    cache: prediction_cache.PredictionCache,
    vae_model,
    degenerate: collections.Counter | None = None,
) -> list[Prediction]:
    """The cached texts of `items` as predictions, their masks decoded in one VAE batch."""
    return from_texts(
        [(cache.text(item.key), item.record.prefix, item.width, item.height) for item in items],
        vae_model,
        degenerate,
        [cache.chunk_scores(item.key) for item in items],
    )


def ceiling_score(
    item: Item, mask: np.ndarray, boxes, vae_model, degenerate: collections.Counter
) -> scoring.ImageScore:
    """The round trip of the ground truth through the tokens (`vae.ceiling.round_trip`), scored as a prediction."""
    from vae.ceiling import round_trip
    from vae.sources import Sample

    sample = Sample(item.record.where, item.record.prefix, mask, list(boxes), None, item.record.image_path)
    result = round_trip(vae_model, sample, counts=degenerate)
    return scoring.score_image(
        result.prediction, mask, item.record.prefix, item.record.image, pred_boxes=boxes, gt_boxes=boxes
    )


def pick_best(results: Sequence[StepResult], metric: str) -> StepResult | None:
    """The checkpoint (step > 0) with the highest overall `metric`; ties are broken by the other metrics
    (in `METRICS` order), then go to the earlier step."""
    candidates = [
        r for r in results if r.step > 0 and r.summary is not None and r.summary["overall"][metric] is not None
    ]
    if not candidates:
        return None

    def rank(result: StepResult):
        overall = result.summary["overall"]
        others = [overall[key] if overall[key] is not None else -1.0 for key in METRICS if key != metric]
        return (overall[metric], *others, -result.step)

    return max(candidates, key=rank)


def evaluate_run(config: EvalSettings, on_step_done: Callable[[int], None] | None = None) -> dict[str, Any] | None:
    """Score the checkpoints of `config.run_dir` on its data's split and write the report into `config.out`
    (the settings of `paliseg eval`: `infer.config.EvalSettings`). `on_step_done(step)` is called after each
    step's texts are cached (the demo's progress, the tests' crash). Returns the report's content (see
    `infer.sweep_report.build`).

    Every device decodes its share of each batch; across processes (`jax.distributed`, as `paliseg train`
    joins them) each one loads only its rows' images, and process 0 alone keeps the cache, scores and
    writes the report (the others return None). The report is the one one device writes.
    """
    import jax

    import vae
    from infer import sweep_report
    from train import sharding

    run = Run.open(config.run_dir)
    run_dir, data_dir, out_dir, split = run.dir, Path(config.data), Path(config.out), config.split
    wanted = select_steps(config.requested_steps, run.steps, config.base)
    if not wanted:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to score yet (and the base was not asked for)")
    items, skips = dataset.check_split(data_dir, split, config.limit)
    if not items and not skips:
        raise ValueError(f"{dataset.split_location(data_dir, split)}: the '{split}' split has no records")
    if not items:
        raise ValueError(
            f"{dataset.split_location(data_dir, split)}: no usable record ({len(skips)} skipped: "
            + "; ".join(f"{s.where}: {s.message}" for s in skips[:3])
            + ")"
        )
    for skip in skips:
        console.info(f"skipped {skip.where}: {skip.message}")
    decoding = config.decoding
    vae_file = vae_for(run, data_dir, decoding.vae, decoding.allow_vae_mismatch)
    writer = jax.process_index() == 0
    if writer:
        claimed = {"run_dir": str(run_dir.absolute()), "data": str(data_dir.absolute()), "split": split}
        _claim(out_dir, claimed, config.overwrite)
    mesh = sharding.make_mesh() if jax.device_count() > 1 else None
    max_new_tokens = decoding.max_new_tokens or run.train_config.seq_len
    vae_model = vae.load(vae_file.path)

    results: list[StepResult] = []
    caches: dict[int, prediction_cache.PredictionCache] = {}

    for step in wanted:
        started = time.perf_counter()
        fingerprint = _fingerprint(
            run, step, max_new_tokens, decoding.dtype, decoding.quantize, decoding.samples, decoding.temperature
        )
        cache = (
            prediction_cache.PredictionCache(prediction_cache.step_path(out_dir, step), fingerprint) if writer else None
        )
        todo = agreed_todo(items, cache)
        factory = lambda step=step: Predictor.from_run(  # noqa: E731 - the run keeps the frozen base for every step
            run,
            step,
            vae_model=vae_model,
            batch_size=config.batch_size,
            max_new_tokens=max_new_tokens,
            dtype=decoding.dtype,
            quantize=decoding.quantize,
            mesh=mesh,
            samples=decoding.samples,
            temperature=decoding.temperature,
        )
        try:
            decoded = decode_step(factory, todo, cache, f"step {step}")
        except Exception as error:
            message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            console.info(f"step {step}: FAILED, skipped ({message})")
            results.append(StepResult(step, "failed", cached=len(items) - len(todo), error=message))
            continue
        caches[step] = cache
        results.append(StepResult(step, "ok", decoded, len(items) - len(todo), time.perf_counter() - started))
        if on_step_done is not None:
            on_step_done(step)
    if not writer:
        return None

    scores, ceiling_scores, degenerate = _score(items, caches, vae_model, config.ceiling)
    for result in results:
        if result.step in caches:
            result.summary = aggregate.summarize(scores[result.step])
    best = pick_best(results, config.metric)
    report = sweep_report.build(
        run_dir=run_dir, data_dir=data_dir, out_dir=out_dir, split=split, limit=config.limit, metric=config.metric,
        items=items, skips=skips, results=results, best=best,
        ceiling=None if ceiling_scores is None else aggregate.summarize(ceiling_scores), degenerate=degenerate,
        max_new_tokens=max_new_tokens,
    )  # fmt: skip
    sweep_report.write(out_dir, report, items, scores, ceiling_scores, caches, vae_model, config.canvases)
    if best is not None:
        run.record_best(report["best"])
    return report


def vae_for(
    run: Run, data_dir: Path, requested: str | os.PathLike | None, allow_mismatch: bool
) -> identity.VaeIdentity:
    """The VAE to score with: the run's recorded one (else the data's), by `vae.identity.resolve`. A data
    folder converted with another VAE than the run's is refused like a mismatching --vae."""
    data_vae = identity.of_data(data_dir)
    if run.vae is not None and data_vae is not None and run.vae.sha256 != data_vae.sha256:
        mismatch = (
            f"{data_dir} was converted with the VAE of SHA-256 {data_vae.sha256}, run {run.dir} was trained "
            f"on the seg tokens of the VAE of SHA-256 {run.vae.sha256}"
        )
        if not allow_mismatch:
            raise identity.VaeMismatchError(
                f"{mismatch}; pass {identity.MISMATCH_FLAG} if scoring it anyway is intended"
            )
        console.info(f"warning: {mismatch}; scoring anyway ({identity.MISMATCH_FLAG})")
    recorded, recorded_by = (run.vae, f"run {run.dir}") if run.vae is not None else (data_vae, str(data_dir))
    return identity.resolve(recorded, requested, allow_mismatch, recorded_by)


def _score(items, caches, vae_model, ceiling: bool):
    """Per step, the ImageScore of every item (in item order), and the ceiling's. Items go in chunks of
    SCORE_CHUNK: each one's ground truth is read once, and a step's masks of a chunk are one VAE batch."""
    scores: dict[int, list[scoring.ImageScore]] = {step: [] for step in caches}
    ceiling_scores: list[scoring.ImageScore] | None = [] if ceiling else None
    degenerate: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    bar = console.progress_bar("scoring", total=len(items), unit="image")
    try:
        for start in range(0, len(items), SCORE_CHUNK):
            chunk = items[start : start + SCORE_CHUNK]
            truths = [ground_truth(item.record, item.width, item.height) for item in chunk]
            for step, cache in caches.items():
                predictions = predictions_of(chunk, cache, vae_model, degenerate[f"step {step}"])
                scores[step] += [score(p, item.record, *truth) for p, item, truth in zip(predictions, chunk, truths)]
            if ceiling_scores is not None:
                ceiling_scores += [
                    ceiling_score(item, *truth, vae_model, degenerate["ceiling"]) for item, truth in zip(chunk, truths)
                ]
            bar.update(len(chunk))
    finally:
        bar.close()
    return scores, ceiling_scores, {k: dict(v) for k, v in degenerate.items() if v}
