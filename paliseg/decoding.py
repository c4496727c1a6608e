"""Jit-compiled KV-cache decoding, optionally constrained to the segmentation grammar.

`generate` runs the prompt once (prefill, filling a KV cache) and then one token per step in a
`lax.while_loop` until every example has emitted EOS or `max_new_tokens` is reached. Prompts are
right-padded to a shared length and may differ in length: each example keeps its own positions, and all
write their next token to the same cache slot (see `PaliGemma.prefill`).

Constrained decoding (`SegmentGrammar`) masks the logits at every step so that the output is always a
valid sequence of objects for `paliseg.tokens.parse_suffix`:

    object = 4 loc (y2 > y1, x2 > x1) + 16 seg + label text,  objects joined by " ; ",  then EOS

A small per-example state machine over token classes (loc, seg, eos, label text, whitespace, separator)
drives the mask; it also counts the remaining budget, so it never starts an object (or a separator) that
could not be finished before `max_new_tokens`. Label text is any ordinary piece without `<`, `>` or `;`;
the separator is any piece with one `;` followed only by whitespace (e.g. Gemma's "▁;"). Byte-fallback
pieces are never emitted under the grammar.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from paliseg.config import ModelConfig
from paliseg.model.inference import decoding_view
from paliseg.model.kernels import compiler_options
from paliseg.model.paligemma import PaliGemma, cache_positions
from paliseg.tokenizer import Tokenizer
from paliseg.tokens import LOC_BINS, SEG_PER_OBJECT

# Token classes.
LOC, SEG, EOS, TEXT, SPACE, SEMI, FORBIDDEN = range(7)
# Grammar phases: BEGIN (first object or EOS), AFTER_SEP (whitespace, then the next object), the 3 loc
# tokens after the first, the 16 seg tokens, LABEL, DONE.
BEGIN, AFTER_SEP = 0, 1
FIRST_SEG = 5  # phases 2, 3, 4 expect x1, y2, x2
LABEL = FIRST_SEG + SEG_PER_OBJECT
DONE = LABEL + 1
OBJECT_TOKENS = 4 + SEG_PER_OBJECT


def _transition_table() -> np.ndarray:
    allowed = np.zeros((DONE + 1, FORBIDDEN + 1), bool)
    allowed[BEGIN, [LOC, EOS]] = True
    allowed[AFTER_SEP, [LOC, SPACE]] = True
    allowed[2:FIRST_SEG, LOC] = True
    allowed[FIRST_SEG:LABEL, SEG] = True
    allowed[LABEL, [TEXT, SPACE, SEMI, EOS]] = True
    allowed[DONE, :] = True  # finished rows are overwritten with pad; keep their logits finite
    return allowed


@dataclasses.dataclass(frozen=True)
class SegmentGrammar:
    """Per-vocabulary arrays for the constrained decoder (ids beyond the tokenizer are forbidden)."""

    token_class: np.ndarray  # int32 [V]
    loc_value: np.ndarray  # int32 [V], -1 for non-loc tokens

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, vocab_size: int) -> SegmentGrammar:
        token_class = np.full(vocab_size, FORBIDDEN, np.int32)
        for i in range(min(vocab_size, tokenizer.vocab_size)):
            if tokenizer.is_plain_text(i):
                token_class[i] = _text_class(tokenizer.piece_text(i))
        token_class[tokenizer.loc_ids] = LOC
        token_class[tokenizer.seg_ids] = SEG
        token_class[tokenizer.eos_id] = EOS
        loc_value = np.full(vocab_size, -1, np.int32)
        loc_value[tokenizer.loc_ids] = np.arange(LOC_BINS)
        if not (token_class == SEMI).any():
            raise ValueError(f"{tokenizer.path}: no piece can encode the object separator ' ; '")
        return cls(token_class, loc_value)

    def arrays(self) -> tuple[jax.Array, jax.Array]:
        return jnp.asarray(self.token_class), jnp.asarray(self.loc_value)


@functools.lru_cache(maxsize=4)
def segment_grammar(tokenizer: Tokenizer, vocab_size: int) -> SegmentGrammar:
    """`SegmentGrammar.from_tokenizer`, built once per tokenizer (a pass over the whole vocabulary)."""
    return SegmentGrammar.from_tokenizer(tokenizer, vocab_size)


def _text_class(text: str) -> int:
    if "<" in text or ">" in text or not text:
        return FORBIDDEN
    if ";" not in text:
        return SPACE if not text.strip() else TEXT
    _head, _, tail = text.partition(";")
    return SEMI if not tail.strip() else FORBIDDEN


def _allowed(phase, y1, x1, remaining, token_class, loc_value):
    """bool [B,V]: the tokens each example may emit next."""
    table = jnp.asarray(_transition_table())
    cls = token_class[None, :]
    allowed = table[phase[:, None], cls]
    value = loc_value[None, :]
    p = phase[:, None]
    loc_ok = jnp.where(p == 3, value > y1[:, None], jnp.where(p == 4, value > x1[:, None], value < LOC_BINS - 1))
    allowed &= (cls != LOC) | loc_ok
    r = remaining
    room = jnp.where(
        p == BEGIN,
        (cls != LOC) | (r >= OBJECT_TOKENS + 1),
        jnp.where(
            p == AFTER_SEP,
            (cls != SPACE) | (r >= OBJECT_TOKENS + 2),
            jnp.where(
                p == LABEL,
                jnp.where(cls == SEMI, r >= OBJECT_TOKENS + 2, (cls == EOS) | (r >= 2)),
                True,
            ),
        ),
    )
    return allowed & room


def _constrain(logits, phase, y1, x1, remaining, grammar):
    """The logits [B,V] with the tokens the grammar forbids next set to -inf."""
    return jnp.where(_allowed(phase, y1, x1, remaining, *grammar), logits, -jnp.inf)


def _advance(phase, y1, x1, token, token_class, loc_value):
    cls, value = token_class[token], loc_value[token]
    starts = ((phase == BEGIN) | (phase == AFTER_SEP)) & (cls == LOC)
    new = jnp.where(starts, 2, phase)
    new = jnp.where((phase >= 2) & (phase < LABEL), phase + 1, new)
    new = jnp.where((phase == LABEL) & (cls == SEMI), AFTER_SEP, new)
    new = jnp.where(cls == EOS, DONE, new)
    return new, jnp.where(starts, value, y1), jnp.where(phase == 2, value, x1)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; otherwise softmax(logits / temperature), restricted to the top-p nucleus."""

    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def _sample(logits: jax.Array, temperature: jax.Array | None, top_p: jax.Array, rng: jax.Array) -> jax.Array:
    """Greedy when `temperature` is None (static); otherwise temperature and top-p are traced values, so
    every sampling setting shares one compiled program."""
    if temperature is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    order = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(order, axis=-1), axis=-1)
    # the smallest logit still inside the nucleus (the top token always is; top_p >= 1 keeps every token)
    cutoff_index = jnp.where(top_p >= 1.0, order.shape[-1] - 1, jnp.sum(cumulative < top_p, axis=-1, keepdims=True))
    cutoff = jnp.take_along_axis(order, jnp.minimum(cutoff_index, order.shape[-1] - 1), axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


_STATIC = ("config", "max_new_tokens", "eos_id", "pad_id", "return_logits", "samples_per_prompt")


def _generate(
    config,
    params,
    images,
    tokens,
    mask_ar,
    mask_input,
    grammar,
    temperature,
    top_p,
    rng,
    *,
    max_new_tokens,
    eos_id,
    pad_id,
    return_logits,
    samples_per_prompt,
):
    model = PaliGemma(config)
    params = decoding_view(config, params)
    prompt_len = config.num_image_tokens + tokens.shape[1]
    logits, cache, key_valid, seq_len = model.apply(  # the last token is never written: max_new - 1 slots
        {"params": params},
        images,
        tokens,
        mask_ar,
        mask_input,
        prompt_len + max_new_tokens - 1,
        method=PaliGemma.prefill,
    )
    if samples_per_prompt > 1:  # each prompt's prefill, run once, copied to its samples' rows
        logits, key_valid, seq_len, mask_input = (
            jnp.repeat(a, samples_per_prompt, axis=0) for a in (logits, key_valid, seq_len, mask_input)
        )
        cache = tuple(jnp.repeat(c, samples_per_prompt, axis=1) for c in cache)  # [L,B,K,S,H]
    batch = logits.shape[0]
    zeros = jnp.zeros((batch,), jnp.int32)
    state = {
        "step": jnp.asarray(0, jnp.int32),
        "logits": logits,
        "cache": cache,
        "key_valid": key_valid,
        "out": jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        "done": jnp.zeros((batch,), bool),
        "phase": zeros,
        "y1": zeros,
        "x1": zeros,
        "rng": rng,
        "logprobs": jnp.zeros((batch, max_new_tokens), jnp.float32),
    }
    if config.llm.sliding_window is not None:  # the window is over positions: track each slot's
        state["key_positions"] = cache_positions(config.num_image_tokens, mask_input, cache[0].shape[3])
    if return_logits:
        state["all_logits"] = jnp.zeros((batch, max_new_tokens, logits.shape[-1]), jnp.float32)

    def choose(s):
        """Pick each example's next token from `s["logits"]` and record it at column `step`."""
        s = dict(s)
        step, logits = s["step"], s["logits"]
        if return_logits:
            s["all_logits"] = s["all_logits"].at[:, step].set(logits)
        if grammar is not None:
            logits = _constrain(logits, s["phase"], s["y1"], s["x1"], max_new_tokens - step, grammar)
        s["rng"], key = jax.random.split(s["rng"])
        token = jnp.where(s["done"], pad_id, _sample(logits, temperature, top_p, key))
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), token[:, None], axis=-1)
        s["logprobs"] = s["logprobs"].at[:, step].set(jnp.where(s["done"], 0.0, logprob[:, 0]))
        if grammar is not None:
            s["phase"], s["y1"], s["x1"] = _advance(s["phase"], s["y1"], s["x1"], token, *grammar)
        s["out"] = s["out"].at[:, step].set(token)
        s["done"] = s["done"] | (token == eos_id)
        return s, token

    def body(s):
        s, token = choose(s)
        step = s["step"]
        slot = prompt_len + step
        s["logits"], s["cache"] = model.apply(
            {"params": params},
            token[:, None],
            (seq_len + step)[:, None],
            s["key_valid"],
            s["cache"],
            slot,
            s.get("key_positions"),
            method=PaliGemma.extend,
        )
        s["key_valid"] = s["key_valid"].at[:, slot].set(True)
        if "key_positions" in s:
            s["key_positions"] = s["key_positions"].at[:, slot].set(seq_len + step)
        s["step"] = step + 1
        return s

    # every step but the last also runs the model on its token; the last only chooses
    state = jax.lax.while_loop(lambda s: (s["step"] < max_new_tokens - 1) & ~jnp.all(s["done"]), body, state)
    state, _ = choose(state)
    return {"tokens": state["out"], "logprobs": state["logprobs"], "logits": state.get("all_logits")}


