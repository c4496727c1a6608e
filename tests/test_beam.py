"""Apache Beam (DirectRunner, 2 worker processes): `paliseg convert --beam` equals the conversion in this
process (records, masks, TFDS examples, skips and warnings), and a failing pipeline leaves no dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vae
from converters import sam, synthetic
from converters.convert import ConvertConfig, convert
from converters.sources import ConversionError
from paliseg import dataset, images, records
from paliseg.cli.main import main

pytestmark = pytest.mark.slow
TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def polygon_export(root: Path) -> Path:
    """COCO polygons, with a corrupt image, a tiny box and an image listed twice (counted skips)."""
    synthetic.write_synthetic_coco(
        root, n_train=9, n_valid=4, seed=3, config=synthetic.ShapesConfig(64, ("ellipse", "rectangle"), (1, 3))
    )
    path = root / "train" / "_annotations.coco.json"
    data = json.loads(path.read_text())
    (root / "train" / data["images"][2]["file_name"]).write_bytes(b"\xff\xd8 not a JPEG")
    data["images"].append({**data["images"][4], "id": 999})
    first = data["annotations"][0]
    x, y = first["bbox"][:2]
    data["annotations"].append({**first, "id": 999, "bbox": [x, y, 1, 1], "segmentation": []})
    path.write_text(json.dumps(data))
    return root


def box_only_export(root: Path) -> Path:
    synthetic.write_synthetic_coco(
        root, n_train=7, n_valid=0, seed=5, config=synthetic.ShapesConfig(64, ("ellipse", "rectangle"), (1, 3)),
        box_only=True,
    )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[list[Path], dict]:
    root = tmp_path_factory.mktemp("beam")
    checkpoint = root / "tiny_sam.pth"
    torch.save(sam.build_sam("tiny").state_dict(), checkpoint)
    settings = dict(
        vae=vae.write_random_npz(root / "vae.npz"), sam_checkpoint=checkpoint, sam_model="tiny", sam_device="cpu"
    )
    return [polygon_export(root / "cracks"), box_only_export(root / "boxes")], settings


def test_beam_convert_equals_the_conversion_in_this_process(sources, tmp_path, capsys):
    exports, settings = sources
    plain = convert(ConvertConfig(exports, tmp_path / "plain", output_format="both", **settings))
    argv = ["convert", *map(str, exports), "--out", str(tmp_path / "beam"), "--output-format", "both", "--vae",
            str(settings["vae"]), "--sam-checkpoint", str(settings["sam_checkpoint"]), "--sam-model", "tiny",
            "--sam-device", "cpu", "--json", "--beam", *TWO_WORKERS]  # fmt: skip
    assert main(argv) == 0
    on_beam = json.loads(capsys.readouterr().out)

    assert plain["skipped"] == on_beam["skipped"] == {"corrupt_image": 1, "duplicate_image": 1, "tiny_box": 1}
    assert on_beam["warnings"] == plain["warnings"] and plain["warnings"]["box_only_annotation"] == 1
    assert on_beam["splits"] == plain["splits"] and on_beam["settings"]["box_masks"] == "sam"
    origins = set()
    for split in ("train", "valid"):
        expected = sorted(dataset.read_records(tmp_path / "plain", split), key=lambda r: (r.image, r.prefix))
        found = sorted(dataset.read_records(tmp_path / "beam", split), key=lambda r: (r.image, r.prefix))
        assert found == expected and len(found) > 0
        for a, b in zip(expected, found):
            assert b.mask_path.read_bytes() == a.mask_path.read_bytes()
            assert b.image_path.read_bytes() == a.image_path.read_bytes()
            origins |= {o["mask_from"] for o in a.extra["objects"]}
        assert _examples(tmp_path / "beam", split) == _examples(tmp_path / "plain", split)
    assert {"box_sam", "polygon"} <= origins  # both kinds of export went through
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden folder left


def _examples(folder: Path, split: str) -> list[dict]:
    """A split's TFDS examples as stored (array_record), in order: each feature's values, undecoded (the
    serialized bytes are not comparable: protobuf writes the feature map in a per-process order)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.proto import tf_example_pb2

    builder = tfds.builder_from_directory(str(folder))
    source = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    examples = [tf_example_pb2.Example.FromString(source[i]).features.feature for i in range(len(source))]
    return [{key: str(value) for key, value in example.items()} for example in examples]


# Beam's job service reports, from a thread of its own, the worker it stops after the failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failing_pipeline_leaves_no_dataset(sources, tmp_path):
    exports, settings = sources
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"^the Beam pipeline failed: .*ConversionError: .*\(--strict\)"):
        convert(ConvertConfig(exports, out, output_format="both", strict=True, beam=TWO_WORKERS, **settings))
    assert list(tmp_path.iterdir()) == []  # neither DIR nor the hidden folder the workers wrote into
    assert images.max_image_pixels() > 0 and not records.available_splits(tmp_path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(a TFDS-only converted folder, a tiny-preset run trained on it for 2 steps)."""
    from train import commands as train_commands
    from train import run as run_folder

    root = tmp_path_factory.mktemp("beam_predict")
    synthetic.write_synthetic_coco(
        root / "shapes", n_train=4, n_valid=5, seed=6, config=synthetic.ShapesConfig(64, ("rectangle",), (1, 1))
    )
    data = root / "data"
    convert(ConvertConfig([root / "shapes"], data, vae=vae.write_random_npz(root / "vae.npz"), output_format="tfds"))
    config = run_folder.resolve_config(dict(
        data=[str(data)], out=str(root / "run"), init="random", preset="tiny", trainable="all", seq_len=48,
        steps=2, batch_size=2, save_every=2, lr=3e-3, workers=1,
    ))  # fmt: skip
    train_commands.run(config)
    return data, root / "run"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_beam_predict_equals_paliseg_predict(tiny_run, tmp_path, capsys):
    data, run_dir = tiny_run
    images_folder = data.parent / "shapes" / "valid"
    for index, source in enumerate([str(images_folder), f"{data}:valid"]):  # a folder; a TFDS split (scored)
        outs = {kind: tmp_path / f"{kind}-{index}" for kind in ("plain", "beam")}
        summaries = {}
        for kind, beam_options in (("plain", []), ("beam", ["--beam", *TWO_WORKERS])):
            argv = ["predict", "--run", str(run_dir), "--image", source, "--prompt", "segment rectangle",
                    "--out", str(outs[kind]), "--batch-size", "2", "--json", *beam_options]  # fmt: skip
            assert main(argv) == 0
            summaries[kind] = json.loads(capsys.readouterr().out)
        for summary in summaries.values():
            summary.pop("seconds"), summary.pop("images_per_s"), summary.pop("out")
        assert summaries["beam"] == summaries["plain"] and summaries["plain"]["predicted"] == 5
        written = _files(outs["plain"])
        assert {"coco_results.json", "coco_dataset.json", "predictions.jsonl"} <= set(written)
        assert sum(name.startswith("masks/") for name in written) == 5
        assert _files(outs["beam"]) == written  # masks, objects, JSON, canvases, COCO files, byte for byte
    assert summaries["plain"]["summary"] is not None  # the TFDS split's ground truth was scored
