"""Token-aware geometric augmentation (train.augment): the tokens of an augmented example describe its pixels.

The moved masks and boxes the tests compare with are computed here independently, from the transform's
definition (frame pixel = edge + normalised coordinate x extent, then the mirror), not with the module's code.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_masked_dataset, tiny_config
from PIL import Image

import vae
from metrics.masks import iou
from paliseg import dataset, images
from paliseg import tokens as codec
from paliseg.tokenizer import Tokenizer
from train import augment
from train import commands as train_commands
from train import data as train_data
from train import run as run_folder
from train.config import TrainConfig
from vae.masks import crop_to_64, tight_box

SIZE = 112  # the model's input side
RESOLUTION = 448  # the frame's side at which the moved ground truth is drawn and the tokens decoded


@pytest.fixture(scope="module")
def vae_model():
    return vae.load(vae.model.BUNDLED_VAE_PATH)


def _scene(vae_model, width: int = 300, height: int = 200):
    """A noisy photo with a triangle "a" and a rectangle "b" whose boxes do not overlap: the image, their
    masks, their union and the converter's suffix (tight boxes, seg tokens of the bundled VAE)."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:height, :width]
    x, y = (cols - 0.1 * width) / (0.35 * width), (rows - 0.15 * height) / (0.4 * height)  # [0, 1] in a's box
    triangle = (x >= 0) & (y < 1) & (x < y)  # no mirror symmetry: a crop mirrored wrongly shows
    rectangle = np.zeros((height, width), bool)
    rectangle[int(0.55 * height) : int(0.95 * height), int(0.6 * width) : int(0.9 * width)] = True
    pixels = rng.integers(0, 90, (height, width, 3), dtype=np.uint8)
    pixels[triangle], pixels[rectangle] = (230, 200, 40), (40, 220, 230)
    objects = [
        codec.SegObject(
            codec.box_to_locs(tight_box(m), width, height), vae.mask_to_tokens(vae_model, m, tight_box(m)), label
        )
        for m, label in ((triangle, "a"), (rectangle, "b"))
    ]
    union = triangle | rectangle
    return Image.fromarray(pixels), [triangle, rectangle], union, codec.format_suffix(codec.sort_objects(objects))


def _augment(vae_model, image, suffix, masks, transform, min_visible=0.3):
    example = augment.transform_example(image, suffix, masks, transform, min_visible)
    return example, augment.encode(vae_model, [example])[0]


def _moved_mask(mask: np.ndarray, transform: augment.Transform, resolution: int = RESOLUTION) -> np.ndarray:
    """The source mask as the frame shows it, resolution x resolution: each pixel takes the source pixel
    under its centre (background outside the image)."""
    height, width = mask.shape
    centres = (np.arange(resolution) + 0.5) * transform.size / resolution  # in frame pixels
    along_x = transform.size - centres if transform.flip else centres
    u, v = (along_x - transform.left) / transform.extent, (centres - transform.top) / transform.extent
    columns, rows = (u >= 0) & (u < 1), (v >= 0) & (v < 1)
    moved = np.zeros((resolution, resolution), bool)
    moved[np.ix_(rows, columns)] = mask[np.ix_((v[rows] * height).astype(int), (u[columns] * width).astype(int))]
    return moved


def _moved_locs(locs, transform: augment.Transform) -> np.ndarray:
    """Loc tokens of a source box moved into the frame and clipped to it."""
    y1, x1, y2, x2 = np.asarray(locs) / 1023

    def frame(value, edge):
        return np.clip((edge + value * transform.extent) / transform.size, 0, 1)

    x1, x2 = frame(x1, transform.left), frame(x2, transform.left)
    if transform.flip:
        x1, x2 = 1 - x2, 1 - x1
    return np.round(np.array([frame(y1, transform.top), x1, frame(y2, transform.top), x2]) * 1023)


