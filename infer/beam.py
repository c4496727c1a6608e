"""`paliseg predict --beam`: batch prediction as an Apache Beam pipeline (the DirectRunner on this machine;
Dataflow, Flink or Spark with their pipeline options), for image sets larger than one machine predicts.

    batches of jobs (cut as `paliseg predict` cuts them: `--batch-size` jobs in order)
      --Reshuffle--> RunInference(a ModelHandler around `infer.predictor.Predictor`: one model per worker
      process, on its accelerator when it has one) -> `outputs.predict_jobs`: each batch predicted and its
      per-image files (masks, objects, JSON, canvases) written into OUT by the worker
      --> the batches' results gathered for the driver, which writes predictions.jsonl, coco_dataset.json
      and coco_results.json in job order (`outputs.finish_set`)

The batches are the ones `paliseg predict` decodes, so every file equals its own. OUT (and the inputs)
must be reachable by every worker.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from infer import outputs
from infer.config import PredictSettings
from paliseg import images

_GATHERED = ".beam-predicted.pickle"  # the batches' results, for the driver; removed once read
# Before the user's options (which win): workers log warnings and errors only, not every bundle.
_DEFAULT_OPTIONS = ("--default_sdk_harness_log_level=WARNING",)
_PREDICTING = threading.Lock()  # a worker process's threads take turns with its one model


class PredictorHandler(ModelHandler[Sequence[outputs.Job], PredictionResult, Any]):
    """RunInference's model: the Predictor `load` gives (`paliseg predict`'s, for its settings). Each element
    is a batch of jobs (RunInference's own batching is turned off: the batches are `paliseg predict`'s)."""

    def __init__(self, config: PredictSettings, load: Callable[[], Any], max_image_pixels: int):
        super().__init__()
        self._config = config
        self._load = load
        self._max_image_pixels = max_image_pixels

    def load_model(self):
        images.set_max_image_pixels(self._max_image_pixels)  # the driver's --max-image-pixels
        return self._load()

    def run_inference(
        self, batch: Sequence[Sequence[outputs.Job]], model, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        results = []
        for jobs in batch:
            with _PREDICTING:
                predicted = outputs.predict_jobs(model, jobs, Path(self._config.out), self._config.canvas)
            results.append(PredictionResult(jobs, predicted))
        return results

    def batch_elements_kwargs(self) -> dict[str, int]:
        return {"min_batch_size": 1, "max_batch_size": 1}


def predict_set(
    config: PredictSettings, jobs: Sequence[outputs.Job], load: Callable[[], Any], options: Sequence[str]
) -> dict[str, Any]:
    """`outputs.predict_set` on Beam: the same files in `config.out`, the same summary. `load` gives the
    Predictor on each worker (picklable: a module-level function, or a partial of one)."""
    if config.out is None:
        raise ValueError("--beam writes its predictions into --out DIR")
    out = Path(config.out)
    outputs.check_out(out, config.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    batches = [list(jobs[start : start + config.batch_size]) for start in range(0, len(jobs), config.batch_size)]
    started = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions([*_DEFAULT_OPTIONS, *options])) as pipeline:
        _ = (
            pipeline
            | "Batches" >> beam.Create(batches, reshuffle=False)
            | "Spread" >> beam.Reshuffle()
            | "Predict" >> RunInference(PredictorHandler(config, load, images.max_image_pixels()))
            | "Results" >> beam.Map(lambda result: result.inference)
            | "All" >> beam.combiners.ToList()
            | "Save" >> beam.Map(lambda predicted: (out / _GATHERED).write_bytes(pickle.dumps(predicted)))
        )
    predicted = pickle.loads((out / _GATHERED).read_bytes())
    (out / _GATHERED).unlink()
    return outputs.finish_set(out, jobs, predicted, time.perf_counter() - started)
