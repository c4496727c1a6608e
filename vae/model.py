"""The mask VQ-VAE of PaliGemma (big_vision's `vae-oid.npz`) in Flax: 64x64 mask <-> 16 codes of 128.

Architecture (big_vision's `proj/paligemma` segmentation VAE, the AiT `VQVAE` with hidden 16, 2 res blocks, D = 512):

    encoder: 2*(x-0.5) -> [conv4x4 s2 p1 + ReLU] x4 (16, 32, 64, 128) -> 2 ResBlocks -> conv1x1 to 512
    quantize: nearest of 128 codebook rows, raster order over the 4x4 grid -> int32 [N, 16]
    decoder: codes -> conv1x1 512->128 + ReLU -> 2 ResBlocks -> [convT4x4 s2 p1 + ReLU] x4
             (128, 64, 32, 16) -> conv1x1 to 1; unclamped, foreground is > 0

Weights live in PyTorch state-dict layout (`encoder.N.weight` OIHW, `decoder.N.weight` of a transposed
conv as (in, out, kh, kw), `_vq_vae._embedding` (128, 512)) so the released file, our own trained files and
the random test files are interchangeable. Flax module names mirror the torch keys (`encoder.8.net.0` ->
`encoder_8/net_0`), which makes the conversion a mechanical rename + transpose.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from paliseg import downloads, files

GRID = 4  # the latent grid is 4x4 ...
TOKENS = GRID * GRID  # ... read in raster order: 16 tokens per mask
MASK_SIZE = 64
CODEBOOK_SIZE = 128
CODE_DIM = 512
CODEBOOK_KEY = "_vq_vae._embedding"
ENCODER_WIDTHS = (16, 32, 64, 128)
DECODER_WIDTHS = (128, 64, 32, 16)

# Batches are padded up to one of these sizes (larger inputs run in chunks of the largest), so a long
# dataset compiles at most len(BATCH_BUCKETS) programs per function instead of one per batch size.
BATCH_BUCKETS = (1, 8, 32, 128, 256)

# `load(None)` looks first for the released VAE as `paliseg vae download` / setup_models.sh put it:
# models/vae-oid.npz under the current directory (normally the repository root), or under $PALISEG_MODELS.
# If absent, it uses the small VAE bundled in the package.
RELEASED_VAE_NAME = "vae-oid.npz"
BUNDLED_VAE_PATH = Path(__file__).resolve().parent / "assets" / "paliseg-vae-f16.npz"


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(conv3x3(x))))), torch `nn.Sequential` indices 0, 2, 4."""

    features: int = 128

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(self.features, (3, 3), padding=1, name="net_0")(x))
        h = nn.relu(nn.Conv(self.features, (3, 3), padding=1, name="net_2")(h))
        return x + nn.Conv(self.features, (1, 1), name="net_4")(h)


# XLA:CPU runs convolution forwards well but their gradients badly: the kernel gradient ~10x slower than
# the same sums as a matmul, and the input gradient of a strided (or transposed) convolution on a slow
# input-dilated path. So each layer below has two exact formulations: XLA's native convolution for the
# forward, and one built from a matmul of shifted views (`_conv2x2_matmul`) whose gradients are used.


def _native_forward_matmul_backward(native, matmul):
    """A function computed by `native`, differentiated through `matmul` (same math, other summation order)."""
    function = jax.custom_vjp(native)
    function.defvjp(lambda *args: (native(*args), args), lambda args, gradient: jax.vjp(matmul, *args)[1](gradient))
    return function


