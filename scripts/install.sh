#!/usr/bin/env bash
# Set up ./.venv with the engine and its dependencies (CPU build of torch), idempotently.
#   scripts/install.sh          the engine (CPU)
#   scripts/install.sh --dev    the engine and the test tools (and, as root on Debian/Ubuntu, Chromium
#                               for the web client's browser test when it is missing)
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
if [ "${1:-}" = "--dev" ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # tests/test_web_client.py drives a headless Chromium; without one it skips, saying why.
  echo "installing Debian's chromium for the browser test (apt-get)..."
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
      || echo "could not install chromium: the browser test will skip" >&2
  fi
fi
