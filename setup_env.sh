#!/usr/bin/env bash
# Create .venv with every dependency pinned (requirements.lock) and install paliseg into it, so that
# `.venv/bin/paliseg` works. Idempotent: on a ready machine it checks a stamp and returns in seconds.
#
#   bash setup_env.sh                        # CPU, or CUDA if nvidia-smi finds a GPU
#   bash setup_env.sh --accelerator cuda13   # cpu | cuda12 | cuda13 | tpu
#   bash setup_env.sh --relock               # re-resolve requirements.in and rewrite requirements.lock
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

accelerator=auto
relock=0
while [ $# -gt 0 ]; do
  case "$1" in
    --accelerator) accelerator="${2:?--accelerator needs cpu|cuda12|cuda13|tpu}"; shift 2 ;;
    --accelerator=*) accelerator="${1#*=}"; shift ;;
    --relock) relock=1; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "setup_env.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$accelerator" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    driver_cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p' | head -n1)
    if [ "${driver_cuda:-12}" -ge 13 ]; then accelerator=cuda13; else accelerator=cuda12; fi
  else
    accelerator=cpu
  fi
fi
case "$accelerator" in cpu|cuda12|cuda13|tpu) ;; *) echo "setup_env.sh: unknown accelerator '$accelerator'" >&2; exit 2 ;; esac

python="${PYTHON:-python3}"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "setup_env.sh: Python >= 3.11 is needed ($python is $("$python" --version 2>&1))" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)

stamp=.venv/.paliseg-setup
want="$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16) $accelerator"
if [ "$relock" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup_env.sh: .venv is ready ($accelerator)"
  exit 0
fi

if [ "$relock" = 1 ]; then
  "${pip[@]}" install -r requirements.in
  # --all keeps setuptools/wheel pinned (the editable install builds with them); pip itself is not pinned.
  "${pip[@]}" freeze --all --exclude-editable | grep -v -e '^-e ' -e '^pip==' > requirements.lock.tmp
  mv requirements.lock.tmp requirements.lock
  want="$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16) $accelerator"
else
  "${pip[@]}" install -r requirements.lock
fi

jax_version=$(sed -n 's/^jax==//p' requirements.lock)
case "$accelerator" in
  cuda12|cuda13) "${pip[@]}" install "jax[$accelerator]==$jax_version" ;;
  tpu) "${pip[@]}" install "jax[tpu]==$jax_version" ;;
  cpu)
    # torch on CPU never uses triton, and with triton present `import tensorflow` followed by
    # `import torchvision` segfaults; removing it makes every import order work.
    "${pip[@]}" uninstall -y -q triton 2>/dev/null || true ;;
esac

"${pip[@]}" install --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "setup_env.sh: .venv is ready ($accelerator); run .venv/bin/paliseg --help"
