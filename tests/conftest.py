"""Shared test set-up: a persistent JAX compilation cache (so re-runs skip XLA compiles), quiet TF,
and paths to the real Roboflow exports beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = Path(os.environ.get("PALISEG_TEST_CACHE", Path(__file__).resolve().parents[1] / ".cache" / "jax"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

REPO = Path(__file__).resolve().parents[1]
ROBOFLOW = REPO.parent / "shared" / "data" / "roboflow"


@pytest.fixture(scope="session")
def roboflow_dir() -> Path:
    """The real Roboflow COCO exports (cracks: polygons, drywall: boxes), CC BY 4.0. They are not in the
    repository but beside it (shared/), where CI has them: missing there is a failure; elsewhere (a clone
    without shared/) the tests that read them are skipped."""
    if not ROBOFLOW.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"real Roboflow data not found at {ROBOFLOW} (CI has shared/ beside the checkout)")
        pytest.skip(f"real Roboflow data not found at {ROBOFLOW}")
    return ROBOFLOW
