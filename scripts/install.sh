#!/usr/bin/env bash
# Set up ./.venv with the engine and its dependencies (CPU build of torch), idempotently.
#   scripts/install.sh          the engine (CPU)
#   scripts/install.sh --dev    the engine and the test tools
# GPU machines: see README ("Installing on a GPU machine").
set -euo pipefail
cd "$(dirname "$0")/.."
extras="cpu"
[ "${1:-}" = "--dev" ] && extras="cpu,dev"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# torch==2.13.0 is named explicitly so that pip takes the CPU build (a bare `torch` would
# fetch a multi-GB CUDA build).
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[${extras}]"
