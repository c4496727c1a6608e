"""The Flax PaliGemma: big_vision's parameter tree, the prefix-LM mask, LoRA, remat and the dtype policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paliseg import config as cfgs
from paliseg import model
from paliseg.checkpoints.tree import flatten
from paliseg.model import lora

# The released PaliGemma 1 (3B, 224) tree, as big_vision stores it.
REFERENCE_TREE_224 = {
    "img/embedding/kernel": (14, 14, 3, 1152),
    "img/embedding/bias": (1152,),
    "img/pos_embedding": (1, 256, 1152),
    "img/Transformer/encoderblock/LayerNorm_0/scale": (27, 1152),
    "img/Transformer/encoderblock/LayerNorm_0/bias": (27, 1152),
    "img/Transformer/encoderblock/LayerNorm_1/scale": (27, 1152),
    "img/Transformer/encoderblock/LayerNorm_1/bias": (27, 1152),
    **{
        f"img/Transformer/encoderblock/MultiHeadDotProductAttention_0/{n}/kernel": (27, 1152, 16, 72)
        for n in ("query", "key", "value")
    },
    **{
        f"img/Transformer/encoderblock/MultiHeadDotProductAttention_0/{n}/bias": (27, 16, 72)
        for n in ("query", "key", "value")
    },
    "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel": (27, 16, 72, 1152),
    "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/bias": (27, 1152),
    "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel": (27, 1152, 4304),
    "img/Transformer/encoderblock/MlpBlock_0/Dense_0/bias": (27, 4304),
    "img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel": (27, 4304, 1152),
    "img/Transformer/encoderblock/MlpBlock_0/Dense_1/bias": (27, 1152),
    "img/Transformer/encoder_norm/scale": (1152,),
    "img/Transformer/encoder_norm/bias": (1152,),
    "img/head/kernel": (1152, 2048),
    "img/head/bias": (2048,),
    "llm/embedder/input_embedding": (257152, 2048),
    "llm/layers/pre_attention_norm/scale": (18, 2048),
    "llm/layers/attn/q_einsum/w": (18, 8, 2048, 256),
    "llm/layers/attn/kv_einsum/w": (18, 2, 1, 2048, 256),
    "llm/layers/attn/attn_vec_einsum/w": (18, 8, 256, 2048),
    "llm/layers/pre_ffw_norm/scale": (18, 2048),
    "llm/layers/mlp/gating_einsum": (18, 2, 2048, 16384),
    "llm/layers/mlp/linear": (18, 16384, 2048),
    "llm/final_norm/scale": (2048,),
}


def _shapes(config):
    return {k: tuple(v.shape) for k, v in flatten(model.param_shapes(config)).items()}


def test_real_preset_tree_is_big_vision_checkpoint_tree():
    shapes = _shapes(cfgs.preset("paligemma-3b-224"))
    assert shapes == REFERENCE_TREE_224
    assert sum(int(np.prod(s)) for s in shapes.values()) == 2_923_335_408


@pytest.mark.parametrize("name, patches", [("paligemma-3b-448", 1024), ("paligemma-3b-896", 4096)])
def test_higher_resolution_presets_only_grow_the_position_embedding(name, patches):
    shapes = _shapes(cfgs.preset(name))
    assert shapes["img/pos_embedding"] == (1, patches, 1152)
    assert {k: v for k, v in shapes.items() if k != "img/pos_embedding"} == {
        k: v for k, v in REFERENCE_TREE_224.items() if k != "img/pos_embedding"
    }


def test_one_kv_head_per_query_head_uses_fused_qkv_einsum():
    config = cfgs.preset("tiny").replace(llm={"num_kv_heads": 4})
    shapes = _shapes(config)
    assert shapes["llm/layers/attn/qkv_einsum/w"] == (3, 3, 4, 128, 32)
    assert not any("q_einsum" in k or "kv_einsum/" in k for k in shapes if "qkv" not in k)


def test_prefix_lm_mask_truth_table():
    # image+prefix (mask_ar 0) bidirectional, suffix (1) causal, padding (mask_input 0) never attended
    mask_ar = jnp.array([[0, 0, 0, 1, 1, 1]])
    mask_input = jnp.array([[1, 1, 1, 1, 1, 0]])
    expected = np.array(
        [
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        bool,
    )
    np.testing.assert_array_equal(np.asarray(model.make_attn_mask(mask_input, mask_ar))[0], expected)


def _batch(config, batch=2, length=7, seed=0):
    rng = np.random.default_rng(seed)
    size = config.img.image_size
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    tokens = rng.integers(0, config.llm.vocab_size, (batch, length)).astype(np.int32)
    mask_ar = np.array([[0] * 3 + [1] * (length - 3)] * batch, np.int32)
    mask_input = np.ones((batch, length), np.int32)
    mask_input[1, -2:] = 0
    return images, tokens, mask_ar, mask_input


@pytest.fixture(scope="module")
def tiny():
    config = cfgs.preset("tiny")
    return config, model.init_params(config, jax.random.key(0))


def test_forward_gives_float32_text_logits_and_prefix_is_bidirectional(tiny):
    config, params = tiny
    images, tokens, mask_ar, mask_input = _batch(config)
    logits = model.forward(config, params, images, tokens, mask_ar, mask_input)
    assert logits.shape == (2, 7, config.llm.vocab_size) and logits.dtype == jnp.float32
    # changing a suffix token changes nothing before it; changing a prefix token changes every position
    later = tokens.copy()
    later[:, 5] = (later[:, 5] + 1) % config.llm.vocab_size
    changed = model.forward(config, params, images, later, mask_ar, mask_input)
    np.testing.assert_allclose(changed[:, :5], logits[:, :5], atol=1e-5)
    assert not np.allclose(changed[0, 5], logits[0, 5], atol=1e-3)
    earlier = tokens.copy()
    earlier[:, 2] = (earlier[:, 2] + 1) % config.llm.vocab_size
    changed = model.forward(config, params, images, earlier, mask_ar, mask_input)
    assert not np.allclose(changed[0, 0], logits[0, 0], atol=1e-3)
    # the image matters
    other = model.forward(config, params, -images, tokens, mask_ar, mask_input)
    assert not np.allclose(other[0, 0], logits[0, 0], atol=1e-3)


LORA_TARGETS = ("q", "k", "gate", "down", "img_q", "img_o", "img_fc2")


@pytest.mark.parametrize("preset", ["paligemma-3b-224", "paligemma2-3b-224"])
def test_weight_layouts_describe_every_contracted_weight_of_the_real_trees(preset):
    config = cfgs.preset(preset)
    shapes = flatten(model.param_shapes(config))
    layouts = model.weight_layouts(config)
    # everything but norm scales, biases and the added position table is contracted with an input
    assert set(layouts) == {k for k in shapes if not k.endswith(("/scale", "/bias", "/pos_embedding"))}
    sizes = {}
    for path, layout in layouts.items():
        assert len(layout.axes) == len(shapes[path].shape), path
        assert sorted(layout.batch + layout.inputs + layout.outputs) == sorted(layout.axes), path
        for letter, size in zip(layout.axes, shapes[path].shape):  # a letter means one size in each tower
            assert sizes.setdefault((path.split("/")[0], letter), size) == size, (path, letter)
    assert layouts["llm/layers/attn/kv_einsum/w"] == model.WeightLayout("LPKDH", "D", "KH", ("k", "v"))
    assert layouts["llm/layers/attn/attn_vec_einsum/w"].contracted == (1, 2)  # N, H of [L,N,H,D]
    assert layouts["img/embedding/kernel"].contracted == (0, 1, 2)
    # each LoRA target adapts one part of one weight
    targets = [t for layout in layouts.values() for t in layout.targets]
    assert sorted(targets) == sorted(cfgs.LLM_LORA_TARGETS + cfgs.IMG_LORA_TARGETS)


def test_weight_layout_refuses_an_equation_that_does_not_describe_its_weight():
    from paliseg.model.layouts import WeightLayout

    assert WeightLayout.of("...D,PDF->P...F", ("gate", "up")).fused
    for equation in ("...D,NDH->...NK", "BD,DF->BF", "...D,PDF->...F"):
        with pytest.raises(ValueError, match="not"):
            WeightLayout.of(equation)


def test_lora_params_sit_beside_their_weights(tiny):
    config = tiny[0].replace(lora={"rank": 4, "targets": LORA_TARGETS})
    shapes = _shapes(config)
    adapters = {k: v for k, v in shapes.items() if lora.is_lora_path(k)}
    assert adapters == {
        "llm/layers/attn/q_einsum/w_lora_a": (3, 128, 4),
        "llm/layers/attn/q_einsum/w_lora_b": (3, 4, 4, 32),
        "llm/layers/attn/kv_einsum/w_lora_a": (3, 1, 128, 4),  # only k: one part of the fused [2,K,D,H]
        "llm/layers/attn/kv_einsum/w_lora_b": (3, 1, 4, 1, 32),
        "llm/layers/mlp/gating_einsum_lora_a": (3, 1, 128, 4),
        "llm/layers/mlp/gating_einsum_lora_b": (3, 1, 4, 512),
        "llm/layers/mlp/linear_lora_a": (3, 512, 4),
        "llm/layers/mlp/linear_lora_b": (3, 4, 128),
        "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel_lora_a": (2, 96, 4),
        "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel_lora_b": (2, 4, 4, 24),
        "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel_lora_a": (2, 4, 24, 4),
        "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel_lora_b": (2, 4, 96),
        "img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel_lora_a": (2, 384, 4),
        "img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel_lora_b": (2, 4, 96),
    }
    base = {k: v for k, v in shapes.items() if not lora.is_lora_path(k)}
    assert base == _shapes(tiny[0])


@pytest.mark.parametrize("targets", [LORA_TARGETS, ("q", "k", "v")])
def test_lora_starts_as_identity_and_merges_exactly(tiny, targets):
    base_config, base_params = tiny
    kv_heads = 4 if targets == ("q", "k", "v") else 1  # the last case exercises the fused qkv_einsum
    base_config = base_config.replace(llm={"num_kv_heads": kv_heads})
    if kv_heads != 1:
        base_params = model.init_params(base_config, jax.random.key(0))
    config = base_config.replace(lora={"rank": 4, "alpha": 8.0, "targets": targets})
    fresh = model.init_params(config, jax.random.key(1))
    _, adapters = lora.split_params(fresh)
    images, tokens, mask_ar, mask_input = _batch(config)
    reference = model.forward(base_config, base_params, images, tokens, mask_ar, mask_input)

    # B = 0 at init: the adapted model computes exactly the base function
    joined = lora.join_params(base_params, adapters)
    np.testing.assert_array_equal(model.forward(config, joined, images, tokens, mask_ar, mask_input), reference)

    # trained adapters change the function, and folding them in reproduces it without LoRA
    keys = iter(jax.random.split(jax.random.key(2), 64))
    trained = jax.tree.map(lambda x: 0.2 * jax.random.normal(next(keys), x.shape), adapters)
    adapted = model.forward(config, lora.join_params(base_params, trained), images, tokens, mask_ar, mask_input)
    assert np.abs(adapted - reference).max() > 0.1
    merged = model.merge_lora(lora.join_params(base_params, trained), config)
    assert not any(lora.is_lora_path(k) for k in flatten(merged))
    np.testing.assert_allclose(
        model.forward(base_config, merged, images, tokens, mask_ar, mask_input), adapted, atol=2e-4, rtol=1e-4
    )


def test_low_rank_gradients_equal_autodiff():
    """`low_rank` writes its backward by hand (for XLA:CPU's sake); it must be the same math."""
    from paliseg.model.kernels import low_rank

    x, a, b, cotangent = (
        jax.random.normal(k, s)
        for k, s in zip(jax.random.split(jax.random.key(0), 4), ((24, 12), (12, 3), (3, 10), (24, 10)))
    )
    ours = jax.vjp(low_rank, x, a, b)
    plain = jax.vjp(lambda x, a, b: (x @ a) @ b, x, a, b)
    np.testing.assert_allclose(ours[0], plain[0], rtol=1e-6)
    for mine, reference in zip(ours[1](cotangent), plain[1](cotangent)):
        np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 24), (1, 24), (2, 1, 24)])
