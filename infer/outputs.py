"""What `paliseg predict` reads and writes.

Inputs (`--image`): one image file, a folder of images (searched recursively), a glob (`'photos/*.jpg'`),
a list of image paths (a .txt file, one a line, relative to its folder), or annotation records: a JSONL
file or `DIR:SPLIT` of a converted folder, JSONL or TFDS (`paliseg.records`: each record is an image and
its prompt, and its ground truth is drawn and scored).

Outputs in OUT (NAME = image stem + "." + prompt slug, as the converter names its masks, so
`paliseg score --gt DATA/masks/... --pred OUT/masks --prompt-from-name` pairs them):

    OUT/masks/NAME.png            union of the prompt's objects, 0/255, the image's full resolution
    OUT/objects/NAME.K.png        object K's own mask (K from 0, in the order of the text)
    OUT/json/NAME.json            prompt, raw decoded text, objects (label, confidence, pixel box, loc and
                                  seg tokens, mask file), invalid chunks by reason, and the score when GT
                                  is known
    OUT/canvases/NAME.png         original | ground truth (when known) | prediction
    OUT/predictions.jsonl         one annotation record per image and prompt (suffix = decoded text,
                                  mask = the predicted mask): `paliseg visualize --pred` reads it
    OUT/coco_results.json         COCO results: RLE masks, xywh boxes, score = the object's confidence (the
                                  geometric-mean probability of its 4 loc tokens, `paliseg.decoding`),
                                  image_id and category_id of coco_dataset.json
    OUT/coco_dataset.json         the images, one category per prompt, and, for JSONL input, the ground
                                  truth objects (box from the loc tokens, mask = the GT union inside the
                                  box, as `vae.sources` reads records), so pycocotools can evaluate
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from infer import prediction as prediction_module
from infer.prediction import Prediction
from paliseg import dataset, files, images, records
from paliseg import tokens as codec
from vae.masks import crop_box

PREDICTIONS_FILE = "predictions.jsonl"  # OUT/predictions.jsonl
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
IMAGE_LIST_SUFFIX = ".txt"  # --image LIST.txt: one image path a line


@dataclasses.dataclass(frozen=True)
class Job:
    """One image and one prompt to predict; `record` when the input was an annotation JSONL."""

    image_path: Path | files.StoredFile  # a file, or an image held in a TFDS dataset
    prompt: str
    record: records.Record | None = None
    name: str = ""  # output file name stem, unique within a run


def _split_of(source: str) -> tuple[Path, str] | None:
    """(folder, split) of `DIR:SPLIT` naming a split of a converted folder; None for anything else."""
    folder, colon, split = source.rpartition(":")
    return (Path(folder), split) if colon and split and dataset.is_converted(folder) else None


def _images_in(source: str | os.PathLike) -> list[Path]:
    """The images of a folder (recursive), a glob, a list file or one image."""
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if path.is_file() and path.suffix == IMAGE_LIST_SUFFIX:
        lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        return [path.parent / line for line in lines if line and not line.startswith("#")]
    if path.is_file():
        return [path]
    return sorted(Path(p) for p in glob.glob(str(source), recursive=True) if Path(p).suffix.lower() in IMAGE_SUFFIXES)


def jobs_for(source: str | os.PathLike, prompts: Sequence[str]) -> list[Job]:
    """The (image, prompt) pairs of `--image` and `--prompt` (see the module docstring)."""
    split = _split_of(str(source))
    source = Path(source)
    if split is None and not source.exists() and not glob.has_magic(str(source)):
        raise FileNotFoundError(f"--image {source}: no such file or folder")
    if split is not None or (source.is_file() and source.suffix == ".jsonl"):
        found = dataset.read_records(*split) if split is not None else records.read_records(source)
        if prompts:
            found = [r for r in found if r.prefix in prompts]
        if not found:
            raise ValueError(
                f"{source}: no record" + (f" with prompt {' or '.join(map(repr, prompts))}" if prompts else "")
            )
        jobs = [Job(r.image_path, r.prefix, r) for r in found]
    else:
        if not prompts:
            raise ValueError("--prompt is required for images (a JSONL's records carry their own prompts)")
        paths = _images_in(source)
        if not paths:
            raise ValueError(f"--image {source}: no image ({', '.join(IMAGE_SUFFIXES)}) found")
        if source.is_dir() and dataset.is_converted(source):
            from paliseg import console

            console.info(f"note: {source} is converted data; pass --image {source}:{dataset.find_splits(source)[0]} "
                         "to draw and score the ground truth too")  # fmt: skip
        jobs = [Job(path, prompt) for path in paths for prompt in prompts]
    return _named(jobs)


def _named(jobs: list[Job]) -> list[Job]:
    """Give each job a unique output name: STEM.PROMPT_SLUG, with -2, -3 ... when two images share a stem."""
    used: dict[str, int] = {}
    named = []
    for job in jobs:
        base = f"{job.image_path.stem}.{records.prompt_slug(job.prompt)}"
        used[base] = used.get(base, 0) + 1
        name = base if used[base] == 1 else f"{job.image_path.stem}-{used[base]}.{records.prompt_slug(job.prompt)}"
        named.append(dataclasses.replace(job, name=name))
    return named


def write_prediction(
    out: Path, job: Job, prediction: Prediction, canvas_image, score, overwrite: bool
) -> dict[str, Any]:
    """The per-image files of one job; returns its JSON (also written to OUT/json/NAME.json)."""
    mask_path = out / "masks" / f"{job.name}.png"
    files.write_mask(
        mask_path,
        prediction.mask if prediction.valid else np.zeros((prediction.height, prediction.width), bool),
        overwrite,
    )
    objects = []
    for index, (obj, entry) in enumerate(zip(prediction.objects, prediction.to_json()["objects"])):
        if obj.mask is not None:
            object_path = out / "objects" / f"{job.name}.{index}.png"
            files.write_mask(object_path, obj.mask, overwrite)
            entry["mask"] = object_path.relative_to(out).as_posix()
        objects.append(entry)
    result = prediction.to_json() | {
        "image": str(job.image_path),
        "name": job.name,
        "mask": mask_path.relative_to(out).as_posix(),
        "objects": objects,
        "score": None if score is None else score.to_row(),
    }
    if canvas_image is not None:
        canvas_path = out / "canvases" / f"{job.name}.png"
        files.write_image(canvas_path, canvas_image, overwrite)
        result["canvas"] = canvas_path.relative_to(out).as_posix()
    files.write_json(out / "json" / f"{job.name}.json", result, overwrite)
    return result


def prediction_record(out: Path, job: Job, prediction: Prediction) -> records.Record:
    """The annotation record of a prediction (paths relative to OUT/predictions.jsonl)."""
    image = Path(os.path.relpath(Path(str(job.image_path)).absolute(), out.absolute())).as_posix()
    return records.Record(image, job.prompt, prediction.text, f"masks/{job.name}.png", {"valid": prediction.valid})


def rle(mask: np.ndarray) -> dict[str, Any]:
    """A bool HxW mask as COCO's compressed RLE ({"size": [H, W], "counts": str}), JSON-ready."""
    from pycocotools import mask as coco_mask

    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def _xywh(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]


