"""`paliseg plan` (train/plan.py): the planned peak against the very program run (XLA's buffers for the
real arguments, and the process's resident peak), the largest batch for a budget, the FLOPs, the mesh, and
bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from paliseg import checkpoints, model
from paliseg.cli import main as cli
from paliseg.config import preset
from train import plan, plan_commands, sharding
from train import run as run_folder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from train_vs_transformers import lora_step_flops  # noqa: E402  (the analytic count of a LoRA step)

TINY = ["--preset", "tiny", "--batch-size", "16", "--seq-len", "64"]


def plan_of(argv: list[str]) -> dict:
    """What `paliseg plan ARGV` reports, in this process."""
    return plan.plan(*plan_commands.resolve(cli.build_parser().parse_args(["plan", *argv])))


def measure(task: str, argv: list[str]) -> dict:
    """The case run in a fresh process (benchmarks/plan_accuracy.py): idle resident memory, the resident
    peak of a call, XLA's buffers of the program compiled for the real arguments, the arguments' bytes."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "plan_accuracy.py"), "--measure", task, *argv],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("task", ["train", "predict"])
def test_the_planned_peak_is_the_peak_of_the_program_that_runs(task):
    argv = TINY + (["--predict", "--max-new-tokens", "32"] if task == "predict" else [])
    planned = plan_of(argv)["bytes_per_device"]
    measured = measure(task, argv)
    # XLA's buffer assignment of the program compiled for the real arrays, and their bytes
    assert abs(planned["peak"] - measured["xla_peak"]) <= 0.15 * measured["xla_peak"]
    if task == "train":
        assert planned["params"] + planned["optimizer_state"] + planned["batch"] == measured["argument_bytes"]
    else:
        assert planned["params"] + planned["inputs"] == measured["argument_bytes"]
        assert planned["kv_cache"] <= planned["temporaries"]
    # the process: its idle resident memory (runtime, compiled programs) + the plan vs its resident peak
    predicted = measured["idle"] + planned["peak"]
    assert abs(predicted - measured["peak"]) <= 0.15 * measured["peak"]


@pytest.mark.slow
def test_the_largest_batch_fits_when_run_and_the_next_one_does_not():
    fit = plan_of(TINY + ["--device-memory", "0.3GB"])["fit"]
    largest = fit["largest_micro_batch"]
    assert fit["peak"] <= fit["budget"] < fit["next_peak"]
    config, _ = plan_commands.resolve(cli.build_parser().parse_args(["plan", *TINY]))
    mesh = sharding.make_mesh()
    for size, peak in ((largest, fit["peak"]), (largest + 1, fit["next_peak"])):  # by their own compiles
        assert plan.train_peak(config.replace(batch_size=size), mesh) == peak
    # --batch-size 16 fits as it is (16 < the largest): one micro-batch
    assert largest > 16 and fit["grad_accum"] == 1 and fit["peak_at_batch"] <= fit["budget"]
    # a smaller budget: a smaller batch; a batch larger than fits is split into micro-batches that fit
    smaller = plan_of(["--preset", "tiny", "--batch-size", "64", "--seq-len", "64", "--device-memory", "0.2GB"])["fit"]
    assert smaller["largest_micro_batch"] < largest
    assert 64 // smaller["grad_accum"] <= smaller["largest_micro_batch"] < 64 // (smaller["grad_accum"] - 1)
    # run at the largest batch: the process grows by less than the device memory (the margin holds XLA:CPU's
    # own runtime memory beside the planned buffers)
    measured = measure("train", ["--preset", "tiny", "--batch-size", str(largest), "--seq-len", "64"])
    assert measured["peak"] - measured["idle"] <= fit["device_memory"]


