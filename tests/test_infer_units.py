"""Inference pieces without a language model: text -> objects and masks, the prediction cache, COCO
results checked with pycocotools, output naming, step selection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vae
from infer import cache as prediction_cache
from infer import outputs, sweep
from infer.config import parse_steps
from infer.prediction import from_text
from paliseg import files, records, tokens


@pytest.fixture(scope="module")
def vae_model(tmp_path_factory):
    return vae.MaskVAE.from_npz(vae.write_random_npz(tmp_path_factory.mktemp("vae") / "vae.npz", seed=0))


def _object(box, width, height, seed, label="crack"):
    seg = tuple(int(v) for v in np.random.default_rng(seed).integers(0, 128, 16))
    return tokens.SegObject(tokens.box_to_locs(box, width, height), seg, label)


def test_text_to_objects_boxes_and_full_resolution_masks(vae_model):
    width, height = 120, 80
    objects = [_object((10, 5, 60, 40), width, height, 1), _object((50, 30, 110, 75), width, height, 2)]
    prediction = from_text(tokens.format_suffix(objects), "segment crack", width, height, vae_model)
    assert prediction.valid and prediction.invalid_count == 0
    assert prediction.labels == ["crack", "crack"]
    assert prediction.masks.shape == (2, height, width)
    expected = vae.tokens_to_masks(vae_model, [o.seg for o in objects], [o.locs for o in objects], width, height)
    np.testing.assert_array_equal(prediction.masks, expected)
    np.testing.assert_array_equal(prediction.mask, expected[0] | expected[1])
    np.testing.assert_allclose(prediction.boxes[0], tokens.locs_to_box(objects[0].locs, width, height))
    # Masks stay inside their (truncated) loc boxes.
    x1, y1, x2, y2 = tokens.locs_to_pixel_box(objects[0].locs, width, height)
    outside = prediction.masks[0].copy()
    outside[y1:y2, x1:x2] = False
    assert not outside.any()


def test_empty_invalid_partial_and_box_only_texts(vae_model):
    empty = from_text("", "segment crack", 40, 30, vae_model)
    assert empty.valid and not empty.mask.any() and empty.objects == () and empty.mask.shape == (30, 40)
    garbage = from_text("a crack in the wall <loc0001>", "segment crack", 40, 30, vae_model)
    assert not garbage.valid and garbage.mask is None and garbage.invalid_count == 1
    good = _object((2, 2, 30, 20), 40, 30, 3)
    partial = from_text(good.to_text() + " ; <loc0001><seg001> crack", "segment crack", 40, 30, vae_model)
    assert partial.valid and len(partial.objects) == 1 and partial.invalid == {"loc_count": 1}
    box_only = tokens.SegObject(good.locs, None, "crack")
    boxed = from_text(box_only.to_text(), "detect crack", 40, 30, vae_model)
    assert boxed.valid and boxed.objects[0].mask is None and not boxed.mask.any() and len(boxed.boxes) == 1
    assert boxed.to_json()["objects"][0]["seg"] is None


def test_cache_survives_a_torn_line_and_drops_stale_texts(tmp_path):
    path = prediction_cache.step_path(tmp_path, 25)
    assert path.name == "step_000025.jsonl"
    fingerprint = {"step": 25, "max_new_tokens": 64}
    cache = prediction_cache.PredictionCache(path, fingerprint)
    cache.append([{"key": "a\tp", "text": "x"}, {"key": "b\tp", "text": ""}])
    with open(path, "a") as handle:  # a crash in the middle of the next batch
        handle.write('{"key": "c\\tp", "te')
    again = prediction_cache.PredictionCache(path, fingerprint)
    assert again.missing(["a\tp", "b\tp", "c\tp"]) == ["c\tp"] and again.text("b\tp") == ""
    again.append([{"key": "c\tp", "text": "z"}])
    lines = [json.loads(line) for line in path.read_text().splitlines()]  # every line parses again
    assert [line.get("key") for line in lines] == [None, "a\tp", "b\tp", "c\tp"]
    stale = prediction_cache.PredictionCache(path, {"step": 25, "max_new_tokens": 128})
    assert stale.missing(["a\tp"]) == ["a\tp"] and len(path.read_text().splitlines()) == 1


def _records_set(folder: Path, vae_model) -> Path:
    """Two real-layout records (image, union GT mask PNG, suffix of VAE-encoded objects) and one negative."""
    rng = np.random.default_rng(0)
    out = []
    for index, boxes in enumerate([[(8, 6, 50, 30), (40, 34, 90, 70)], [(20, 10, 70, 60)], []]):
        width, height = 96, 80
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8))
        files.write_image(folder / "images" / f"im{index}.png", image)
        union = np.zeros((height, width), bool)
        objects = []
        for box in boxes:
            x1, y1, x2, y2 = box
            union[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2] = True
        for box in boxes:
            seg = vae.mask_to_tokens(vae_model, union, box)
            objects.append(tokens.SegObject(tokens.box_to_locs(box, width, height), seg, "crack"))
        files.write_mask(folder / "masks" / f"im{index}.png", union)
        out.append(
            records.Record(
                f"images/im{index}.png", "segment crack", tokens.format_suffix(objects), f"masks/im{index}.png"
            )
        )
    return records.write_records(records.annotations_path(folder, "valid"), out) and records.annotations_path(
        folder, "valid"
    )


@pytest.mark.oracle
def test_coco_results_evaluate_with_pycocotools(tmp_path, vae_model):
    from pycocotools import mask as coco_mask
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    jsonl = _records_set(tmp_path, vae_model)
    jobs = outputs.jobs_for(jsonl, [])
    collector = outputs.CocoCollector([job.prompt for job in jobs])
    predictions = []
    for job in jobs:  # a perfect model: it predicts the ground-truth tokens
        width, height = Image.open(job.image_path).size
        predictions.append(from_text(job.record.suffix, job.prompt, width, height, vae_model))
        collector.add(job, predictions[-1])
    files.write_json(tmp_path / "gt.json", collector.dataset())
    files.write_json(tmp_path / "res.json", collector.results)
    assert len(collector.results) == 3 and len(collector.dataset()["annotations"]) == 3
    # The RLE of each result is exactly the object's mask.
    decoded = coco_mask.decode(collector.results[0]["segmentation"]).astype(bool)
    np.testing.assert_array_equal(decoded, predictions[0].objects[0].mask)

    ground_truth = COCO(str(tmp_path / "gt.json"))
    results = ground_truth.loadRes(str(tmp_path / "res.json"))
    evaluation = COCOeval(ground_truth, results, "bbox")
    evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)  # boxes from the same loc tokens: AP 1
    segm = COCOeval(ground_truth, results, "segm")
    segm.evaluate(), segm.accumulate(), segm.summarize()
    assert 0.0 <= segm.stats[0] <= 1.0  # runs; the value depends on the (random) VAE's reconstructions


def test_confidences_follow_their_chunks_and_rank_coco_results(tmp_path, vae_model):
    """Each object takes the confidence of its own ";"-chunk (an invalid chunk in between shifts nothing),
    and pycocotools ranks by it: a false positive scored below the true objects costs no AP, above them it does."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    jsonl = _records_set(tmp_path, vae_model)
    [job] = outputs.jobs_for(jsonl, [])[:1]
    width, height = Image.open(job.image_path).size
    true_text = job.record.suffix
    n_true = true_text.count(";") + 1
    false_object = _object((1, 1, 6, 6), width, height, 9).to_text()
    text = f"{true_text} ; <loc0001> crack ; {false_object}"
    ap = {}
    for false_confidence in (0.1, 0.99):
        scores = [0.9] * n_true + [None, false_confidence]
        prediction = from_text(text, job.prompt, width, height, vae_model, chunk_scores=scores)
        assert [o.confidence for o in prediction.objects] == [0.9] * n_true + [false_confidence]
        assert prediction.invalid == {"loc_count": 1}
        collector = outputs.CocoCollector([job.prompt])
        collector.add(job, prediction)
        files.write_json(tmp_path / "gt.json", collector.dataset(), overwrite=True)
        files.write_json(tmp_path / "res.json", collector.results, overwrite=True)
        ground_truth = COCO(str(tmp_path / "gt.json"))
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(str(tmp_path / "res.json")), "bbox")
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
        ap[false_confidence] = evaluation.stats[0]
    assert ap[0.1] == pytest.approx(1.0) and ap[0.99] < 0.9


