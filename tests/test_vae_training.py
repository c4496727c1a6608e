"""VAE training (layout of the output, exact resume, dead-code restarts), synthetic shapes, the mask sources
and the round-trip ceiling (library and `paliseg vae` CLI), on tiny configs and tiny generated data."""

from __future__ import annotations

import collections
import dataclasses
import json

import jax
import numpy as np
import pytest
from PIL import Image

import vae
from paliseg import files, records
from paliseg import tokens as codec
from paliseg.cli.main import main as cli
from vae import ceiling, sources, synthetic, training
from vae import model as vae_model


@pytest.fixture(scope="module")
def random_npz(tmp_path_factory):
    return vae.write_random_npz(tmp_path_factory.mktemp("vae") / "vae-random.npz", seed=7)


# ---------------------------------------------------------------------------------------------------------
# Synthetic shapes


@pytest.mark.parametrize("kind", synthetic.SHAPES)
def test_every_synthetic_shape_gives_a_crop_that_fills_its_box(kind):
    rng = np.random.default_rng(0)
    for _ in range(3):
        mask = synthetic.draw_shape(rng, kind)
        box = vae.masks.tight_box(mask)
        assert box is not None
        crop = vae.masks.crop_to_64(mask, box)
        assert crop.shape == (64, 64) and crop.min() >= 0.0 and crop.max() <= 1.0
        # A tight box: the object reaches all four edges of the crop.
        assert crop[0].max() > 0 and crop[-1].max() > 0 and crop[:, 0].max() > 0 and crop[:, -1].max() > 0


def test_synthetic_crops_are_deterministic_and_mixed():
    a, b = synthetic.synthetic_crops(40, seed=1), synthetic.synthetic_crops(40, seed=1)
    np.testing.assert_array_equal(a, b)
    fill = a.mean((1, 2))
    assert fill.min() < 0.25 and fill.max() > 0.9  # thin cracks and full bands are both there


def test_unknown_shape_is_an_error():
    with pytest.raises(ValueError, match="unknown synthetic shape"):
        synthetic.draw_shape(np.random.default_rng(0), "hexagon")


# ---------------------------------------------------------------------------------------------------------
# Sources


def write_coco(folder, with_image=True):
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "categories": [{"id": 0, "name": "crack", "supercategory": "none"}, {"id": 1, "name": "crack-real", "supercategory": "crack"}],
        "images": [{"id": 0, "file_name": "a.jpg", "width": 80, "height": 60}, {"id": 1, "file_name": "b.jpg", "width": 80, "height": 60}],
        "annotations": [
            {"id": 0, "image_id": 0, "category_id": 1, "bbox": [10, 10, 20, 10], "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]], "area": 200, "iscrowd": 0},
            {"id": 1, "image_id": 0, "category_id": 1, "bbox": [50, 30, 10, 20], "segmentation": [], "area": 200, "iscrowd": 0},
        ],
    }  # fmt: skip
    (folder / records.COCO_ANNOTATIONS_FILE).write_text(json.dumps(data))
    if with_image:
        for name in ("a.jpg", "b.jpg"):
            Image.new("RGB", (80, 60), (90, 90, 90)).save(folder / name)
    return folder


def test_coco_export_gives_instance_masks_box_only_rectangles_and_empty_images(tmp_path):
    found = list(sources.samples(write_coco(tmp_path / "valid")))
    assert [s.prompt for s in found] == ["crack-real", "crack-real"]  # the unused placeholder class is skipped
    first, second = found
    assert first.boxes == [(10.0, 10.0, 30.0, 20.0), (50.0, 30.0, 60.0, 50.0)]
    assert first.instance_masks[1][30:50, 50:60].all() and first.instance_masks[1].sum() == 200
    polygon = first.instance_masks[0]
    assert polygon[12:18, 12:28].all() and not polygon[:, 35:].any()
    np.testing.assert_array_equal(first.mask, first.instance_masks[0] | first.instance_masks[1])
    assert second.boxes == [] and not second.mask.any()
    assert sources.kind_of(tmp_path) == "coco-splits"
    assert len(list(sources.samples(tmp_path, split="valid"))) == 2
    with pytest.raises(ValueError, match="no split 'train'"):
        list(sources.samples(tmp_path, split="train"))