@dataclasses.dataclass
class CocoEntries:
    """One prediction's part of the COCO files before ids are given (`CocoCollector.add_entries` numbers
    them in job order): the image's size, the ground truth's annotations (records only), the objects."""

    width: int
    height: int
    annotations: list[dict[str, Any]]
    results: list[dict[str, Any]]


def coco_entries(job: Job, prediction: Prediction) -> CocoEntries:
    annotations = [] if job.record is None else _gt_annotations(job.record, prediction.width, prediction.height)
    results = []
    for obj in prediction.objects:
        score = 1.0 if obj.confidence is None else round(obj.confidence, 4)
        result = {"bbox": _xywh(obj.box), "score": score}
        if obj.mask is not None:
            result["segmentation"] = rle(obj.mask)
        results.append(result)
    return CocoEntries(prediction.width, prediction.height, annotations, results)


class CocoCollector:
    """Builds coco_dataset.json and coco_results.json one prediction at a time (masks kept as RLE only)."""

    def __init__(self, prompts: Sequence[str]):
        self.categories = {prompt: index for index, prompt in enumerate(sorted(set(prompts)), start=1)}
        self.image_ids: dict[Path | files.StoredFile, int] = {}
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []

    def add(self, job: Job, prediction: Prediction) -> None:
        self.add_entries(job, coco_entries(job, prediction))

    def add_entries(self, job: Job, entries: CocoEntries) -> None:
        if job.image_path not in self.image_ids:
            self.image_ids[job.image_path] = len(self.image_ids) + 1
            self.images.append({"id": self.image_ids[job.image_path], "file_name": str(job.image_path),
                                "width": entries.width, "height": entries.height})  # fmt: skip
        ids = {"image_id": self.image_ids[job.image_path], "category_id": self.categories[job.prompt]}
        for annotation in entries.annotations:
            self.annotations.append({"id": len(self.annotations) + 1, **ids, **annotation})
        self.results += [{**ids, **result} for result in entries.results]

    def dataset(self) -> dict[str, Any]:
        return {
            "info": {"description": "paliseg predict: the images, one category per prompt, ground truth when known"},
            "images": self.images,
            "categories": [{"id": index, "name": prompt} for prompt, index in self.categories.items()],
            "annotations": self.annotations,
        }