def test_jobs_names_and_input_errors(tmp_path):
    for sub in ("a", "b"):
        files.write_image(tmp_path / "imgs" / sub / "same.jpg", Image.new("RGB", (8, 8)))
    jobs = outputs.jobs_for(tmp_path / "imgs", ["segment crack", "segment taping area"])
    assert [job.name for job in jobs] == [
        "same.segment_crack", "same.segment_taping_area", "same-2.segment_crack", "same-2.segment_taping_area",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="--prompt is required"):
        outputs.jobs_for(tmp_path / "imgs", [])
    with pytest.raises(FileNotFoundError, match="no such file"):
        outputs.jobs_for(tmp_path / "nothing", ["segment crack"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image"):
        outputs.jobs_for(tmp_path / "empty", ["segment crack"])


def test_step_selection():
    assert sweep.select_steps("all", [10, 20], base=True) == [0, 10, 20]
    assert sweep.select_steps("all", [10, 20], base=False) == [10, 20]
    assert sweep.select_steps([20, 0], [10, 20], base=False) == [0, 20]
    with pytest.raises(ValueError, match="saved steps: 10, 20"):
        sweep.select_steps([15], [10, 20], base=True)
    assert parse_steps("all") == "all" and parse_steps("10,20") == [10, 20]
    with pytest.raises(ValueError, match="comma-separated"):
        parse_steps("best")


@pytest.mark.slow
def test_step_0_of_a_lora_run_is_the_base_checkpoint(tmp_path):
    """Before fine-tuning = the base checkpoint: fresh adapters (B = 0) merged change nothing."""
    import jax

    from paliseg import checkpoints, model
    from paliseg import config as model_configs
    from train import run

    base_config = model_configs.preset("tiny")
    base_params = model.init_params(base_config, jax.random.key(3))
    base_path = checkpoints.save(tmp_path / "base", base_params, base_config)
    config = run.resolve_config(dict(data=[str(tmp_path)], out=str(tmp_path / "run"), checkpoint=str(base_path),
                                       preset="tiny", trainable="lora", lora={"rank": 4}))  # fmt: skip
    run.write_config(tmp_path / "run", config, run.model_config(config), {}, None)
    step0_config, step0 = run.Run(tmp_path / "run").load(0)
    assert not step0_config.lora.enabled
    flat, expected = checkpoints.tree.flatten(step0), checkpoints.tree.flatten(base_params)
    assert flat.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(np.asarray(flat[key]), np.asarray(expected[key]), err_msg=key)


def test_best_step_skips_the_base_and_failures_and_breaks_ties():
    def result(step, miou, box_miou, status="ok"):
        overall = dict.fromkeys(sweep.METRICS, 0.0) | {"miou": miou, "box_miou": box_miou}
        return sweep.StepResult(step, status, summary=None if status != "ok" else {"overall": overall})

    results = [
        result(0, 0.9, 0.9),
        result(10, 0.2, 0.1),
        result(20, 0.2, 0.3),
        result(30, 0.2, 0.3),
        result(40, 0, 0, "failed"),
    ]
    assert sweep.pick_best(results, "miou").step == 20  # base excluded; tie on mIoU -> box mIoU -> earlier step
    assert sweep.pick_best(results, "box_miou").step == 20
    assert sweep.pick_best(results[:1], "miou") is None