def _conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    pads = ((padding, padding), (padding, padding))
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv2x2_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'VALID' 2x2 convolution [N, H, W, C] x [2, 2, C, O] -> [N, H-1, W-1, O] as one matmul."""
    h, w = x.shape[1] - 1, x.shape[2] - 1
    patches = jnp.concatenate([x[:, sy : sy + h, sx : sx + w] for sy in (0, 1) for sx in (0, 1)], axis=-1)
    return patches @ kernel.reshape(-1, kernel.shape[-1])


def _down2_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """torch Conv2d(k=4, stride=2, padding=1) as space-to-depth + a 2x2 convolution: tap k = 2 s + p of the
    padded input is phase p of 2x2 block s."""
    n, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    x = (
        x.reshape(n, h // 2 + 1, 2, w // 2 + 1, 2, c)
        .transpose(0, 1, 3, 2, 4, 5)
        .reshape(n, h // 2 + 1, w // 2 + 1, 4 * c)
    )
    # kernel[2 sy + py, 2 sx + px, c, o] -> [sy, sx, (py, px, c), o]
    blocks = kernel.reshape(2, 2, 2, 2, c, -1).transpose(0, 2, 1, 3, 4, 5).reshape(2, 2, 4 * c, -1)
    return _conv2x2_matmul(x, blocks)


_conv2x2 = _native_forward_matmul_backward(lambda x, kernel: _conv(x, kernel, 1, 0), _conv2x2_matmul)
_down2 = _native_forward_matmul_backward(lambda x, kernel: _conv(x, kernel, 2, 1), _down2_matmul)


class Down2(nn.Module):
    """torch Conv2d(k=4, stride=2, padding=1), with the parameters of `nn.Conv(features, (4, 4), strides=2,
    padding=1)` (kernel (4, 4, in, out)); `_down2` computes it."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (4, 4, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return _down2(x, kernel) + bias


class Up2(nn.Module):
    """torch ConvTranspose2d(k=4, stride=2, padding=1) as a 2x2 convolution to the 4 output phases.

    Same parameters as `nn.ConvTranspose(features, (4, 4), strides=2, padding=2, transpose_kernel=True)`
    (kernel (4, 4, out, in) = torch's (in, out, kh, kw) transposed by (2, 3, 1, 0)) and the same sums:
    output row 2m + a reads input rows m - 1 + a + s (s = 0, 1) through kernel row 3 - a - 2s: one 2x2
    convolution to the four phases, then interleaved. XLA:CPU runs a native transposed convolution (an
    input-dilated one) on a slow generic path.
    """

    features: int

    @nn.compact
    def __call__(self, x, interleave: bool = True):
        """[n, h, w, in] -> [n, 2h, 2w, out]; or, with `interleave=False`, the phase grid
        [n, h+1, w+1, 2, 2, out] that `interleave_phases` turns into it (pointwise ops commute with it)."""
        n, h, w, c = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (4, 4, self.features, c))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        rows = np.array([[3, 2], [1, 0]])  # rows[s, a] = 3 - a - 2s
        taps = kernel[rows[:, :, None, None], rows[None, None, :, :]]  # [sy, a, sx, b, out, in]
        taps = taps.transpose(0, 2, 5, 1, 3, 4).reshape(2, 2, c, 4 * self.features)  # [sy, sx, in, (a, b, out)]
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        phases = _conv2x2(x, taps).reshape(n, h + 1, w + 1, 2, 2, self.features) + bias
        return interleave_phases(phases) if interleave else phases


def interleave_phases(phases: jax.Array) -> jax.Array:
    """Phase grid [n, h+1, w+1, 2, 2, c] -> image [n, 2h, 2w, c]: pixel (2m + a, 2k + b) is phase (a, b)
    at grid position (m + a, k + b)."""
    n, h, w, _, _, c = phases.shape
    h, w = h - 1, w - 1
    rows = [jnp.stack([phases[:, a : a + h, b : b + w, a, b] for b in (0, 1)], axis=3) for a in (0, 1)]
    return jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, c)  # [n, h, a, w, b, c] -> rows 2m + a


class MaskEncoder(nn.Module):
    """[N, 64, 64] masks in [0, 1] -> [N, 4, 4, 512] continuous latents (before quantization)."""

    @nn.compact
    def __call__(self, masks):
        x = 2.0 * (masks[..., None] - 0.5)
        for index, width in zip((0, 2, 4, 6), ENCODER_WIDTHS):
            # k4 s2 with padding 1 each side: torch `padding=1`, and TF 'SAME' on even sizes.
            x = nn.relu(Down2(width, name=f"encoder_{index}")(x))
        x = ResBlock(ENCODER_WIDTHS[-1], name="encoder_8")(x)
        x = ResBlock(ENCODER_WIDTHS[-1], name="encoder_9")(x)
        return nn.Conv(CODE_DIM, (1, 1), name="encoder_10")(x)


