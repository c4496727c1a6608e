"""GRPO (`paliseg train --objective grpo`): the reward is eval's per-image IoU, advantages are group-relative,
the sampled tokens' log-probabilities are the model's under the grammar, a zero learning rate changes
nothing, the mean reward rises on a toy task, and a resumed run is the uninterrupted one."""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import SMALL, make_masked_dataset, random_params, rl_config, train_tiny_run
from PIL import Image

import vae
from infer.prediction import from_text, score
from metrics import scoring
from paliseg import dataset, decoding, files, records, tokens
from paliseg.cli.main import main
from paliseg.tokenizer import Tokenizer
from train import commands as train_commands
from train import config as train_config
from train import data as train_data
from train import grpo
from train import params as param_sets
from train import run as run_folder
from train.run import Run
from vae import identity

REPO = Path(__file__).resolve().parents[1]

# --- reward and advantages ------------------------------------------------------------------------------


def test_reward_is_the_per_image_iou_eval_reports(tmp_path):
    vae_model = vae.MaskVAE.from_npz(vae.write_random_npz(tmp_path / "vae.npz", seed=0))
    width, height = 48, 40
    gt_mask = np.zeros((height, width), bool)
    gt_mask[8:30, 10:40] = True
    gt_boxes = [(10.0, 8.0, 40.0, 30.0)]
    record = records.Record("images/a.png", "segment crack", "", "masks/a.png")
    rng = np.random.default_rng(0)
    texts = ["", "garbage <loc0001>", "<loc0100><loc0200> crack"]  # empty, invalid, malformed
    for _ in range(6):
        objects = []
        for _ in range(rng.integers(1, 3)):
            y1, x1 = rng.integers(0, 600, 2)
            seg = tuple(int(v) for v in rng.integers(0, 128, 16))
            objects.append(
                tokens.SegObject((y1, x1, y1 + rng.integers(50, 400), x1 + rng.integers(50, 400)), seg, "crack")
            )
        texts.append(tokens.format_suffix(objects))
    rewards = []
    batched = vae.texts_masks([(text, width, height) for text in texts], vae_model)  # one VAE batch, as GRPO
    for text, decoded in zip(texts, batched):
        expected = score(from_text(text, record.prefix, width, height, vae_model), record, gt_mask, gt_boxes)
        single = vae.text_masks(text, width, height, vae_model)
        assert (decoded.union is None) == (single.union is None) and decoded.invalid == single.invalid
        if single.union is not None:
            np.testing.assert_array_equal(decoded.union, single.union)
        got = grpo.reward(decoded, gt_mask, gt_boxes)
        assert got == expected.iou
        with_boxes = grpo.reward(decoded, gt_mask, gt_boxes, box_weight=0.5)
        assert with_boxes == pytest.approx(expected.iou + 0.5 * expected.box_miou)
        rewards.append(got)
    assert rewards[1] == 0.0 and 0 < max(rewards) < 1  # invalid scores 0; the random objects overlap somewhat
    empty_gt = np.zeros((height, width), bool)
    nothing = vae.text_masks("", width, height, vae_model)
    assert grpo.reward(nothing, empty_gt, []) == 1.0  # empty/empty, as eval scores it
    assert grpo.reward(nothing, empty_gt, []) == scoring.score_image(np.zeros_like(empty_gt), empty_gt, "", "").iou


def test_advantages_are_zero_mean_per_group_and_zero_on_ties():
    rewards = np.asarray([[0.1, 0.5, 0.9, 0.3], [0.7, 0.7, 0.7, 0.7], [0.0, 0.0, 0.0, 1.0], [0.3, 0.3, 0.3, 0.3]])
    rewards[3] = 0.1 + 0.2  # a float whose mean over the group is not exactly itself
    advantages = grpo.group_advantages(rewards)
    assert advantages.shape == rewards.shape
    np.testing.assert_allclose(advantages.mean(axis=1), 0.0, atol=1e-6)
    assert (advantages[1] == 0).all() and (advantages[3] == 0).all()
    np.testing.assert_allclose(advantages[[0, 2]].std(axis=1), 1.0, atol=1e-4)
    assert np.argmax(advantages[0]) == 2 and advantages[2, 3] > 0 > advantages[2, 0]


def test_max_variance_subset_keeps_each_groups_extremes():
    rng = np.random.default_rng(0)
    rewards = rng.uniform(size=(5, 8))
    chosen = grpo.max_variance_subset(rewards, 4)
    assert chosen.shape == (5, 4)
    for row, columns in zip(rewards, chosen):
        assert len(set(columns)) == 4
        kept = np.sort(row[columns])
        np.testing.assert_array_equal(kept, np.sort(np.concatenate([np.sort(row)[:2], np.sort(row)[-2:]])))
        # no other 4 of the 8 vary more (the subset PODS proves best, checked by brute force)
        best = max(np.var(row[list(c)]) for c in itertools.combinations(range(8), 4))
        assert np.var(row[columns]) == pytest.approx(best)
    odd = grpo.max_variance_subset(np.asarray([[0.5, 0.1, 0.9]]), 3)
    assert sorted(odd[0]) == [0, 1, 2]  # keep == G keeps everything


