"""`paliseg validate`: a converted dataset passes; each kind of broken record is reported as file:line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import vae
from converters import synthetic
from converters.convert import ConvertConfig, convert
from paliseg import files
from paliseg.cli import main as cli


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("validate")
    synthetic.write_synthetic_coco(
        base / "shapes", n_train=4, n_valid=2, seed=1, config=synthetic.ShapesConfig(64, ("ellipse",), (1, 2))
    )
    convert(ConvertConfig([base / "shapes"], base / "data", vae=vae.write_random_npz(base / "vae.npz")))
    return base / "data"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["validate", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_converted_dataset_is_valid(dataset, capsys):
    code, out, _ = run(capsys, dataset, "--json")
    result = json.loads(out)
    assert code == 0 and result["ok"] and result["problems"] == []
    assert {s: (v["records"], v["bad_records"]) for s, v in result["splits"].items()} == {
        "train": (4, 0),
        "valid": (2, 0),
    }
    assert result["splits"]["train"]["objects"] == sum(
        len(json.loads(line)["objects"]) for line in (dataset / "_annotations.train.jsonl").read_text().splitlines()
    )


def test_each_broken_record_is_reported_with_file_and_line(dataset, tmp_path, capsys):
    good = json.loads((dataset / "_annotations.train.jsonl").read_text().splitlines()[0])
    image = str((dataset / good["image"]).resolve())
    mask = str((dataset / good["mask"]).resolve())
    small_mask = tmp_path / "small.png"
    files.write_mask(small_mask, np.ones((10, 10), bool))
    empty_mask = tmp_path / "empty.png"
    files.write_mask(empty_mask, np.zeros((64, 64), bool))
    n = len(good["objects"])
    locs, rest = good["suffix"][:36], good["suffix"][36:]  # 4 loc tokens of 9 characters, then 16 seg of 8
    variants = [
        {},  # 1: fine
        None,  # 2: not JSON
        {"image": "missing.jpg"},  # 3
        {"suffix": locs + rest[8:]},  # 4: 15 seg tokens in the first object
        {"suffix": "<loc0500><loc0010><loc0400><loc0020>" + rest[: 16 * 8] + " ellipse", "objects": [{}]},  # 5: y2 < y1
        {"mask": str(small_mask)},  # 6: wrong size
        {"suffix": "", "objects": []},  # 7: empty suffix, mask not empty
        {"mask": None},  # 8: no mask
        {"objects": good["objects"] * 2},  # 9: provenance disagrees with the suffix
        {"suffix": "", "objects": [], "mask": str(empty_mask)},  # 10: a fine negative
    ]
    lines = []
    for change in variants:
        if change is None:
            lines.append('{"image": "a.jpg", "prefix": ')
            continue
        record = {**good, "image": image, "mask": mask, **change}
        lines.append(json.dumps({k: v for k, v in record.items() if v is not None}))
    broken = tmp_path / "broken"
    broken.mkdir()
    path = broken / "_annotations.train.jsonl"
    path.write_text("\n".join(lines) + "\n")

    code, out, _err = run(capsys, broken)
    assert code == 1 and "INVALID: 8 problem(s) in 8 record(s)" in out
    problems = [line for line in out.splitlines() if line.startswith(str(path))]
    lines_reported = [int(p[len(str(path)) + 1 :].split(":", 1)[0]) for p in problems]
    assert lines_reported == [2, 3, 4, 5, 6, 7, 8, 9]
    expected = {
        2: "not valid JSON",
        3: "missing.jpg not found",
        4: "1 seg_count",
        5: "1 degenerate_box",
        6: "mask is 10x10 but the image is 64x64",
        7: "suffix is empty but the mask is not",
        8: "no 'mask' field",
        9: f"'objects' lists {2 * n} object(s) but the suffix has {n}",
    }
    for problem, number in zip(problems, lines_reported):
        assert expected[number] in problem, problem

    code, out, _ = run(capsys, broken, "--json")
    # Objects that parse: n on lines 1, 3, 6, 8, 9 and n - 1 on line 4; lines 7 and 10 are empty.
    assert code == 1 and json.loads(out)["splits"]["train"] == {
        "file": str(path),
        "records": 10,
        "objects": 6 * n - 1,
        "empty": 2,
        "bad_records": 8,
        "problems": 8,
    }


def test_missing_folder_or_split_is_a_clear_error(tmp_path, dataset, capsys):
    code, _, err = run(capsys, tmp_path / "nope")
    assert code == 1 and "nope: dataset folder not found" in err
    code, _, err = run(capsys, dataset, "--splits", "test")
    assert code == 1 and "no split 'test'; found: train, valid" in err