class MaskDecoder(nn.Module):
    """[N, 4, 4, 512] code vectors -> [N, 64, 64] mask logits (> 0 is foreground, roughly in [-1, 1])."""

    @nn.compact
    def __call__(self, codes):
        x = nn.relu(nn.Conv(DECODER_WIDTHS[0], (1, 1), name="decoder_0")(codes))
        x = ResBlock(DECODER_WIDTHS[0], name="decoder_2")(x)
        x = ResBlock(DECODER_WIDTHS[0], name="decoder_3")(x)
        for index, width in zip((4, 6, 8), DECODER_WIDTHS):
            x = nn.relu(Up2(width, name=f"decoder_{index}")(x))
        # The last up-sampling stays a phase grid through its ReLU and the 1x1 output conv (both pointwise),
        # so only the 1-channel logits are interleaved, not 16 channels at 64x64.
        phases = nn.relu(Up2(DECODER_WIDTHS[-1], name="decoder_10")(x, interleave=False))
        n, gh, gw = phases.shape[:3]
        logits = nn.Conv(1, (1, 1), name="decoder_12")(phases.reshape(n, gh, gw * 4, -1)).reshape(n, gh, gw, 2, 2, 1)
        return interleave_phases(logits)[..., 0]


# The decoder's logits are about +-1; sigmoid(4 x logit) makes them soft masks of 0.98 / 0.02.
SOFT_MASK_SCALE = 4.0


