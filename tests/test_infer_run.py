"""Predict and the checkpoint sweep on a real (tiny-preset) training run: the sweep's cache and its
resumption after a crash, a checkpoint from another config, best.json, the report, and `paliseg predict`."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PROMPT, run_processes, train_tiny_run
from PIL import Image

import vae
from infer import sweep
from infer.cache import PredictionCache, step_path
from infer.config import DecodingSettings, EvalSettings
from infer.prediction import from_text
from infer.predictor import Predictor
from paliseg import config as model_configs
from paliseg import dataset, files, images, model, records, tokens
from paliseg.cli.main import main
from train import checkpoints as run_checkpoints
from train import config as train_config
from train import run as run_folder
from train.run import Run
from vae import identity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(data dir, run dir with checkpoints at steps 2 and 4, VAE path)."""
    data, run_dir, vae_path = train_tiny_run(tmp_path_factory.mktemp("infer_run"))
    assert run_checkpoints.list_steps(run_dir) == [2, 4]
    assert Run(run_dir).vae == identity.identify(vae_path)  # the data's VAE, recorded by the run
    return data, run_dir, vae_path


def _count_decodes(monkeypatch) -> list[int]:
    """Patch the prediction cache to record how many decoded records each batch adds."""
    calls: list[int] = []
    original = PredictionCache.append

    def counting(self, entries):
        entries = list(entries)
        calls.append(len(entries))
        return original(self, entries)

    monkeypatch.setattr(PredictionCache, "append", counting)
    return calls


class Crash(RuntimeError):
    pass


def _stable(report: dict) -> dict:
    """The report without what legitimately differs between two sweeps (timings, cache counts, paths)."""
    report = json.loads(json.dumps(report))
    for step in report["steps"]:
        for key in ("decoded", "cached", "seconds"):
            step.pop(key)
    report["best"].pop("time")
    report["best"].pop("report")
    report.pop("files")
    return report


def _sweep(run_dir: Path, data: Path, out: Path, vae_path: Path, canvases: int = 2) -> EvalSettings:
    """`paliseg eval RUN_DIR --data DATA --out OUT --vae VAE --batch-size 2 --canvases N`."""
    return EvalSettings(run_dir=run_dir, data=data, out=out, decoding=DecodingSettings(vae=vae_path), batch_size=2,
                        canvases=canvases)  # fmt: skip


@pytest.fixture(scope="module")
def swept(setup, tmp_path_factory):
    """An uninterrupted sweep of the run: (report, report dir, decoded images per decode call, how many
    times the run's frozen parameters were loaded)."""
    data, run_dir, vae_path = setup
    out = tmp_path_factory.mktemp("sweep") / "whole"
    loads, parsed = [], []
    initial, from_dict = run_folder.initial_params, train_config.from_dict
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = _count_decodes(monkeypatch)
        monkeypatch.setattr(run_folder, "initial_params", lambda *args: loads.append(args) or initial(*args))
        monkeypatch.setattr(train_config, "from_dict", lambda *args: parsed.append(args) or from_dict(*args))
        monkeypatch.setattr(sweep, "SCORE_CHUNK", 2)  # 3 images: a full chunk and a partial one
        report = sweep.evaluate_run(_sweep(run_dir, data, out, vae_path))
    assert len(parsed) == 1  # the run's config.json is parsed once per sweep, not per checkpoint
    return report, out, calls, len(loads)


