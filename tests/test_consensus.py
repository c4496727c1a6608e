"""Consensus decoding (`--samples G`, infer/consensus.py): G sampled answers become one text with the most
common object count, median boxes, codebook-mean seg codes and each object's share of the samples; the
Predictor and `paliseg eval` decode with it, and the prediction cache tells it from greedy decoding."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import PROMPT, train_tiny_run

import vae
from infer import consensus, sweep
from infer.config import DecodingSettings, EvalSettings
from infer.predictor import Predictor
from paliseg import decoding
from paliseg import tokens as codec
from train.run import Run

CODEBOOK = np.eye(128, 8) * 10.0  # codes 0-7 on the axes, the rest at the origin (nearest to every mean)


def _text(*objects: tuple[tuple[int, int, int, int], int, str]) -> str:
    """Objects of (locs, one seg code for all 16 positions, label) -> a suffix."""
    return codec.format_suffix(codec.SegObject(locs, (code,) * 16, label) for locs, code, label in objects)


def test_identical_samples_give_themselves_with_full_agreement():
    text = _text(((100, 100, 400, 500), 3, "crack"), ((600, 100, 900, 400), 5, "crack"))
    assert consensus.consensus([text] * 4, CODEBOOK) == (text, (1.0, 1.0))


def test_boxes_are_medians_and_codes_the_nearest_to_the_mean_vector():
    texts = [
        _text(((100, 100, 400, 400), 2, "crack")),
        _text(((110, 90, 420, 400), 2, "crack")),
        _text(((130, 100, 400, 440), 3, "crack")),
    ]
    text, shares = consensus.consensus(texts, CODEBOOK)
    [merged] = codec.parse_suffix(text).objects
    assert merged.locs == (110, 100, 400, 400)
    assert merged.seg == (2,) * 16  # mean (0, 0, 6.7, 3.3, ...): nearest code 2 (10 on axis 2)
    assert shares == (1.0,)
    split = [_text(((100, 100, 400, 400), code, "crack")) for code in (1, 2, 3)]
    [between] = codec.parse_suffix(consensus.consensus(split, CODEBOOK)[0]).objects
    assert between.seg == (8,) * 16  # mean (0, 3.3, 3.3, 3.3, ...): nearer the origin (code 8 on) than any axis


def test_the_most_common_object_count_wins_and_objects_match_by_label_and_box():
    one = ((100, 100, 400, 400), 1, "crack")
    other = ((600, 600, 900, 900), 4, "crack")
    stray = ((100, 100, 400, 400), 6, "joint")  # the same box, another label: not the crack's match
    texts = [_text(one, other), _text(other, one), _text(one, other, stray), _text(one)]
    text, shares = consensus.consensus(texts, CODEBOOK)
    assert text == _text(one, other) and shares == (1.0, 0.75)
    assert consensus.consensus(["", "", _text(one)], CODEBOOK) == ("", ())  # most say: nothing here


def test_texts_that_are_not_object_lists_keep_their_most_common_one():
    captions = ["a wall with a crack", "a cracked wall", "a cracked wall", ""]
    assert consensus.consensus(captions, CODEBOOK) == ("a cracked wall", ())
    mostly_objects = [_text(((100, 100, 400, 400), 1, "crack"))] * 3 + ["<loc0100> broken"]
    assert consensus.consensus(mostly_objects, CODEBOOK)[1] == (0.75,)  # the invalid sample holds no object


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("consensus"))


def test_the_predictor_answers_with_the_consensus_of_its_samples(tiny_run):
    data, run_dir, vae_path = tiny_run
    model = vae.MaskVAE.from_npz(vae_path)
    predictor = Predictor.from_run(run_dir, 4, vae_model=model, batch_size=2, samples=4, temperature=1.0, seed=3)
    pixels = [predictor.preprocess(image) for image in _images(data)]
    answers = predictor.decode_batch(pixels, [PROMPT] * 2)
    assert predictor.decode_batch(pixels, [PROMPT] * 2) == answers  # seeded: the same answers again
    sampled = decoding.predict_texts(
        predictor.config, predictor.params, predictor.tokenizer, np.stack(pixels), [PROMPT] * 2,
        max_new_tokens=predictor.max_new_tokens, sampling=decoding.Sampling(1.0, 1.0), rng=jax.random.key(3),
        samples_per_prompt=4,
    )  # fmt: skip
    codebook = np.asarray(model.params["codebook"])
    for row, answer in enumerate(answers):
        texts = [item.text for item in sampled[row * 4 : row * 4 + 4]]
        assert (answer.text, answer.chunk_scores) == consensus.consensus(texts, codebook)


def test_eval_with_samples_scores_the_consensus_and_keeps_it_apart_in_the_cache(tiny_run, tmp_path):
    data, run_dir, vae_path = tiny_run
    decoding_settings = DecodingSettings(vae=vae_path, samples=4, temperature=1.0)
    settings = EvalSettings(run_dir=run_dir, data=data, out=tmp_path / "report", decoding=decoding_settings,
                            batch_size=2, canvases=0, steps="4", base=False)  # fmt: skip
    report = sweep.evaluate_run(settings)
    assert [step["step"] for step in report["steps"]] == [4]
    run = Run(run_dir)
    assert sweep._fingerprint(run, 4, 8, samples=4, temperature=1.0) != sweep._fingerprint(run, 4, 8)


def _images(data):
    from paliseg import images

    return [images.read_image(data / "images" / f"valid_{index}.png") for index in range(2)]
