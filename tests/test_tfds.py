"""Converted data as a TFDS dataset: read back through `tfds.builder_from_directory` (tf.data on the
tfrecord files, a data source on the array_record files) it equals the JSONL; every paliseg reader takes
the TFDS folder (the same records, images and masks; train and eval give the same losses and scores); a
failed conversion leaves nothing that looks like a dataset."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vae
from converters import synthetic
from converters.convert import ConvertConfig, convert
from converters.sources import ConversionError
from infer import serve
from paliseg import dataset, images, records, tfds_data, tokens
from paliseg.cli.main import main
from train import commands as train_commands
from train import run as run_folder
from train.run import Run

SPLITS = ("train", "valid")


def shapes_export(root: Path, objects_per_image=(1, 3), classes=("ellipse", "rectangle"), n_train=5) -> Path:
    synthetic.write_synthetic_coco(
        root, n_train=n_train, n_valid=3, seed=4, config=synthetic.ShapesConfig(64, classes, objects_per_image)
    )
    return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(a folder converted with --output-format both, the same export converted as tfds only, the VAE)."""
    root = tmp_path_factory.mktemp("tfds")
    export = shapes_export(root / "shapes")
    vae_path = vae.write_random_npz(root / "vae.npz")
    convert(ConvertConfig([export], root / "both", vae=vae_path, output_format="both"))
    convert(ConvertConfig([export], root / "tfds", vae=vae_path, output_format="tfds"))
    return root / "both", root / "tfds", vae_path


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_example(example: dict, record: records.Record, folder: Path) -> None:
    """A TFDS example (its image left encoded, its masks decoded by TFDS) against its JSONL record and files."""
    assert _text(example["prefix"]) == record.prefix and _text(example["suffix"]) == record.suffix
    assert records.parse_record(_text(example["record"])) == record
    assert example["image"] == (folder / record.image).read_bytes()  # a plain JPEG is stored as it is
    mask = images.read_mask(record.mask_path)
    np.testing.assert_array_equal(np.asarray(example["mask"])[..., 0] > 127, mask)
    height, width = mask.shape
    parsed = tokens.parse_suffix(record.suffix).objects
    boxes = np.asarray(example["objects"]["bbox"]).reshape(-1, 4)
    assert len(boxes) == len(parsed) == len(record.extra["objects"])
    union = np.zeros_like(mask)
    for box, obj, info, label, object_mask in zip(
        boxes, parsed, record.extra["objects"], example["objects"]["label"], example["objects"]["mask"]
    ):
        x1, y1, x2, y2 = info["box"]
        np.testing.assert_allclose(box, [y1 / height, x1 / width, y2 / height, x2 / width], atol=1e-3)
        assert tokens.box_to_locs((x1, y1, x2, y2), width, height) == obj.locs and _text(label) == obj.label
        union |= np.asarray(object_mask)[..., 0] > 127
    np.testing.assert_array_equal(union, mask)  # the record's mask is the union of its objects'


def test_tfds_examples_equal_the_jsonl_records_and_masks(converted):
    import tensorflow_datasets as tfds

    both, tfds_only, _ = converted
    for folder in (both, tfds_only):
        builder = tfds.builder_from_directory(str(folder))  # no paliseg code
        assert sorted(builder.info.splits) == sorted(SPLITS)
        conversion = builder.info.metadata["conversion"]
        assert conversion == json.loads((folder / records.CONVERSION_FILE).read_text())
        assert (
            len(conversion["vae"]["sha256"]) == 64 and conversion["settings"]["prompts"]["ellipse"] == "segment ellipse"
        )
        for split in SPLITS:
            jsonl = records.read_records(records.annotations_path(both, split))
            encoded = {"image": tfds.decode.SkipDecoding()}  # TF's JPEG decoder rounds otherwise than PIL's
            by_tf_data = list(builder.as_dataset(split=split, decoders=encoded).as_numpy_iterator())  # tfrecord
            # array_record (a builder of its own: as_data_source switches its builder to that format)
            by_source = tfds.builder_from_directory(str(folder)).as_data_source(split, decoders=encoded)
            assert len(by_tf_data) == len(by_source) == len(jsonl) == builder.info.splits[split].num_examples
            for index, record in enumerate(jsonl):
                _check_example(by_tf_data[index], record, both)
                _check_example(by_source[index], record, both)