def test_sweep_resumes_after_a_crash_and_equals_an_uninterrupted_one(setup, swept, tmp_path, monkeypatch):
    data, run_dir, vae_path = setup
    whole, whole_dir, whole_calls, frozen_loads = swept
    assert [s["step"] for s in whole["steps"]] == [0, 2, 4] and all(s["status"] == "ok" for s in whole["steps"])
    assert sum(whole_calls) == 3 * 3  # 3 valid records x (base + 2 checkpoints)
    assert frozen_loads == 1  # step 0 and the checkpoints share one read of the base
    calls = _count_decodes(monkeypatch)

    def crash_after_step_2(step):
        if step == 2:
            raise Crash("killed")

    calls.clear()
    with pytest.raises(Crash):
        sweep.evaluate_run(_sweep(run_dir, data, tmp_path / "cut", vae_path), on_step_done=crash_after_step_2)
    assert sum(calls) == 2 * 3 and not (tmp_path / "cut" / "report.json").exists()
    calls.clear()
    resumed = sweep.evaluate_run(_sweep(run_dir, data, tmp_path / "cut", vae_path))
    assert calls == [2, 1]  # only step 4 was decoded (3 records in batches of 2)
    assert [(s["decoded"], s["cached"]) for s in resumed["steps"]] == [(0, 3), (0, 3), (3, 0)]
    assert _stable(resumed) | {"title": ""} == _stable(whole) | {"title": ""}
    for name in ("metrics.csv", "steps/step_000004/per_image.csv", "ceiling/per_image.csv"):
        assert (tmp_path / "cut" / name).read_text() == (whole_dir / name).read_text()

    calls.clear()
    again = sweep.evaluate_run(_sweep(run_dir, data, tmp_path / "cut", vae_path, canvases=0))
    assert calls == [] and _stable(again) == _stable(resumed)

    # A report folder of this run is not reused for another data folder without --overwrite.
    other = tmp_path / "other_data"
    shutil.copytree(data, other)
    with pytest.raises(FileExistsError, match="--overwrite"):
        sweep.evaluate_run(EvalSettings(run_dir=run_dir, data=other, out=tmp_path / "cut",
                                        decoding=DecodingSettings(vae=vae_path)))  # fmt: skip


@pytest.mark.slow
def test_eval_split_over_two_processes_writes_the_one_device_report(setup, swept, tmp_path):
    """`paliseg eval` in 2 processes of 2 devices each, joined as `paliseg train` joins them: each batch (2,
    rounded up to 4: a row per device) is split over the 4 devices, each process loads its rows' images, and
    process 0 writes the report one device wrote, from the same decoded texts."""
    data, run_dir, vae_path = setup
    whole, whole_dir, _, _ = swept
    out = tmp_path / "multi"
    argv = ["eval", str(run_dir), "--data", str(data), "--out", str(out), "--vae", str(vae_path), "--batch-size", "2"]
    run_processes(argv, tmp_path / "logs")
    multi = json.loads((out / "report.json").read_text())
    assert _stable(multi) | {"title": ""} == _stable(whole) | {"title": ""}
    for step in (0, 2, 4):
        multi_texts, one_texts = (
            {entry["key"]: entry for entry in _cached(step_path(f, step))} for f in (out, whole_dir)
        )
        assert {k: e["text"] for k, e in multi_texts.items()} == {k: e["text"] for k, e in one_texts.items()}
        for key, entry in one_texts.items():  # confidences: the same up to float rounding in another batch shape
            assert multi_texts[key]["chunk_scores"] == pytest.approx(entry["chunk_scores"], rel=1e-5)
        assert len(one_texts) == 3


def _cached(path: Path) -> list[dict]:
    """The decoded records of a prediction cache file (its first line is the fingerprint)."""
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


def test_report_files_best_json_and_scores(setup, swept):
    data, run_dir, vae_path = setup
    report, out, _, _ = swept
    best = report["best"]
    recorded = json.loads((run_dir / "best.json").read_text())  # (a later sweep of this run may rewrite it)
    assert {k: recorded[k] for k in ("step", "metric", "value")} == {k: best[k] for k in ("step", "metric", "value")}
    assert best["step"] in (2, 4) and best["metric"] == "miou" and best["report"] == str((out / "report.md").absolute())
    values = {s["step"]: s["summary"]["overall"]["miou"] for s in report["steps"]}
    assert best["value"] == max(values[2], values[4])
    # The ceiling of a perfect token round trip of these rectangles is scored like any prediction.
    assert report["ceiling"]["overall"]["count"] == 3 and report["ceiling"]["overall"]["box_miou"] == 1.0
    for name in ("report.md", "report.json", "metrics.csv", "plots/miou_vs_step.png", "plots/iou_histogram.png",
                 "canvases/best.png", "canvases/worst_2.png", "steps/step_000000/per_image.csv"):  # fmt: skip
        assert (out / name).is_file(), name
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["step"], r["kind"], r["prompt"]) for r in rows][:2] == [("0", "base", "all"), ("0", "base", PROMPT)]
    assert rows[-1]["kind"] == "ceiling" and sum(r["best"] == "True" for r in rows) == 2
    markdown = (out / "report.md").read_text()
    assert f"**step {best['step']} (best)**" in markdown and "base (before fine-tuning)" in markdown
    assert "ceiling (token round trip)" in markdown and "![best images](canvases/best.png)" in markdown
    # The scores are the metrics' scores of the cached texts, image by image.
    from metrics import scoring

    cache_lines = (out / "predictions" / "step_000004.jsonl").read_text().splitlines()[1:]
    texts = {json.loads(line)["key"]: json.loads(line)["text"] for line in cache_lines}
    items, _ = dataset.check_split(data, "valid")
    model_vae = vae.MaskVAE.from_npz(vae_path)
    expected = []
    for item in items:  # one by one, against the sweep's batches
        predicted = from_text(texts[item.key], PROMPT, item.width, item.height, model_vae)
        gt = images.read_mask(item.record.mask_path)
        boxes = [
            tokens.locs_to_box(o.locs, item.width, item.height) for o in tokens.parse_suffix(item.record.suffix).objects
        ]
        expected.append(scoring.score_image(predicted.mask, gt, PROMPT, item.record.image, pred_boxes=predicted.boxes,
                                            gt_boxes=boxes).iou)  # fmt: skip
    assert report["steps"][2]["summary"]["overall"]["miou"] == pytest.approx(np.mean(expected))


