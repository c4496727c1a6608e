"""The checked reader of a converted dataset folder (`paliseg.dataset`): clear errors for a missing folder
or split and a malformed line; each unusable record a counted skip with its reason; good records pass."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from paliseg import dataset, files, records, tokens

WIDTH, HEIGHT = 40, 30
SUFFIX = tokens.SegObject(tokens.box_to_locs((5, 5, 20, 15), WIDTH, HEIGHT), tuple(range(16)), "crack").to_text()


def _write_dataset(folder, split="valid"):
    """Two good records (an object, and a negative) of one image, and the image and masks they name."""
    files.write_image(folder / "images" / "a.png", Image.new("RGB", (WIDTH, HEIGHT), (90, 90, 90)))
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[5:15, 5:20] = True
    files.write_mask(folder / "masks" / "a.crack.png", mask)
    files.write_mask(folder / "masks" / "a.hole.png", np.zeros((HEIGHT, WIDTH), bool))
    good = [
        records.Record("images/a.png", "segment crack", SUFFIX, "masks/a.crack.png"),
        records.Record("images/a.png", "segment hole", "", "masks/a.hole.png"),
    ]
    records.write_records(records.annotations_path(folder, split), good, overwrite=True)
    return good


def test_good_records_are_items_with_their_image_size(tmp_path):
    good = _write_dataset(tmp_path)
    items, skips = dataset.check_split(tmp_path, "valid")
    assert skips == [] and [item.record for item in items] == good
    assert {(item.width, item.height) for item in items} == {(WIDTH, HEIGHT)}
    assert items[0].key == "images/a.png\tsegment crack"
    assert items[0].read_mask().sum() == 150 and not items[1].read_mask().any()
    assert dataset.check_split(tmp_path, "valid", limit=1)[0] == items[:1]


def test_each_unusable_record_is_a_counted_skip_with_its_reason(tmp_path):
    good = _write_dataset(tmp_path)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really a png")
    files.write_mask(tmp_path / "masks" / "small.png", np.zeros((4, 4), bool))
    (tmp_path / "masks" / "broken.png").write_bytes(b"not a png")
    bad = [
        records.Record("images/missing.png", "segment crack", "", "masks/a.hole.png"),
        records.Record("images/broken.png", "segment crack", "", None),
        records.Record("images/a.png", "segment x", "<loc0001> crack", "masks/a.hole.png"),
        records.Record("images/a.png", "segment y", SUFFIX, None),
        records.Record("images/a.png", "segment z", SUFFIX, "masks/absent.png"),
        records.Record("images/a.png", "segment w", "", "masks/broken.png"),
        records.Record("images/a.png", "segment v", "", "masks/small.png"),
        good[0],  # the same image and prompt again
    ]
    path = records.annotations_path(tmp_path, "valid")
    records.write_records(path, good + bad, overwrite=True)
    items, skips = dataset.check_split(tmp_path, "valid")
    assert [item.record for item in items] == good
    assert [skip.reason for skip in skips] == [
        "missing_image", "unreadable_image", "invalid_suffix", "missing_mask", "missing_mask", "unreadable_mask",
        "mask_size", "duplicate",
    ]  # fmt: skip
    assert [skip.where for skip in skips] == [f"{path}:{line}" for line in range(3, 11)]
    assert "missing.png not found" in skips[0].message and "broken.png is not a readable image" in skips[1].message
    assert skips[6].message == f"mask is 4x4 but the image is {WIDTH}x{HEIGHT}"
    assert dataset.skip_counts(skips) == {
        "missing_image": 1, "unreadable_image": 1, "invalid_suffix": 1, "missing_mask": 2, "unreadable_mask": 1,
        "mask_size": 1, "duplicate": 1,
    }  # fmt: skip


def test_without_masks_only_the_image_and_suffix_are_checked(tmp_path):
    _write_dataset(tmp_path)
    record = records.Record("images/a.png", "segment crack", SUFFIX, "masks/absent.png", source=tmp_path / "x.jsonl")
    (item,) = dataset.check([record], masks=False)
    assert isinstance(item, dataset.Item) and (item.width, item.height) == (WIDTH, HEIGHT)
    assert dataset.inspect_record(record).mask_problem.reason == "missing_mask"


def test_a_missing_split_lists_the_ones_found(tmp_path):
    _write_dataset(tmp_path, "train")
    _write_dataset(tmp_path, "valid")
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path}: no split 'test'; found: train, valid$"):
        dataset.check_split(tmp_path, "test")
    assert dataset.find_splits(tmp_path) == ["train", "valid"]


def test_a_folder_that_is_not_a_converted_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="not a converted dataset"):
        dataset.read_records(tmp_path, "valid")
    with pytest.raises(FileNotFoundError, match="absent: dataset folder not found"):
        dataset.read_records(tmp_path / "absent", "valid")


def test_a_malformed_line_names_file_and_line(tmp_path):
    _write_dataset(tmp_path)
    path = records.annotations_path(tmp_path, "valid")
    path.write_text(path.read_text() + "\n" + '{"image": "a.png", "prefix": \n')
    with pytest.raises(records.RecordError, match=f"^{path}:4: not valid JSON"):
        dataset.check_split(tmp_path, "valid")
    parsed = dataset.read_lines(tmp_path, "valid")
    assert [type(p).__name__ for p in parsed] == ["Record", "Record", "RecordError"]
