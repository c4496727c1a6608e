"""Inference and the checkpoint sweep: the stage after training.

    from infer import EvalSettings, Predictor, evaluate_run
    predictor = Predictor.from_run("runs/r1", step="best")       # load once ("best", "latest", N; 0 = base)
    predictor = Predictor.from_checkpoint("ckpt.npz", preset="paligemma-3b-224", tokenizer="tok.model")
    predictions = predictor.predict(["a.jpg", "b.jpg"], "segment crack")   # ... predict many
    p = predictions[0]
    p.text        # the raw decoded text
    p.objects     # PredictedObject(label, box (pixel xyxy), locs, seg, mask (bool HxW)) per object
    p.boxes, p.labels, p.masks (bool [N, H, W]), p.mask (union, bool HxW; None if the text was invalid)

    report = evaluate_run(EvalSettings(run_dir="runs/r1", data="data/cracks", out="reports/r1"))  # `paliseg eval`
    report["best"]   # also written to runs/r1/best.json

Modules: `predictor` (loading, batched decoding), `prediction` (text -> objects, boxes, masks),
`outputs` (`paliseg predict`'s files and COCO results), `sweep` + `cache` + `sweep_report` (`paliseg eval`),
`serve` (`paliseg serve`: the web page, the HTTP API and its batching worker; `web/` holds the page),
`config` (the commands' settings, from which their flags derive).
Names are imported lazily, so `import infer.commands` (the CLI's --help) stays free of jax.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Predictor": "infer.predictor",
    "Prediction": "infer.prediction",
    "PredictedObject": "infer.prediction",
    "evaluate_run": "infer.sweep",
    "EvalSettings": "infer.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'infer' has no attribute {name!r}")