def test_eval_cli_reports_and_skips_a_checkpoint_of_another_config(setup, tmp_path, capsys):
    data, run_dir, vae_path = setup
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    # Step 6: parameters of another preset (tiny-112: another image size) saved into this run.
    other = model.init_params(model_configs.preset("tiny-112"), jax.random.key(1))
    with run_checkpoints.manager(copy) as manager:
        run_checkpoints.save(manager, 6, {"step": jnp.asarray(6, jnp.int32), "params": other}, {"step": 6})
        manager.wait_until_finished()
    argv = ["eval", str(copy), "--data", str(data), "--out", str(tmp_path / "report"), "--steps", "4,6", "--no-base",
            "--no-ceiling", "--vae", str(vae_path), "--batch-size", "4", "--canvases", "1", "--json"]  # fmt: skip
    assert main(argv) == 0  # the sweep goes on past the broken checkpoint
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "step      6: FAILED" in captured.err and "best: step 4" in captured.err
    assert [(s["step"], s["status"]) for s in report["steps"]] == [(4, "ok"), (6, "failed")]
    assert report["best"]["step"] == 4 and report["failed_steps"][0]["error"]
    assert "Checkpoints that could not be scored" in (tmp_path / "report" / "report.md").read_text()


def test_predict_cli_writes_masks_objects_json_canvases_and_coco(setup, tmp_path, capsys):
    data, run_dir, vae_path = setup
    out = tmp_path / "pred"
    jsonl = records.annotations_path(data, "valid")
    argv = ["predict", "--run", str(run_dir), "--step", "4", "--image", str(jsonl), "--out", str(out),
            "--vae", str(vae_path), "--batch-size", "2", "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["predicted"] == 3 and result["summary"]["overall"]["count"] == 3
    names = [r["name"] for r in result["results"]]
    assert names == ["valid_0.segment_crack", "valid_1.segment_crack", "valid_2.segment_crack"]
    for index, entry in enumerate(result["results"]):
        size = Image.open(data / "images" / f"valid_{index}.png").size
        mask = images.read_mask(out / entry["mask"])
        assert mask.shape == (size[1], size[0])  # full resolution
        assert (out / entry["canvas"]).is_file() and (out / "json" / f"{entry['name']}.json").is_file()
        for obj in entry["objects"]:
            assert obj["mask"] is None or (out / obj["mask"]).is_file()
            assert 0 < obj["confidence"] <= 1
    predicted = records.read_records(out / "predictions.jsonl")
    coco_scores = [r["score"] for r in json.loads((out / "coco_results.json").read_text())]
    assert coco_scores == [o["confidence"] for r in result["results"] for o in r["objects"]]
    assert [r.suffix for r in predicted] == [r["text"] for r in result["results"]]
    assert json.loads((out / "coco_dataset.json").read_text())["categories"] == [{"id": 1, "name": PROMPT}]
    assert main(argv) == 1  # an existing prediction set is not replaced without --overwrite
    assert "--overwrite" in capsys.readouterr().err

    # The Python API gives the same texts and masks for the same step, from PIL images.
    predictor = Predictor.from_run(run_dir, 4, vae_model=vae.MaskVAE.from_npz(vae_path), batch_size=2)
    photos = [Image.open(data / "images" / f"valid_{i}.png") for i in range(3)]
    api = predictor.predict(photos, PROMPT)
    assert [p.text for p in api] == [r["text"] for r in result["results"]]
    assert [round(o.confidence, 4) for p in api for o in p.objects] == coco_scores
    for prediction, name in zip(api, names):
        expected = images.read_mask(out / "masks" / f"{name}.png")
        np.testing.assert_array_equal(prediction.mask if prediction.valid else np.zeros_like(expected), expected)


def test_predict_on_plain_images_and_bad_inputs(setup, tmp_path, capsys):
    data, run_dir, vae_path = setup
    folder = tmp_path / "photos"
    shutil.copytree(data / "images", folder)
    (folder / "broken.png").write_bytes(b"\x89PNG not an image")
    (run_dir / "best.json").unlink(missing_ok=True)
    out = tmp_path / "pred"
    argv = ["predict", "--run", str(run_dir), "--image", str(folder), "--prompt", PROMPT, "--out", str(out),
            "--vae", str(vae_path), "--json"]  # fmt: skip
    assert main(argv) == 0  # no best.json: the latest step
    result = json.loads(capsys.readouterr().out)
    assert result["model"].endswith("step 4") and result["predicted"] == 7 and len(result["skipped"]) == 1
    assert result["summary"] is None and (out / "canvases" / "train_0.segment_crack.png").is_file()

    base = ["predict", "--run", str(run_dir), "--image", str(folder), "--vae", str(vae_path)]
    assert main(base + ["--step", "best", "--prompt", PROMPT, "--out", str(tmp_path / "x")]) == 1
    assert "no best step recorded" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "y")]) == 1
    assert "--prompt is required" in capsys.readouterr().err
    plain = _plain_tokenizer(tmp_path / "plain.model")  # a SentencePiece model without <loc>/<seg> pieces
    assert main(base + ["--tokenizer", str(plain), "--prompt", PROMPT, "--out", str(tmp_path / "z")]) == 1
    assert "not a PaliGemma tokenizer" in capsys.readouterr().err


