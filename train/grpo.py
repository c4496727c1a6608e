"""Reinforcement fine-tuning (`paliseg train --objective grpo`): group-relative policy optimisation with
the per-image mask IoU that `paliseg eval` reports as the reward.

Cross-entropy treats every wrong seg code as equally wrong and never sees the mask the tokens draw; here
the model is rewarded by the mask itself (Seg-Zero, arXiv:2503.06520, did this with an IoU reward; GRPO is
DeepSeekMath's, arXiv:2402.03300). Each step:

1. for each of the batch's B image/prompt pairs, sample G completions (`paliseg.decoding.generate`: the
   KV-cached decoder under the segmentation grammar, so every sample parses; one compiled program, no
   host round trip per token; each prompt prefilled once for its G samples);
2. decode each sample's objects through the VAE into masks at the ground truth's resolution
   (`vae.texts_masks`, the path predict and eval use; all samples in one VAE batch) and reward it with
   `metrics.scoring.score_image(...).iou` (invalid = 0, empty/empty = 1, as eval scores), plus
   `--grpo-box-weight` x the Hungarian-matched box mIoU;
3. with `--grpo-keep K`, only K of each group's samples go on: the K/2 worst and K/2 best rewarded
   (max-variance down-sampling, PODS); advantages: each reward minus its group's mean, over the group's
   standard deviation (all zero when the group ties: nothing to learn from it);
4. one compiled update step (`--grpo-updates-per-batch` optimizer updates): the clipped policy-gradient
   objective over the sampled tokens (mean per sequence, then over sequences), minus `--grpo-kl-coef` x
   the k3 estimate of KL(policy || reference), the reference being the frozen starting policy. Token
   log-probabilities come from a teacher-forced forward pass under the grammar's mask
   (`paliseg.decoding.token_logprobs`), i.e. the distribution the samples were drawn from at temperature 1;
   as in sampling, each prompt's image and text run once for its K kept samples
   (`model.continuation_logits`), not once per sample.

On several devices and hosts (`train.sharding`'s mesh, as supervised runs): each process loads its share
of the prompts, the devices sample them and update on the kept samples, each process rewards its own
(the step's metrics gather every process's); `--mesh-fsdp` splits the parameters.

The forward passes are deterministic (no dropout): the ratio must compare the policy with itself. With one
update per batch the ratio is exactly 1 and the gradient is the plain policy gradient; more updates
compare against the log-probabilities of the policy that sampled (computed at the step's start).

The run folder is a supervised run's (`train.loop`): config.json, checkpoints every --save-every steps
(the same state: step, trainable params, optimizer state), exact --resume (the batch, the sampling key and
so the completions are functions of the step), metrics.csv and TensorBoard with the GRPO_FIELDS. Step 0 is
the starting policy (--init-run's checkpoint), so `paliseg eval` sweeps the run unchanged.
"""

from __future__ import annotations

import csv
import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import vae
from metrics import scoring
from paliseg import dataset, decoding, model
from paliseg.config import ModelConfig
from paliseg.model import kernels
from train import data as train_data
from train import params as param_sets
from train import run as run_folder
from train import sharding
from train.config import TrainConfig
from train.loop import Context, Start

GRPO_FIELDS = (
    "step", "loss", "reward_mean", "reward_std", "kl", "clip_fraction", "zero_variance_groups",
    "tokens_per_s", "examples_per_s", "lr", "grad_norm", "elapsed_s",
)  # fmt: skip


# --- reward and advantages (host) ---------------------------------------------------------------------


def reward(decoded: vae.TextMasks, gt_mask: np.ndarray, gt_boxes, box_weight: float = 0.0) -> float:
    """One sample's reward from its masks decoded at the ground truth's resolution (`vae.texts_masks`):
    `score_image(...).iou` of the union (what `paliseg eval` scores), plus `box_weight` x the matched box
    mIoU."""
    height, width = gt_mask.shape
    score = scoring.score_image(
        decoded.union, gt_mask, "", "", pred_boxes=decoded.boxes(width, height), gt_boxes=gt_boxes,
        invalid_objects=sum(decoded.invalid.values()),
    )  # fmt: skip
    return score.iou + (box_weight * (score.box_miou or 0.0) if box_weight else 0.0)


