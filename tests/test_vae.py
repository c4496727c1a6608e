"""The Flax mask VAE against a PyTorch reference of the same architecture loading the same npz (the
oracle for conv / transposed-conv / padding semantics), the npz layout, batching, and mask <-> tokens."""

from __future__ import annotations

import collections
import json
import warnings

import numpy as np
import pytest
import torch

import vae
from vae import masks as vae_masks
from vae import model as vae_model

nn = torch.nn


# ---------------------------------------------------------------------------------------------------------
# The PyTorch reference: upstream AiT VQVAE indices, which are the vae-oid.npz key names.


class TorchResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x):
        return x + self.net(x)


class TorchQuantizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("_embedding", torch.zeros(128, 512))


class TorchMaskVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 4, stride=2, padding=1), nn.ReLU(),
            TorchResBlock(128), TorchResBlock(128),
            nn.Conv2d(128, 512, 1),
        )  # fmt: skip
        self._vq_vae = TorchQuantizer()
        self.decoder = nn.Sequential(
            nn.Conv2d(512, 128, 1), nn.ReLU(),
            TorchResBlock(128), TorchResBlock(128),
            nn.ConvTranspose2d(128, 128, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 1, 1),
        )  # fmt: skip

    @classmethod
    def from_npz(cls, path) -> TorchMaskVAE:
        module = cls()
        with np.load(path) as data:
            module.load_state_dict({k: torch.from_numpy(data[k].astype(np.float32)) for k in data.files}, strict=True)
        return module.eval()

    @torch.no_grad()
    def encode(self, masks: np.ndarray) -> np.ndarray:
        z = self.encoder(2.0 * (torch.from_numpy(masks)[:, None] - 0.5))  # [N, 512, 4, 4]
        flat = z.permute(0, 2, 3, 1).reshape(-1, 512)
        codebook = self._vq_vae._embedding
        distances = (flat**2).sum(1, keepdim=True) + (codebook**2).sum(1)[None] - 2 * flat @ codebook.T
        return distances.argmin(1).reshape(len(masks), 16).numpy()

    @torch.no_grad()
    def decode(self, tokens: np.ndarray) -> np.ndarray:
        codes = self._vq_vae._embedding[torch.from_numpy(tokens.astype(np.int64))]  # [N, 16, 512]
        codes = codes.reshape(len(tokens), 4, 4, 512).permute(0, 3, 1, 2)
        return self.decoder(codes)[:, 0].numpy()


# ---------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def random_npz(tmp_path_factory):
    return vae.write_random_npz(tmp_path_factory.mktemp("vae") / "vae-random.npz", seed=3)


@pytest.fixture(scope="module")
def flax_vae(random_npz):
    return vae.load(random_npz)


@pytest.fixture(scope="module")
def torch_vae(random_npz):
    torch.set_num_threads(2)
    return TorchMaskVAE.from_npz(random_npz)


