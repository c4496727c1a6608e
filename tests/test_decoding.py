"""KV-cache decoding equals a full recompute; the segmentation grammar makes every output parse cleanly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SMALL, random_params

from paliseg import decoding, model
from paliseg.tokenizer import Tokenizer
from paliseg.tokens import parse_suffix

# Gemma 2: post-norms, both soft-caps, heads * head_dim != width, a query scalar != head_dim, and a window
# (6) far shorter than the sequence (4 image + 16 prompt + 8 decoded tokens) on layers 0 and 2.
SMALL_PG2 = SMALL.replace(
    llm={"depth": 3, "head_dim": 24, "post_norms": True, "attn_logits_softcap": 50.0,
         "final_logits_softcap": 30.0, "query_pre_attn_scalar": 20, "sliding_window": 6}
)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(SMALL.tokenizer_path)


@pytest.fixture(scope="module")
def params():
    return random_params(SMALL)


def _prompts(tokenizer, texts, length=16):
    encoded = [tokenizer.encode_prompt(t, length) for t in texts]
    return {k: np.stack([e[k] for e in encoded]) for k in ("tokens", "mask_ar", "mask_input")}


def _images(batch, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 16, 16, 3)).astype(np.float32)


@pytest.mark.parametrize("generation", [1, 2])
def test_kv_cache_logits_equal_full_recompute_at_every_step(tokenizer, params, generation):
    config = SMALL if generation == 1 else SMALL_PG2
    params = params if generation == 1 else random_params(SMALL_PG2)
    prompts = _prompts(tokenizer, ["segment crack", "detect drywall ; taping area ; joint", "caption en"])
    images = _images(3)
    steps = 8
    out = decoding.generate(
        config,
        params,
        images,
        prompts["tokens"],
        prompts["mask_ar"],
        prompts["mask_input"],
        max_new_tokens=steps,
        eos_id=tokenizer.eos_id,
        return_logits=True,
    )
    tokens, logits = np.asarray(out.tokens), np.asarray(out.logits)
    assert len({tuple(row) for row in tokens}) == 3 and len(set(tokens[0].tolist())) > 2
    # the whole sequence at once: right-padded prompt, then the generated tokens (causal, mask_ar 1)
    full_tokens = np.concatenate([prompts["tokens"], tokens], axis=1)
    full_ar = np.concatenate([prompts["mask_ar"], np.ones_like(tokens)], axis=1)
    full_input = np.concatenate([prompts["mask_input"], np.ones_like(tokens)], axis=1)
    full = np.asarray(model.forward(config, params, images, full_tokens, full_ar, full_input))
    length = prompts["tokens"].shape[1]
    for row in range(3):
        last_prompt = prompts["mask_input"][row].sum() - 1
        positions = [last_prompt] + [length + t - 1 for t in range(1, steps)]
        np.testing.assert_allclose(logits[row], full[row, positions], atol=1e-4, rtol=1e-5)
        np.testing.assert_array_equal(tokens[row], full[row, positions].argmax(-1))
    # each token's log-probability is the log-softmax of the logits it was chosen from
    chosen = np.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs), chosen, atol=1e-5)


def test_prompt_padding_does_not_change_the_output(tokenizer, params):
    texts = ["segment crack", "detect drywall ; taping area ; joint"]
    short = decoding.generate(SMALL, params, _images(2), *_prompts(tokenizer, texts, 16).values(), max_new_tokens=8)
    long = decoding.generate(SMALL, params, _images(2), *_prompts(tokenizer, texts, 32).values(), max_new_tokens=8)
    np.testing.assert_array_equal(short.tokens, long.tokens)


def _random_grammar_walk(grammar, batch, steps, seed):
    """Emit tokens by choosing a random allowed token class (EOS rarely), then a random allowed token of it:
    reaches every branch of the grammar (separators, labels, budget-forced EOS) that a model rarely would."""
    token_class, loc_value = grammar.arrays()
    rng = np.random.default_rng(seed)
    phase = y1 = x1 = jnp.zeros((batch,), jnp.int32)
    out = np.zeros((batch, steps), np.int32)
    done = np.zeros(batch, bool)
    for step in range(steps):
        allowed = np.asarray(decoding._allowed(phase, y1, x1, steps - step, token_class, loc_value))
        for row in range(batch):
            classes = sorted(set(grammar.token_class[allowed[row]].tolist()))
            weights = np.array([0.1 if c == decoding.EOS else 1.0 for c in classes])
            cls = rng.choice(classes, p=weights / weights.sum())
            out[row, step] = 0 if done[row] else rng.choice(np.flatnonzero(allowed[row] & (grammar.token_class == cls)))
        phase, y1, x1 = decoding._advance(phase, y1, x1, jnp.asarray(out[:, step]), token_class, loc_value)
        done |= out[:, step] == 1
    return out


@pytest.mark.parametrize("steps", [20, 45, 90])
def test_grammar_random_walks_always_parse_cleanly(tokenizer, steps):
    grammar = decoding.SegmentGrammar.from_tokenizer(tokenizer, SMALL.llm.vocab_size)
    out = _random_grammar_walk(grammar, batch=24, steps=steps, seed=steps)
    objects = 0
    for row in out:
        text = tokenizer.decode(row)
        result = parse_suffix(text)
        assert result.invalid_count == 0, (text, result.invalid)
        objects += len(result.objects)
        assert len(result.objects) == sum(int(i) in set(tokenizer.loc_ids.tolist()) for i in row) // 4
        assert tokenizer.eos_id in row.tolist()  # always finished within budget
    if steps == 20:
        assert objects == 0  # no room for a whole object (20 tokens) and EOS
    else:
        assert objects >= 24 * (steps // 45)  # the walk does produce objects, separators and labels


def test_constrained_model_outputs_are_always_valid(tokenizer, params):
    grammar = decoding.SegmentGrammar.from_tokenizer(tokenizer, SMALL.llm.vocab_size)
    prompts = _prompts(tokenizer, ["segment crack"] * 4 + ["segment taping area"] * 4)
    images = _images(8, seed=1)
    texts = []
    for seed, sampling in enumerate([decoding.Sampling(), *[decoding.Sampling(temperature=1.5, top_p=0.95)] * 2]):
        out = decoding.generate(
            SMALL,
            params,
            images,
            *prompts.values(),
            max_new_tokens=48,
            eos_id=tokenizer.eos_id,
            grammar=grammar,
            sampling=sampling,
            rng=jax.random.key(seed),
        )
        texts += [tokenizer.decode(row) for row in np.asarray(out.tokens)]
        if sampling.greedy:  # the grammar renormalises over the allowed tokens: never less likely than unmasked
            raw = decoding.generate(
                SMALL,
                params,
                images,
                *prompts.values(),
                max_new_tokens=48,
                eos_id=tokenizer.eos_id,
                grammar=grammar,
                return_logits=True,
            )
            tokens = np.asarray(raw.tokens)
            unmasked = np.take_along_axis(jax.nn.log_softmax(raw.logits, axis=-1), tokens[..., None], axis=-1)[..., 0]
            live = np.cumsum(tokens == tokenizer.eos_id, axis=1) - (tokens == tokenizer.eos_id) == 0  # up to EOS
            assert np.all(np.asarray(raw.logprobs)[live] >= unmasked[live] - 1e-5)
            assert np.all(np.asarray(raw.logprobs)[live] <= 1e-6) and np.all(np.asarray(raw.logprobs)[~live] == 0)
    results = [parse_suffix(t) for t in texts]
    assert all(r.invalid_count == 0 for r in results), [
        (t, r.invalid) for t, r in zip(texts, results) if r.invalid_count
    ]
    assert sum(len(r.objects) for r in results) >= len(texts)
    # unconstrained, the same random model produces nothing parseable
    free = decoding.generate(SMALL, params, images, *prompts.values(), max_new_tokens=48, eos_id=tokenizer.eos_id)
    assert not any(parse_suffix(tokenizer.decode(row)).objects for row in np.asarray(free.tokens))


def test_sampling_is_reproducible_and_tiny_nucleus_is_greedy(tokenizer, params):
    prompts = _prompts(tokenizer, ["caption en"] * 2)
    images = _images(2, seed=2)

    def run(sampling, seed):
        return np.asarray(
            decoding.generate(
                SMALL, params, images, *prompts.values(), max_new_tokens=8, sampling=sampling, rng=jax.random.key(seed)
            ).tokens
        )

    hot = decoding.Sampling(temperature=2.0)
    np.testing.assert_array_equal(run(hot, 0), run(hot, 0))
    assert not np.array_equal(run(hot, 0), run(hot, 1))
    np.testing.assert_array_equal(run(decoding.Sampling(temperature=1.0, top_p=1e-6), 5), run(decoding.Sampling(), 0))


def test_predict_texts_constrains_segment_prompts_by_default(tokenizer, params):
    images = _images(8, seed=3)  # the shapes of the test above: no new compile
    decoded = decoding.predict_texts(
        SMALL, params, tokenizer, images, ["segment crack", "segment drywall"] * 4, max_new_tokens=48
    )
    texts = [d.text for d in decoded]
    assert all(parse_suffix(t).invalid_count == 0 for t in texts) and any(parse_suffix(t).objects for t in texts)
    for item in decoded:  # one confidence per ";"-chunk; every object's chunk has one, in (0, 1]
        parsed = parse_suffix(item.text)
        assert len(item.chunk_scores) == item.text.count(";") + 1
        assert all(0 < item.chunk_scores[chunk] <= 1 for chunk in parsed.chunks)
    assert decoding.is_segment_prompt(" Segment crack") and not decoding.is_segment_prompt("detect crack")
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        decoding.predict_texts(SMALL, params, tokenizer, images[:1], ["a", "b"])


def test_chunk_scores_are_geometric_means_of_each_chunks_loc_tokens(tokenizer):
    loc, seg = tokenizer.loc_id, tokenizer.seg_id
    separator = tokenizer.encode(" ; ")
    first = [loc(1), loc(2), loc(30), loc(40), *[seg(3)] * 16, *tokenizer.encode(" crack")]
    second = [loc(5), loc(6), loc(50), loc(60), *tokenizer.encode(" crack")]
    ids = first + separator + second + [tokenizer.eos_id, tokenizer.pad_id, loc(7)]
    logprobs = np.full(len(ids), -3.0)
    logprobs[:4] = np.log([0.9, 0.8, 0.5, 0.4])
    start = len(first) + len(separator)
    logprobs[start : start + 4] = np.log(0.25)
    scores = decoding.chunk_scores(tokenizer, ids, logprobs)
    assert tokenizer.decode(ids).count(";") == 1 and len(scores) == 2  # nothing after EOS counts
    np.testing.assert_allclose(scores, [(0.9 * 0.8 * 0.5 * 0.4) ** 0.25, 0.25], rtol=1e-6)
    assert decoding.chunk_scores(tokenizer, tokenizer.encode("a ; ; b"), np.zeros(8)) == (None, None, None)


def test_samples_per_prompt_equal_the_prompts_repeated(tokenizer, params):
    """G samples of each prompt from one prefill: the same tokens and log-probabilities as decoding each
    prompt repeated G times (rows prompt-major), greedy under the grammar and sampled with the same key."""
    prompts = _prompts(tokenizer, ["segment cat", "caption en"])
    images = _images(2, seed=3)
    repeated = {key: np.repeat(value, 3, axis=0) for key, value in prompts.items()}
    grammar = decoding.segment_grammar(tokenizer, SMALL.llm.vocab_size)
    for constrain, sampling in ((grammar, decoding.Sampling()), (None, decoding.Sampling(temperature=1.0))):
        kwargs = dict(max_new_tokens=10, eos_id=-1, grammar=constrain, sampling=sampling, rng=jax.random.key(4))
        shared = decoding.generate(SMALL, params, images, *prompts.values(), samples_per_prompt=3, **kwargs)
        copies = decoding.generate(SMALL, params, np.repeat(images, 3, axis=0), *repeated.values(), **kwargs)
        assert shared.tokens.shape == (6, 10)
        np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(copies.tokens))
        np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(copies.logprobs), atol=1e-5)
    sampled = np.asarray(shared.tokens)
    assert not np.array_equal(sampled[0], sampled[1])  # a prompt's samples differ
