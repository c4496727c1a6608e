"""The synthetic-shapes generator: a valid Roboflow COCO export whose polygons are exactly what was drawn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage

from converters import coco as coco_reader
from converters import synthetic
from converters.sources import IssueLog, Polygons
from paliseg import records

CROWDED = synthetic.ShapesConfig(objects_per_image=(1, 3))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    synthetic.write_synthetic_coco(out, n_train=12, n_valid=4, config=CROWDED, seed=3, image_format="png")
    return out


def _luminance(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(float) @ np.array([0.299, 0.587, 0.114])


def test_layout_is_roboflow_coco(export):
    for split, count in (("train", 12), ("valid", 4)):
        path = export / split / records.COCO_ANNOTATIONS_FILE
        data = json.loads(path.read_text())
        assert data["categories"][0] == {"id": 0, "name": "shapes", "supercategory": "none"}
        assert [c["name"] for c in data["categories"][1:]] == list(synthetic.SHAPES)
        assert [c["id"] for c in data["categories"]] == list(range(len(synthetic.SHAPES) + 1))
        assert len(data["images"]) == count
        assert all((export / split / image["file_name"]).is_file() for image in data["images"])
        assert data["annotations"], "no objects were drawn"
        dataset = COCO(str(path))  # pycocotools accepts it (it builds its index)
        for annotation in data["annotations"]:
            assert annotation["category_id"] != 0 and annotation["iscrowd"] == 0
            ring = np.reshape(annotation["segmentation"][0], (-1, 2))
            x, y, w, h = annotation["bbox"]
            np.testing.assert_allclose([x, y, x + w, y + h], [*ring.min(0), *ring.max(0)], atol=0.011)
            assert all(float(v).is_integer() for v in annotation["bbox"]), "boxes fall on pixel edges"
            assert ring.min() >= 0 and ring.max() <= 64
            assert annotation["area"] == dataset.annToMask(annotation).sum()


def test_polygons_are_what_was_drawn(export):
    """pycocotools' rasterisation of each JSON polygon covers exactly the pixels painted in the shape's colour."""
    data = json.loads((export / "train" / records.COCO_ANNOTATIONS_FILE).read_text())
    for image in data["images"]:
        sample = synthetic.make_image(synthetic.image_rng(3, "train", image["id"]), CROWDED)
        written = np.asarray(Image.open(export / "train" / image["file_name"]).convert("RGB"))
        np.testing.assert_array_equal(written, sample.pixels)  # PNG: the file holds the generated pixels
        annotations = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        assert len(annotations) == len(sample.objects) >= 1
        taken = np.zeros((64, 64), int)
        for annotation, obj in zip(annotations, sample.objects):
            rle = mask_utils.merge(mask_utils.frPyObjects(annotation["segmentation"], 64, 64))
            polygon_mask = mask_utils.decode(rle).astype(bool)
            np.testing.assert_array_equal(polygon_mask, obj.mask)
            taken += polygon_mask
            # The shape is plainly darker than the background right around it.
            ring = ndimage.binary_dilation(polygon_mask, iterations=2) & ~polygon_mask
            inside, outside = _luminance(written[polygon_mask]).mean(), _luminance(written[ring]).mean()
            assert outside - inside > 25, (image["file_name"], annotation["id"])
        assert taken.max() == 1, "shapes overlap"


def test_converter_reads_every_object(export):
    split = coco_reader.read_coco_split(export, "valid", export / "valid")
    assert split.class_names == list(synthetic.SHAPES)
    log = IssueLog(strict=True)
    images = list(split.read(log))
    assert len(images) == 4 and not log.skipped and not log.warnings
    assert all(isinstance(obj.shape, Polygons) for image in images for obj in image.objects)


def test_deterministic_and_growable(tmp_path):
    synthetic.write_synthetic_coco(tmp_path / "a", 5, 2, seed=7)
    synthetic.write_synthetic_coco(tmp_path / "b", 5, 2, seed=7)
    synthetic.write_synthetic_coco(tmp_path / "c", 8, 2, seed=7)
    synthetic.write_synthetic_coco(tmp_path / "d", 5, 2, seed=8)
    for path in (tmp_path / "a").rglob("*"):
        if path.is_file():
            relative = path.relative_to(tmp_path / "a")
            assert path.read_bytes() == (tmp_path / "b" / relative).read_bytes(), relative
            if relative.suffix == ".jpg":
                assert path.read_bytes() == (tmp_path / "c" / relative).read_bytes(), relative
    first = "train/train_00000.jpg"
    assert (tmp_path / "a" / first).read_bytes() != (tmp_path / "d" / first).read_bytes()


def test_refuses_to_overwrite_and_bad_settings(tmp_path):
    synthetic.write_synthetic_coco(tmp_path, 1, 1)
    with pytest.raises(FileExistsError):
        synthetic.write_synthetic_coco(tmp_path, 1, 1)
    synthetic.write_synthetic_coco(tmp_path, 1, 1, overwrite=True)
    with pytest.raises(ValueError, match="unknown shape classes"):
        synthetic.ShapesConfig(classes=("hexagon",))
    with pytest.raises(ValueError, match="objects_per_image"):
        synthetic.ShapesConfig(objects_per_image=(2, 1))
    with pytest.raises(ValueError, match="placeholder"):
        synthetic.write_synthetic_coco(
            tmp_path / "y", 1, 1, synthetic.ShapesConfig(classes=("ellipse",)), project="ellipse"
        )


def test_every_class_appears():
    counts = {name: 0 for name in synthetic.SHAPES}
    for index in range(40):
        for obj in synthetic.make_image(synthetic.image_rng(0, "train", index)).objects:
            counts[obj.class_name] += 1
    assert all(count >= 4 for count in counts.values()), counts