def _gt_annotations(record: records.Record, width: int, height: int) -> list[dict[str, Any]]:
    union = dataset.read_mask(record, width, height)
    annotations = []
    for obj in codec.parse_suffix(record.suffix, require_seg=False).objects:
        x1, y1, x2, y2 = crop_box(codec.locs_to_box(obj.locs, width, height), width, height)
        inside = np.zeros_like(union)
        inside[y1:y2, x1:x2] = union[y1:y2, x1:x2]
        annotations.append({
            "bbox": _xywh(codec.locs_to_box(obj.locs, width, height)), "segmentation": rle(inside),
            "area": int(np.count_nonzero(inside)), "iscrowd": 0,
        })  # fmt: skip
    return annotations


def _canvas(job: Job, image, prediction: Prediction):
    """original | ground truth | prediction: the record's GT for JSONL input, else the prediction alone."""
    from metrics import canvas

    if job.record is not None:
        predicted = canvas.CanvasPrediction(prediction.mask, prediction.text, prediction.confidences)
        return canvas.canvas_for_record(job.record, predicted, panel_height=320)[0]
    caption = (
        f"prompt: {job.prompt}    image: {job.image_path.name}\n"
        f"{len(prediction.objects)} object(s) predicted; no ground truth given (middle panel: the image alone)"
        + ("" if prediction.valid else "\nINVALID prediction: the text has no valid object")
    )
    return canvas.make_canvas(
        image, None, prediction.mask, caption, pred_boxes=prediction.boxes,
        pred_labels=canvas.labelled(prediction.labels, prediction.confidences),
        panel_height=320,
    )  # fmt: skip


@dataclasses.dataclass
class Predicted:
    """A job once predicted and its files written (`predict_jobs`): what predictions.jsonl, the COCO files and
    the summary need of it. `result` None: its image could not be read (`skipped` says why)."""

    job: Job
    result: dict[str, Any] | None = None
    skipped: dict[str, str] | None = None
    record: records.Record | None = None
    score: Any = None  # metrics.scoring.ImageScore, for records
    coco: CocoEntries | None = None


@dataclasses.dataclass
class PredictedBatch:
    """The jobs of one decoding batch, predicted (in this process or on a Beam worker)."""

    predicted: list[Predicted]
    degenerate: dict[str, int]  # degenerate boxes by reason (`vae.masks`)
    model: str  # the predictor's source


def check_out(out: Path, overwrite: bool) -> None:
    """OUT must not hold an earlier prediction set unless `overwrite`."""
    if not overwrite and ((out / PREDICTIONS_FILE).exists() or any((out / "masks").glob("*.png"))):
        raise files.OutputExistsError(out / PREDICTIONS_FILE)