def test_clipped_objective_by_hand():
    logp = jnp.log(jnp.asarray([[0.5, 0.2, 0.9], [0.3, 0.6, 0.1]]))
    old = jnp.log(jnp.asarray([[0.4, 0.2, 0.5], [0.3, 0.3, 0.1]]))
    ref = jnp.log(jnp.asarray([[0.5, 0.1, 0.9], [0.2, 0.6, 0.1]]))
    advantages, mask = jnp.asarray([1.0, -2.0]), jnp.asarray([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, metrics = grpo.clipped_objective(logp, old, ref, advantages, mask, clip_epsilon=0.2, kl_coef=0.1)
    ratio = np.exp(np.asarray(logp - old))
    adv = np.asarray(advantages)[:, None]
    objective = np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
    delta = np.asarray(ref - logp)
    kl = np.exp(delta) - delta - 1
    m = np.asarray(mask)
    expected = -np.mean(((objective - 0.1 * kl) * m).sum(1) / m.sum(1))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["kl"]) == pytest.approx((kl * m).sum() / m.sum(), rel=1e-5)
    assert float(metrics["clip_fraction"]) == pytest.approx(2 / 5)  # 0.5/0.4 and 0.6/0.3; 0.9/0.5 is masked


# --- log-probabilities and the compiled step -------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(SMALL.tokenizer_path)


@pytest.fixture(scope="module")
def sampled(tokenizer):
    """A random SMALL model, prompts of two lengths, 2 completions each sampled under the grammar."""
    params = random_params(SMALL)
    grammar = decoding.segment_grammar(tokenizer, SMALL.llm.vocab_size)
    texts = ["segment crack", "segment the long taping area please", "segment crack", "segment hole"]
    encoded = [tokenizer.encode_prompt(t, 16) for t in texts]
    prompts = {k: np.stack([e[k] for e in encoded]) for k in ("tokens", "mask_ar", "mask_input")}
    images = np.asarray(jax.random.uniform(jax.random.key(3), (4, 16, 16, 3), minval=-1, maxval=1))
    generation = decoding.generate(
        SMALL, params, images, prompts["tokens"], prompts["mask_ar"], prompts["mask_input"], max_new_tokens=24,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, grammar=grammar,
        sampling=decoding.Sampling(temperature=1.3, top_p=0.95), rng=jax.random.key(5), samples_per_prompt=2,
    )  # fmt: skip
    batch = grpo.rollout_batch(images, prompts, np.asarray(generation.tokens), tokenizer.eos_id)
    return params, grammar, batch, generation


def test_sampled_logprobs_equal_the_teacher_forced_models_under_the_grammar(tokenizer, sampled):
    params, grammar, batch, generation = sampled
    samples = np.asarray(generation.tokens)
    assert (samples == tokenizer.eos_id).any(axis=1).sum() >= 4 and len({tuple(r) for r in samples}) == 8
    recomputed = grpo.policy_logprobs(SMALL, params, batch, grammar, tokenizer.eos_id)
    np.testing.assert_allclose(np.asarray(recomputed), np.asarray(generation.logprobs), atol=2e-4)
    assert np.all(np.asarray(recomputed)[batch["mask"] == 0] == 0)  # nothing after EOS
    free = grpo.policy_logprobs(SMALL, params, batch, None, tokenizer.eos_id)  # without the grammar's mask
    assert np.all(np.asarray(free) < np.asarray(recomputed) + 1e-5) and np.any(
        np.asarray(free) < np.asarray(recomputed) - 1e-3
    )


def test_zero_learning_rate_changes_nothing(tokenizer, sampled):
    params, grammar, batch, _ = sampled
    config = train_config.TrainConfig(
        data=["x"],
        out="x",
        init="random",
        preset="tiny",
        trainable="all",
        grpo=train_config.GrpoConfig(updates_per_batch=2),
    )
    batch = {**batch, "advantages": np.linspace(-1, 1, 8).astype(np.float32)}
    frozen, trainable = param_sets.split(params, "all")
    tx = optax.sgd(0.0)
    state = {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": tx.init(trainable)}
    step = jax.jit(grpo.make_grpo_step(config, SMALL, tx, lambda count: 0.0, grammar, tokenizer.eos_id))
    new_state, metrics = step(state, frozen, trainable, batch)
    assert int(new_state["step"]) == 1 and float(metrics["grad_norm"]) > 0  # a real gradient, not applied
    for before, after in zip(jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(new_state["params"])):
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    assert float(metrics["kl"]) == pytest.approx(0.0, abs=1e-6) and float(metrics["clip_fraction"]) == 0.0
    tx = optax.sgd(1e-2)
    step = jax.jit(grpo.make_grpo_step(config, SMALL, tx, lambda count: 1e-2, grammar, tokenizer.eos_id))
    moved, _ = step({**state, "opt_state": tx.init(trainable)}, frozen, trainable, batch)
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(moved["params"]))
    )


