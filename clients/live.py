"""``avatar live``: the microphone in, the talking portrait out to a preview window or a virtual camera.

A thin front end over ``engine.pipeline``: a ``MicrophoneSource``, the pipeline in real time, and
one sink. Every device is checked before anything starts, and a missing one is a clear error:
no display for the preview window, no virtual camera device (pyvirtualcam: v4l2loopback on
Linux, OBS's virtual camera elsewhere), no audio input device.

Audio: a video call takes your microphone directly, so with ``--vcam`` the call hears you
about one pipeline latency (see ``avatar bench pipeline``) before it sees the lips move; most
call apps let you add an audio delay. ``--speaker`` plays the pipeline's re-emitted audio (in
sync with the frames) on the default output device, for a preview.
"""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import numpy as np

from engine.errors import AvatarInputError


class OutputDeviceUnavailable(AvatarInputError):
    """No display for a preview window, or no virtual camera."""


class PreviewSink:
    """An OpenCV window showing each frame as it comes."""

    name = "preview window"

    def __init__(self, width: int, height: int, fps: int):
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise OutputDeviceUnavailable("no display for a preview window (DISPLAY is not set); run it on a desktop, or use --vcam")
        import cv2

        self.cv2 = cv2
        try:
            cv2.namedWindow("avatar", cv2.WINDOW_NORMAL)
            cv2.resizeWindow("avatar", width, height)
        except cv2.error as e:
            raise OutputDeviceUnavailable(f"cannot open a preview window: {e}") from None

    def send(self, rgb: np.ndarray) -> bool:
        """Show a frame; False once the user closed the window or pressed q / Esc."""
        self.cv2.imshow("avatar", rgb[..., ::-1])
        key = self.cv2.waitKey(1) & 0xFF
        return key not in (ord("q"), 27) and self.cv2.getWindowProperty("avatar", self.cv2.WND_PROP_VISIBLE) >= 1

    def close(self) -> None:
        self.cv2.destroyAllWindows()


class VirtualCameraSink:
    """pyvirtualcam: a camera device that Zoom, Meet, Teams and OBS can pick."""

    name = "virtual camera"

    def __init__(self, width: int, height: int, fps: int, device: str | None = None):
        try:
            import pyvirtualcam
        except ImportError:
            raise OutputDeviceUnavailable("the virtual camera needs pyvirtualcam: pip install pyvirtualcam "
                                          "(and on Linux the v4l2loopback kernel module: modprobe v4l2loopback)") from None
        try:
            self.cam = pyvirtualcam.Camera(width=width, height=height, fps=fps, device=device)
        except Exception as e:  # pyvirtualcam raises RuntimeError / OSError per backend
            raise OutputDeviceUnavailable(f"no virtual camera device: {e} (Linux: modprobe v4l2loopback devices=1; "
                                          "macOS/Windows: install OBS and start its virtual camera once)") from None
        print(f"virtual camera: {self.cam.device}")

    def send(self, rgb: np.ndarray) -> bool:
        self.cam.send(np.ascontiguousarray(rgb))
        return True

    def close(self) -> None:
        self.cam.close()


class SpeakerSink:
    """The pipeline's re-emitted audio on the default output device (16 kHz mono)."""

    def __init__(self):
        try:
            import sounddevice as sd

            self.stream = sd.OutputStream(samplerate=16000, channels=1, dtype="float32", blocksize=0)
            self.stream.start()
        except Exception as e:  # OSError (no PortAudio) or sounddevice.PortAudioError
            raise OutputDeviceUnavailable(f"no audio output device: {e}") from None

    def send(self, audio: np.ndarray) -> None:
        self.stream.write(audio.reshape(-1, 1))

    def close(self) -> None:
        self.stream.stop()
        self.stream.close()


def run_live(portrait: str | Path, *, bundle: str | None = None, vcam: bool = False, vcam_device: str | None = None,
             speaker: bool = False, mic_device: str | None = None, backend: str = "auto", threads: int | None = None,
             steps: int | None = None) -> dict:
    """Run until the window is closed or Ctrl-C; returns the pipeline's metrics snapshot."""
    from engine.avatar import load_portrait, prepare_avatar
    from engine.pipeline.pipeline import Pipeline, PipelineConfig
    from engine.pipeline.sources import MicrophoneSource
    from engine.runtime import load_runtime

    image = load_portrait(portrait)
    h, w = image.shape[:2]
    rt = load_runtime(bundle, backend, threads=threads)
    sink = VirtualCameraSink(w, h, rt.bundle.fps, vcam_device) if vcam else PreviewSink(w, h, rt.bundle.fps)
    spk = SpeakerSink() if speaker else None
    try:
        mic = MicrophoneSource(mic_device)
        avatar = prepare_avatar(image, rt, crop_size_px=rt.bundle.crop_size_px)

        async def main() -> dict:
            async with Pipeline(rt, avatar, PipelineConfig(realtime=True, steps=steps)) as p:
                p.start(mic)
                print(f"live: microphone -> {sink.name} at {rt.bundle.fps} fps on {rt.backend}; Ctrl-C to stop")
                async for f in p.frames():
                    if spk is not None:
                        spk.send(f.audio)
                    if not sink.send(f.image):
                        break
                return p.metrics.snapshot()

        try:
            return asyncio.run(main())
        except KeyboardInterrupt:
            return {}
    finally:
        sink.close()
        if spk is not None:
            spk.close()
