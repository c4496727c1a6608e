"""The loss and the one compiled training step.

Loss as big_vision (`trainers/proj/paligemma/train.py`): the model reads `tokens[:, :-1]`, the targets are
`tokens[:, 1:]`, token losses are averaged over `mask_loss[:, 1:]` (the suffix and its eos) per example,
then over the batch. Label smoothing gives the target `1 - ls` and every other class `ls / (V - 1)`; it is
computed from logsumexp and the logit sum, so no [B, T, V] one-hot or log-prob array is built.

With --mask-loss-weight W, the loss is token loss + W x mask loss. Cross-entropy makes every wrong seg code
equally wrong and never shows the model the mask its codes draw; the mask loss does, differentiably, under
the same teacher forcing: at each of an object's 16 seg positions, the model's distribution over the 128
seg codes (softmax of their logits only) picks a code vector, the run's VAE decoder (frozen) draws the 64x64
mask of the object's box from the 16, and soft Dice (or BCE) compares it with the ground truth as the VAE's
encoder sees it (`train.data.mask_loss_targets`). The code vector is the most likely code's, differentiated
as the expected one (probabilities x codebook; straight-through), so the loss is that of the mask greedy
decoding would draw: decoding the expected vectors instead (`--mask-loss-codes expected`) lets a blend of
codes draw a mask no single code draws, and measured worse. The loss reaches only the seg positions'
seg-code logits: loc and label positions get no gradient from it.

With --seg-label-smoothing S, each seg position's target is no longer one code: the true code keeps 1 - S
and S goes to the codes nearest to it in the decoder's input space (its codebook vectors: a nearer code
draws a more similar mask; `seg_code_targets`), so a near miss costs less than a far one. Other positions
keep the token loss above.

The step takes a batch shaped [grad_accum, micro_batch, ...], scans over the micro-batches summing
gradients (so memory is one micro-batch's), averages them, and applies the optimizer. Gradients exist only
for the trainable parameters. Dropout keys derive from (seed, step, micro-batch): nothing random is carried
in the state, so a resumed run draws the same dropout masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from paliseg import model
from paliseg.config import ModelConfig
from paliseg.model import kernels
from train import params as param_sets
from train.config import TrainConfig
from vae import model as vae_model

State = dict[str, Any]  # {"step": int32 [], "params": trainable tree, "opt_state": optax state}
MASK_LOSS_METRICS = ("token_loss", "mask_loss")  # the loss's parts, logged with --mask-loss-weight
# What the seg-code losses read besides the batch (`seg_inputs`): {"seg_ids": int32 [128], the token id of
# each seg code}, with the mask loss {"decoder": the VAE decoder's params, "codebook": float32 [128, D]},
# with seg label smoothing {"code_targets": float32 [128, 128]}; None when neither is on.
SegInputs = dict[str, Any]


def token_loss(
    logits: jax.Array,
    targets: jax.Array,
    mask_loss: jax.Array,
    label_smoothing: float = 0.0,
    seg: SegInputs | None = None,
) -> jax.Array:
    """Per-example mean of the masked token cross-entropies, then the batch mean. logits [B,T,V] float32.
    With `seg["code_targets"]`, a position whose target is a seg code is scored against that code's row."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - lse
    if label_smoothing > 0:
        vocab = logits.shape[-1]
        other_logp = (jnp.sum(logits, axis=-1) - vocab * lse - target_logp) / (vocab - 1)
        token_nll = -((1.0 - label_smoothing) * target_logp + label_smoothing * other_logp)
    else:
        token_nll = -target_logp
    if seg is not None and "code_targets" in seg:
        is_code = targets[..., None] == seg["seg_ids"]  # [B, T, 128]: one-hot where the target is a seg code
        soft_targets = is_code.astype(jnp.float32) @ seg["code_targets"]
        code_logp = jnp.take(logits, seg["seg_ids"], axis=-1) - lse[..., None]
        token_nll = jnp.where(jnp.any(is_code, axis=-1), -jnp.sum(soft_targets * code_logp, axis=-1), token_nll)
    mask = mask_loss.astype(jnp.float32)
    per_example = jnp.sum(token_nll * mask, axis=-1) / jnp.clip(jnp.sum(mask, axis=-1), 1.0)
    return jnp.mean(per_example)


