"""scripts/install.sh: `--dev` installs (as root, with apt-get) the system packages the tests need.

A fresh machine without libportaudio2 once failed the README's test command; the script's list is
the one place that names these packages, and `--list-system-packages` prints it without
installing anything.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash on this machine")


def test_install_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_dev_install_lists_every_system_package_the_tests_need() -> None:
    out = subprocess.run(
        ["bash", str(SCRIPT), "--list-system-packages"], capture_output=True, text=True, timeout=30, check=True
    )
    packages = out.stdout.split()
    # libportaudio2: sounddevice (the microphone source's tests); chromium: the web client's test;
    # libgl1 / libglib2.0-0: OpenCV and MediaPipe load them at import.
    for name in ("libportaudio2", "chromium", "libgl1", "libglib2.0-0"):
        assert name in packages
    assert out.stderr == ""