# --- runs ------------------------------------------------------------------------------------------------


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / run_folder.METRICS_FILE, newline="") as handle:
        return [{k: v for k, v in row.items() if k not in ("tokens_per_s", "examples_per_s", "elapsed_s")}
                for row in csv.DictReader(handle)]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("grpo"))


@pytest.mark.slow
def test_grpo_run_resumes_exactly_and_eval_reads_it(tiny_run, tmp_path):
    data, init_run, _ = tiny_run
    whole = rl_config(data, init_run, tmp_path / "whole")
    assert whole.init_step == "4" and whole.preset == "tiny" and whole.seq_len == 48  # inherited, resolved
    train_commands.run(whole)
    part = rl_config(data, init_run, tmp_path / "part")
    train_commands.run(part, stop_after=2)
    resumed = train_config.check_resume(Run(tmp_path / "part").train_config, {"out": str(tmp_path / "part")})
    train_commands.run(resumed, resume=True)
    assert _rows(tmp_path / "whole") == _rows(tmp_path / "part") and len(_rows(tmp_path / "whole")) == 3
    _, final_whole = Run(tmp_path / "whole").load(3)
    _, final_part = Run(tmp_path / "part").load(3)
    for a, b in zip(jax.tree_util.tree_leaves(final_whole), jax.tree_util.tree_leaves(final_part)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # step 0 of the GRPO run is the policy it started from
    _, start = Run(tmp_path / "whole").load(0)
    _, init = Run(init_run).load(4)
    for a, b in zip(jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(init)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    row = _rows(tmp_path / "whole")[-1]
    assert (
        0 <= float(row["reward_mean"]) <= 1 and float(row["kl"]) >= 0 and 0 <= float(row["zero_variance_groups"]) <= 1
    )


@pytest.mark.slow
def test_cli_trains_grpo_with_lora_from_a_run(tiny_run, tmp_path, capsys):
    data, init_run, _ = tiny_run
    out = tmp_path / "lora"
    code = main(["train", "--objective", "grpo", "--init-run", str(init_run), "--init-step", "2", "--data", str(data),
                 "--out", str(out), "--trainable", "lora", "--steps", "2", "--batch-size", "2", "--save-every", "2",
                 "--grpo-group-size", "3", "--grpo-keep", "2", "--grpo-max-new-tokens", "24", "--workers", "1",
                 "--json"])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["checkpoint_steps"] == [2] and summary["objective"] == "grpo"
    run = Run(out)
    assert run.train_config.init_step == "2" and run.model_config.lora.enabled
    config, _ = run.load(2)
    assert not config.lora.enabled  # merged, as for a supervised LoRA run


_SHARDED_GRPO = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import jax
assert len(jax.devices()) == 2, jax.devices()
from helpers import rl_config
from train import commands as train_commands
train_commands.run(rl_config(Path({data!r}), Path({init_run!r}), Path({out!r}), steps=2, mesh_fsdp=2))
"""


def _assert_same_run(one: Path, other: Path) -> None:
    """Two runs of the same GRPO config on different device layouts: the same samples (rewards), losses and
    final params. atol: an Adam step is ~lr (1e-3); params whose gradient is zero up to rounding (SigLIP's
    key bias: a constant added to every key's logit) take steps of rounding noise, which differs."""
    rows_one, rows_other = _rows(one), _rows(other)
    assert len(rows_one) == len(rows_other) == 2
    for a, b in zip(rows_one, rows_other):
        assert float(b["reward_mean"]) == pytest.approx(float(a["reward_mean"]), abs=1e-9)
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-4, abs=1e-6)
    (_, final_one), (_, final_other) = Run(one).load(2), Run(other).load(2)
    for a, b in zip(jax.tree_util.tree_leaves(final_one), jax.tree_util.tree_leaves(final_other)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def one_device(tiny_run, tmp_path_factory):
    """The reference: 2 steps of GRPO on one device."""
    data, init_run, _ = tiny_run
    out = tmp_path_factory.mktemp("grpo_one") / "run"
    train_commands.run(rl_config(data, init_run, out, steps=2))
    return out


@pytest.mark.slow
def test_two_device_grpo_run_matches_one_device(tiny_run, one_device, tmp_path):
    """Two simulated CPU devices in one process, FSDP 2 (the params split, each device sampling and updating
    on one prompt's group)."""
    data, init_run, _ = tiny_run
    script = _SHARDED_GRPO.format(
        tests=str(REPO / "tests"), data=str(data), init_run=str(init_run), out=str(tmp_path / "two")
    )
    done = subprocess.run([sys.executable, "-c", script], env=_env(2), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 device(s) (data 1 x fsdp 2), 1 process(es)" in done.stderr
    _assert_same_run(one_device, tmp_path / "two")


@pytest.mark.slow
def test_two_process_grpo_run_matches_one_device(tiny_run, one_device, tmp_path):
    """Multi-host as on a pod: two processes (one CPU device each) joined by jax.distributed through
    `paliseg train --coordinator`, each loading, sampling and rewarding its prompt, FSDP over both."""
    import socket

    data, init_run, _ = tiny_run
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    args = ["train", "--objective", "grpo", "--init-run", str(init_run), "--init-step", "latest", "--data", str(data),
            "--out", str(tmp_path / "multi"), "--trainable", "all", "--steps", "2", "--batch-size", "2",
            "--save-every", "1", "--lr", "1e-3", "--workers", "1", "--no-augment", "--grpo-group-size", "4",
            "--grpo-updates-per-batch", "2", "--grpo-max-new-tokens", "24", "--mesh-fsdp", "2",
            "--coordinator", f"localhost:{port}", "--num-processes", "2"]  # fmt: skip
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "paliseg.cli.main", *args, "--process-id", str(i)],
            env=_env(1),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in (0, 1)
    ]
    errors = [process.communicate(timeout=600)[1].decode() for process in processes]
    assert [p.returncode for p in processes] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    assert "2 device(s) (data 1 x fsdp 2), 2 process(es)" in errors[0]
    _assert_same_run(one_device, tmp_path / "multi")


def wall_dataset(folder: Path, vae_path: Path, count: int = 4) -> Path:
    """A toy task: "segment wall" on plain images whose ground truth is the whole image."""
    vae_model = vae.MaskVAE.from_npz(vae_path)
    for split in ("train", "valid"):
        out = []
        for index in range(count):
            size = 64
            mask = np.ones((size, size), bool)
            seg = vae.mask_to_tokens(vae_model, mask, (0, 0, size, size))
            wall = tokens.SegObject(tokens.box_to_locs((0, 0, size, size), size, size), seg, "wall")
            name = f"{split}_{index}"
            files.write_image(
                folder / "images" / f"{name}.png", Image.fromarray(np.full((size, size, 3), 60 + 30 * index, np.uint8))
            )
            files.write_mask(folder / "masks" / f"{name}.png", mask)
            out.append(
                records.Record(f"images/{name}.png", "segment wall", tokens.format_suffix([wall]), f"masks/{name}.png")
            )
        records.write_records(records.annotations_path(folder, split), out)
    files.write_json(folder / records.CONVERSION_FILE, {"vae": identity.identify(vae_path).to_json()})
    return folder


@pytest.mark.slow
def test_mean_reward_rises_on_a_toy_task(tmp_path):
    """A policy half-way through supervised training on a toy task (12 steps), then GRPO: the mean reward
    of the sampled completions rises."""
    data = wall_dataset(tmp_path / "data", vae.write_random_npz(tmp_path / "vae.npz", seed=0))
    supervised = run_folder.resolve_config(dict(
        data=[str(data)], out=str(tmp_path / "sup"), init="random", preset="tiny", trainable="all", steps=12,
        batch_size=4, save_every=12, lr=3e-3, workers=1, seq_len=32, remat=False,
    ))  # fmt: skip
    train_commands.run(supervised)
    config = rl_config(data, tmp_path / "sup", tmp_path / "rl", steps=24, lr=5e-4, warmup_fraction=0.0, remat=False,
                        grpo={"group_size": 8, "max_new_tokens": 24, "kl_coef": 0.0})  # fmt: skip
    rewards = train_commands.run(config)["rewards"]
    assert np.mean(rewards[-8:]) > np.mean(rewards[:8]) + 0.03, rewards


def test_data_examples_know_their_ground_truths_resolution(tmp_path):
    data = make_masked_dataset(tmp_path / "data", vae.write_random_npz(tmp_path / "vae.npz", seed=0))
    items, _ = dataset.check_split(data, "train")
    sizes = {(item.width, item.height) for item in items}
    config = run_folder.resolve_config(dict(data=[str(data)], out="x", init="random", preset="tiny", seq_len=48))
    examples = [e for folder in train_data.read_examples(config, Tokenizer(SMALL.tokenizer_path)) for e in folder]
    assert {(e.width, e.height) for e in examples} == sizes
