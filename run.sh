#!/usr/bin/env bash
# Set up (first time) and run the default job: W4 g64 QAT of SmolLM2-135M on the embedded corpus.
# Any Hydra override can follow: bash run.sh recipe=w3g64 trainer.max_steps=100
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # no OpenMP busy-waiting on shared cores
. "${QAT_VENV:-.venv}/bin/activate"
exec python train.py budget=short "$@"  # the recipes carry their quality budgets; this is the ~10-min one