def test_converted_dataset_boxes_come_from_the_suffix_locs(tmp_path):
    mask = np.zeros((60, 80), bool)
    mask[10:20, 10:30] = True
    files.write_mask(tmp_path / "masks" / "a.png", mask)
    Image.new("RGB", (80, 60)).save(tmp_path / "a.jpg")
    locs = codec.box_to_locs((10, 10, 30, 20), 80, 60)
    suffix = codec.SegObject(locs, tuple(range(16)), "crack").to_text()
    records.write_records(records.annotations_path(tmp_path, "valid"), [
        records.Record("a.jpg", "segment crack", suffix, "masks/a.png"),
        records.Record("gone.jpg", "segment crack", suffix, "masks/a.png"),  # skipped, as eval skips it
    ])  # fmt: skip
    skipped = []
    (sample,) = sources.samples(tmp_path, skipped=skipped)
    assert [(skip.where[-1], skip.reason) for skip in skipped] == [("2", "missing_image")]
    assert sample.prompt == "segment crack" and sample.instance_masks is None
    np.testing.assert_allclose(sample.boxes[0], (10, 10, 30, 20), atol=0.05)
    np.testing.assert_array_equal(sample.mask, mask)
    assert len(sample.object_masks()) == 1 and sample.object_masks()[0] is sample.mask


def test_mask_folder_objects_are_connected_components(tmp_path):
    mask = np.zeros((50, 50), bool)
    mask[5:10, 5:20] = True
    mask[30:45, 30:32] = True
    mask[10, 20] = True  # diagonal neighbour: 8-connected to the first object
    files.write_mask(tmp_path / "m.png", mask)
    (sample,) = sources.samples(tmp_path)
    assert sorted(sample.boxes) == [(5.0, 5.0, 21.0, 11.0), (30.0, 30.0, 32.0, 45.0)]
    np.testing.assert_array_equal(np.logical_or.reduce(sample.instance_masks), mask)


def test_unknown_source_folder_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a converted dataset"):
        sources.kind_of(tmp_path)
    with pytest.raises(FileNotFoundError):
        sources.kind_of(tmp_path / "absent")


# ---------------------------------------------------------------------------------------------------------
# Ceiling


def test_round_trip_unites_the_pasted_objects_and_scores_with_metrics(tmp_path, random_npz):
    model = vae.load(random_npz)
    first, empty = sources.samples(write_coco(tmp_path / "valid"))
    result = ceiling.round_trip(model, first, "instance")
    segs = vae.masks_to_tokens(model, first.instance_masks, first.boxes)
    locs = [codec.box_to_locs(b, 80, 60) for b in first.boxes]
    expected = np.logical_or.reduce(vae.tokens_to_masks(model, segs, locs, 80, 60))
    np.testing.assert_array_equal(result.prediction, expected)
    inter, union = (expected & first.mask).sum(), (expected | first.mask).sum()
    assert result.iou == pytest.approx(inter / union) and result.objects == 2
    assert ceiling.round_trip(model, first, "merged").objects == 1
    nothing = ceiling.round_trip(model, empty, "instance")
    assert nothing.iou == 1.0 and not nothing.prediction.any() and nothing.objects == 0
    summary = ceiling.summarize([result, nothing], collections.Counter())
    assert summary["prompts"]["crack-real"]["images"] == 2
    assert summary["overall"]["miou"] == pytest.approx((result.iou + 1.0) / 2)