class Generation(NamedTuple):
    """`generate`'s result: the tokens, each token's log-probability under the model's softmax at
    temperature 1, restricted to the grammar's allowed tokens when constrained (whatever the sampling
    settings; 0 after EOS), and with `return_logits` the raw logits of every step."""

    tokens: jax.Array  # int32 [B, max_new_tokens], pad after EOS
    logprobs: jax.Array  # float32 [B, max_new_tokens]
    logits: jax.Array | None  # float32 [B, max_new_tokens, V]


def token_logprobs(
    logits: jax.Array, tokens: jax.Array, grammar: SegmentGrammar | None = None, eos_id: int = 1
) -> jax.Array:
    """float32 [B,T]: the log-probability of each of `tokens` [B,T] (a `generate` output, pad after EOS)
    under the logits [B,T,V] that chose it, restricted to the grammar's allowed tokens as `generate`
    restricts them (the grammar state is replayed over the tokens; T is the decoding budget), 0 after
    EOS: what `Generation.logprobs` holds, here differentiable, for a teacher-forced forward pass."""
    batch, length, _ = logits.shape
    arrays = None if grammar is None else grammar.arrays()
    zeros = jnp.zeros((batch,), jnp.int32)

    def one(carry, inputs):
        phase, y1, x1, done = carry
        step_logits, token, step = inputs
        if arrays is not None:
            step_logits = _constrain(step_logits, phase, y1, x1, length - step, arrays)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(step_logits.astype(jnp.float32), axis=-1), token[:, None], -1)
        if arrays is not None:
            phase, y1, x1 = _advance(phase, y1, x1, token, *arrays)
        return (phase, y1, x1, done | (token == eos_id)), jnp.where(done, 0.0, logprob[:, 0])

    carry = (zeros, zeros, zeros, jnp.zeros((batch,), bool))
    inputs = (jnp.swapaxes(logits, 0, 1), jnp.swapaxes(tokens, 0, 1), jnp.arange(length))
    _, logprobs = jax.lax.scan(one, carry, inputs)
    return jnp.swapaxes(logprobs, 0, 1)


