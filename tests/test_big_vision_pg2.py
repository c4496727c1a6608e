"""PaliGemma 2 big_vision npz files in the released layouts (bf16 as `|V2` or as bfloat16, with or without
`params/`, split into `.part*` pieces) load to identical parameters; a file and a preset that disagree fail
naming the keys and the preset that fits."""

from __future__ import annotations

import io
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest

from paliseg import checkpoints, model
from paliseg import config as cfgs
from paliseg.checkpoints import big_vision
from paliseg.checkpoints.tree import flatten, unflatten

PG2 = cfgs.preset("tiny-pg2").replace(param_dtype="bfloat16")
POST_NORMS = ("llm/layers/post_attention_norm/scale", "llm/layers/post_ffw_norm/scale")


@pytest.fixture(scope="module")
def flat():
    """Random tiny-pg2 params as bf16 numpy."""
    return {k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in flatten(model.init_params(PG2, jax.random.key(3))).items()}  # fmt: skip


def _write_bf16_typed(path, flat: dict, prefix: str = "") -> None:
    """An npz whose bf16 entries declare the dtype 'bfloat16' (np.load then returns bfloat16, not `|V2`)."""
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in flat.items():
            buffer = io.BytesIO()
            descr = "bfloat16" if value.dtype == ml_dtypes.bfloat16 else np.lib.format.dtype_to_descr(value.dtype)
            header = {"descr": descr, "fortran_order": False, "shape": value.shape}
            np.lib.format.write_array_header_1_0(buffer, header)
            buffer.write(np.ascontiguousarray(value).tobytes())
            archive.writestr(prefix + key + ".npy", buffer.getvalue())


def _split(path, parts: int, name=lambda i: f".part{i}") -> list:
    data = path.read_bytes()
    step = -(-len(data) // parts)
    out = []
    for i in range(parts):
        piece = path.with_name(path.name + name(i))
        piece.write_bytes(data[i * step : (i + 1) * step])
        out.append(piece)
    path.unlink()
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == ml_dtypes.bfloat16, key
        np.testing.assert_array_equal(a[key].view(np.uint16), b[key].view(np.uint16), err_msg=key)


@pytest.mark.parametrize("layout", ["void", "bfloat16", "void-prefixed", "bfloat16-prefixed"])
def test_every_npz_layout_reads_the_same_params(flat, tmp_path, layout):
    path = tmp_path / "pg2.b16.npz"
    prefix = "params/" if layout.endswith("prefixed") else ""
    if layout.startswith("void"):
        np.savez(path, **{prefix + k: v for k, v in flat.items()})
        with np.load(path) as raw:
            assert raw[prefix + POST_NORMS[0]].dtype == np.dtype("V2")
    else:
        _write_bf16_typed(path, flat, prefix)
        with np.load(path) as raw:
            assert raw[prefix + POST_NORMS[0]].dtype == ml_dtypes.bfloat16
    _assert_same(big_vision.read_npz(path), flat)


def test_part_pieces_are_read_in_order_through_the_first_piece_or_the_base_name(flat, tmp_path):
    path = checkpoints.export_big_vision(tmp_path / "pg2.b16.npz", unflatten(flat))
    pieces = _split(path, 11, name=lambda i: f".part{i}")  # .part10 sorts after .part9, not after .part1
    assert big_vision.pieces(pieces[3]) == pieces == big_vision.pieces(path)
    _assert_same(big_vision.read_npz(pieces[0]), flat)
    _assert_same(big_vision.read_npz(path), flat)
    assert checkpoints.kind_of(path) == checkpoints.kind_of(pieces[0]) == "big_vision"


def test_lettered_pieces_and_gaps(flat, tmp_path):
    path = checkpoints.export_big_vision(tmp_path / "a.npz", unflatten(flat))
    pieces = _split(path, 3, name=lambda i: ".part" + "abc"[i] * 2)  # split's aa, bb, cc
    _assert_same(big_vision.read_npz(path), flat)
    pieces[1].unlink()
    with pytest.raises(ValueError, match="not a readable npz"):
        big_vision.read_npz(path)

    other = checkpoints.export_big_vision(tmp_path / "b.npz", unflatten(flat))
    pieces = _split(other, 3)
    pieces[1].unlink()
    with pytest.raises(ValueError, match=r"not numbered consecutively from 0 or 1: \[0, 2\]"):
        big_vision.read_npz(other)


def test_an_unfinished_download_is_not_a_piece(tmp_path):
    (tmp_path / "x.npz.part").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoints.load(tmp_path / "x.npz", preset="tiny-pg2")


def test_the_generation_and_sizes_are_read_from_the_keys(flat):
    assert big_vision.describe(flat) == big_vision.describe_config(PG2)
    assert big_vision.matching_presets(flat) == ["tiny-pg2"]
    pg1 = {k: v for k, v in flat.items() if k not in POST_NORMS}
    assert big_vision.describe(pg1)["generation"] == 1


def test_a_pg2_file_with_a_pg1_preset_names_the_keys_and_the_preset_that_fits(flat, tmp_path):
    path = checkpoints.export_big_vision(tmp_path / "pg2.b16.npz", unflatten(flat))
    with pytest.raises(ValueError) as error:
        checkpoints.load(path, preset="tiny")
    message = str(error.value)
    assert "unexpected keys" in message and "llm/layers/post_ffw_norm/scale" in message
    assert "llm/layers/attn/kv_einsum/w: (4, 2, 2, 128, 48), expected (3, 2, 1, 128, 32)" in message
    assert "a PaliGemma 2 checkpoint (post-norm keys present)" in message
    assert "generation 2 (preset: 1)" in message and "depth 4 (preset: 3)" in message
    assert "use --preset tiny-pg2" in message


def test_a_file_no_preset_fits_asks_for_one(flat, tmp_path):
    smaller = {k: v for k, v in flat.items() if k != "llm/final_norm/scale"}
    smaller["llm/final_norm/scale"] = np.ones(7, ml_dtypes.bfloat16)
    path = checkpoints.export_big_vision(tmp_path / "odd.npz", unflatten(smaller))
    with pytest.raises(ValueError, match=r"no preset has its sizes: pass a preset \(--preset\)"):
        checkpoints.load(path)


def test_a_pg2_npz_loads_with_its_preset_or_without_one(flat, tmp_path):
    assert set(POST_NORMS) <= set(flat)  # the model makes PaliGemma 2's post-norms, so the file has them
    path = checkpoints.export_big_vision(tmp_path / "pg2.b16.npz", unflatten(flat))
    _split(path, 2)
    for preset in ("tiny-pg2", None):
        config, params = checkpoints.load(path, preset=preset, param_dtype="bfloat16")
        assert config.llm == PG2.llm
        _assert_same({k: np.asarray(v) for k, v in flatten(params).items()}, flat)


def test_every_preset_is_told_apart_by_its_shapes():
    """So a file never fits two presets: loading without --preset is unambiguous for every released size."""
    signatures = [tuple(big_vision.describe_config(config).values()) for config in cfgs.PRESETS.values()]
    assert len(set(signatures)) == len(signatures)
