#!/usr/bin/env bash
# Set up (first time) and run the test suite, including the slow tests of the real default model.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # no OpenMP busy-waiting on shared cores
. "${QAT_VENV:-.venv}/bin/activate"
exec python -m pytest -q "$@"