TRANSFORMS = {
    "zoom in, shifted, cuts both": augment.Transform(SIZE, left=-40, top=-20, extent=168, flip=False),
    "zoom out, mirrored": augment.Transform(SIZE, left=20, top=30, extent=70, flip=True),
    "mirrored": augment.Transform(SIZE, left=0, top=0, extent=SIZE, flip=True),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_seg_tokens_decode_to_the_moved_masks_as_well_as_the_vae_round_trip(vae_model, name):
    transform = TRANSFORMS[name]
    image, masks, union, suffix = _scene(vae_model)
    _, targets = _augment(vae_model, image, suffix, [union, union], transform)  # a JSONL record's masks
    objects = codec.parse_suffix(targets.suffix).objects
    assert [o.label for o in objects] == ["a", "b"]
    for obj, mask, source in zip(objects, masks, codec.parse_suffix(suffix).objects):
        truth = _moved_mask(mask, transform)
        decoded = vae.tokens_to_mask(vae_model, obj.seg, obj.locs, RESOLUTION, RESOLUTION)
        # The VAE's own round trip of the moved mask, in the moved box.
        locs = tuple(int(v) for v in _moved_locs(source.locs, transform))
        box = codec.locs_to_box(locs, RESOLUTION, RESOLUTION)
        round_trip = vae.tokens_to_mask(
            vae_model, vae.mask_to_tokens(vae_model, truth, box), locs, RESOLUTION, RESOLUTION
        )
        assert iou(round_trip, truth) > 0.8  # a VAE good enough for the comparison to mean something
        assert iou(decoded, truth) >= iou(round_trip, truth) - 0.01, (obj.label, iou(decoded, truth))


@pytest.mark.parametrize("seed", range(6))
def test_loc_tokens_are_the_moved_boxes(vae_model, seed):
    config = TrainConfig(augment_geometric=True, augment_flip=True, augment_min_scale=0.6, augment_max_scale=1.6,
                         augment_max_shift=0.2, augment_min_visible=0.05)  # fmt: skip
    transform = augment.draw_transform(np.random.default_rng([seed, 7, 1]), config, SIZE)
    image, _, union, suffix = _scene(vae_model)
    example = augment.transform_example(image, suffix, [union, union], transform, config.augment_min_visible)
    source = {o.label: o.locs for o in codec.parse_suffix(suffix).objects}
    assert example.objects  # each seed keeps something to compare
    for placed in example.objects:
        assert np.abs(np.asarray(placed.locs) - _moved_locs(source[placed.label], transform)).max() <= 1


def test_without_the_flags_the_image_is_the_models_preprocessing_and_crops_are_the_mask_losss(vae_model):
    image, _, union, suffix = _scene(vae_model)
    transform = augment.draw_transform(np.random.default_rng(0), TrainConfig(), SIZE)
    assert transform == augment.Transform(SIZE, 0, 0, SIZE, False)
    example, targets = _augment(vae_model, image, suffix, [union, union], transform)
    np.testing.assert_array_equal(example.image, images.preprocess(image, SIZE))
    source = codec.parse_suffix(suffix).objects
    assert [o.locs for o in codec.parse_suffix(targets.suffix).objects] == [o.locs for o in source]
    # train.data.mask_loss_targets crops the union mask to each object's loc box, as here.
    expected = [crop_to_64(union, codec.locs_to_box(o.locs, *image.size)) for o in source]
    np.testing.assert_array_equal(targets.target_masks, np.stack(expected))


def test_a_zoomed_out_image_is_the_models_preprocessing_at_its_place_in_a_frame_of_its_mean(vae_model):
    image, _, union, suffix = _scene(vae_model)
    transform = augment.Transform(SIZE, left=30, top=12, extent=70, flip=False)
    example = augment.transform_example(image, suffix, [union, union], transform, 0.3)
    placed = images.preprocess(image, 70)
    np.testing.assert_array_equal(example.image[12:82, 30:100], placed)
    padding = np.ones((SIZE, SIZE), bool)
    padding[12:82, 30:100] = False
    mean = np.round((placed + 1) * 127.5).mean(axis=(0, 1)) / 127.5 - 1
    np.testing.assert_allclose(example.image[padding], np.broadcast_to(mean, (padding.sum(), 3)), atol=1 / 127.5)


def test_a_zoomed_in_image_is_a_crop_of_the_models_preprocessing_at_that_zoom(vae_model):
    image, _, union, suffix = _scene(vae_model)
    transform = TRANSFORMS["zoom in, shifted, cuts both"]  # the image is 168 px wide, at -40, -20
    example = augment.transform_example(image, suffix, [union, union], transform, 0.3)
    expected = images.preprocess(image, 168)[20 : 20 + SIZE, 40 : 40 + SIZE]
    np.testing.assert_allclose(example.image, expected, atol=1.01 / 127.5)  # PIL's fixed-point rounding: 1 level


def test_objects_are_put_back_in_reading_order(vae_model):
    """Mirroring two objects with the same top edge swaps which one comes first."""
    image, _, _, _ = _scene(vae_model)
    width, height = image.size
    masks = [np.zeros((height, width), bool) for _ in range(2)]
    masks[0][50:85, 20:100], masks[1][50:150, 150:280] = True, True  # "left" fills the top half of its box
    boxes = [(20, 50, 100, 120), (150, 50, 280, 150)]
    objects = [
        codec.SegObject(codec.box_to_locs(box, width, height), (0,) * 16, label)
        for box, label in zip(boxes, ("left", "right"))
    ]
    mirrored = augment.Transform(SIZE, 0, 0, SIZE, True)
    _, targets = _augment(vae_model, image, codec.format_suffix(objects), masks, mirrored)
    assert [o.label for o in codec.parse_suffix(targets.suffix).objects] == ["right", "left"]
    assert targets.target_masks[0].mean() > 0.99 and 0.45 < targets.target_masks[1].mean() < 0.55  # crops follow


def test_flipping_twice_is_the_identity(vae_model):
    image, masks, _, suffix = _scene(vae_model, SIZE, SIZE)  # the frame's size: the image is not resampled
    flip, identity = augment.Transform(SIZE, 0, 0, SIZE, True), augment.Transform(SIZE, 0, 0, SIZE, False)
    once, once_targets = _augment(vae_model, image, suffix, masks, flip)
    mirrored = Image.fromarray(np.round((once.image + 1) * 127.5).astype(np.uint8))
    twice, twice_targets = _augment(vae_model, mirrored, once_targets.suffix, [np.fliplr(m) for m in masks], flip)
    unmoved, unmoved_targets = _augment(vae_model, image, suffix, masks, identity)
    assert once_targets.suffix != unmoved_targets.suffix
    np.testing.assert_array_equal(once.image, unmoved.image[:, ::-1])
    np.testing.assert_array_equal(twice.image, unmoved.image)
    assert twice_targets.suffix == unmoved_targets.suffix  # boxes and seg tokens
    np.testing.assert_allclose(twice_targets.target_masks, unmoved_targets.target_masks, atol=1e-5)


def test_an_object_the_crop_removes_loses_its_tokens(vae_model):
    image, _, union, suffix = _scene(vae_model)
    top_left_quarter = augment.Transform(SIZE, 0, 0, 2 * SIZE, False)  # the rectangle "b" is bottom-right
    _, targets = _augment(vae_model, image, suffix, [union, union], top_left_quarter)
    assert [o.label for o in codec.parse_suffix(targets.suffix).objects] == ["a"]
    assert targets.target_masks.shape == (1, 64, 64)


@pytest.mark.parametrize("box_only", [False, True])
def test_a_cut_object_stays_when_enough_of_it_is_visible(vae_model, box_only):
    image, _, union, suffix = _scene(vae_model)
    if box_only:  # its share is its box's area in the frame
        suffix = codec.format_suffix(codec.SegObject(o.locs, None, o.label) for o in codec.parse_suffix(suffix).objects)
    # The frame's right edge at x = 225 of 300 halves the rectangle "b" (x 180..270) and keeps "a" whole.
    half_of_b = augment.Transform(SIZE, left=SIZE // 4, top=0, extent=SIZE, flip=False)
    for min_visible, kept in ((0.45, ["a", "b"]), (0.55, ["a"])):
        _, targets = _augment(vae_model, image, suffix, [union, union], half_of_b, min_visible)
        assert [o.label for o in codec.parse_suffix(targets.suffix, require_seg=not box_only).objects] == kept
        assert len(targets.target_masks) == (0 if box_only else len(kept))


def test_a_negative_stays_a_negative(vae_model):
    image, _, _, _ = _scene(vae_model)
    example, targets = _augment(vae_model, image, "", [], TRANSFORMS["zoom out, mirrored"])
    assert example.image.shape == (SIZE, SIZE, 3) and targets.suffix == ""
    assert targets.target_masks.shape == (0, 64, 64)


def test_the_seed_decides_the_augmentation(vae_model):
    config = TrainConfig(augment_geometric=True, augment_flip=True)
    image, _, union, suffix = _scene(vae_model)

    def augmented(seed):
        transform = augment.draw_transform(np.random.default_rng([seed, 3, 5, 1]), config, SIZE)
        return _augment(vae_model, image, suffix, [union, union], transform, config.augment_min_visible)

    (a, a_targets), (b, b_targets), (c, c_targets) = augmented(0), augmented(0), augmented(1)
    np.testing.assert_array_equal(a.image, b.image)
    assert a_targets.suffix == b_targets.suffix
    np.testing.assert_array_equal(a_targets.target_masks, b_targets.target_masks)
    assert not np.array_equal(a.image, c.image) and a_targets.suffix != c_targets.suffix


def test_every_object_needs_a_mask_of_the_images_size(vae_model):
    image, _, union, suffix = _scene(vae_model)
    identity = augment.Transform(SIZE, 0, 0, SIZE, False)
    with pytest.raises(ValueError, match="1 masks for the 2 objects"):
        augment.transform_example(image, suffix, [union], identity, 0.3)
    with pytest.raises(ValueError, match="mask is"):
        augment.transform_example(image, suffix, [union[:, :-1], union], identity, 0.3)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"augment_min_scale": 1.5, "augment_max_scale": 1.2}, "--augment-min-scale 1.5 is above --augment-max-scale"),
        ({"augment_max_shift": 0.5}, "--augment-max-shift must be less than 0.5"),
        ({"augment_min_visible": 0.0}, "--augment-min-visible must be more than 0"),
        ({"objective": "grpo", "augment_flip": True}, "are for --objective supervised"),
    ],
)
def test_nonsense_augmentation_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        run_folder.resolve_config({"data": ["/d"], "out": "/run", "init": "random", "preset": "tiny", **changes})