def soft_dice_loss(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """float [N]: 1 - the soft Dice of decoder logits [N, 64, 64] (as sigmoid(SOFT_MASK_SCALE x logits))
    with masks [N, 64, 64] in [0, 1], smoothed by 1 so that an empty mask drawn empty costs about 0. Per
    mask, not per pixel: a thin object's overlap counts as much as a large one's."""
    soft = jax.nn.sigmoid(SOFT_MASK_SCALE * logits)
    overlap = jnp.sum(soft * masks, axis=(1, 2))
    return 1.0 - (2.0 * overlap + 1.0) / (jnp.sum(soft, axis=(1, 2)) + jnp.sum(masks, axis=(1, 2)) + 1.0)


def quantize(latents: jax.Array, codebook: jax.Array) -> jax.Array:
    """[N, 4, 4, D] latents -> int32 [N, 16]: index of the nearest codebook row (squared L2), raster order."""
    flat = latents.reshape(-1, latents.shape[-1])
    distances = (
        jnp.sum(flat**2, axis=1, keepdims=True) + jnp.sum(codebook**2, axis=1)[None, :] - 2.0 * flat @ codebook.T
    )
    return jnp.argmin(distances, axis=1).astype(jnp.int32).reshape(latents.shape[0], TOKENS)


def embed(tokens: jax.Array, codebook: jax.Array) -> jax.Array:
    """int [N, 16] -> [N, 4, 4, D] code vectors."""
    return jnp.take(codebook, tokens, axis=0).reshape(tokens.shape[0], GRID, GRID, codebook.shape[-1])


# ---------------------------------------------------------------------------------------------------------
# PyTorch state dict (npz) <-> Flax params


def _torch_key_to_path(key: str) -> tuple[tuple[str, ...], str]:
    """'encoder.8.net.0.weight' -> (('encoder_8', 'net_0'), 'weight')."""
    *parts, leaf = key.split(".")
    return tuple(f"{name}_{index}" for name, index in zip(parts[::2], parts[1::2])), leaf


def _path_to_torch_key(path: tuple[str, ...], leaf: str) -> str:
    return ".".join(part.replace("_", ".") for part in path) + "." + leaf


@functools.cache
def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the vae-oid layout and its PyTorch shape, derived from the Flax modules."""
    shapes = {CODEBOOK_KEY: (CODEBOOK_SIZE, CODE_DIM)}
    trees = {
        "encoder": jax.eval_shape(MaskEncoder().init, jax.random.key(0), jnp.zeros((1, MASK_SIZE, MASK_SIZE))),
        "decoder": jax.eval_shape(MaskDecoder().init, jax.random.key(0), jnp.zeros((1, GRID, GRID, CODE_DIM))),
    }
    for tree in trees.values():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree["params"])[0]:
            names = tuple(p.key for p in path)
            if names[-1] == "bias":
                shapes[_path_to_torch_key(names[:-1], "bias")] = leaf.shape
            else:  # flax kernel (kh, kw, a, b) -> torch (b, a, kh, kw)
                kh, kw, a, b = leaf.shape
                shapes[_path_to_torch_key(names[:-1], "weight")] = (b, a, kh, kw)
    return shapes


def state_dict_to_params(state: Mapping[str, np.ndarray], source: str = "<state dict>") -> dict:
    """Torch-layout arrays -> {'encoder': params, 'decoder': params, 'codebook': (128, 512)} in float32.

    Extra keys (the real file may carry EMA buffers) are ignored; a missing key or a wrong shape raises
    ValueError naming `source`.
    """
    want = expected_shapes()
    missing = sorted(set(want) - set(state))
    if missing:
        raise ValueError(
            f"{source}: not a mask VAE in the vae-oid layout; missing {len(missing)} keys, e.g. {missing[:3]}"
        )
    params: dict = {"encoder": {}, "decoder": {}}
    for key, shape in want.items():
        value = np.asarray(state[key], dtype=np.float32)
        if value.shape != shape:
            raise ValueError(f"{source}: {key} has shape {value.shape}, expected {shape}")
        if key == CODEBOOK_KEY:
            params["codebook"] = value
            continue
        path, leaf = _torch_key_to_path(key)
        node = params[path[0].split("_")[0]]
        for part in path:
            node = node.setdefault(part, {})
        # OIHW (conv) and (in, out, kh, kw) (transposed conv) both become (kh, kw, b, a) by (2, 3, 1, 0).
        node["bias" if leaf == "bias" else "kernel"] = value if leaf == "bias" else value.transpose(2, 3, 1, 0)
    return params


def params_to_state_dict(params: Mapping, dtype: np.dtype = np.float32) -> dict[str, np.ndarray]:
    """Inverse of `state_dict_to_params`: exactly the vae-oid keys, in torch layout, as `dtype`."""
    state = {CODEBOOK_KEY: np.asarray(params["codebook"], dtype=dtype)}
    for part in ("encoder", "decoder"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(params[part])[0]:
            names = tuple(p.key for p in path)
            value = np.asarray(leaf, dtype=dtype)
            if names[-1] == "bias":
                state[_path_to_torch_key(names[:-1], "bias")] = value
            else:
                state[_path_to_torch_key(names[:-1], "weight")] = value.transpose(3, 2, 0, 1)
    return state


def save_npz(path: str | os.PathLike, params: Mapping, dtype: np.dtype = np.float32, overwrite: bool = False) -> None:
    """Write params as a vae-oid-layout npz (atomic; refuses to replace a file unless `overwrite`)."""
    buffer = io.BytesIO()
    np.savez(buffer, **params_to_state_dict(params, dtype))
    files.write_bytes(path, buffer.getvalue(), overwrite=overwrite)


def random_params(seed: int = 0) -> dict:
    """Freshly initialised params (Flax default init, codebook ~ U(-1/128, 1/128) as in torch VQ code)."""
    enc_key, dec_key, code_key = jax.random.split(jax.random.key(seed), 3)
    encoder = MaskEncoder().init(enc_key, jnp.zeros((1, MASK_SIZE, MASK_SIZE)))["params"]
    decoder = MaskDecoder().init(dec_key, jnp.zeros((1, GRID, GRID, CODE_DIM)))["params"]
    codebook = jax.random.uniform(code_key, (CODEBOOK_SIZE, CODE_DIM), minval=-1, maxval=1) / CODEBOOK_SIZE
    return jax.tree.map(np.asarray, {"encoder": encoder, "decoder": decoder, "codebook": codebook})


def write_random_npz(path: str | os.PathLike, seed: int = 0) -> Path:
    """An npz with the exact keys, shapes and dtype (float32) of vae-oid.npz, filled with random values.

    For tests: the real file is a download. The weights are scaled like torch's default init and the
    biases are random too (not zero), and the codebook is spread like trained latents, so encode gives
    varied tokens and decode gives varied outputs.
    """
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in expected_shapes().items():
        if key == CODEBOOK_KEY:
            state[key] = rng.normal(0.0, 0.5, shape).astype(np.float32)
            continue
        if key.endswith("bias"):
            state[key] = rng.uniform(-0.1, 0.1, shape).astype(np.float32)
            continue
        is_transposed = key.startswith("decoder.") and len(shape) == 4 and shape[2] == 4
        fan_in = (shape[0] if is_transposed else shape[1]) * shape[2] * shape[3]
        bound = np.sqrt(6.0 / fan_in)  # He-uniform: activations keep their scale through the ReLUs
        state[key] = rng.uniform(-bound, bound, shape).astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    files.write_bytes(path, buffer.getvalue())
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# The model object used by the rest of paliseg


def bucket_size(n: int) -> int:
    """Smallest batch bucket >= n (n <= the largest bucket)."""
    return next(b for b in BATCH_BUCKETS if b >= n)


def _encode(params, masks):
    return quantize(MaskEncoder().apply({"params": params["encoder"]}, masks), params["codebook"])


def _decode(params, tokens):
    return MaskDecoder().apply({"params": params["decoder"]}, embed(tokens, params["codebook"]))


# jax 0.10's XLA:CPU hands matmuls to YNNPACK by default; for this model's small convolutions and matmuls
# XLA's own dot emitter is faster (encode ~1.25x, decode ~1.2x on a 2-core AMD EPYC; measured with
# benchmarks/vae_throughput.py). The language model's large matmuls are not: it keeps the default.
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def programs() -> tuple:
    """The jitted (encode, decode) functions, with the CPU options on the CPU (known once jax is up)."""
    options = _CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    return jax.jit(_encode, compiler_options=options), jax.jit(_decode, compiler_options=options)


class MaskVAE:
    """A loaded VAE: batched, jit-compiled `encode` / `decode` on fixed batch buckets."""

    def __init__(self, params: Mapping, source: str = "<params>"):
        self.params = jax.tree.map(jnp.asarray, dict(params))
        self.source = source

    @classmethod
    def from_npz(cls, path: str | os.PathLike) -> MaskVAE:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: VAE file not found")
        try:
            with np.load(path, allow_pickle=False) as data:
                state = {key: data[key] for key in data.files}
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not a readable npz file: {error}") from error
        return cls(state_dict_to_params(state, str(path)), str(path))

    def _batched(self, function, inputs: np.ndarray, out_shape: tuple[int, ...], out_dtype) -> np.ndarray:
        largest = BATCH_BUCKETS[-1]
        outputs = []
        for start in range(0, len(inputs), largest):
            chunk = inputs[start : start + largest]
            padded = np.zeros((bucket_size(len(chunk)),) + chunk.shape[1:], chunk.dtype)
            padded[: len(chunk)] = chunk
            outputs.append(np.asarray(function(self.params, padded))[: len(chunk)])
        if not outputs:
            return np.zeros((0,) + out_shape, out_dtype)
        return np.concatenate(outputs).astype(out_dtype, copy=False)

    def encode(self, masks) -> np.ndarray:
        """float [N, 64, 64] masks in [0, 1] (soft values allowed) -> int32 [N, 16] codes."""
        masks = np.asarray(masks, dtype=np.float32)
        if masks.ndim != 3 or masks.shape[1:] != (MASK_SIZE, MASK_SIZE):
            raise ValueError(f"encode expects masks of shape [N, {MASK_SIZE}, {MASK_SIZE}], got {masks.shape}")
        return self._batched(programs()[0], masks, (TOKENS,), np.int32)

    def decode(self, tokens) -> np.ndarray:
        """int [N, 16] codes in [0, 128) -> float32 [N, 64, 64] logits (> 0 is foreground)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != TOKENS:
            raise ValueError(f"decode expects tokens of shape [N, {TOKENS}], got {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= CODEBOOK_SIZE):
            raise ValueError(f"decode expects token values in [0, {CODEBOOK_SIZE}), got {tokens.min()}..{tokens.max()}")
        return self._batched(programs()[1], tokens.astype(np.int32), (MASK_SIZE, MASK_SIZE), np.float32)

    def __repr__(self) -> str:
        return f"MaskVAE({self.source})"


def default_path() -> Path:
    """Where `load(None)` finds its VAE: the released VAE at `models/vae-oid.npz` (relative to the current
    directory, or in $PALISEG_MODELS; where `paliseg vae download` puts it), else the small VAE bundled with
    paliseg (`vae/assets/paliseg-vae-f16.npz`)."""
    released = downloads.models_dir() / RELEASED_VAE_NAME
    if released.is_file():
        return released
    if BUNDLED_VAE_PATH.is_file():
        return BUNDLED_VAE_PATH
    raise FileNotFoundError(
        f"no VAE found: neither {released} (run `paliseg vae download`) nor the bundled "
        f"{BUNDLED_VAE_PATH} exists; pass a path to a vae-oid-layout npz"
    )


def load(path: str | os.PathLike | None = None) -> MaskVAE:
    """Load a VAE npz (vae-oid layout, float32 or float16); `path=None` loads the `default_path()`.

    A dataset's or run's tokens need the VAE that encoded them: commands pick it with `vae.identity.resolve`.
    """
    return MaskVAE.from_npz(default_path() if path is None else path)
