"""``avatar live``: the microphone in, the talking portrait out to a preview window (``--vcam``: to
a virtual camera, which is ``avatar vcam``, ``clients/vcam``).

A thin front end over ``engine.pipeline``: a ``MicrophoneSource``, the pipeline in real time, and
one sink. Every device is checked before anything starts, and a missing one is a clear error:
no display for the preview window, no virtual camera device, no audio input device.
``--speaker`` plays the pipeline's re-emitted audio, in sync with the frames.
"""
from __future__ import annotations

from pathlib import Path

from clients.sinks import PreviewSink
from clients.vcam import run_vcam


def run_live(portrait: str | Path, *, bundle: str | None = None, vcam: bool = False, vcam_device: str | None = None,
             speaker: bool = False, mic_device: str | None = None, backend: str = "auto", threads: int | None = None,
             steps: int | None = None) -> dict:
    """Run until the window is closed or Ctrl-C; returns the pipeline's metrics snapshot."""
    report = run_vcam(portrait, device=vcam_device, speaker=speaker or None, mic_device=mic_device, bundle=bundle, backend=backend,
                      threads=threads, steps=steps, sink=None if vcam else PreviewSink)
    return report.metrics