def predict_jobs(predictor, jobs: Sequence[Job], out: Path, canvases: bool) -> PredictedBatch:
    """Predict one batch of jobs and write their per-image files (masks, objects, JSON, canvases)."""
    from paliseg import console

    opened, predicted = [], {}
    for job in jobs:
        try:
            opened.append((job, images.read_image(job.image_path)))
        except ValueError as error:  # an image that cannot be read is a counted skip
            predicted[job.name] = Predicted(job, skipped={"image": str(job.image_path), "prompt": job.prompt,
                                                          "error": str(error)})  # fmt: skip
            console.info(f"skipped {job.image_path}: {error}")
    degenerate: collections.Counter = collections.Counter()
    predictions = predictor.predict([i for _, i in opened], [j.prompt for j, _ in opened], degenerate) if opened else []
    for (job, image), prediction in zip(opened, predictions):
        score = None
        if job.record is not None:
            score = prediction_module.score(prediction, job.record, *prediction_module.ground_truth(
                job.record, prediction.width, prediction.height))  # fmt: skip
        picture = _canvas(job, image, prediction) if canvases else None
        result = write_prediction(out, job, prediction, picture, score, overwrite=True)
        predicted[job.name] = Predicted(
            job, result, None, prediction_record(out, job, prediction), score, coco_entries(job, prediction)
        )
    return PredictedBatch([predicted[job.name] for job in jobs], dict(degenerate), predictor.source)


def finish_set(out: Path, jobs: Sequence[Job], batches: Sequence[PredictedBatch], seconds: float) -> dict[str, Any]:
    """Write predictions.jsonl and the COCO files of the predicted jobs (in job order); returns the summary."""
    from metrics import aggregate

    position = {job.name: index for index, job in enumerate(jobs)}
    predicted = sorted((p for batch in batches for p in batch.predicted), key=lambda p: position[p.job.name])
    done = [p for p in predicted if p.result is not None]
    coco = CocoCollector([job.prompt for job in jobs])
    for entry in done:
        coco.add_entries(entry.job, entry.coco)
    records.write_records(out / PREDICTIONS_FILE, [p.record for p in done], overwrite=True)
    files.write_json(out / "coco_dataset.json", coco.dataset())
    files.write_json(out / "coco_results.json", coco.results)
    results = [p.result for p in done]
    scores = [p.score for p in done if p.score is not None]
    degenerate = sum((collections.Counter(batch.degenerate) for batch in batches), collections.Counter())
    return {
        "out": str(out),
        "model": batches[0].model,
        "predicted": len(results),
        "skipped": [p.skipped for p in predicted if p.skipped is not None],
        "objects": sum(len(r["objects"]) for r in results),
        "invalid_predictions": sum(not r["valid"] for r in results),
        "degenerate_boxes": dict(degenerate),
        "summary": aggregate.summarize(scores) if scores else None,
        "seconds": seconds,
        "images_per_s": len(results) / seconds if seconds > 0 else None,
        "results": results,
    }


def predict_set(
    predictor, jobs: Sequence[Job], out: str | os.PathLike, canvases: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Predict every job in batches and write the files of the module docstring; returns a summary.

    An image that cannot be read is a counted skip; OUT must not hold an earlier prediction set unless
    `overwrite`. (`infer.beam.predict_set` does the same on Apache Beam workers.)
    """
    import time

    from paliseg import console

    out = Path(out)
    check_out(out, overwrite)
    started = time.perf_counter()
    batches = []
    bar = console.progress_bar("predict", total=len(jobs), unit="image")
    try:
        for start in range(0, len(jobs), predictor.batch_size):
            chunk = jobs[start : start + predictor.batch_size]
            batches.append(predict_jobs(predictor, chunk, out, canvases))
            bar.update(len(chunk))
    finally:
        bar.close()
    return finish_set(out, jobs, batches, time.perf_counter() - started)