# Compiled with the backend's options (`kernels.compiler_options`, on CPU: no loop-invariant code
# motion). XLA:CPU gathers rows of a bfloat16 table inside a loop from a float32 copy of the whole table, and
# hoisting that copy out of the token loop kept it alive for the whole decode: the embedding table's, 2.1 GB
# for PaliGemma 3B (its decode peaked at 11.5 GB), or an extra 2.4 GB for PaliGemma 2 3B with nf4 (6.77 GB
# instead of 4.64 GB). Left in the loop, the copy fuses into the gather of the one row it needs.
@functools.cache
def _compiled_generate():  # built on first use: asking for the backend's options initialises the backend
    return jax.jit(_generate, static_argnames=_STATIC, compiler_options=compiler_options())


def generate(
    config: ModelConfig,
    params: dict,
    images: jax.Array,
    tokens: jax.Array,
    mask_ar: jax.Array,
    mask_input: jax.Array,
    *,
    max_new_tokens: int,
    eos_id: int = 1,
    pad_id: int = 0,
    grammar: SegmentGrammar | None = None,
    sampling: Sampling = Sampling(),
    rng: jax.Array | None = None,
    return_logits: bool = False,
    samples_per_prompt: int = 1,
) -> Generation:
    """Decode up to `max_new_tokens` after each prompt (see `Generation` for what comes back).

    `samples_per_prompt` = G decodes G completions of each prompt (rows b * G ... b * G + G - 1 of the
    result, as for prompts repeated G times) from one prefill of it: the image encoder and the prompt run
    once per prompt, not once per sample (GRPO's groups)."""
    args, static = _arguments(
        config, params, images, tokens, mask_ar, mask_input, max_new_tokens=max_new_tokens, eos_id=eos_id,
        pad_id=pad_id, grammar=grammar, sampling=sampling, rng=rng, return_logits=return_logits,
        samples_per_prompt=samples_per_prompt,
    )  # fmt: skip
    return Generation(**_compiled_generate()(*args, **static))


