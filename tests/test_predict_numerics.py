"""Oracle: `paliseg predict --dtype float32` on a float32 Hugging Face checkpoint prints the text of
transformers' greedy `generate` (eager attention), token for token.

The checkpoint is a tiny random PaliGemma saved by transformers over the bundled tiny tokenizer's vocabulary;
its weights are re-drawn with a large std so greedy decoding does not settle into repeats (and, at this std,
bfloat16 drifts from transformers' float32 text after about ten tokens). Each entry of
CONFIGS builds one transformers config: PaliGemma 1 and 2.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from paliseg import images as image_ops
from paliseg.cli import main as cli
from paliseg.config import TINY_TOKENIZER, TINY_VOCAB_SIZE
from paliseg.tokenizer import Tokenizer

pytestmark = pytest.mark.oracle
os.environ.setdefault("HF_HUB_OFFLINE", "1")

NEW_TOKENS = 20
PROMPT = "caption en"


def _paligemma1():
    return transformers.PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model", vision_use_head=False, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14,
        ),
        text_config=dict(
            model_type="gemma", vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        ),
        image_token_index=TINY_VOCAB_SIZE,  # outside the vocabulary, as our exports write it
        projection_dim=64,
    )  # fmt: skip


def _paligemma2():
    """Gemma 2 with every feature on: post-norms, both soft-caps, grouped kv heads, heads * head_dim != width,
    a query scalar other than head_dim, and a sliding window shorter than the sequence on the even layers."""
    config = _paligemma1()
    config.text_config = transformers.Gemma2Config(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=8,
        hidden_activation="gelu_pytorch_tanh",
    )  # fmt: skip
    return config


# name -> (config builder, std of the norm scales, std of the weights): Gemma 2's post-norms shrink each layer's
# update next to the scaled input embedding, so a random Gemma 2 repeats one token unless its norm scales are
# large (and its weights moderate: large logits saturate the final soft-cap into ties).
CONFIGS = {"paligemma1": (_paligemma1, 0.1, 0.6), "paligemma2": (_paligemma2, 3.0, 0.3)}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(transformers model, its float32 save_pretrained folder)."""
    torch.manual_seed(0)
    build, norm_std, weight_std = CONFIGS[request.param]
    hf = transformers.PaliGemmaForConditionalGeneration(build()).eval()
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.normal_(0, norm_std if "norm" in name else 0.1 if param.ndim == 1 else weight_std)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, folder


def _generate(hf, tokenizer: Tokenizer, image_path) -> str:
    """transformers' greedy text for the prompt as paliseg encodes it: image tokens, bos, prompt, newline."""
    size = hf.config.vision_config.image_size
    pixels = image_ops.preprocess(image_ops.read_image(image_path), size)
    prompt = tokenizer.encode(PROMPT, bos=True) + tokenizer.encode("\n")
    ids = torch.tensor([[hf.config.image_token_index] * (size // hf.config.vision_config.patch_size) ** 2 + prompt])
    with torch.no_grad():
        generated = hf.generate(
            input_ids=ids,
            pixel_values=torch.tensor(pixels.transpose(2, 0, 1)[None]),
            token_type_ids=torch.zeros_like(ids),
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
        )[0, ids.shape[1] :].tolist()
    assert len(set(generated)) > 5, generated  # not a degenerate model
    return tokenizer.decode(generated)


def _predict(folder, image_path, dtype: str, capsys) -> str:
    argv = ["predict", "--checkpoint", str(folder), "--tokenizer", str(TINY_TOKENIZER), "--image", str(image_path),
            "--prompt", PROMPT, "--raw", "--no-constrain", "--max-new-tokens", str(NEW_TOKENS), "--batch-size", "1",
            "--dtype", dtype]  # fmt: skip
    assert cli.main(argv) == 0
    return capsys.readouterr().out.rstrip("\n")


def test_predict_in_float32_prints_the_text_of_transformers_generate(checkpoint, tmp_path, capsys):
    hf, folder = checkpoint
    image_path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), np.uint8)).save(image_path)
    expected = _generate(hf, Tokenizer(TINY_TOKENIZER), image_path)
    assert _predict(folder, image_path, "float32", capsys) == expected
    # bfloat16 runs too (its text may drift from float32 after a few tokens: nothing to assert about it)
    assert isinstance(_predict(folder, image_path, "bfloat16", capsys), str)