def group_advantages(rewards: np.ndarray) -> np.ndarray:
    """float32 [B, G]: each reward minus its group's (row's) mean, over the group's standard deviation;
    exactly 0 for a group whose rewards all tie."""
    rewards = np.asarray(rewards, np.float64)
    centered = rewards - rewards.mean(axis=1, keepdims=True)
    tied = np.ptp(rewards, axis=1, keepdims=True) == 0
    std = rewards.std(axis=1, keepdims=True)
    return np.where(tied, 0.0, centered / np.where(tied, 1.0, std + 1e-6)).astype(np.float32)


def max_variance_subset(rewards: np.ndarray, keep: int) -> np.ndarray:
    """int [B, keep]: per group (row), the `keep` // 2 lowest and the rest highest rewarded samples' columns,
    the subset whose rewards vary most (PODS, arXiv:2504.13818): the samples an update learns most from."""
    order = np.argsort(rewards, axis=1, kind="stable")
    low = keep // 2
    return np.concatenate([order[:, :low], order[:, order.shape[1] - (keep - low) :]], axis=1)


# --- sequences ------------------------------------------------------------------------------------------


def sampled_mask(samples: np.ndarray, eos_id: int) -> np.ndarray:
    """bool [N, T]: the tokens the sampler drew, each row up to and including its EOS (pad after it)."""
    return ~(np.cumsum(samples == eos_id, axis=1) - (samples == eos_id) > 0)


def rollout_batch(
    images: np.ndarray, prompts: dict[str, np.ndarray], samples: np.ndarray, eos_id: int
) -> dict[str, np.ndarray]:
    """The update's inputs: the B images and prompts (right-padded [B, P], as decoded) and the samples
    [B * K, T] that continue them, K per prompt in prompt-major order (pad after EOS); `mask` [B * K, T]
    says which tokens were sampled (up to EOS)."""
    return {
        "image": images,
        **{key: prompts[key] for key in ("tokens", "mask_ar", "mask_input")},
        "samples": samples.astype(np.int32),
        "mask": sampled_mask(samples, eos_id).astype(np.float32),
    }


# --- the compiled step ----------------------------------------------------------------------------------


def policy_logprobs(
    model_cfg: ModelConfig, params, batch: dict[str, jax.Array], grammar: decoding.SegmentGrammar, eos_id: int
) -> jax.Array:
    """float32 [B * K, T]: the log-probability of each sampled token under `params` and the grammar (0 after
    EOS), teacher-forced; each prompt's image and text run once for its K samples
    (`model.continuation_logits`)."""
    logits = model.continuation_logits(
        model_cfg, params, batch["image"], batch["tokens"], batch["mask_ar"], batch["mask_input"], batch["samples"]
    )
    return decoding.token_logprobs(logits, batch["samples"], grammar, eos_id)


def clipped_objective(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    clip_epsilon: float,
    kl_coef: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO's loss (to minimise) and its metrics: per token min(r A, clip(r, 1 +- eps) A) - beta KL, where
    r = pi / pi_old and KL is the k3 estimate exp(ref - logp) - (ref - logp) - 1 (unbiased, positive);
    averaged over each sequence's sampled tokens, then over sequences."""
    ratio = jnp.exp(logp - old_logp)
    advantage = advantages[:, None]
    objective = jnp.minimum(ratio * advantage, jnp.clip(ratio, 1 - clip_epsilon, 1 + clip_epsilon) * advantage)
    if ref_logp is None:
        kl = jnp.zeros_like(logp)
    else:
        delta = ref_logp - logp
        kl = jnp.exp(delta) - delta - 1
    weights = mask / jnp.clip(jnp.sum(mask, axis=1, keepdims=True), 1.0)
    loss = -jnp.mean(jnp.sum((objective - kl_coef * kl) * weights, axis=1))
    tokens = jnp.clip(jnp.sum(mask), 1.0)
    clipped = (jnp.abs(ratio - 1) > clip_epsilon).astype(jnp.float32)
    return loss, {"kl": jnp.sum(kl * mask) / tokens, "clip_fraction": jnp.sum(clipped * mask) / tokens}


def make_grpo_step(
    config: TrainConfig,
    model_cfg: ModelConfig,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    grammar: decoding.SegmentGrammar,
    eos_id: int,
):
    """step(state, frozen, reference, batch) -> (new state, metrics); `reference` is the starting trainable
    set (the KL's frozen policy). Not yet jit-compiled."""
    grpo = config.grpo
    updates = grpo.updates_per_batch

    def logprobs(trainable, frozen, batch):
        return policy_logprobs(model_cfg, param_sets.join(frozen, trainable), batch, grammar, eos_id)

    def loss_fn(trainable, frozen, batch, old, ref):
        logp = logprobs(trainable, frozen, batch)
        old = jax.lax.stop_gradient(logp) if old is None else old
        return clipped_objective(logp, old, ref, batch["advantages"], batch["mask"], grpo.clip_epsilon, grpo.kl_coef)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, frozen, reference, batch):
        no_grad = jax.lax.stop_gradient
        ref = no_grad(logprobs(reference, frozen, batch)) if grpo.kl_coef > 0 else None
        old = no_grad(logprobs(state["params"], frozen, batch)) if updates > 1 else None

        def update(carry, _):
            params, opt_state = carry
            (loss, metrics), grads = grad_fn(params, frozen, batch, old, ref)
            changes, opt_state = tx.update(grads, opt_state, params)
            metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
            return (optax.apply_updates(params, changes), opt_state), metrics

        (params, opt_state), history = jax.lax.scan(update, (state["params"], state["opt_state"]), length=updates)
        metrics = {key: jnp.mean(value) for key, value in history.items()}
        metrics["lr"] = lr_schedule(state["step"] * updates)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return step