def blob_masks(n: int, seed: int) -> np.ndarray:
    """Random ellipses and rectangles, some soft-edged (the encoder sees soft antialiased crops)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    out = np.zeros((n, 64, 64), np.float32)
    for i in range(n):
        cy, cx, ry, rx = rng.uniform(8, 56), rng.uniform(8, 56), rng.uniform(3, 30), rng.uniform(3, 30)
        r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        out[i] = np.clip(1.5 - r, 0, 1) if i % 2 else (r < 1)
    return out


def real_crack_crops(roboflow_dir, count: int = 48) -> list[tuple[np.ndarray, tuple[float, float, float, float]]]:
    """(full mask, box) pairs from the real cracks valid polygons, one per annotation."""
    from pycocotools import mask as coco_mask

    data = json.loads((roboflow_dir / "cracks" / "valid" / "_annotations.coco.json").read_text())
    images = {im["id"]: im for im in data["images"]}
    pairs = []
    for ann in data["annotations"]:
        if not ann["segmentation"]:
            continue
        im = images[ann["image_id"]]
        rles = coco_mask.frPyObjects(ann["segmentation"], im["height"], im["width"])
        full = coco_mask.decode(coco_mask.merge(rles)).astype(bool)
        x, y, w, h = ann["bbox"]
        pairs.append((full, (x, y, x + w, y + h)))
        if len(pairs) == count:
            break
    return pairs


# ---------------------------------------------------------------------------------------------------------
# Layout


def test_random_npz_has_the_vae_oid_layout(random_npz):
    with np.load(random_npz) as data:
        shapes = {k: data[k].shape for k in data.files}
        assert {data[k].dtype for k in data.files} == {np.dtype(np.float32)}
    assert shapes == vae_model.expected_shapes()
    assert shapes["_vq_vae._embedding"] == (128, 512)
    assert shapes["encoder.0.weight"] == (16, 1, 4, 4)
    assert shapes["decoder.6.weight"] == (128, 64, 4, 4)  # ConvTranspose: (in, out, kh, kw)
    assert shapes["decoder.12.weight"] == (1, 16, 1, 1)
    # The torch reference's strict load proves the key names are exactly nn.Sequential's.
    TorchMaskVAE.from_npz(random_npz)


def test_params_convert_back_to_the_identical_state_dict(random_npz, flax_vae):
    state = vae_model.params_to_state_dict(flax_vae.params)
    with np.load(random_npz) as data:
        assert set(state) == set(data.files)
        for key in data.files:
            np.testing.assert_array_equal(state[key], data[key], err_msg=key)


def test_float16_files_load_and_extra_ema_buffers_are_ignored(tmp_path, random_npz, flax_vae):
    with np.load(random_npz) as data:
        state = {k: data[k].astype(np.float16) for k in data.files}
    state["_vq_vae._ema_w"] = np.zeros((128, 512), np.float32)
    np.savez(tmp_path / "half.npz", **state)
    half = vae.load(tmp_path / "half.npz")
    masks = blob_masks(8, seed=1)
    np.testing.assert_allclose(half.decode(flax_vae.encode(masks)), flax_vae.decode(flax_vae.encode(masks)), atol=0.05)


def test_bad_files_raise_errors_naming_the_file(tmp_path, random_npz):
    with np.load(random_npz) as data:
        state = {k: data[k] for k in data.files}
    del state["decoder.12.bias"]
    np.savez(tmp_path / "missing.npz", **state)
    with pytest.raises(ValueError, match=r"missing.npz.*decoder\.12\.bias"):
        vae.load(tmp_path / "missing.npz")
    state["decoder.12.bias"] = np.zeros((2,), np.float32)
    np.savez(tmp_path / "shape.npz", **state)
    with pytest.raises(ValueError, match=r"shape.npz: decoder\.12\.bias has shape \(2,\)"):
        vae.load(tmp_path / "shape.npz")
    with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
        vae.load(tmp_path / "nope.npz")


def test_load_default_prefers_models_vae_oid_then_the_bundled_file(tmp_path, monkeypatch, random_npz):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PALISEG_MODELS", raising=False)
    monkeypatch.setattr(vae_model, "BUNDLED_VAE_PATH", tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError, match="vae download"):
        vae.load()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "vae-oid.npz").write_bytes(random_npz.read_bytes())
    assert vae.load().source == str(tmp_path / "models" / "vae-oid.npz")
    monkeypatch.setenv("PALISEG_MODELS", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        vae.load()


# ---------------------------------------------------------------------------------------------------------
# The oracle


@pytest.mark.oracle
def test_encoder_tokens_match_the_torch_reference_on_random_masks(flax_vae, torch_vae):
    masks = np.concatenate([blob_masks(40, seed=0), np.random.default_rng(0).random((8, 64, 64), np.float32)])
    ours, reference = flax_vae.encode(masks), torch_vae.encode(masks)
    assert ours.dtype == np.int32 and ours.shape == (48, 16)
    assert len(np.unique(reference)) > 10  # the test would be weak if every mask gave the same code
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.oracle
def test_decoder_matches_the_torch_reference_on_random_tokens(flax_vae, torch_vae):
    tokens = np.random.default_rng(1).integers(0, 128, (32, 16)).astype(np.int32)
    ours, reference = flax_vae.decode(tokens), torch_vae.decode(tokens)
    assert ours.dtype == np.float32 and ours.shape == (32, 64, 64)
    assert reference.std() > 0.01
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


@pytest.mark.oracle
@pytest.mark.parametrize("weights", ["random", "bundled"])
def test_oracle_on_real_crack_masks(roboflow_dir, random_npz, weights):
    path = random_npz if weights == "random" else vae_model.BUNDLED_VAE_PATH
    flax_vae, torch_vae = vae.load(path), TorchMaskVAE.from_npz(path)
    crops = np.stack([vae_masks.crop_to_64(m, b) for m, b in real_crack_crops(roboflow_dir)])
    tokens = flax_vae.encode(crops)
    np.testing.assert_array_equal(tokens, torch_vae.encode(crops))
    np.testing.assert_allclose(flax_vae.decode(tokens), torch_vae.decode(tokens), atol=1e-4, rtol=0)


def test_bundled_vae_is_the_default_and_round_trips_simple_shapes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no models/vae-oid.npz here
    monkeypatch.delenv("PALISEG_MODELS", raising=False)
    model = vae.load()
    assert model.source == str(vae_model.BUNDLED_VAE_PATH)
    with np.load(vae_model.BUNDLED_VAE_PATH) as data:
        assert {k: data[k].shape for k in data.files} == vae_model.expected_shapes()
    masks = blob_masks(32, seed=11)
    reconstructed = model.decode(model.encode(masks)) > 0
    target = masks > 0.5
    iou = (reconstructed & target).sum((1, 2)) / (reconstructed | target).sum((1, 2))
    assert iou.mean() > 0.85, iou


@pytest.mark.parametrize("layer", ["down", "up"])
def test_fast_conv_layers_equal_the_flax_layers_big_vision_uses(layer):
    """Down2 / Up2 hold the same parameters as flax's strided Conv and big_vision's decoder ConvTranspose
    (`padding=2, transpose_kernel=True`) and compute the same function, with the same gradients (ours
    come from another formulation of the same sums)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as flax_nn

    ours, reference = {
        "down": (vae_model.Down2(5), flax_nn.Conv(5, (4, 4), strides=(2, 2), padding=1)),
        "up": (vae_model.Up2(5), flax_nn.ConvTranspose(5, (4, 4), strides=(2, 2), padding=2, transpose_kernel=True)),
    }[layer]
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 6))
    params = ours.init(jax.random.key(1), x)
    np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x), atol=1e-5)
    loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))  # noqa: E731
    for a, b in zip(
        jax.tree.leaves(jax.grad(loss(ours), (0, 1))(params, x)),
        jax.tree.leaves(jax.grad(loss(reference), (0, 1))(params, x)),
    ):
        np.testing.assert_allclose(a, b, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Batching


def test_batch_buckets_pad_without_changing_results_and_bound_compiles(flax_vae):
    masks = blob_masks(300, seed=5)  # 256 + 44: one full chunk and one padded to 128
    all_at_once = flax_vae.encode(masks)
    np.testing.assert_array_equal(all_at_once[7:10], flax_vae.encode(masks[7:10]))
    np.testing.assert_array_equal(all_at_once[299:], flax_vae.encode(masks[299:]))
    for n in (2, 3, 5, 17, 33, 65):
        flax_vae.encode(masks[:n])
    assert vae_model.programs()[0]._cache_size() <= len(vae_model.BATCH_BUCKETS)
    assert flax_vae.encode(np.zeros((0, 64, 64))).shape == (0, 16)
    assert flax_vae.decode(np.zeros((0, 16), np.int32)).shape == (0, 64, 64)


def test_encode_and_decode_reject_wrong_shapes_and_values(flax_vae):
    with pytest.raises(ValueError, match=r"\[N, 64, 64\]"):
        flax_vae.encode(np.zeros((2, 32, 32)))
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        flax_vae.decode(np.full((1, 16), 128))


# ---------------------------------------------------------------------------------------------------------
# Full-resolution masks <-> tokens


@pytest.mark.oracle
@pytest.mark.parametrize("shape", [(480, 640), (37, 23), (12, 200), (64, 64), (300, 9)])
def test_antialiased_resize_matches_tf_image_resize(shape):
    import tensorflow as tf

    rng = np.random.default_rng(sum(shape))
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    crop = (yy - shape[0] / 2) ** 2 / (shape[0] / 3) ** 2 + (xx - shape[1] / 2) ** 2 / (shape[1] / 3) ** 2 < 1
    crop ^= rng.random(shape) < 0.05  # speckle: high frequencies are where antialiasing matters
    ours = vae_masks.resize_antialiased(crop.astype(np.float32), 64, 64)
    uint8 = (crop * 255).astype(np.uint8)[None, :, :, None]  # as big_vision: uint8 0/255 mask, then / 255
    reference = tf.image.resize(uint8, [64, 64], method="bilinear", antialias=True).numpy()[0, :, :, 0] / 255.0
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_crop_uses_the_rounded_box():
    mask = np.zeros((100, 300), bool)
    mask[20:60, 30:130] = True  # exactly the rounded box of (29.6, 19.5, 130.4, 60.2)
    crop = vae_masks.crop_to_64(mask, (29.6, 19.5, 130.4, 60.2))
    assert crop.shape == (64, 64) and crop.min() > 0.9999
    one_more_column = vae_masks.crop_to_64(mask, (29.4, 19.5, 130.4, 60.2))  # rounds to x1 = 29
    assert one_more_column[:, 0].max() < 0.9
    half = vae_masks.crop_to_64(mask, (30, 20, 230, 60))  # object fills the left half of this box
    assert half[:, :31].min() > 0.99 and half[:, 33:].max() < 0.01


def test_tokens_to_mask_pastes_into_the_truncated_loc_box_only(flax_vae):
    width, height = 640, 480
    locs = (100, 200, 700, 900)  # (y1, x1, y2, x2)
    x1, y1, x2, y2 = (
        int(v) for v in (200 / 1023 * width, 100 / 1023 * height, 900 / 1023 * width, 700 / 1023 * height)
    )
    seg = flax_vae.encode(np.ones((1, 64, 64)))[0]
    logits = flax_vae.decode(seg[None])[0]
    mask = vae.tokens_to_mask(flax_vae, seg, locs, width, height)
    assert mask.shape == (height, width) and mask.dtype == bool
    outside = mask.copy()
    outside[y1:y2, x1:x2] = False
    assert not outside.any()
    from PIL import Image

    expected = np.asarray(Image.fromarray(logits, mode="F").resize((x2 - x1, y2 - y1), Image.BILINEAR)) > 0
    np.testing.assert_array_equal(mask[y1:y2, x1:x2], expected)
    assert expected.sum() > 0


def test_batched_and_single_calls_agree(flax_vae):
    full = np.zeros((240, 320), bool)
    full[40:200, 60:100] = True
    full[100:130, 150:300] = True
    boxes = [(60, 40, 100, 200), (150, 100, 300, 130), (55.4, 35.6, 310.2, 205.0)]
    tokens = vae.masks_to_tokens(flax_vae, [full] * 3, boxes)
    assert tokens.shape == (3, 16) and tokens.dtype == np.int32
    assert [tuple(t) for t in tokens] == [vae.mask_to_tokens(flax_vae, full, b) for b in boxes]
    locs = [(100, 200, 700, 900), (0, 0, 1023, 1023)]
    pasted = vae.tokens_to_masks(flax_vae, tokens[:2], locs, 320, 240)
    assert pasted.shape == (2, 240, 320)
    for i in range(2):
        np.testing.assert_array_equal(pasted[i], vae.tokens_to_mask(flax_vae, tokens[i], locs[i], 320, 240))


def test_degenerate_boxes_give_empty_masks_and_counted_warnings(flax_vae):
    counts = collections.Counter()
    seg = list(range(16))
    with pytest.warns(vae.DegenerateBoxWarning):
        assert not vae.tokens_to_mask(flax_vae, seg, (500, 100, 500, 900), 640, 480, counts).any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", vae.DegenerateBoxWarning)
        assert not vae.tokens_to_mask(flax_vae, seg, (1000, 100, 1001, 900), 640, 480, counts).any()  # < 1 px tall
        full = np.ones((50, 50), bool)
        zero_crop = vae.mask_to_tokens(flax_vae, full, (10, 10, 10.3, 40), counts)
        outside = vae.mask_to_tokens(flax_vae, full, (60, 60, 90, 90), counts)
    empty = tuple(int(v) for v in flax_vae.encode(np.zeros((1, 64, 64)))[0])
    assert zero_crop == outside == empty
    assert counts == {"zero_area": 3, "outside_image": 1}