def test_predict_raw_prints_texts_and_no_constrain_decodes_freely(setup, tmp_path, capsys):
    data, run_dir, vae_path = setup
    image = data / "images" / "valid_0.png"
    base = ["predict", "--run", str(run_dir), "--step", "0", "--image", str(image), "--prompt", PROMPT,
            "--vae", str(vae_path)]  # fmt: skip
    assert main(base) == 1 and "--out DIR is required" in capsys.readouterr().err
    predictor = Predictor.from_run(run_dir, 0, vae_model=vae.MaskVAE.from_npz(vae_path))  # untrained: the grammar shows
    texts = []
    for flags, constrain in (([], None), (["--no-constrain"], False)):
        assert main(base + ["--raw", *flags]) == 0
        printed = capsys.readouterr().out
        predictor.constrain = constrain
        [expected] = predictor.predict(image, PROMPT)
        assert printed == expected.text + "\n"
        texts.append(expected)
        assert main(base + ["--raw", "--json", *flags]) == 0
        assert json.loads(capsys.readouterr().out)["results"][0]["text"] == expected.text
    assert texts[0].valid and texts[0].invalid_count == 0  # constrained: always parses
    assert texts[1].text != texts[0].text


def _plain_tokenizer(path: Path) -> Path:
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["segment crack in the wall"] * 50 + ["a b c d e f g h"] * 50), model_writer=buffer,
        vocab_size=23, pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2,
    )  # fmt: skip
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def loaded_vaes(monkeypatch) -> list[str]:
    """The paths `vae.load` loads from here on."""
    loaded: list[str] = []
    load = vae.load
    monkeypatch.setattr(vae, "load", lambda path=None: loaded.append(str(path)) or load(path))
    return loaded


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """Another current folder whose models/vae-oid.npz is another VAE than the run's (the default one)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PALISEG_MODELS", raising=False)
    vae.write_random_npz(tmp_path / "models" / "vae-oid.npz", seed=1)
    return tmp_path / "models" / "vae-oid.npz"


def test_predict_and_eval_use_the_runs_vae_and_refuse_another(setup, elsewhere, loaded_vaes, tmp_path, capsys):
    data, run_dir, vae_path = setup
    digests = (identity.identify(vae_path).sha256, identity.identify(elsewhere).sha256)
    image = data / "images" / "valid_0.png"
    predict = ["predict", "--run", str(run_dir), "--step", "4", "--image", str(image), "--prompt", PROMPT]
    evaluate = ["eval", str(run_dir), "--data", str(data), "--steps", "4", "--no-base", "--canvases", "0"]
    for argv in (predict, evaluate):
        out = tmp_path / f"{argv[0]}_default"
        assert main(argv + ["--out", str(out)]) == 0
        assert loaded_vaes[-1] == str(vae_path.absolute())  # not ./models/vae-oid.npz
        capsys.readouterr()

        refused = tmp_path / f"{argv[0]}_refused"
        assert main(argv + ["--out", str(refused), "--vae", str(elsewhere)]) == 1
        err = capsys.readouterr().err
        assert all(digest in err for digest in digests) and "--allow-vae-mismatch" in err
        assert not refused.exists()  # nothing written

        assert (
            main(
                argv + ["--out", str(tmp_path / f"{argv[0]}_allowed"), "--vae", str(elsewhere), "--allow-vae-mismatch"]
            )
            == 0
        )
        assert loaded_vaes[-1] == str(elsewhere.absolute()) and "warning" in capsys.readouterr().err


def test_eval_refuses_data_of_another_vae_and_legacy_runs_behave_as_before(
    setup, elsewhere, loaded_vaes, tmp_path, capsys
):
    data, run_dir, vae_path = setup
    other_data = tmp_path / "other_data"
    shutil.copytree(data, other_data)
    files.write_json(
        other_data / records.CONVERSION_FILE, {"vae": identity.identify(elsewhere).to_json()}, overwrite=True
    )
    argv = [
        "eval",
        str(run_dir),
        "--data",
        str(other_data),
        "--steps",
        "4",
        "--no-base",
        "--no-ceiling",
        "--canvases",
        "0",
    ]
    assert main(argv + ["--out", str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err
    assert identity.identify(vae_path).sha256 in err and identity.identify(elsewhere).sha256 in err
    assert not (tmp_path / "refused").exists()
    assert main(argv + ["--out", str(tmp_path / "allowed"), "--allow-vae-mismatch"]) == 0
    assert loaded_vaes[-1] == str(vae_path.absolute()) and "warning" in capsys.readouterr().err

    legacy = tmp_path / "legacy_run"  # a run from before the VAE was recorded, on data without a record
    shutil.copytree(run_dir, legacy)
    config = json.loads((legacy / "config.json").read_text())
    del config["vae"]
    files.write_json(legacy / "config.json", config, overwrite=True)
    (other_data / records.CONVERSION_FILE).unlink()
    assert Run(legacy).vae is None
    predict = ["predict", "--run", str(legacy), "--step", "4", "--image", str(data / "images" / "valid_0.png"),
               "--prompt", PROMPT]  # fmt: skip
    assert main(predict + ["--out", str(tmp_path / "legacy_default")]) == 0
    assert Path(loaded_vaes[-1]) == elsewhere.absolute()  # the default search, as before
    assert main(predict + ["--out", str(tmp_path / "legacy_any"), "--vae", str(vae_path)]) == 0  # no record: any --vae
    assert loaded_vaes[-1] == str(vae_path.absolute())
    assert main(["eval", str(legacy), "--data", str(other_data), "--steps", "4", "--no-base", "--no-ceiling",
                 "--canvases", "0", "--out", str(tmp_path / "legacy_eval")]) == 0  # fmt: skip
    assert Path(loaded_vaes[-1]) == elsewhere.absolute()


def test_a_run_predicts_in_the_dtype_asked_for(setup):
    """--dtype bfloat16 on a float32 (tiny) run: the weights, matmuls and cache follow, and the texts decode."""
    data, run_dir, vae_path = setup
    predictor = Predictor.from_run(run_dir, 4, vae_model=vae.MaskVAE.from_npz(vae_path), batch_size=2, dtype="bfloat16")
    config = predictor.config
    assert (config.param_dtype, config.compute_dtype, config.cache_dtype) == ("bfloat16",) * 3
    assert {leaf.dtype for leaf in jax.tree.leaves(predictor.params)} == {jnp.dtype(jnp.bfloat16)}
    [prediction] = predictor.predict(data / "images" / "valid_0.png", PROMPT)
    assert isinstance(prediction.text, str)
    run = Run(run_dir)
    assert sweep._fingerprint(run, 4, 8, "bfloat16") != sweep._fingerprint(run, 4, 8)