def jit_grpo_step(config, model_cfg, tx, lr_schedule, grammar, eos_id, **jit_kwargs):
    """`make_grpo_step` compiled as `paliseg train --objective grpo` runs it (the state donated);
    `jit_kwargs` (shardings) go to `jax.jit`."""
    return jax.jit(
        make_grpo_step(config, model_cfg, tx, lr_schedule, grammar, eos_id),
        donate_argnums=(0,),
        compiler_options=kernels.compiler_options(),
        **jit_kwargs,
    )


# --- the run --------------------------------------------------------------------------------------------


class Rollouts:
    """What a step needs from its examples: prompts of one shared length (one compiled sampler), the
    completions, their rewards (each ground truth read once per process, then kept)."""

    def __init__(self, config: TrainConfig, tokenizer, data: train_data.TrainData, vae_model):
        self.config, self.tokenizer, self.data, self.vae = config, tokenizer, data, vae_model
        longest = max(len(tokenizer.encode(e.record.prefix, bos=True) + tokenizer.encode("\n")) for e in data.examples)
        self.prompt_len = decoding.prompt_length_bucket(longest)
        self.max_new_tokens = config.grpo.max_new_tokens or config.seq_len

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (one Rollouts per run; bounded)
    def prompt(self, example_id: int) -> dict[str, np.ndarray]:
        return self.tokenizer.encode_prompt(self.data.examples[example_id].record.prefix, self.prompt_len)

    @functools.lru_cache(maxsize=1024)  # noqa: B019 (one Rollouts per run; bounded)
    def ground_truth(self, example_id: int) -> tuple[np.ndarray, list]:
        example = self.data.examples[example_id]
        return dataset.ground_truth(example.record, example.width, example.height)

    def rewards(self, example_ids: Sequence[int], texts: Sequence[str]) -> np.ndarray:
        """float64 [N]: each text's reward against its example's ground truth (one VAE batch for all)."""
        sizes = [(self.data.examples[i].width, self.data.examples[i].height) for i in example_ids]
        decoded = vae.texts_masks([(text, *size) for text, size in zip(texts, sizes)], self.vae)
        return np.asarray(
            [reward(d, *self.ground_truth(i), self.config.grpo.box_weight) for i, d in zip(example_ids, decoded)]
        )


