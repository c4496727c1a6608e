"""Fine-tuning across processes: 8 simulated CPU devices (data x FSDP) and two processes joined by
jax.distributed give the losses of one device, and a training process killed mid-run resumes to exactly
the losses of an uninterrupted run (with other --workers; its data workers die with it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_dataset, read_losses, run_processes, tiny_config

from paliseg.cli.main import main
from train import commands as train_commands

REPO = Path(__file__).resolve().parents[1]

_SHARDED_RUN = """
import sys
sys.path.insert(0, {tests!r})
import jax
assert len(jax.devices()) == 8, jax.devices()
from helpers import tiny_config
from train import commands as train_commands
config = tiny_config({data!r}, {out!r}, steps=3, save_every=2, batch_size=8, mesh_fsdp=4)
train_commands.run(config, stop_after=2)
train_commands.run(config, resume=True)  # restores the sharded checkpoint of step 2
"""


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@pytest.mark.slow
def test_eight_device_data_fsdp_run_matches_one_device(tmp_path):
    data = make_dataset(tmp_path / "data")
    single = train_commands.run(tiny_config(data, tmp_path / "single", steps=3, save_every=2, batch_size=8))
    script = _SHARDED_RUN.format(tests=str(REPO / "tests"), data=str(data), out=str(tmp_path / "sharded"))
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = read_losses(tmp_path / "sharded")
    assert sorted(sharded) == [1, 2, 3]
    for step, loss in enumerate(single["losses"], start=1):
        assert sharded[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_losses(tmp_path):
    data = make_dataset(tmp_path / "data")
    args = [
        "--data",
        str(data),
        "--init",
        "random",
        "--preset",
        "tiny",
        "--seq-len",
        "48",
        "--steps",
        "40",
        "--batch-size",
        "4",
        "--save-every",
        "2",
        "--lr",
        "3e-3",
    ]
    assert main(["train", *args, "--workers", "0", "--out", str(tmp_path / "whole")]) == 0

    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "paliseg.cli.main", "train", *args, "--workers", "2", "--out", str(run_dir)]
    process = subprocess.Popen(
        command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "4").is_dir():  # orbax renames a checkpoint in when complete
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint at step 4 after 300 s"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    deadline = time.monotonic() + 30
    while _live_processes(session=process.pid):  # its data workers (and their resource tracker) exit with it
        assert time.monotonic() < deadline, f"processes of the killed run still alive: {_live_processes(process.pid)}"
        time.sleep(0.1)
    assert main(["train", "--out", str(run_dir), "--resume", "--workers", "1"]) == 0
    assert read_losses(run_dir) == read_losses(tmp_path / "whole")


def _live_processes(session: int) -> list[int]:
    """The processes of a session that have not exited (zombies, exited but not yet reaped, do not count)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, _, sid = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except OSError:  # exited meanwhile
            continue
        if int(sid) == session and state != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """Multi-host as on a pod: two processes (2 CPU devices each) joined by jax.distributed, each loading its
    half of every batch, writing one sharded checkpoint together."""
    data = make_dataset(tmp_path / "data")
    single = train_commands.run(tiny_config(data, tmp_path / "single", steps=2, save_every=2))
    args = ["--data", str(data), "--init", "random", "--preset", "tiny", "--seq-len", "48", "--steps", "2",
            "--batch-size", "4", "--save-every", "2", "--lr", "3e-3", "--workers", "2"]  # fmt: skip
    run_processes(["train", *args, "--out", str(tmp_path / "multi")], tmp_path / "logs")
    multi = read_losses(tmp_path / "multi")
    assert sorted(multi) == [1, 2]
    for step, loss in enumerate(single["losses"], start=1):
        assert multi[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert (tmp_path / "multi" / "checkpoints" / "2" / "state").is_dir()


@pytest.mark.slow
def test_two_processes_fine_tune_lora_on_a_loaded_base(tmp_path):
    """The usual pod run: LoRA on a base loaded from a checkpoint (here a run's), placed on a mesh that spans
    both processes (FSDP 4): the losses of one process. The processes keep no persistent compilation cache
    on CPUs (`train.sharding.join_processes`: with one, process 0 alone loaded its cached train step, and
    the two compilations waited in different collectives forever)."""
    data = make_dataset(tmp_path / "data")
    train_commands.run(tiny_config(data, tmp_path / "base", steps=2, save_every=2))
    args = ["--data", str(data), "--init-run", str(tmp_path / "base"), "--init-step", "2", "--trainable", "lora",
            "--steps", "2", "--batch-size", "4", "--save-every", "2", "--lr", "3e-3", "--workers", "2"]  # fmt: skip
    assert main(["train", *args, "--out", str(tmp_path / "single")]) == 0
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    run_processes(["train", *args, "--mesh-fsdp", "4", "--out", str(tmp_path / "multi")], tmp_path / "logs", env=cache)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    single, multi = read_losses(tmp_path / "single"), read_losses(tmp_path / "multi")
    assert sorted(multi) == sorted(single) == [1, 2]
    for step, loss in single.items():
        assert multi[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)
