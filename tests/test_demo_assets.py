"""The committed real sample: unmodified Roboflow images, their original annotations, attribution, small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from paliseg.config import ASSETS

SAMPLE = ASSETS / "demo" / "roboflow"
DATASETS = ("cracks", "drywall")


def test_sample_is_small_and_attributed():
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert total < 1_500_000, f"the committed sample grew to {total} bytes"
    attribution = (SAMPLE / "ATTRIBUTION.txt").read_text()
    assert attribution.count("CC BY 4.0") >= 2
    for name in DATASETS:
        assert "License: CC BY 4.0" in (SAMPLE / name / "README.dataset.txt").read_text()
        assert f"{name}/valid" in attribution


@pytest.mark.parametrize("name", DATASETS)
def test_sample_is_an_unmodified_subset_of_the_export(roboflow_dir: Path, name: str):
    sample = json.loads((SAMPLE / name / "valid" / "_annotations.coco.json").read_text())
    original = json.loads((roboflow_dir / name / "valid" / "_annotations.coco.json").read_text())
    assert sample["categories"] == original["categories"] and sample["licenses"] == original["licenses"]
    originals = {image["id"]: image for image in original["images"]}
    ids = {image["id"] for image in sample["images"]}
    assert len(ids) == 8
    assert all(originals[image["id"]] == image for image in sample["images"])
    assert sample["annotations"] == [a for a in original["annotations"] if a["image_id"] in ids]
    for image in sample["images"]:
        committed = (SAMPLE / name / "valid" / image["file_name"]).read_bytes()
        assert committed == (roboflow_dir / name / "valid" / image["file_name"]).read_bytes()
    images_on_disk = {p.name for p in (SAMPLE / name / "valid").glob("*.jpg")}
    assert images_on_disk == {image["file_name"] for image in sample["images"]}
