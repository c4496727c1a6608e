"""The PaliGemma tokenizer and big_vision's input building, on a tiny SentencePiece model built here."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from paliseg import config as cfgs
from paliseg import tokens as codec
from paliseg.tokenizer import Tokenizer, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    path = build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny.model", extra_text=["wall-crack region"])
    return Tokenizer(path)


def test_special_ids_and_loc_seg_pieces_appended_last(tokenizer):
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 2)
    base = tokenizer.vocab_size - 1024 - 128
    # as big_vision appends them: <locNNNN> = base + i, then <segNNN>
    assert [tokenizer.loc_id(i) for i in (0, 1, 1023)] == [base, base + 1, base + 1023]
    assert [tokenizer.seg_id(j) for j in (0, 127)] == [base + 1024, base + 1151]
    assert tokenizer.encode("<loc0005><seg077>") == [tokenizer.loc_id(5), tokenizer.seg_id(77)]


def test_bundled_tiny_tokenizer_is_reproducible(tmp_path):
    bundled = cfgs.TINY_TOKENIZER
    rebuilt = build_tiny_tokenizer(tmp_path / "tiny_tokenizer.model")
    assert hashlib.sha256(rebuilt.read_bytes()).digest() == hashlib.sha256(bundled.read_bytes()).digest()
    assert Tokenizer(bundled).vocab_size == cfgs.TINY_VOCAB_SIZE
    assert bundled.stat().st_size < 300_000


def test_encode_example_is_big_vision_layout(tokenizer):
    prefix, suffix = "segment crack", "<loc0010><loc0020><loc0500><loc0600>" + "<seg001>" * 16 + " crack"
    out = tokenizer.encode_example(prefix, suffix, seq_len=40)
    # bos + sp(prefix), then sp("\n") separately, then sp(suffix) + eos
    head = [tokenizer.bos_id] + tokenizer.sp.encode(prefix) + tokenizer.sp.encode("\n")
    tail = tokenizer.sp.encode(suffix) + [tokenizer.eos_id]
    n = len(head) + len(tail)
    np.testing.assert_array_equal(out["tokens"][:n], head + tail)
    np.testing.assert_array_equal(out["tokens"][n:], 0)
    np.testing.assert_array_equal(out["mask_ar"], [0] * len(head) + [1] * len(tail) + [0] * (40 - n))
    np.testing.assert_array_equal(out["mask_loss"], out["mask_ar"])
    np.testing.assert_array_equal(out["mask_input"], [1] * n + [0] * (40 - n))
    assert {a.dtype for a in out.values()} == {np.dtype(np.int32)}
    assert tokenizer.decode(out["tokens"][len(head) :]) == suffix


def test_separator_is_tokenised_on_its_own(tokenizer):
    # a prefix ending in a piece that could merge with "\n" still gets a separate "\n" token
    out = tokenizer.encode_example("crack ", "", seq_len=16)
    newline = tokenizer.sp.encode("\n")
    n_prefix = 1 + len(tokenizer.sp.encode("crack "))
    assert out["tokens"][n_prefix : n_prefix + len(newline)].tolist() == newline


def test_long_example_is_truncated_like_big_vision(tokenizer):
    suffix = "<loc0001><loc0002><loc0003><loc0004>" + "<seg000>" * 16
    out = tokenizer.encode_example("segment crack", suffix, seq_len=10)
    assert len(out["tokens"]) == 10 and out["mask_input"].all()
    assert tokenizer.eos_id not in out["tokens"].tolist()


def test_prompt_is_prefix_and_newline_and_must_fit(tokenizer):
    out = tokenizer.encode_prompt("segment crack", seq_len=12)
    head = [tokenizer.bos_id] + tokenizer.sp.encode("segment crack") + tokenizer.sp.encode("\n")
    np.testing.assert_array_equal(out["tokens"][: len(head)], head)
    np.testing.assert_array_equal(out["mask_input"], [1] * len(head) + [0] * (12 - len(head)))
    assert not out["mask_ar"].any() and not out["mask_loss"].any()
    with pytest.raises(ValueError, match="longer than seq_len"):
        tokenizer.encode_prompt("segment crack ; drywall ; taping area", seq_len=3)


def test_decode_keeps_loc_and_seg_and_stops_at_eos(tokenizer):
    objects = [
        codec.SegObject((10, 20, 300, 400), tuple(range(16)), "crack"),
        codec.SegObject((1, 2, 3, 4), (127,) * 16, "taping area"),
    ]
    text = codec.format_suffix(objects)
    ids = tokenizer.encode(text, bos=True, eos=True) + [tokenizer.seg_id(3), tokenizer.pad_id]
    decoded = tokenizer.decode(ids)
    assert decoded == text
    assert codec.parse_suffix(decoded).objects == objects


def test_missing_file_and_non_paligemma_tokenizer_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(tmp_path / "nope.model")
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["plain words only"] * 50),
        model_prefix=str(tmp_path / "plain"),
        vocab_size=30,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    with pytest.raises(ValueError, match="no piece for <loc0000>"):
        Tokenizer(tmp_path / "plain.model")


def test_a_bundled_tokenizer_recorded_by_another_checkout_is_this_installations(tmp_path):
    """A run records the absolute path of the bundled tokenizer it trained with; moved, it still loads."""
    elsewhere = tmp_path / "old_checkout" / "paliseg" / "assets" / cfgs.TINY_TOKENIZER.name
    assert Tokenizer(elsewhere).vocab_size == Tokenizer(cfgs.TINY_TOKENIZER).vocab_size
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(tmp_path / "old_checkout" / "other" / "assets" / cfgs.TINY_TOKENIZER.name)  # not paliseg's assets