def test_paliseg_reads_a_tfds_folder_as_the_jsonl_one(converted, capsys):
    both, tfds_only, _ = converted
    assert not records.available_splits(tfds_only) and dataset.find_splits(tfds_only) == list(SPLITS)
    for split in SPLITS:
        from_jsonl, from_tfds = dataset.read_records(both, split), dataset.read_records(tfds_only, split)
        assert from_tfds == from_jsonl
        assert [r.line for r in from_tfds] == [r.line for r in from_jsonl]  # where: the JSONL's line number
        assert from_tfds[0].where == f"{tfds_only}/paliseg-{split}:1"
        for a, b in zip(from_jsonl, from_tfds):
            assert b.image_path.read_bytes() == a.image_path.read_bytes()
            np.testing.assert_array_equal(images.read_mask(b.mask_path), images.read_mask(a.mask_path))
        items, skips = dataset.check_split(tfds_only, split)
        assert not skips and [i.key for i in items] == [i.key for i in dataset.check_split(both, split)[0]]
    assert dataset.split_digest(tfds_only, "train") != dataset.split_digest(tfds_only, "valid")
    with pytest.raises(FileNotFoundError, match="no split 'test'; found: train, valid"):
        dataset.read_records(tfds_only, "test")

    assert main(["validate", str(tfds_only), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["splits"]["valid"]["records"] == len(dataset.read_records(both, "valid"))
    out = tfds_only.parent / "canvases"
    assert main(["visualize", "--data", str(tfds_only), "--split", "valid", "--out", str(out), "--json"]) == 0
    drawn = json.loads(capsys.readouterr().out)["canvases"]
    assert len(drawn) == len(dataset.read_records(both, "valid")) and all(Path(p).is_file() for p in drawn)
    assert main(["vae", "ceiling", str(tfds_only), "--split", "valid", "--json"]) == 0
    from_tfds = json.loads(capsys.readouterr().out)
    assert main(["vae", "ceiling", str(both), "--split", "valid", "--json"]) == 0
    from_jsonl = json.loads(capsys.readouterr().out)
    assert from_tfds["overall"] == from_jsonl["overall"]


def test_images_are_stored_in_their_displayed_frame(tmp_path):
    import tensorflow as tf

    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:5, :10] = 200  # a corner that shows where the image is turned
    plain, turned = tmp_path / "plain.jpg", tmp_path / "turned.jpg"
    Image.fromarray(pixels).save(plain)
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = 6
    Image.fromarray(pixels).save(turned, exif=exif)
    assert tfds_data.displayed_bytes(plain) == plain.read_bytes()  # any decoder shows the file as paliseg does
    stored = tfds_data.displayed_bytes(turned)  # a decoder that ignores EXIF would show it turned: re-encoded
    decoded = tf.io.decode_image(stored, channels=3).numpy()
    np.testing.assert_array_equal(decoded, np.asarray(images.read_image(turned)))
    assert decoded.shape == (30, 20, 3)


def test_a_failed_conversion_leaves_no_dataset_and_overwrite_replaces_one(tmp_path, converted):
    _, _, vae_path = converted
    export = shapes_export(tmp_path / "shapes")
    (export / "valid" / next((export / "valid").glob("*.jpg")).name).write_bytes(b"\xff\xd8 not a JPEG")
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="--strict"):
        convert(ConvertConfig([export], out, vae=vae_path, output_format="both", strict=True))
    assert not out.exists() and list(tmp_path.iterdir()) == [export]  # no DIR, no hidden partial folder

    convert(ConvertConfig([export], out, vae=vae_path))  # JSONL, the corrupt image skipped
    (out / "notes.txt").write_text("mine")
    convert(ConvertConfig([export], out, vae=vae_path, output_format="tfds", overwrite=True))
    left = sorted(p.name for p in out.iterdir())
    assert "notes.txt" in left and not any(n.startswith("_annotations") or n in ("images", "masks") for n in left)
    assert dataset.find_splits(out) == list(SPLITS) and tfds_data.is_dataset(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _tiny_run(data: Path, out: Path) -> Path:
    config = run_folder.resolve_config(dict(
        data=[str(data)], out=str(out), init="random", preset="tiny", trainable="all", seq_len=48,
        steps=4, batch_size=2, save_every=2, lr=3e-3, workers=1,
    ))  # fmt: skip
    train_commands.run(config)
    return out


def _losses(run_dir: Path) -> list[tuple[str, str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [(row["step"], row["loss"], row["grad_norm"]) for row in csv.DictReader(handle)]


def _scores(report: dict) -> list:
    return [{k: v for k, v in step.items() if k not in ("decoded", "cached", "seconds")} for step in report["steps"]]


@pytest.mark.slow
def test_train_and_eval_on_the_tfds_folder_equal_the_jsonl_folder(tmp_path, capsys):
    export = shapes_export(tmp_path / "shapes", objects_per_image=(1, 1), classes=("rectangle",), n_train=6)
    vae_path = vae.write_random_npz(tmp_path / "vae.npz")
    convert(ConvertConfig([export], tmp_path / "jsonl", vae=vae_path))
    convert(ConvertConfig([export], tmp_path / "tfds", vae=vae_path, output_format="tfds"))
    runs = {kind: _tiny_run(tmp_path / kind, tmp_path / f"run-{kind}") for kind in ("jsonl", "tfds")}
    losses = {kind: _losses(run) for kind, run in runs.items()}
    assert len(losses["tfds"]) == 4 and losses["tfds"] == losses["jsonl"]
    prompts = {kind: serve.run_prompts(Run(run)) for kind, run in runs.items()}  # `paliseg serve`'s suggestions
    assert prompts["tfds"] == prompts["jsonl"] == ["segment rectangle"]

    reports = {}
    for kind in ("jsonl", "tfds"):
        argv = ["eval", str(runs["jsonl"]), "--data", str(tmp_path / kind), "--out", str(tmp_path / f"eval-{kind}"),
                "--vae", str(vae_path), "--batch-size", "2", "--canvases", "0", "--json"]  # fmt: skip
        assert main(argv) == 0
        reports[kind] = json.loads(capsys.readouterr().out)
    assert [step["step"] for step in reports["tfds"]["steps"]] == [0, 2, 4]
    assert _scores(reports["tfds"]) == _scores(reports["jsonl"])
