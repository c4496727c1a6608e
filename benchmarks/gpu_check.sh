#!/usr/bin/env bash
# The first thing to run on a machine with a GPU: the real PaliGemma 2 3B-224 shapes with random weights (LoRA
# step and greedy decode at batch 32, an NF4 10B LoRA step), each beside `paliseg plan`'s prediction; under
# 8 minutes on one H100 or H200. Writes runs/gpu_check.json (--out FILE) and prints a table (benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, with its own python3 (jax with CUDA, flax...)
#   bash benchmarks/gpu_check.sh --smoke     # the same code on tiny shapes, on a CPU (CI)
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --smoke
#
# No .venv: the machine's python3 (or $PYTHON) runs the checkout (PYTHONPATH=.). A package it lacks is
# installed from the wheels in .whl/ (ignored by git; put them there beforehand) into .whl/site.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"

# import name -> wheel name, for what the checked code imports
missing=$("$PYTHON" - <<'EOF'
import importlib.util

needed = {
    "jax": "jax", "flax": "flax", "optax": "optax", "orbax.checkpoint": "orbax-checkpoint", "numpy": "numpy",
    "ml_dtypes": "ml-dtypes", "sentencepiece": "sentencepiece", "PIL": "pillow", "tqdm": "tqdm",
    "safetensors": "safetensors", "scipy": "scipy",
}
found = lambda name: importlib.util.find_spec(name.split(".")[0]) is not None and importlib.util.find_spec(name)
print(" ".join(wheel for name, wheel in needed.items() if not found(name)))
EOF
)
if [ -n "$missing" ]; then
  if [ ! -d .whl ]; then
    echo "gpu_check.sh: $PYTHON lacks: $missing; put their wheels in .whl/ (pip download --only-binary :all: -d .whl $missing)" >&2
    exit 1
  fi
  echo "gpu_check.sh: installing $missing from .whl/ into .whl/site" >&2
  "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links .whl --target .whl/site $missing
  export PYTHONPATH=".whl/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/gpu_check.py "$@"
