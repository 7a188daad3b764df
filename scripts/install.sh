#!/usr/bin/env bash
# Set up ./.venv with the engine and its dependencies (CPU build of torch), idempotently.
#   scripts/install.sh          the engine (CPU)
#   scripts/install.sh --dev    the engine and the test tools, and, as root on Debian/Ubuntu (apt-get),
#                               the system packages the tests need when they are missing
#   scripts/install.sh --list-system-packages   print those Debian packages, one a line, and exit
#   scripts/install.sh [--dev] --cluster   also Ray Serve (extra "cluster", `avatar serve --ray`); --dev includes it
#                               (it resolves with the engine's pins; ~80 MB download; its test takes ~25 s)
#   scripts/install.sh [--dev] --adapters       also pipecat-ai and livekit-agents (clients/pipecat, clients/livekit and
#                               their tests), as a second pip step: they need protobuf>=5, which mediapipe 0.10.21's
#                               metadata forbids (pip warns; the face tracker gives the same landmarks with it), so pip
#                               cannot resolve them with the engine; a later run without --adapters takes protobuf back to 4
# GPU machines: see README ("Installing on a GPU machine").
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian/Ubuntu packages the test suite needs. Without one of them the tests that need it skip or
# check the clear error instead, so a machine without root still passes; with --dev as root they
# are installed, so a fresh machine runs every test.
#   libportaudio2  the PortAudio library behind sounddevice (MicrophoneSource, SpeakerSink)
#   libgl1 libglib2.0-0  loaded by OpenCV (opencv-contrib-python) and MediaPipe at import
#   chromium       tests/test_web_client.py drives a headless Chromium
#   coturn         turnserver: the TURN relay of tests/test_turn_relay.py and `avatar bench audio` (on 127.0.0.1 only)
dev_system_packages="libportaudio2 libgl1 libglib2.0-0 chromium coturn"
if [ "${1:-}" = "--list-system-packages" ]; then
  printf '%s\n' $dev_system_packages
  exit 0
fi

extras="cpu"
[ "${1:-}" = "--dev" ] && extras="cpu,dev,cluster"
case " $* " in *" --cluster "*) extras="${extras%,cluster},cluster" ;; esac
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# torch==2.13.0 is named explicitly so that pip takes the CPU build (a bare `torch` would
# fetch a multi-GB CUDA build).
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[${extras}]"
case " $* " in
  *" --adapters "*)  # ~450 MB, ~35 s (pipecat-ai's numba/llvmlite are most of it)
    echo "installing the voice-agent frameworks (pipecat-ai, livekit-agents); pip warns that mediapipe wants protobuf<5"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "pipecat-ai>=1.14,<2" "livekit-agents>=1.8,<2"
    ;;
esac
installed() {  # a Debian package (or Ubuntu 24.04's t64 rename of it) is installed
  { dpkg-query -W -f='${Status}' "$1" "$1t64" 2>/dev/null || true; } | grep -q "install ok installed"
}
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1
}
if [ "${1:-}" = "--dev" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && command -v dpkg-query >/dev/null; then
  missing=""
  for pkg in $dev_system_packages; do
    if [ "$pkg" = chromium ] && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
      continue  # a Chromium from elsewhere (a snap, a download) serves the browser test as well
    fi
    installed "$pkg" || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    echo "installing the system packages the tests need (apt-get):$missing"
    # shellcheck disable=SC2086  # one word per package
    if ! apt_install $missing; then
      apt-get update -qq >/dev/null 2>&1 || true
      for pkg in $missing; do  # one at a time, so that one unknown name does not stop the others
        apt_install "$pkg" || apt_install "${pkg}t64" \
          || echo "could not install $pkg: the tests that need it will skip or check the error without it" >&2
      done
    fi
    case " $missing " in
      *" coturn "*)  # only its binary is wanted (the tests start their own on 127.0.0.1): not a system-wide TURN service
        if command -v systemctl >/dev/null; then systemctl disable --now coturn >/dev/null 2>&1 || true; fi ;;
    esac
  fi
elif [ "${1:-}" = "--dev" ]; then
  echo "not root on Debian/Ubuntu (apt-get): for the full test suite install these system packages yourself:" \
    $dev_system_packages >&2
fi