def test_weight_einsum_single_row_equals_plain_einsum(shape):
    """A single bfloat16 row takes a detour through a padded dot (see `kernels.weight_einsum`); the result is
    the same numbers in the same shape as the plain einsum's, for one row or several."""
    from paliseg.model.kernels import weight_einsum

    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, shape).astype(jnp.bfloat16)
    weight = jax.random.normal(kw, (3, 24, 5)).astype(jnp.bfloat16)
    plain = jnp.einsum("...D,NDH->...NH", x, weight, preferred_element_type=jnp.float32)
    ours = weight_einsum("...D,NDH->...NH", x, weight)
    assert ours.shape == plain.shape and ours.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(plain.astype(jnp.bfloat16), np.float32))
    logits = weight_einsum("...D,NDH->...NH", x, weight, result_dtype=jnp.float32)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, plain, rtol=1e-6)


@pytest.mark.parametrize("as_matrices", [False, True])
def test_fused_weight_einsum_equals_each_part_alone(as_matrices):
    """A fused weight contracts part by part, as the checkpoint stores it (training) or as `Matrices`
    (unscanned inference layers, `inference.for_inference`); either way each part's result is its own einsum's,
    for one row (the padded path) or several."""
    from paliseg.model.kernels import Matrices, weight_einsum
    from paliseg.model.layouts import WeightLayout

    kx, kw = jax.random.split(jax.random.key(4))
    x = jax.random.normal(kx, (1, 3, 24)).astype(jnp.bfloat16)
    fused = jax.random.normal(kw, (2, 3, 24, 5)).astype(jnp.bfloat16)  # kv_einsum's [P, K, D, H]
    equation = "...D,PKDH->P...KH"
    weight = Matrices.of(fused, WeightLayout.of(equation)) if as_matrices else fused
    if as_matrices:
        assert [m.shape for m in weight.parts] == [(15, 24)] * 2 and weight.output_shape == (3, 5)
    for rows in (x[:, :1], x):
        parts = weight_einsum(equation, rows, weight)
        assert len(parts) == 2
        for part, alone in zip(parts, fused):
            plain = jnp.einsum("...D,KDH->...KH", rows, alone, preferred_element_type=jnp.float32)
            assert part.shape == plain.shape
            np.testing.assert_array_equal(
                np.asarray(part, np.float32), np.asarray(plain.astype(jnp.bfloat16), np.float32)
            )