def lower_generate(
    config: ModelConfig, params: dict, images, tokens, mask_ar, mask_input, **options
) -> jax.stages.Lowered:
    """`generate`'s program for these arguments (and its keywords), lowered, not run: the arrays may be
    `jax.ShapeDtypeStruct`s, so its memory and FLOPs can be read without allocating the model (`paliseg plan`)."""
    args, static = _arguments(config, params, images, tokens, mask_ar, mask_input, **options)
    return _compiled_generate().lower(*args, **static)


def _arguments(
    config,
    params,
    images,
    tokens,
    mask_ar,
    mask_input,
    *,
    max_new_tokens: int,
    eos_id: int = 1,
    pad_id: int = 0,
    grammar: SegmentGrammar | None = None,
    sampling: Sampling = Sampling(),
    rng: jax.Array | None = None,
    return_logits: bool = False,
    samples_per_prompt: int = 1,
) -> tuple[tuple, dict]:
    """(positional, static keyword) arguments of `_generate` for `generate`'s."""
    array = lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jnp.asarray(x)  # noqa: E731
    args = (
        config, params, array(images), array(tokens), array(mask_ar), array(mask_input),
        None if grammar is None else grammar.arrays(),
        None if sampling.greedy else jnp.float32(sampling.temperature),
        jnp.float32(sampling.top_p),
        jax.random.key(0) if rng is None else rng,
    )  # fmt: skip
    static = {"max_new_tokens": max_new_tokens, "eos_id": eos_id, "pad_id": pad_id, "return_logits": return_logits,
              "samples_per_prompt": samples_per_prompt}  # fmt: skip
    return args, static


