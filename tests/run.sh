#!/usr/bin/env bash
# Set up .venv (idempotent), lint, and run the whole test suite on every core. README's test command.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash setup_env.sh
# Lint and format first: a failure here names the file and line, before minutes of tests.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
set +e
.venv/bin/python -m pytest -n auto --dist loadfile "$@"
status=$?
set -e
# pytest exits 5 when it collected no test: that is a failure of the suite, not a pass.
[ "$status" = 5 ] && echo "tests/run.sh: no tests were collected" >&2
exit "$status"