@given(
    base=st.integers(0, 10**6),
    slope=st.integers(1, 10**4),
    bumps=st.integers(0, 10**4),
    budgets=st.lists(st.integers(0, 10**8), min_size=2, max_size=4),
)
def test_largest_finds_the_last_n_under_the_budget_and_grows_with_it(base, slope, bumps, budgets):
    def peak(n: int) -> int:  # grows with n, not quite linearly (XLA pads and reuses buffers)
        return base + slope * n + bumps * (n // 7)

    found = [plan.largest(peak, budget) for budget in sorted(budgets)]
    for n, budget in zip(found, sorted(budgets)):
        assert (n == 0 or peak(n) <= budget) and peak(n + 1) > budget
    assert found == sorted(found)


def test_flops_count_every_layer_and_every_micro_batch():
    config, _ = plan_commands.resolve(cli.build_parser().parse_args(["plan", "--preset", "mid", "--batch-size", "2"]))
    flops = plan.train_flops(config)  # lowered only: nothing compiled
    analytic = lora_step_flops(run_folder.model_config(config), 2, config.seq_len - 1)
    assert abs(flops - analytic) <= 0.05 * analytic  # the layer scan counted once would be ~1/4 of it
    assert plan.train_flops(config.replace(grad_accum=2)) == pytest.approx(flops, rel=0.01)


@pytest.mark.slow
def test_a_mesh_splits_the_params_and_optimizer_state_over_its_devices():
    argv = ["--preset", "tiny", "--trainable", "all", "--batch-size", "4", "--seq-len", "32"]
    one = plan_of(argv)["bytes_per_device"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "paliseg.cli.main", "plan", *argv, "--devices", "2", "--mesh-fsdp", "2", "--json"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    two = json.loads(done.stdout)
    assert two["devices"] == 2 and two["mesh"] == {"data": 1, "fsdp": 2}
    for key in ("params", "optimizer_state"):  # the tiny model's few unsplittable leaves stay whole
        assert 0.5 <= two["bytes_per_device"][key] / one[key] < 0.56


def test_plan_json_and_train_plan_report_the_same_step(tmp_path, capsys):
    assert cli.main(["plan", *TINY, "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    run_dir = tmp_path / "run"
    train = ["train", "--data", str(tmp_path / "data"), "--out", str(run_dir), "--init", "random"]
    assert cli.main([*train, *TINY, "--plan", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes_per_device"] == planned["bytes_per_device"]
    assert not run_dir.exists()  # it planned, and trained nothing
    assert planned["compiled_for"] == jax.default_backend() and planned["flops_per_step"] > 0


def test_an_unknown_accelerator_is_refused_naming_the_known_ones(capsys):
    assert cli.main(["plan", *TINY, "--accelerator", "V100"]) == 1
    err = capsys.readouterr().err
    assert "unknown accelerator 'V100'" in err and "H100, H200, A100, L4, RTX 4090, TPU v5e" in err


def test_accelerators_are_found_by_their_names_and_device_kinds():
    assert plan.accelerator("rtx4090").name == "RTX 4090" and plan.accelerator("tpu-v5e").name == "TPU v5e"
    assert plan.accelerator_of("NVIDIA H100 80GB HBM3").name == "H100"
    assert plan.accelerator_of("NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert plan.accelerator_of("NVIDIA L40S") is None and plan.accelerator_of("cpu") is None


def test_memory_sizes_read_as_cards_are_sold():
    assert plan.parse_memory("24GB") == plan.parse_memory("24 GiB") == 24 * 2**30
    assert plan.parse_memory("512MB") == 512 * 2**20 and plan.parse_memory("1.5T") == int(1.5 * 2**40)
    with pytest.raises(ValueError, match="--device-memory '24 parsecs': expected a size such as 24GB"):
        plan.parse_memory("24 parsecs")


def test_a_budget_no_batch_fits_names_what_to_change(capsys):
    assert cli.main(["plan", *TINY, "--no-remat", "--device-memory", "4MB"]) == 1
    err = capsys.readouterr().err
    assert "nothing fits --device-memory 4MB less the 10% margin" in err
    for change in ("--base-dtype nf4", "--remat", "--mesh-fsdp N"):
        assert change in err


def test_a_checkpoint_of_another_preset_is_refused_before_anything_compiles(tmp_path, capsys):
    config = preset("tiny-pg2")
    params = model.init_params(config, jax.random.key(0))
    npz = checkpoints.export_big_vision(tmp_path / "pg2.npz", params)
    hf = checkpoints.export_hf(tmp_path / "hf", params, config)
    for path in (npz, hf):
        assert cli.main(["plan", "--checkpoint", str(path), "--preset", "tiny", "--batch-size", "2"]) == 1
        err = capsys.readouterr().err
        assert f"{path} is a PaliGemma 2 checkpoint" in err
        assert "it differs from preset tiny in: generation 2 (preset: 1), depth 4 (preset: 3)" in err
        assert "use --preset tiny-pg2" in err
    assert cli.main(["plan", "--checkpoint", str(npz), "--preset", "tiny-pg2", "--batch-size", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(npz)