def seg_code_targets(codebook, smoothing: float) -> np.ndarray:
    """float32 [128, 128]: row k is the target of seg code k under --seg-label-smoothing: 1 - `smoothing` on k,
    `smoothing` over the other codes in proportion to exp(-d^2 / d_1^2), d the distance between codebook
    vectors and d_1 code k's distance to its nearest other code (so the nearest gets e^-1, a code twice as
    far e^-4). Measured on the bundled VAE and the demo's masks, this distance ranks the pixels a code's
    replacement changes in its mask with Spearman 0.89."""
    codebook = np.asarray(codebook, np.float64)
    squared = np.sum((codebook[:, None] - codebook[None]) ** 2, axis=-1)
    np.fill_diagonal(squared, np.inf)
    nearest = np.maximum(squared.min(axis=1, keepdims=True), np.finfo(np.float32).tiny)
    weights = np.exp(-(squared - nearest) / nearest)  # exp(-d^2 / d_1^2) scaled by e for every row alike
    targets = smoothing * weights / weights.sum(axis=1, keepdims=True)
    np.fill_diagonal(targets, 1.0 - smoothing)
    return targets.astype(np.float32)


def needs_seg_inputs(config: TrainConfig) -> bool:
    return config.mask_loss_weight > 0 or config.seg_label_smoothing > 0


def seg_inputs(config: TrainConfig, vae: vae_model.MaskVAE, seg_ids) -> SegInputs:
    """The seg-code losses' frozen inputs: the tokenizer's `seg_ids`, and from the run's `vae` the decoder
    and codebook (--mask-loss-weight) or the code targets (--seg-label-smoothing)."""
    inputs = {"seg_ids": jnp.asarray(seg_ids, jnp.int32)}
    if config.mask_loss_weight:
        inputs.update(decoder=vae.params["decoder"], codebook=vae.params["codebook"])
    if config.seg_label_smoothing:
        inputs["code_targets"] = jnp.asarray(seg_code_targets(vae.params["codebook"], config.seg_label_smoothing))
    return inputs


def seg_inputs_shapes(config: TrainConfig) -> SegInputs:
    """`seg_inputs`'s shapes, for planning and lowering the step without a VAE file."""
    codes = vae_model.CODEBOOK_SIZE
    inputs = {"seg_ids": jax.ShapeDtypeStruct((codes,), jnp.int32)}
    if config.mask_loss_weight:
        grid = jnp.zeros((1, vae_model.GRID, vae_model.GRID, vae_model.CODE_DIM))
        inputs["decoder"] = jax.eval_shape(vae_model.MaskDecoder().init, jax.random.key(0), grid)["params"]
        inputs["codebook"] = jax.ShapeDtypeStruct((codes, vae_model.CODE_DIM), jnp.float32)
    if config.seg_label_smoothing:
        inputs["code_targets"] = jax.ShapeDtypeStruct((codes, codes), jnp.float32)
    return inputs


def mask_loss(
    logits: jax.Array,
    batch: dict[str, jax.Array],
    seg: SegInputs,
    kind: str = "dice",
    codes: str = "straight-through",
) -> jax.Array:
    """Per-example mean over its objects of the loss between the mask each object's seg-code distributions
    decode to and its target mask, then the batch mean (an example without objects adds 0). `logits`
    [B, T, V] predict `tokens[:, 1:]`; the batch holds `train.data.mask_loss_fields` ([B, K, ...]). `codes`:
    decode the most likely codes with the expected vectors' gradient (straight-through), or the expected
    vectors (`--mask-loss-codes`)."""
    positions = batch["seg_positions"]  # [B, K, 16]
    size, slots, per_object = positions.shape
    seg_logits = jnp.take(logits.astype(jnp.float32), seg["seg_ids"], axis=-1)  # [B, T, 128]
    at_segs = jnp.take_along_axis(seg_logits, positions.reshape(size, slots * per_object, 1), axis=1)
    weights = jax.nn.softmax(at_segs, axis=-1)
    if codes == "straight-through":
        most_likely = jax.nn.one_hot(jnp.argmax(at_segs, axis=-1), weights.shape[-1])
        weights = most_likely + weights - jax.lax.stop_gradient(weights)
    vectors = weights @ seg["codebook"]  # [B, K * 16, D]
    grid = vectors.reshape(size * slots, vae_model.GRID, vae_model.GRID, -1)
    drawn = vae_model.MaskDecoder().apply({"params": seg["decoder"]}, grid)  # [B * K, 64, 64] logits
    targets = batch["target_masks"].reshape(drawn.shape)
    if kind == "dice":
        per_mask = vae_model.soft_dice_loss(drawn, targets)
    else:
        scaled = vae_model.SOFT_MASK_SCALE * drawn
        per_mask = jnp.mean(optax.sigmoid_binary_cross_entropy(scaled, targets), axis=(1, 2))
    valid = batch["target_objects"]
    per_example = jnp.sum(per_mask.reshape(size, slots) * valid, axis=-1) / jnp.clip(jnp.sum(valid, axis=-1), 1.0)
    return jnp.mean(per_example)


