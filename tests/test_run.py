"""`train.run.Run`, a run folder as one object: config.json parsed once, steps, loading a step (0 = the
base) with the frozen base read once, the best step, the recorded VAE; a checkpoint of another model
config is refused before orbax reads it. The run here is a tiny LoRA run whose checkpoints are written
directly (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paliseg import config as model_configs
from paliseg import model
from train import checkpoints
from train import config as train_config
from train import params as param_sets
from train import run as run_folder
from train.run import Run
from vae import identity

VAE = identity.VaeIdentity("ab" * 32, "/somewhere/vae-oid.npz")


def _save(run_dir: Path, step: int, params) -> None:
    with checkpoints.manager(run_dir) as manager:
        checkpoints.save(manager, step, {"step": jnp.asarray(step, jnp.int32), "params": params}, {"step": step})
        manager.wait_until_finished()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A LoRA run (tiny preset, seeded random base) with checkpoints at steps 2 and 4: the initial adapters
    plus 0.01 * step."""
    root = tmp_path_factory.mktemp("lora_run")
    config = run_folder.resolve_config(dict(data=[str(root)], out=str(root / "run"), init="random", preset="tiny",
                                       trainable="lora", lora_rank=2, seq_len=32))  # fmt: skip
    model_cfg = run_folder.model_config(config)
    run_folder.write_config(root / "run", config, model_cfg, {str(root): "d1"}, VAE)
    _, adapters = run_folder.initial_params(config, model_cfg)
    for step in (2, 4):
        _save(root / "run", step, jax.tree.map(lambda a, step=step: a + 0.01 * step, adapters))
    return root / "run"


def _count(monkeypatch, module, name: str) -> list:
    calls: list = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs))
    return calls


def test_a_run_folder_is_read_once(lora_run, monkeypatch):
    parsed = _count(monkeypatch, train_config, "from_dict")
    run = Run(lora_run)
    assert run.steps == [2, 4] and run.resolve_step(None) == 4 and run.resolve_step("latest") == 4
    assert run.resolve_step("2") == 2 and run.resolve_step(0) == 0
    assert run.train_config.trainable == "lora" and run.model_config.lora.rank == 2
    assert run.vae == VAE and run.data_sha256 == {str(lora_run.parent): "d1"}
    run.load(2)
    run.load(4, merge_lora=False)
    assert len(parsed) == 1  # config.json parsed by the constructor only
    assert Run.open(run) is run
    with pytest.raises(ValueError, match="integer, 'best' or 'latest'"):
        run.resolve_step("first")
    with pytest.raises(ValueError, match="changed since the run started"):
        run.check_same_data({str(lora_run.parent): "d2"})
    run.check_same_data({str(lora_run.parent): "d1"})


def test_not_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is .* a `paliseg train` run folder"):
        Run(tmp_path)
    assert not run_folder.is_run(tmp_path)


def test_best_step_round_trip(lora_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy)
    run = Run(copy)
    assert run.best is None
    with pytest.raises(FileNotFoundError, match="no best step recorded yet"):
        run.resolve_step("best")
    best = {"step": 2, "metric": "miou", "value": 0.5}
    run.record_best(best)
    assert json.loads((copy / "best.json").read_text()) == best  # where `paliseg predict --step best` looks
    assert Run(copy).best == best and Run(copy).resolve_step("best") == 2


def test_frozen_base_is_read_once_and_steps_differ(lora_run, monkeypatch):
    initial = _count(monkeypatch, run_folder, "initial_params")
    run = Run(lora_run)
    base_cfg, _base = run.load(0)  # the base with zero-effect adapters, merged
    lora_cfg, step2 = run.load(2, merge_lora=False)
    _, step4 = run.load(4, merge_lora=False)
    assert run.frozen_params() is run.frozen_params()
    assert len(initial) == 1  # step 0, both checkpoints and frozen_params share one base
    assert not base_cfg.lora.enabled and lora_cfg.lora.enabled
    name = next(k for k in _flat(step2) if k.endswith("_lora_b"))
    np.testing.assert_allclose(_flat(step4)[name] - _flat(step2)[name], 0.02, atol=1e-6)
    with pytest.raises(ValueError, match="no checkpoint at step 3; saved steps: 2, 4"):
        run.load(3)


@pytest.mark.filterwarnings("error")  # orbax left reads unfinished (never-awaited coroutines) on such a restore
def test_a_checkpoint_of_another_config_is_refused_before_reading(lora_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy)
    other = model_configs.preset("tiny").replace(lora={"rank": 3})
    adapters = param_sets.split(model.init_params(other, jax.random.key(0)), "lora")[1]
    _save(copy, 6, adapters)
    with pytest.raises(
        ValueError,
        match=r"checkpoints/6/state: not a checkpoint of this run's model config; \d+ "
        r"parameter\(s\) differ, e\.g\. .*lora",
    ):
        Run(copy).load(6)


def _flat(tree) -> dict[str, np.ndarray]:
    from flax import traverse_util

    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
