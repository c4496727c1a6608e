"""big_vision `.npz` checkpoints of both PaliGemma generations.

Layout (big_vision `utils.save_checkpoint` / the released files): flat '/'-joined keys, optionally under
`params/` (the Hugging Face converters' `flatten_nested_dict` strips it too); bfloat16 arrays (the PaliGemma 2
`.b16.npz` files) load from numpy either as bfloat16 or as raw 2-byte void (`|V2`), which is re-viewed as
bfloat16, as big_vision's `utils.recover_dtype` does.

Large files come in pieces (`X.b16.npz.part0`, `.part1`, ...: the PaliGemma 2 28B release, joined with `cat`
by its model card's instructions). `read_npz` takes the first piece or the base name and reads the pieces
through `JoinedPieces`, a seekable reader over their concatenation: nothing is joined on disk, and the arrays
are read one at a time, so memory holds one copy of the model.

The generation and sizes are read from the keys and shapes (`describe`): PaliGemma 2 adds
`llm/layers/post_attention_norm/scale` and `llm/layers/post_ffw_norm/scale`. `matching_presets` names the
presets a file fits, for the error when a file and a preset disagree and for loading without a preset.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from paliseg.checkpoints.tree import Flat, flatten
from paliseg.config import PRESETS, ModelConfig
from paliseg.files import atomic_open

_PREFIX = "params/"
# `X.npz.part0`, `X.npz.part01`, `X.npz.partaa` (split's names); a bare `.part` is an unfinished download.
_PIECE = re.compile(r"^(?P<base>.+\.npz)\.part(?P<index>[0-9]+|[a-z]+)$")


def pieces(path: str | os.PathLike) -> list[Path]:
    """The files that make up the npz `path`: itself, or its `.part*` pieces in order when `path` is one piece
    or a base name that does not exist beside its pieces. [] when neither exists."""
    path = Path(path)
    match = _PIECE.match(path.name)
    if match is None and path.is_file():
        return [path]
    base = path.with_name(match["base"]) if match else path
    found = [p for p in base.parent.glob(base.name + ".part*") if _PIECE.match(p.name) and p.is_file()]
    if not found:
        return []
    indices = [_PIECE.match(p.name)["index"] for p in found]
    if all(index.isdigit() for index in indices):
        order = sorted(range(len(found)), key=lambda i: int(indices[i]))
        numbers = [int(indices[i]) for i in order]
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))) or numbers[0] not in (0, 1):
            raise ValueError(f"{base}: the .part pieces are not numbered consecutively from 0 or 1: {numbers}")
    elif all(index.isalpha() for index in indices):
        order = sorted(range(len(found)), key=lambda i: indices[i])
    else:
        raise ValueError(f"{base}: .part pieces mix numbered and lettered names: {sorted(p.name for p in found)}")
    return [found[i] for i in order]


class JoinedPieces(io.RawIOBase):
    """A read-only, seekable file over the concatenation of `paths` (what `np.load` and `zipfile` need)."""

    def __init__(self, paths: list[Path]):
        super().__init__()
        self._paths = paths
        self._starts = [0]
        for path in paths:
            self._starts.append(self._starts[-1] + path.stat().st_size)
        self._handles = [open(path, "rb") for path in paths]  # noqa: SIM115 - closed by close()
        self._position = 0

    @property
    def size(self) -> int:
        return self._starts[-1]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError(f"negative seek position {base + offset}")
        self._position = base + offset
        return self._position

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._position < self.size:
            piece = bisect.bisect_right(self._starts, self._position) - 1
            handle = self._handles[piece]
            handle.seek(self._position - self._starts[piece])
            want = min(len(view) - done, self._starts[piece + 1] - self._position)
            got = handle.readinto(view[done : done + want])
            if not got:
                raise OSError(f"{self._paths[piece]}: shorter than when it was opened")
            done += got
            self._position += got
        return done

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        super().close()


@contextlib.contextmanager
def _archive(path: str | os.PathLike) -> Iterator[np.lib.npyio.NpzFile]:
    """The npz `path` (or its `.part*` pieces) opened; an unreadable file is a ValueError naming it."""
    files = pieces(path)
    if not files:
        raise FileNotFoundError(f"checkpoint not found: {path} (nor {path}.part* pieces)")
    source = files[0] if len(files) == 1 else io.BufferedReader(JoinedPieces(files), buffer_size=1 << 20)
    try:
        with np.load(source, allow_pickle=False) as archive:
            yield archive
    except (ValueError, OSError, EOFError) as error:
        names = ", ".join(p.name for p in files)
        raise ValueError(f"{path}: not a readable npz ({names}): {error}") from error
    finally:
        if source is not files[0]:
            source.close()


def _stored_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if dtype == np.dtype("V2") else dtype


def read_npz(path: str | os.PathLike) -> Flat:
    """Flat numpy params of a big_vision npz (or its `.part*` pieces), bf16 as `ml_dtypes.bfloat16`."""
    flat = {}
    with _archive(path) as archive:
        for key in archive.files:
            value = archive[key]
            flat[key.removeprefix(_PREFIX)] = value.view(_stored_dtype(value.dtype))
    return flat


def read_shapes(path: str | os.PathLike) -> Flat:
    """`read_npz`'s tree with each array's shape and dtype but no data (a read-only broadcast of one value),
    from the members' headers: enough for `describe` and `tree.check_tree`, in milliseconds for any size."""
    flat = {}
    with _archive(path) as archive:
        for key in archive.files:
            with archive.zip.open(key + ".npy") as member:
                version = np.lib.format.read_magic(member)
                header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = header(member)
            flat[key.removeprefix(_PREFIX)] = np.broadcast_to(np.zeros((), _stored_dtype(dtype)), shape)
    return flat