def example_loss(
    config: TrainConfig,
    model_cfg: ModelConfig,
    full_params,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    seg: SegInputs | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss of one micro-batch ([B, ...] arrays) under the full parameter tree, and its parts
    ({"token_loss", "mask_loss"} with --mask-loss-weight, else {}); `seg`: `seg_inputs`, where needed."""
    logits = model.forward(
        model_cfg,
        full_params,
        batch["image"],
        batch["tokens"][:, :-1],
        batch["mask_ar"][:, :-1],
        batch["mask_input"][:, :-1],
        train=True,
        rng=rng,
    )
    tokens = token_loss(logits, batch["tokens"][:, 1:], batch["mask_loss"][:, 1:], config.label_smoothing, seg)
    if not config.mask_loss_weight:
        return tokens, {}
    masks = mask_loss(logits, batch, seg, config.mask_loss, config.mask_loss_codes)
    return tokens + config.mask_loss_weight * masks, {"token_loss": tokens, "mask_loss": masks}


def init_state(trainable, tx: optax.GradientTransformation) -> State:
    return {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": tx.init(trainable)}


def make_train_step(
    config: TrainConfig, model_cfg: ModelConfig, tx: optax.GradientTransformation, lr_schedule: optax.Schedule
) -> Callable[..., tuple[State, dict]]:
    """step(state, frozen, batch, seg=None) -> (new state, metrics {loss, grad_norm, lr}, with the mask loss
    also {token_loss, mask_loss}); `seg` (`seg_inputs`) only where `needs_seg_inputs`. Not yet jit-compiled."""
    base_key = jax.random.key(config.seed)

    def micro_loss(trainable, frozen, micro, rng, seg):
        return example_loss(config, model_cfg, param_sets.join(frozen, trainable), micro, rng, seg)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: State, frozen, batch: dict[str, jax.Array], seg: SegInputs | None = None):
        step_key = jax.random.fold_in(base_key, state["step"])

        def accumulate(carry, micro_and_index):
            loss_sum, parts_sum, grad_sum = carry
            micro, index = micro_and_index
            (loss, parts), grads = grad_fn(state["params"], frozen, micro, jax.random.fold_in(step_key, index), seg)
            parts_sum = jax.tree_util.tree_map(jnp.add, parts_sum, parts)
            return (loss_sum + loss, parts_sum, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

        accum = config.grad_accum
        zeros = jax.tree_util.tree_map(jnp.zeros_like, state["params"])
        no_parts = {key: jnp.zeros((), jnp.float32) for key in MASK_LOSS_METRICS} if config.mask_loss_weight else {}
        (loss_sum, parts_sum, grad_sum), _ = jax.lax.scan(
            accumulate, (jnp.zeros((), jnp.float32), no_parts, zeros), (batch, jnp.arange(accum))
        )
        grads = jax.tree_util.tree_map(lambda g: g / accum, grad_sum)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
        }
        metrics = {"loss": loss_sum / accum, "grad_norm": optax.global_norm(grads), "lr": lr_schedule(state["step"])}
        metrics.update({key: value / accum for key, value in parts_sum.items()})
        return new_state, metrics

    return step


def jit_train_step(
    config: TrainConfig,
    model_cfg: ModelConfig,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    **jit_kwargs,
) -> Callable:
    """`make_train_step` compiled as `paliseg train` runs it (the state donated, this backend's compiler
    options), so the benchmarks measure that very step; `jit_kwargs` (e.g. shardings) go to `jax.jit`."""
    return jax.jit(
        make_train_step(config, model_cfg, tx, lr_schedule),
        donate_argnums=(0,),
        compiler_options=kernels.compiler_options(),
        **jit_kwargs,
    )