def test_matrices_contract_several_input_axes_in_the_weights_order():
    """`...NH,NHD->...D` (the attention output): the weight becomes one [D, N*H] matrix and x's two
    trailing axes are flattened in the same order."""
    from paliseg.model.kernels import Matrices, weight_einsum
    from paliseg.model.layouts import WeightLayout

    kx, kw = jax.random.split(jax.random.key(5))
    x = jax.random.normal(kx, (2, 7, 3, 4))
    weight = jax.random.normal(kw, (3, 4, 6))
    equation = "...NH,NHD->...D"
    matrices = Matrices.of(weight, WeightLayout.of(equation))
    assert matrices.parts[0].shape == (6, 12)
    np.testing.assert_allclose(
        weight_einsum(equation, x, matrices), jnp.einsum(equation, x, weight), rtol=1e-5, atol=1e-5
    )


def test_split_and_join_are_inverse(tiny):
    config = tiny[0].replace(lora={"rank": 2})
    params = model.init_params(config, jax.random.key(0))
    base, adapters = lora.split_params(params)
    assert all(lora.is_lora_path(k) for k in flatten(adapters))
    assert not any(lora.is_lora_path(k) for k in flatten(base))
    assert flatten(lora.join_params(base, adapters)).keys() == flatten(params).keys()