def test_ceiling_cli_reports_json_per_prompt_and_writes_a_canvas(tmp_path, random_npz, capsys):
    dataset = write_coco(tmp_path / "export" / "valid").parent
    code = cli(
        [
            "vae",
            "ceiling",
            str(dataset),
            "--vae",
            str(random_npz),
            "--json",
            "--canvas",
            str(tmp_path / "canvas"),
            "--canvas-count",
            "2",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["prompts"]) == {"crack-real"} and result["overall"]["images"] == 2
    assert result["objects"] == "instance" and result["vae"] == str(random_npz)
    assert Image.open(result["canvas"]).size[0] > 300


def test_vae_cli_errors_are_one_line(tmp_path, capsys):
    assert cli(["vae", "ceiling", str(tmp_path / "absent"), "--vae", str(tmp_path / "x.npz")]) == 1
    assert "error:" in capsys.readouterr().err


def test_encode_cli_prints_tokens_of_the_tight_box(tmp_path, random_npz, capsys):
    mask = np.zeros((60, 80), bool)
    mask[10:20, 10:30] = True
    files.write_mask(tmp_path / "m.png", mask)
    assert cli(["vae", "encode", str(tmp_path / "m.png"), "--vae", str(random_npz), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["box"] == [10, 10, 30, 20]
    parsed = codec.parse_suffix(result["tokens"])
    assert parsed.invalid_count == 0 and list(parsed.objects[0].seg) == result["seg"]
    assert 0.0 <= result["round_trip_iou"] <= 1.0


# ---------------------------------------------------------------------------------------------------------
# Training

TINY = dict(steps=4, batch_size=4, synthetic_count=24, save_every=2, warmup_steps=1, restart_every=3)


@pytest.mark.slow
def test_training_writes_the_vae_oid_layout_and_resumes_exactly(tmp_path, monkeypatch):
    config = training.VaeTrainConfig(**TINY)
    straight = training.train(["synthetic"], tmp_path / "a.npz", config, dtype=np.float16)
    assert straight["steps"] == 4 and straight["train_crops"] == {"synthetic": 24}
    with np.load(tmp_path / "a.npz") as data:
        assert {k: data[k].shape for k in data.files} == vae_model.expected_shapes()
        assert {data[k].dtype for k in data.files} == {np.dtype(np.float16)}
    assert (tmp_path / "a.npz.state").is_file()

    batch_at = training.batch_at

    def interrupted(train, step, config):  # Ctrl-C during step 3, after the state of step 2 was saved
        if step == 3:
            raise KeyboardInterrupt
        return batch_at(train, step, config)

    monkeypatch.setattr(training, "batch_at", interrupted)
    with pytest.raises(KeyboardInterrupt):
        training.train(["synthetic"], tmp_path / "b.npz", config, dtype=np.float16)
    monkeypatch.setattr(training, "batch_at", batch_at)
    assert not (tmp_path / "b.npz").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        training.train(["synthetic"], tmp_path / "b.npz", config, dtype=np.float16)
    resumed = training.train(["synthetic"], tmp_path / "b.npz", config, resume=True, dtype=np.float16)
    assert resumed["steps"] == 4
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    other = training.VaeTrainConfig(**{**TINY, "learning_rate": 0.5})
    with pytest.raises(ValueError, match="different training config"):
        training.train(["synthetic"], tmp_path / "b.npz", other, resume=True)


@pytest.mark.slow
def test_dead_codes_restart_on_batch_latents():
    config = training.VaeTrainConfig(**TINY)
    batch = synthetic.synthetic_crops(config.batch_size, seed=2)
    state = training.init_state(config, batch)
    state["ema_count"][:5] = 0.0  # five codes nobody uses ...
    state["codebook"][:5] = 1e3  # ... far from every latent
    state["step"] = np.asarray(config.restart_every - 1, np.int32)  # the step that checks for dead codes
    new_state, metrics = training.make_train_step(config)(state, batch)
    assert int(metrics["restarted"]) >= 5
    latents = vae_model.MaskEncoder().apply({"params": state["params"]["encoder"]}, batch).reshape(-1, 512)
    distances = np.abs(np.asarray(new_state["codebook"])[:5, None, :] - np.asarray(latents)[None]).max(-1).min(-1)
    assert distances.max() < 1e-5  # every restarted code sits on a latent of the batch
    np.testing.assert_array_equal(np.asarray(new_state["ema_count"])[:5], 1.0)
    assert jax.tree.all(jax.tree.map(lambda a: bool(np.isfinite(a).all()), new_state["params"]))


def test_download_fetches_checks_the_layout_and_records_the_digest(tmp_path, random_npz, monkeypatch, capsys):
    from paliseg import downloads

    def fake_download(url, target):  # no network in tests: the "server" serves a vae-oid-layout file
        assert url.endswith("/paligemma/vae-oid.npz")
        target.write_bytes(random_npz.read_bytes())

    monkeypatch.setattr(downloads, "_http_download", fake_download)
    assert cli(["vae", "download", "--dir", str(tmp_path / "models"), "--json"]) == 1  # not the published bytes
    assert "!= expected 8479556" in capsys.readouterr().err
    (tmp_path / "models" / "vae-oid.npz").unlink()
    unpublished = [
        dataclasses.replace(a, size=None, sha256=None) if a.name == "vae-oid.npz" else a for a in downloads.ASSETS
    ]
    monkeypatch.setattr(downloads, "ASSETS", tuple(unpublished))
    assert cli(["vae", "download", "--dir", str(tmp_path / "models"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sha256"] == downloads.sha256_of(random_npz)
    assert result["sha256"] in (tmp_path / "models" / "SHA256SUMS").read_text()

    (tmp_path / "models" / "vae-oid.npz").write_bytes(b"not an npz")  # a corrupted file is reported
    assert cli(["vae", "download", "--dir", str(tmp_path / "models")]) == 1
    assert "differs from the one recorded" in capsys.readouterr().err
