"""The PaliGemma SentencePiece tokenizer and big_vision's input building.

Inputs are built exactly as big_vision's fine-tuning colab: `[bos] + sp(prefix)`, then `sp("\\n")`
tokenised separately, then `sp(suffix) + [eos]`; `mask_ar` is 0 on the prefix part and 1 on the suffix,
`mask_loss` marks the suffix (eos included), `mask_input` marks real tokens; all four arrays are truncated
to `seq_len` and right-padded with 0. Loc/seg token ids always come from the tokenizer file.

`build_tiny_tokenizer` makes a small model with the real layout (pad 0, eos 1, bos 2, unk 3, a base
vocabulary, then the 1024 `<locNNNN>` and 128 `<segNNN>` pieces appended as USER_DEFINED pieces, as
big_vision appends them) for tests and the tiny presets.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from paliseg import tokens as codec
from paliseg.config import installed_asset
from paliseg.files import write_bytes

SEPARATOR = "\n"


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        path = installed_asset(Path(path))
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id, self.eos_id, self.bos_id = self.sp.pad_id(), self.sp.eos_id(), self.sp.bos_id()
        if min(self.pad_id, self.eos_id, self.bos_id) < 0:
            raise ValueError(f"{path}: the tokenizer must define pad, eos and bos pieces")
        self.loc_ids = self._piece_ids(codec.loc_token_strings())
        self.seg_ids = self._piece_ids(codec.seg_token_strings())

    def _piece_ids(self, pieces: Sequence[str]) -> np.ndarray:
        ids = np.array([self.sp.piece_to_id(p) for p in pieces], np.int32)
        missing = [p for p, i in zip(pieces, ids) if self.sp.id_to_piece(int(i)) != p]
        if missing:
            raise ValueError(
                f"{self.path}: no piece for {missing[0]} (and {len(missing) - 1} more): not a PaliGemma tokenizer"
            )
        return ids

    def loc_id(self, index: int) -> int:
        return int(self.loc_ids[index])

    def seg_id(self, index: int) -> int:
        return int(self.seg_ids[index])

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.encode(text) + ([self.eos_id] if eos else [])

    def encode_example(self, prefix: str, suffix: str, seq_len: int) -> dict[str, np.ndarray]:
        """A training example: tokens, mask_ar, mask_loss, mask_input (int32 [seq_len]). Like big_vision, a
        too-long example is truncated (the suffix loses its end, eos included)."""
        head = self.encode(prefix, bos=True) + self.encode(SEPARATOR)
        tail = self.encode(suffix, eos=True)
        return _pad(
            {
                "tokens": head + tail,
                "mask_ar": [0] * len(head) + [1] * len(tail),
                "mask_loss": [0] * len(head) + [1] * len(tail),
                "mask_input": [1] * (len(head) + len(tail)),
            },
            seq_len,
        )

    def encode_prompt(self, prefix: str, seq_len: int) -> dict[str, np.ndarray]:
        """A decoding prompt (`[bos] + prefix + "\\n"`), right-padded with mask_input 0. Raises if it does
        not fit: a cut prompt would silently change the question."""
        head = self.encode(prefix, bos=True) + self.encode(SEPARATOR)
        if len(head) > seq_len:
            raise ValueError(f"prompt {prefix!r} is {len(head)} tokens, longer than seq_len {seq_len}")
        zeros = [0] * len(head)
        return _pad({"tokens": head, "mask_ar": zeros, "mask_loss": zeros, "mask_input": [1] * len(head)}, seq_len)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids up to the first eos; loc/seg pieces are kept as `<loc0123>` / `<seg045>`."""
        kept = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                kept.append(i)
        return self.sp.decode(kept)

    def piece_text(self, index: int) -> str:
        """The surface text of one piece (SentencePiece's '▁' shown as a space)."""
        return self.sp.id_to_piece(index).replace("\u2581", " ")

    def is_plain_text(self, index: int) -> bool:
        """A normal vocabulary piece: not control/unknown/byte-fallback, not loc or seg."""
        sp = self.sp
        return (
            not (sp.is_control(index) or sp.is_unknown(index) or sp.is_byte(index))
            and index not in self._special_pieces
        )

    @property
    def _special_pieces(self) -> frozenset[int]:
        if not hasattr(self, "_special_cache"):
            self._special_cache = frozenset(self.loc_ids.tolist()) | frozenset(self.seg_ids.tolist())
        return self._special_cache


def _pad(arrays: dict[str, list[int]], seq_len: int) -> dict[str, np.ndarray]:
    out = {}
    for name, values in arrays.items():
        values = values[:seq_len]
        out[name] = np.asarray(values + [0] * (seq_len - len(values)), np.int32)
    return out


_WORDS = [
    "segment",
    "detect",
    "caption",
    "describe",
    "answer",
    "en",
    "crack",
    "cracks",
    "drywall",
    "taping",
    "area",
    "joint",
    "tape",
    "seam",
    "wall",
    "ellipse",
    "square",
    "circle",
    "triangle",
    "rectangle",
    "shape",
    "object",
    "region",
    "defect",
    "wall-crack",
    "hole",
    "patch",
    "corner",
    "left",
    "right",
    "top",
    "bottom",
    "small",
    "large",
    "red",
    "green",
    "blue",
    "white",
    "black",
    "the",
    "a",
    "of",
    "and",
    "in",
    "on",
    "with",
]


def _tiny_corpus(extra_text: Sequence[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = list(extra_text)
    for _ in range(4000):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(1, 6))]
        line = " ".join(words)
        if rng.random() < 0.3:
            line = f"{line} ; {' '.join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3)))}"
        if rng.random() < 0.2:
            line = f"{line} {rng.randint(0, 9999)}"
        lines.append(line)
    lines += ["".join(chr(c) for c in range(32, 127))] * 4  # every printable ASCII character
    return lines


def build_tiny_tokenizer(
    out_path: str | os.PathLike, extra_text: Sequence[str] = (), vocab_size: int = 640, seed: int = 0
) -> Path:
    """Train a small BPE SentencePiece model with Gemma's settings (byte fallback, no dummy prefix, digits
    split, whitespace kept) and append the loc/seg pieces at the end, as big_vision does."""
    from sentencepiece import sentencepiece_model_pb2  # protobuf is only needed to build, not to load

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tiny_corpus(extra_text, seed)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        user_defined_symbols=[SEPARATOR],
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        num_threads=1,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    for piece in codec.loc_token_strings() + codec.seg_token_strings():
        new = proto.pieces.add()
        new.piece, new.score, new.type = piece, 0.0, sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    out_path = Path(out_path)
    write_bytes(out_path, proto.SerializeToString())
    return out_path