def test_unknown_lora_target_is_rejected():
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        cfgs.LoraConfig(rank=4, targets=("q", "query"))


def test_remat_computes_the_same_loss_and_gradients(tiny):
    config, params = tiny
    images, tokens, mask_ar, mask_input = _batch(config)

    def loss(p, cfg):
        logits = model.forward(cfg, p, images, tokens, mask_ar, mask_input)
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    plain = jax.value_and_grad(loss)(params, config)
    remat = jax.value_and_grad(loss)(params, config.replace(remat=True))
    np.testing.assert_allclose(plain[0], remat[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(remat[1])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_dropout_only_in_training_mode(tiny):
    config = tiny[0].replace(dropout=0.5)
    params = tiny[1]
    batch = _batch(config)
    eval_logits = model.forward(config, params, *batch)
    np.testing.assert_array_equal(eval_logits, model.forward(tiny[0], params, *batch))
    train_logits = model.forward(config, params, *batch, train=True, rng=jax.random.key(3))
    assert np.abs(train_logits - eval_logits).max() > 1e-2


def test_bf16_policy_stores_bf16_and_keeps_logits_float32(tiny):
    config, params = tiny
    bf16 = config.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert {x.dtype for x in jax.tree.leaves(model.param_shapes(bf16))} == {jnp.dtype(jnp.bfloat16)}
    batch = _batch(config)
    low = model.forward(bf16, params16, *batch)
    high = model.forward(config, params, *batch)
    assert low.dtype == jnp.float32
    # bf16 matmuls track the f32 model closely (relative to the logit scale)
    assert np.abs(low - high).max() < 0.1 * np.abs(high).max()


def test_tiny_presets_match_bundled_tokenizer():
    from paliseg.tokenizer import Tokenizer

    tokenizer = Tokenizer(cfgs.preset("tiny").tokenizer_path)
    for name in ("tiny", "tiny-112", "mid"):
        assert cfgs.preset(name).llm.vocab_size == tokenizer.vocab_size


def test_config_round_trips_through_dict():
    config = cfgs.preset("tiny").replace(lora={"rank": 8, "targets": ("q", "v")}, remat=True)
    assert cfgs.ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown preset"):
        cfgs.preset("paligemma-7b")


@pytest.mark.parametrize("preset", ["tiny", "tiny-pg2"])
def test_unscanned_layers_compute_what_the_scan_computes(preset):
    """`for_inference` on CPU: one module per layer, fed per-layer buffers split from the stacked ones; the
    same logits and the same greedy tokens (KV cache, sliding window for tiny-pg2) as the scanned model, and
    the caller's params untouched."""
    from paliseg import decoding

    config = cfgs.preset(preset).with_dtype("bfloat16")
    params = model.init_params(config, jax.random.key(0))
    unscanned, view = model.for_inference(config, params)
    assert not unscanned.scan_layers
    flat = flatten(view)
    assert f"llm/layers_{config.llm.depth - 1}/attn/attn_vec_einsum/w" in flat and "llm/layers" not in flat
    assert f"img/Transformer/encoderblock_{config.img.depth - 1}/LayerNorm_0/scale" in flat
    stacked = flatten(params)["llm/layers/attn/attn_vec_einsum/w"]  # [L, N, H, D]
    matrix = flat["llm/layers_1/attn/attn_vec_einsum/w"].parts[0]  # [D, N * H]
    np.testing.assert_array_equal(matrix, np.asarray(stacked[1]).reshape(-1, config.llm.width).T)
    batch = _batch(config)
    np.testing.assert_allclose(
        model.forward(unscanned, view, *batch), model.forward(config, params, *batch), atol=2e-2, rtol=2e-2
    )
    greedy = [
        np.asarray(decoding.generate(c, p, *batch, max_new_tokens=6, eos_id=-1).tokens)
        for c, p in ((config, params), (unscanned, view))
    ]
    np.testing.assert_array_equal(greedy[1], greedy[0])


def test_sincos2d_position_embedding_init():
    """The tiny presets start `pos_embedding` as big_vision's 2-D sin-cos table (then learn it); SigLIP presets
    draw it at random."""
    config = cfgs.preset("tiny")
    pos = np.asarray(model.init_params(config, jax.random.key(0))["img"]["pos_embedding"])[0]
    side, quarter = 8, config.img.width // 4
    omega = 1.0 / 10_000.0 ** (np.arange(quarter) / (quarter - 1))
    row, col = 3, 5  # patch 3 * 8 + 5: y = 3, x = 5
    expected = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
    np.testing.assert_allclose(pos[row * side + col], expected, atol=1e-6)
    again = np.asarray(model.init_params(config, jax.random.key(1))["img"]["pos_embedding"])[0]
    np.testing.assert_array_equal(pos, again)  # not random
    assert cfgs.preset("paligemma-3b-224").img.posemb_init == "normal"
    with pytest.raises(ValueError, match="posemb_init"):
        cfgs.SiglipConfig(posemb_init="learned")


def test_scanned_stacks_are_the_subtrees_the_model_stacks_over_depth():
    """`config.SCANNED_STACKS`, what FSDP sharding and the CPU inference layout key on, names exactly the
    subtrees that `scan_layers=False` splits into `<stack>_<i>`, and each leaf under one has that many layers
    first."""
    import re

    config = cfgs.preset("tiny-pg2")
    scanned = flatten(model.param_shapes(config))
    layers: dict[str, set[int]] = {}
    for path in flatten(model.param_shapes(config.replace(scan_layers=False))):
        if match := re.match(r"(.+?)_(\d+)/", path):
            layers.setdefault(match[1], set()).add(int(match[2]))
    assert set(layers) == set(cfgs.SCANNED_STACKS)
    for stack, indices in layers.items():
        leaves = [shape for path, shape in scanned.items() if path.startswith(stack + "/")]
        assert leaves and {leaf.shape[0] for leaf in leaves} == {len(indices)}


@pytest.mark.parametrize("preset, window", [("tiny", None), ("tiny-pg2", 6)])
def test_continuation_logits_equal_the_full_forward_of_each_sequence(preset, window):
    """GRPO's update: G continuations of each prompt, the prompt's prefix run once. Each row's logits equal
    the training forward of [image | prompt | continuation] (prompts of two lengths, right-padded; a sliding
    window small enough to cut into the prefix)."""
    config = cfgs.preset(preset).replace(llm={"sliding_window": window})
    params = model.init_params(config, jax.random.key(1))
    rng = np.random.default_rng(2)
    size, vocab, group, prompt_len, length = config.img.image_size, config.llm.vocab_size, 3, 6, 5
    images = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    real = [6, 3]  # each prompt's real tokens
    tokens = rng.integers(2, vocab, (2, prompt_len)).astype(np.int32)
    mask_input = np.asarray([[1] * n + [0] * (prompt_len - n) for n in real], np.int32)
    tokens *= mask_input
    continuations = rng.integers(2, vocab, (2 * group, length)).astype(np.int32)
    got = model.continuation_logits(config, params, images, tokens, 0 * mask_input, mask_input, continuations)
    assert got.shape == (2 * group, length, vocab)
    for row, continuation in enumerate(continuations):
        prompt, n = row // group, real[row // group]
        sequence = np.concatenate([tokens[prompt, :n], continuation])[None]
        mask_ar = np.asarray([[0] * n + [1] * length], np.int32)
        full = model.forward(config, params, images[prompt : prompt + 1], sequence, mask_ar, np.ones_like(mask_ar))
        np.testing.assert_allclose(
            np.asarray(got[row]), np.asarray(full[0, n - 1 : n - 1 + length]), atol=1e-4, rtol=1e-4
        )