def write_npz(path: str | os.PathLike, params: dict, overwrite: bool = False) -> Path:
    """Write `params` (nested) as big_vision does (`np.savez`, no `params/` prefix, bf16 as `|V2`)."""
    path = Path(path)
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    with atomic_open(path, "wb", overwrite=overwrite) as handle:
        np.savez(handle, **flat)
    return path


_POST_NORMS = ("llm/layers/post_attention_norm/scale", "llm/layers/post_ffw_norm/scale")
_MHA = "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"  # [L, W, heads, head_dim]
_MLP = "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"  # [L, W, mlp]


def describe(flat: Flat) -> dict[str, int | None]:
    """The generation and sizes a param tree has (None where its keys do not say)."""

    def dim(key: str, axis: int) -> int | None:
        return int(np.shape(flat[key])[axis]) if key in flat else None

    patch, patches = dim("img/embedding/kernel", 0), dim("img/pos_embedding", 1)
    fused = "llm/layers/attn/qkv_einsum/w" in flat  # [L, 3, N, D, H] when kv heads == heads
    q_key = "llm/layers/attn/qkv_einsum/w" if fused else "llm/layers/attn/q_einsum/w"
    q_axis = 2 if fused else 1
    return {
        "generation": 2 if any(key in flat for key in _POST_NORMS) else 1,
        "image_size": math.isqrt(patches) * patch if patch and patches else None,
        "patch_size": patch,
        "img_width": dim("img/embedding/kernel", 3),
        "img_depth": dim(_MLP, 0),
        "img_mlp_dim": dim(_MLP, 2),
        "img_heads": dim(_MHA, 2),
        "width": dim("llm/final_norm/scale", 0),
        "depth": dim("llm/layers/pre_attention_norm/scale", 0),
        "mlp_dim": dim("llm/layers/mlp/linear", 1),
        "num_heads": dim(q_key, q_axis),
        "num_kv_heads": dim(q_key, q_axis) if fused else dim("llm/layers/attn/kv_einsum/w", 2),
        "head_dim": dim(q_key, q_axis + 2),
        "vocab_size": dim("llm/embedder/input_embedding", 0),
    }


def describe_config(config: ModelConfig) -> dict[str, int]:
    """`describe` of the tree `config` makes, from its fields."""
    img, llm = config.img, config.llm
    return {
        "generation": llm.generation,
        "image_size": img.image_size,
        "patch_size": img.patch_size,
        "img_width": img.width,
        "img_depth": img.depth,
        "img_mlp_dim": img.mlp_dim,
        "img_heads": img.num_heads,
        "width": llm.width,
        "depth": llm.depth,
        "mlp_dim": llm.mlp_dim,
        "num_heads": llm.num_heads,
        "num_kv_heads": llm.num_kv_heads,
        "head_dim": llm.head_dim,
        "vocab_size": llm.vocab_size,
    }


def matching_presets(flat: Flat) -> list[str]:
    """The presets whose trees have the sizes and generation of `flat`."""
    return presets_with(describe(flat))


def presets_with(sizes: dict[str, int | None]) -> list[str]:
    """The presets of these sizes and generation (`describe`'s)."""
    return [name for name, config in PRESETS.items() if describe_config(config) == sizes]


def summary(sizes: dict[str, int | None]) -> str:
    """E.g. 'a PaliGemma 2 checkpoint (post-norm keys present): LLM width 2304, depth 26; 224 px' for the
    sizes `describe` reads."""
    why = "post-norm keys present" if sizes["generation"] == 2 else "no post-norm keys"
    return (
        f"a PaliGemma {sizes['generation']} checkpoint ({why}): LLM width {sizes['width']}, depth {sizes['depth']}, "
        f"{sizes['num_heads']} heads x {sizes['head_dim']}, {sizes['num_kv_heads']} kv heads; images "
        f"{sizes['image_size']} px"
    )
