"""Oracle: transformers' PaliGemmaForConditionalGeneration on tiny random configs, PaliGemma 1 (Gemma) and
PaliGemma 2 (Gemma 2: post-norms, soft-caps, query scalars != head_dim, heads * head_dim != width, 1/2/4 kv
heads, and sliding windows shorter than the sequence).

Each config is built in transformers, its weights re-drawn with a large std (so greedy decoding is not
degenerate and the (1+w) norm offsets are exercised), saved with `save_pretrained`, and loaded through our
loader. Our logits must equal theirs (f32, eager attention, explicit token_type_ids) within 1e-4, and our
batched KV-cache greedy decoding must reproduce `generate` token for token.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers

from paliseg import checkpoints, decoding, model
from paliseg.checkpoints.tree import flatten

pytestmark = pytest.mark.oracle
os.environ.setdefault("HF_HUB_OFFLINE", "1")

F32 = dict(param_dtype="float32", compute_dtype="float32", cache_dtype="float32")

# (vision, text, vocab, image_token_index): head counts, head_dim, kv heads and image sizes all differ.
CONFIGS = {
    "mqa": (
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=14,
        ),
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
        ),
        300,
        299,
    ),
    "gqa": (
        dict(
            hidden_size=24,
            intermediate_size=40,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=42,
            patch_size=14,
        ),
        dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        ),
        256,
        256,  # outside the vocabulary, as our exports write it
    ),
    "mha": (
        dict(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=3,
            image_size=32,
            patch_size=8,
        ),
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=32,
        ),
        280,
        270,
    ),
    # Gemma 2. Sequences: 4 image tokens + 7 text tokens (logits), up to 10 + 10 decoded (generate).
    "g2-mqa": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
             patch_size=14),
        dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=1, head_dim=24, query_pre_attn_scalar=20,
             attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096),
        300,
        300,
    ),
    "g2-gqa-window": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
             patch_size=14),
        dict(model_type="gemma2", hidden_size=48, intermediate_size=96, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
             attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4),
        290,
        290,
    ),
    "g2-mha-window": (
        dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, image_size=28,
             patch_size=14),
        dict(model_type="gemma2", hidden_size=48, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=4, head_dim=8, query_pre_attn_scalar=12,
             attn_logit_softcapping=20.0, final_logit_softcapping=None, sliding_window=6),
        280,
        280,
    ),
}  # fmt: skip
GEMMA2 = [name for name in CONFIGS if name.startswith("g2-")]


def _hf_model(name: str, seed: int = 1):
    vision, text, vocab, image_token = CONFIGS[name]
    config = transformers.PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", vision_use_head=False, **vision),
        text_config={"model_type": "gemma", **text, "vocab_size": vocab},
        image_token_index=image_token,
        projection_dim=text["hidden_size"],
    )
    torch.manual_seed(seed)
    hf = transformers.PaliGemmaForConditionalGeneration(config).eval()
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        for param_name, param in hf.named_parameters():
            if name in GEMMA2 and param_name.endswith(("embed_tokens.weight", "language_model.norm.weight")):
                # Gemma 2's post-norms keep each block's output near unit scale: with large embeddings the
                # residual stream stays the last token's embedding, and greedy decoding repeats it. Small
                # embeddings, then, and a final norm of (1 + 4) to bring the logits back to a useful range.
                param.normal_(*((4.0, 0.1) if "norm" in param_name else (0, 0.02)))
            elif "norm" in param_name:
                param.normal_(0, 0.1)
            else:
                param.normal_(0, 0.3 if param.ndim > 1 else 0.1)
    return hf


_BUILT: dict = {}


def _saved(name: str, tmp_path_factory):
    """(name, hf model, its save_pretrained folder, our config, our params), built once per config."""
    if name not in _BUILT:
        hf = _hf_model(name)
        folder = tmp_path_factory.mktemp(f"hf_{name}")
        hf.save_pretrained(folder)
        config, params = checkpoints.load(folder, **F32)
        _BUILT[name] = (name, hf, folder, config, params)
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    return _saved(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def mqa(tmp_path_factory):
    """Key layouts and error paths do not depend on sizes: one config covers them."""
    return _saved("mqa", tmp_path_factory)


def _hf_inputs(config, image_token: int, tokens: np.ndarray, mask_ar: np.ndarray):
    batch = tokens.shape[0]
    n = config.num_image_tokens
    ids = np.concatenate([np.full((batch, n), image_token), tokens], axis=1)
    token_types = np.concatenate([np.zeros((batch, n), np.int64), mask_ar], axis=1)
    return torch.tensor(ids), torch.tensor(token_types)


def _images(config, batch: int, seed: int = 0) -> np.ndarray:
    size = config.img.image_size
    return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def test_loaded_config_has_the_hf_sizes(pair):
    _name, hf, _, config, _ = pair
    text, vision = hf.config.text_config, hf.config.vision_config
    assert (config.llm.width, config.llm.depth, config.llm.num_heads) == (
        text.hidden_size,
        text.num_hidden_layers,
        text.num_attention_heads,
    )
    assert (config.llm.num_kv_heads, config.llm.head_dim, config.llm.vocab_size) == (
        text.num_key_value_heads,
        text.head_dim,
        text.vocab_size,
    )
    assert (config.img.width, config.img.patch_size, config.img.image_size) == (
        vision.hidden_size,
        vision.patch_size,
        vision.image_size,
    )


def test_logits_equal_transformers(pair):
    name, hf, _, config, params = pair
    image_token = CONFIGS[name][3]
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 250, (2, 7))
    mask_ar = np.array([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]])
    images = _images(config, 2)
    ids, token_types = _hf_inputs(config, image_token, tokens, mask_ar)
    with torch.no_grad():
        theirs = hf(
            input_ids=ids,
            pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
            token_type_ids=token_types,
            attention_mask=torch.ones_like(ids),
        ).logits.numpy()[:, config.num_image_tokens :]
    ours = np.asarray(model.forward(config, params, images, tokens, mask_ar, np.ones_like(tokens)))
    assert np.abs(theirs).max() > 1.0  # not a degenerate model
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    if config.llm.sliding_window is not None and config.llm.sliding_window < ids.shape[1]:
        # the window changes the result: a model attending globally does not pass
        unwindowed = config.replace(llm={"sliding_window": None})
        everywhere = np.asarray(model.forward(unwindowed, params, images, tokens, mask_ar, np.ones_like(tokens)))
        assert np.abs(everywhere - theirs).max() > 1e-2


def test_greedy_decoding_equals_generate(pair):
    name, hf, _, config, params = pair
    _assert_greedy_decoding_equals_generate(hf, config, params, CONFIGS[name][3])


def _assert_greedy_decoding_equals_generate(hf, config, params, image_token: int):
    rng = np.random.default_rng(2)
    lengths = [3, 6, 4]
    tokens = np.zeros((3, 8), np.int64)
    mask_input = np.zeros((3, 8), np.int64)
    for row, length in enumerate(lengths):
        tokens[row, :length] = [2, *rng.integers(3, 250, length - 1)]
        mask_input[row, :length] = 1
    images = _images(config, 3, seed=3)
    ours = np.asarray(
        decoding.generate(config, params, images, tokens, np.zeros_like(tokens), mask_input, max_new_tokens=10).tokens
    )
    for row, length in enumerate(lengths):
        ids, token_types = _hf_inputs(
            config, image_token, tokens[row : row + 1, :length], np.zeros((1, length), np.int64)
        )
        with torch.no_grad():
            generated = hf.generate(
                input_ids=ids,
                pixel_values=torch.tensor(images[row : row + 1].transpose(0, 3, 1, 2)),
                token_type_ids=token_types,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=10,
                do_sample=False,
                eos_token_id=1,
                pad_token_id=0,
            )[0, ids.shape[1] :].numpy()
        assert len(set(generated.tolist())) > 2  # not degenerate
        np.testing.assert_array_equal(ours[row, : len(generated)], generated)


def _rewrite(src, dst, rename, extra=None, shards: int = 1):
    """Copy an HF folder with its tensor names rewritten (another transformers version's layout)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    renamed = {rename(k): v for k, v in tensors.items()}
    renamed.update(extra(tensors) if extra else {})
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    names = sorted(renamed)
    if shards == 1:
        save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return dst
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: renamed[k] for k in part}, str(dst / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _legacy(key: str) -> str:  # hub files / transformers <= 4.51
    return key.replace("vision_tower.", "vision_tower.vision_model.", 1)


LAYOUTS = {
    "hub (<=4.51)": (_legacy, None, 1),
    "hub + language_model.lm_head": (
        _legacy,
        lambda t: {"language_model.lm_head.weight": t["language_model.model.embed_tokens.weight"]},
        1,
    ),
    "4.52-5.5 in memory": (
        lambda k: "model." + _legacy(k).replace("language_model.model.", "language_model.", 1),
        lambda t: {"lm_head.weight": t["language_model.model.embed_tokens.weight"]},
        1,
    ),
    ">=5.6 in memory": (lambda k: "model." + k.replace("language_model.model.", "language_model.", 1), None, 1),
    "sharded": (lambda k: k, None, 3),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_transformers_key_layout_loads_identically(mqa, layout, tmp_path):
    _name, _, folder, _config, params = mqa
    rename, extra, shards = LAYOUTS[layout]
    other = _rewrite(folder, tmp_path / "other", rename, extra, shards)
    _, loaded = checkpoints.load(other, **F32)
    reference = flatten(params)
    for key, value in flatten(loaded).items():
        np.testing.assert_array_equal(value, reference[key], err_msg=key)


def test_padded_embedding_is_trimmed_to_the_tokenizer(mqa, tmp_path):
    _name, _, folder, config, params = mqa
    pad = np.random.default_rng(0).normal(size=(20, config.llm.width)).astype(np.float32)
    key = "language_model.model.embed_tokens.weight"
    other = _rewrite(folder, tmp_path / "padded", lambda k: k, lambda t: {key: np.concatenate([t[key], pad])})
    cfg_file = other / "config.json"
    hf_config = json.loads(cfg_file.read_text())
    hf_config["text_config"]["vocab_size"] += 20
    cfg_file.write_text(json.dumps(hf_config))
    trimmed_config, trimmed = checkpoints.load(other, vocab_size=config.llm.vocab_size, **F32)
    assert trimmed_config.llm.vocab_size == config.llm.vocab_size
    np.testing.assert_array_equal(
        trimmed["llm"]["embedder"]["input_embedding"], params["llm"]["embedder"]["input_embedding"]
    )
    _full_config, full = checkpoints.load(other, **F32)
    assert full["llm"]["embedder"]["input_embedding"].shape[0] == config.llm.vocab_size + 20


def test_bad_checkpoints_name_the_offending_keys(mqa, tmp_path):
    _name, _, folder, _config, _ = mqa
    missing = "language_model.model.layers.1.mlp.up_proj.weight"
    broken = _rewrite(
        folder,
        tmp_path / "broken",
        lambda k: "vision_tower.bogus.weight" if k == missing else k,
        lambda t: {"vision_tower.post_layernorm.bias": np.zeros(5, np.float32)},
    )
    with pytest.raises(ValueError) as error:
        checkpoints.load(broken, **F32)
    message = str(error.value)
    assert "layers.1.mlp.up_proj.weight" in message and "missing" in message
    assert "vision_tower.bogus.weight" in message and "unexpected" in message
    assert "post_layernorm.bias (5,), expected (32,)" in message


def test_loaded_gemma2_config_has_the_hf_features(pair):
    name, hf, _, config, _ = pair
    text = hf.config.text_config
    if name not in GEMMA2:
        assert not config.llm.post_norms and config.llm.attn_logits_softcap == config.llm.final_logits_softcap == 0
        return
    assert config.llm.post_norms
    assert config.llm.attn_logits_softcap == text.attn_logit_softcapping
    assert config.llm.final_logits_softcap == (text.final_logit_softcapping or 0.0)
    assert config.llm.query_scale == text.query_pre_attn_scalar**-0.5
    assert config.llm.sliding_window == text.sliding_window


def test_gemma1_names_on_gemma2_weights_are_refused(tmp_path, tmp_path_factory):
    """`post_attention_layernorm` means the pre-FFW norm in Gemma 1: Gemma 2 weights under a Gemma 1 config
    must not load (their post-norms would be dropped or misread), and the error names the keys."""
    _name, _, folder, _config, _ = _saved("g2-mqa", tmp_path_factory)
    other = _rewrite(folder, tmp_path / "relabelled", lambda k: k)
    hf_config = json.loads((other / "config.json").read_text())
    hf_config["text_config"]["model_type"] = "gemma"
    (other / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(ValueError, match=r"unexpected keys.*post_feedforward_layernorm") as error:
        checkpoints.load(other, **F32)
    assert "pre_feedforward_layernorm" in str(error.value)


def test_exported_safetensors_load_in_transformers_with_equal_logits(pair, tmp_path):
    _name, _, _, config, params = pair
    folder = checkpoints.export_hf(tmp_path / "export", params, config)
    hf = transformers.PaliGemmaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    tokens = np.random.default_rng(4).integers(3, 250, (1, 5))
    mask_ar = np.array([[0, 0, 0, 1, 1]])
    images = _images(config, 1, seed=5)
    ids, token_types = _hf_inputs(config, config.llm.vocab_size, tokens, mask_ar)
    with torch.no_grad():
        theirs = hf(
            input_ids=ids,
            pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
            token_type_ids=token_types,
            attention_mask=torch.ones_like(ids),
        ).logits.numpy()[:, config.num_image_tokens :]
    ours = np.asarray(model.forward(config, params, images, tokens, mask_ar, np.ones_like(tokens)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    if config.llm.post_norms:
        _assert_greedy_decoding_equals_generate(hf, config, params, config.llm.vocab_size)
    # and our loader reads our export back bit for bit
    again_config, again = checkpoints.load(folder, **F32)
    assert again_config.llm == config.llm
    for key, value in flatten(again).items():
        np.testing.assert_array_equal(value, flatten(params)[key], err_msg=key)
