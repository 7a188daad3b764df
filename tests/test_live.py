"""`avatar live` on a machine without devices: each missing device is a clear error, checked
before anything starts (here: no display, no microphone; the virtual camera: tests/test_vcam.py)."""
from __future__ import annotations

import pytest

from clients.sinks import OutputDeviceUnavailable, PreviewSink
from engine.cli import main


def test_preview_without_a_display_says_so(monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert main(["live"]) == 2
    assert "no display for a preview window" in capsys.readouterr().err


def test_microphone_missing_is_a_clear_error():
    from engine.pipeline.sources import AudioDeviceUnavailable, MicrophoneSource

    try:
        MicrophoneSource()
        pytest.skip("this machine has an audio input device")
    except AudioDeviceUnavailable as e:
        assert "no audio input device" in str(e)


def test_preview_sink_is_refused_without_display_before_opening_anything(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(OutputDeviceUnavailable):
        PreviewSink(64, 64, 25)
