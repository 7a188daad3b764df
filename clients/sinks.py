"""Where live frames and audio go: a preview window, a virtual camera, a speaker (or any output
device, e.g. a virtual microphone). Each is checked when it is made, and a missing device is an
``OutputDeviceUnavailable`` error that says what to install or load."""
from __future__ import annotations

import os
import sys

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
    """The pipeline's re-emitted audio (OutputFrame.playback: 48 kHz mono, the input's full band) on an output device: the default one, or a named
    one, such as a virtual microphone (a PulseAudio/PipeWire null sink, whose monitor a call app
    takes as its microphone) so that a call hears the voice in sync with the lips."""

    def __init__(self, device: str | int | None = None):
        try:
            import sounddevice as sd

            self.stream = sd.OutputStream(samplerate=48000, channels=1, dtype="float32", blocksize=0, device=device)
            self.stream.start()
        except Exception as e:  # OSError (no PortAudio) or sounddevice.PortAudioError
            raise OutputDeviceUnavailable(f"no audio output device: {e}") from None

    def send(self, audio: np.ndarray) -> None:
        self.stream.write(audio.reshape(-1, 1))

    def close(self) -> None:
        self.stream.stop()
        self.stream.close()
