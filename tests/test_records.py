"""The annotation record: JSONL round trip, file:line errors, atomic writes that never clobber."""

from __future__ import annotations

import pytest

from paliseg import files, images, records
from paliseg.records import Record, RecordError


def test_records_round_trip_and_resolve_paths_relative_to_the_jsonl(tmp_path):
    path = records.annotations_path(tmp_path, "train")
    original = [
        Record(
            "images/a.jpg",
            "segment crack",
            "<loc0001><loc0002><loc0003><loc0004> crack",
            "masks/a.png",
            {"source": "cracks"},
        ),
        Record("images/b.jpg", "segment crack", ""),
    ]
    assert records.write_records(path, original) == 2
    loaded = records.read_records(path)
    assert loaded == original
    assert loaded[0].image_path == tmp_path / "images/a.jpg"
    assert loaded[0].where == f"{path}:1"
    assert records.available_splits(tmp_path) == ["train"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"prefix": "segment crack"}', "'image' must be a non-empty string"),
        ('{"image": "a.jpg", "prefix": "p", "suffix": 3}', "'suffix' must be a string"),
    ],
)
def test_malformed_lines_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "_annotations.valid.jsonl"
    path.write_text('{"image": "ok.jpg", "prefix": "segment crack", "suffix": ""}\n\n' + line + "\n")
    with pytest.raises(RecordError, match=rf"{path}:3: .*{message}"):
        records.read_records(path)


def test_existing_output_is_not_overwritten_without_consent(tmp_path):
    path = tmp_path / "_annotations.train.jsonl"
    records.write_records(path, [Record("a.jpg", "p", "")])
    with pytest.raises(files.OutputExistsError, match="--overwrite"):
        records.write_records(path, [Record("b.jpg", "p", "")])
    assert records.read_records(path)[0].image == "a.jpg"
    records.write_records(path, [Record("b.jpg", "p", "")], overwrite=True)
    assert records.read_records(path)[0].image == "b.jpg"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    files.write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), files.atomic_open(path) as handle:
        handle.write('{"v": 2')
        raise RuntimeError("crash mid-write")
    assert path.read_text().startswith('{\n  "v": 1')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_masks_are_saved_as_0_255_png_and_read_back_as_bool(tmp_path):
    import numpy as np
    from PIL import Image

    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:6] = True
    files.write_mask(tmp_path / "m.png", mask)
    assert set(np.unique(np.asarray(Image.open(tmp_path / "m.png")))) == {0, 255}
    np.testing.assert_array_equal(images.read_mask(tmp_path / "m.png"), mask)


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        files.write_json(tmp_path / "a.json", {})
    finally:
        os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