# --- in the training input (train.data) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def masked_data(tmp_path_factory):
    return make_masked_dataset(tmp_path_factory.mktemp("augment") / "data", vae.model.BUNDLED_VAE_PATH)


def _loader(folder, **changes) -> train_data.TrainData:
    config = tiny_config(folder, "/unused", batch_size=4, augment_geometric=True, augment_flip=True,
                         augment_min_scale=0.5, augment_max_scale=2.0, mask_loss_weight=1.0, **changes)  # fmt: skip
    tokenizer = Tokenizer(run_folder.model_config(config).tokenizer_path)
    return train_data.TrainData(config, tokenizer, SIZE, vae_path=vae.model.BUNDLED_VAE_PATH)


def test_the_loader_trains_on_each_slots_moved_example(masked_data, vae_model):
    """Each slot's image, tokens and mask-loss targets are those of its example moved by the transform of
    (seed, 4, step, slot), whatever process loads it (the VAE of a worker process is its own, on the CPU)."""
    data = _loader(masked_data, workers=0)
    tokenizer, moved_suffixes = data.tokenizer, set()
    for step, ids, batch in data.iterate(0, 3):
        for slot, example_id in enumerate(ids.ravel()):
            example = data.examples[int(example_id)]
            record = example.record
            transform = augment.draw_transform(
                np.random.default_rng([data.config.seed, 4, step, slot]), data.config, SIZE
            )
            objects = codec.parse_suffix(record.suffix, require_seg=False).objects
            masks = [dataset.read_mask(record, example.width, example.height)] * len(objects)
            moved, targets = _augment(vae_model, images.read_image(record.image_path), record.suffix, masks, transform)
            moved_suffixes.add(targets.suffix != record.suffix)
            text = tokenizer.encode_example(record.prefix, targets.suffix, data.config.seq_len)
            np.testing.assert_array_equal(batch["tokens"][0, slot], text["tokens"])
            image = train_data.photometric(
                moved.image, np.random.default_rng([data.config.seed, 3, step, slot]), data.config
            )
            np.testing.assert_allclose(batch["image"][0, slot], image, atol=1e-6)
            count = len(targets.target_masks)
            np.testing.assert_array_equal(batch["target_objects"][0, slot], [1.0] * count + [0.0] * (2 - count))
            np.testing.assert_allclose(batch["target_masks"][0, slot, :count], targets.target_masks, atol=1e-6)
            seg_ids = np.flatnonzero(np.isin(text["tokens"], tokenizer.seg_ids)) - 1
            np.testing.assert_array_equal(batch["seg_positions"][0, slot, :count].ravel(), seg_ids)
    assert moved_suffixes == {True}  # every slot saw its object moved
    in_a_worker = list(_loader(masked_data, workers=1).iterate(0, 3))
    for (_, _, expected), (_, _, got) in zip(data.iterate(0, 3), in_a_worker):
        for key, value in expected.items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_a_run_with_the_geometric_augmentation_records_it(masked_data, tmp_path):
    config = tiny_config(masked_data, tmp_path / "run", steps=2, save_every=2, augment_geometric=True,
                         augment_flip=True, mask_loss_weight=0.5)  # fmt: skip
    result = train_commands.run(config)
    assert len(result["losses"]) == 2 and all(np.isfinite(result["losses"]))
    recorded = run_folder.Run(tmp_path / "run").train_config
    assert recorded.augment_geometric and recorded.augment_flip and recorded.augment_min_visible == 0.3