class Grpo:
    """GRPO's optimizer step (`train.loop.Objective`): sample, reward, update (see the module docstring)."""

    name = "grpo"
    fields = GRPO_FIELDS

    def __init__(self, context: Context):
        self.context = context
        config = context.config
        self.rollouts = Rollouts(config, context.tokenizer, context.data, context.load_vae())
        self.grammar = decoding.segment_grammar(context.tokenizer, context.model_cfg.llm.vocab_size)
        self.sampler_cfg = context.model_cfg.replace(remat=False)
        self.sampling = decoding.Sampling(config.grpo.temperature, config.grpo.top_p)
        self.base_key = jax.random.fold_in(jax.random.key(config.seed), 7)  # apart from the other seeded streams

    @property
    def updates_per_step(self) -> int:
        return self.context.config.grpo.updates_per_batch

    def describe(self) -> str:
        config = self.context.config
        grpo = config.grpo
        start = f"{config.init_run} step {config.init_step}" if config.init_run else (config.checkpoint or config.init)
        return (
            f"starting from {start}; {config.batch_size} prompts x {grpo.group_size} samples of up to "
            f"{self.rollouts.max_new_tokens} tokens per step"
            + (f", updating on {grpo.keep} of each group's" if grpo.keep else "")
        )

    def compile(self, tx, lr_schedule, start: Start) -> None:
        context = self.context
        self.frozen, self.reference = start.frozen, start.initial  # reference: the KL's frozen policy
        rows = jax.sharding.NamedSharding(context.mesh, sharding.ROWS_SPEC)
        self.step_fn = jit_grpo_step(
            context.config, context.model_cfg, tx, lr_schedule, self.grammar, context.tokenizer.eos_id,
            in_shardings=(start.state_shardings, start.frozen_shardings, start.state_shardings["params"], rows),
            out_shardings=(start.state_shardings, sharding.replicated(context.mesh)),
        )  # fmt: skip

    def step(self, step: int, state: Any, example_ids: np.ndarray, batch: dict[str, np.ndarray]) -> tuple[Any, dict]:
        started = time.perf_counter()
        context, group, keep = self.context, self.context.config.grpo.group_size, self.context.config.grpo.keep
        tokenizer, mesh = context.tokenizer, context.mesh
        ids, images = example_ids[0], batch["image"][0]  # GRPO runs with --grad-accum 1
        prompts = {
            key: np.stack([self.rollouts.prompt(int(i))[key] for i in ids])
            for key in ("tokens", "mask_ar", "mask_input")
        }
        on_devices = sharding.global_rows((images, prompts), mesh)  # each device samples its prompts' groups
        generated = decoding.generate(
            self.sampler_cfg, param_sets.join(self.frozen, state["params"]), on_devices[0], on_devices[1]["tokens"],
            on_devices[1]["mask_ar"], on_devices[1]["mask_input"], max_new_tokens=self.rollouts.max_new_tokens,
            eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, grammar=self.grammar, sampling=self.sampling,
            rng=jax.random.fold_in(self.base_key, step), samples_per_prompt=group,
        )  # fmt: skip
        process = jax.process_index()
        local = slice(process * len(ids) * group, (process + 1) * len(ids) * group)  # this process's rows
        samples = sharding.all_rows(generated.tokens)[local]  # [B * G, T] of its B prompts, prompt-major
        texts = [tokenizer.decode(sample) for sample in samples]
        rewards = self.rollouts.rewards(np.repeat(ids, group), texts).reshape(len(ids), group)
        columns = max_variance_subset(rewards, keep) if keep else np.tile(np.arange(group), (len(ids), 1))
        kept = (np.arange(len(ids))[:, None] * group + columns).reshape(-1)  # rows of `samples`, prompt-major
        update = rollout_batch(images, prompts, samples[kept], tokenizer.eos_id)
        update["advantages"] = group_advantages(np.take_along_axis(rewards, columns, axis=1)).reshape(-1)
        state, metrics = self.step_fn(state, self.frozen, self.reference, sharding.global_rows(update, mesh))
        every = sharding.all_rows(rewards)  # [all prompts, G]: the step's metrics are over every process's
        sampled = sharding.all_rows(sampled_mask(samples, tokenizer.eos_id).sum(keepdims=True))
        return state, {
            **metrics,
            "reward_mean": float(every.mean()),
            "reward_std": float(every.std()),
            "zero_variance_groups": float(np.mean(np.ptp(every, axis=1) == 0)),
            "tokens_per_s": float(sampled.sum()) / max(time.perf_counter() - started, 1e-9),
        }

    def postfix(self, row: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{row['reward_mean']:.3f}", "kl": f"{row['kl']:.4f}"}

    def summarize(self, history: list[dict[str, float]]) -> dict[str, Any]:
        rewards = [row["reward_mean"] for row in history]
        return {
            "objective": "grpo",
            "rewards": rewards,
            "first_reward": rewards[0] if rewards else None,
            "last_reward": rewards[-1] if rewards else None,
        }


def reward_plot(run_dir: str | Path, out: str | Path) -> Path:
    """reward_mean vs step of a GRPO run's metrics.csv, drawn to `out` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(Path(run_dir) / run_folder.METRICS_FILE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = [int(r["step"]) for r in rows]
    means = np.asarray([float(r["reward_mean"]) for r in rows])
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(steps, means, lw=0.8, alpha=0.5, label="mean reward per step")
    if len(means) >= 10:
        window = max(len(means) // 20, 5)
        smooth = np.convolve(means, np.ones(window) / window, mode="valid")
        axis.plot(steps[window - 1 :], smooth, lw=2, label=f"moving mean ({window} steps)")
    axis.set_xlabel("GRPO step")
    axis.set_ylabel("reward (mask IoU)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