def prompt_length_bucket(length: int, multiple: int = 16) -> int:
    """Prompt lengths are padded to a multiple of 16, so varied prompts reuse a few compiled programs."""
    return max(multiple, math.ceil(length / multiple) * multiple)


def is_segment_prompt(prompt: str) -> bool:
    """Prompts that ask for masks (`segment ...`) are decoded under the grammar by default."""
    return prompt.strip().lower().startswith("segment")


@dataclasses.dataclass(frozen=True)
class Decoded:
    """One decoded suffix: its text, and for every chunk of the text split at ";" (as
    `paliseg.tokens.parse_suffix` splits it) the confidence of the object it holds: the geometric-mean
    probability of the chunk's loc tokens, None for a chunk without any."""

    text: str
    chunk_scores: tuple[float | None, ...]


def chunk_scores(tokenizer: Tokenizer, ids: Sequence[int], logprobs: Sequence[float]) -> tuple[float | None, ...]:
    """Per ";"-chunk of `tokenizer.decode(ids)`: exp(mean log-probability of its loc tokens), or None.

    A box's four loc tokens carry where the model is sure an object is; seg and label tokens describe its
    shape and name, not whether it exists, so they do not count."""
    loc_ids = set(tokenizer.loc_ids.tolist())
    sums, counts = [0.0], [0]
    for index, logprob in zip(ids, logprobs):
        index = int(index)
        if index == tokenizer.eos_id:
            break
        if index in (tokenizer.pad_id, tokenizer.bos_id):
            continue
        if index in loc_ids:
            sums[-1] += float(logprob)
            counts[-1] += 1
        for _ in range(tokenizer.decode([index]).count(";")):
            sums.append(0.0)
            counts.append(0)
    return tuple(math.exp(total / count) if count else None for total, count in zip(sums, counts))


def predict_texts(
    config: ModelConfig,
    params: dict,
    tokenizer: Tokenizer,
    images: np.ndarray | jax.Array,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    constrain: bool | None = None,
    sampling: Sampling = Sampling(),
    rng: jax.Array | None = None,
    samples_per_prompt: int = 1,
) -> list[Decoded]:
    """Images [B,H,W,3] in [-1,1] and one prompt per image -> decoded suffixes with per-object confidences
    (with `samples_per_prompt` G: B * G of them, each prompt's G in a row, as `generate` gives them).
    `constrain=None` uses the grammar for every batch whose prompts all start with "segment". `images` may be
    a global array split over several devices and processes (`infer.predictor.Predictor` with a mesh): every
    process passes every prompt and gets every row's text."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
    if constrain is None:
        constrain = all(is_segment_prompt(p) for p in prompts)
    longest = max(len(tokenizer.encode(p, bos=True) + tokenizer.encode("\n")) for p in prompts)
    encoded = [tokenizer.encode_prompt(p, prompt_length_bucket(longest)) for p in prompts]
    batch = {k: _split_like(np.stack([e[k] for e in encoded]), images) for k in ("tokens", "mask_ar", "mask_input")}
    grammar = segment_grammar(tokenizer, config.llm.vocab_size) if constrain else None
    out = generate(
        config,
        params,
        images,
        batch["tokens"],
        batch["mask_ar"],
        batch["mask_input"],
        max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        grammar=grammar,
        sampling=sampling,
        rng=rng,
        samples_per_prompt=samples_per_prompt,
    )
    tokens, logprobs = _every_row(out.tokens), _every_row(out.logprobs)
    return [Decoded(tokenizer.decode(row), chunk_scores(tokenizer, row, lp)) for row, lp in zip(tokens, logprobs)]


def _split_like(rows: np.ndarray, images) -> Any:
    """The prompts' rows, split over the devices as the images are: a batch split over the devices of
    several processes is one global array, and each process places only its own rows."""
    if not isinstance(images, jax.Array) or len(images.sharding.device_set) == 1:
        return rows
    return jax.make_array_from_callback(rows.shape, images.sharding, lambda index: rows[index])


def _every_row(array: jax.Array) -> np.ndarray:
    """A decoded array's rows, all of them on every process (a batch split over several processes)."""
    return np.asarray(array if array.is_fully_addressable else multihost_utils.process_allgather(array, tiled=True))
