"""benchmarks/gpu_check.sh --smoke: the GPU check's code on tiny shapes on a CPU, through the script itself
(the machine's python3 there; here the venv's, as PYTHON)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_part_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True and set(report["parts"]) == {"train", "decode", "nf4"}
    for name, part in report["parts"].items():
        assert "error" not in part, (name, part)
        assert part["planned_peak"] > 0 and part["measured_peak"] > 0 and part["speed"] > 0
        assert part["planned_peak"] == part["plan"]["bytes_per_device"]["peak"]
    assert report["parts"]["nf4"]["plan"]["base_dtype"] == "nf4"
    assert report["parts"]["decode"]["plan"]["task"] == "predict" and report["parts"]["decode"]["unit"] == "images/s"
    for name in ("train", "nf4"):  # the plan made on a CPU, beside the one made on the device
        assert report["parts"][name]["cpu_plan_peak"] > 0
    assert "| train | cpu |" in done.stdout
