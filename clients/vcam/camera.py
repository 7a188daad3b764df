"""``avatar vcam``: the talking portrait as a camera that video calls (Zoom, Meet, Teams, OBS) can pick.

The microphone (or ``--audio FILE``, spoken in real time) drives the live pipeline; every frame
goes to a virtual camera (pyvirtualcam: v4l2loopback on Linux, OBS's virtual camera on macOS and
Windows) at the bundle's frame rate, fitted into the camera's size (``--size 1280x720``: call
apps crop to 16:9, so the portrait is centred on a blurred, darkened copy of itself rather than
cropped). The camera never freezes: silence gives idle frames (blinks, head sway) until Ctrl-C.

Audio: a call takes your microphone directly and hears you one pipeline latency before it sees
the lips move (``avatar bench pipeline``: p50 ~120 ms here). ``--speaker DEVICE`` plays the
pipeline's re-emitted audio, in step with the frames, on an output device; make that device a
virtual microphone (Linux: ``pactl load-module module-null-sink sink_name=avatar``, then pick
"Monitor of avatar" as the call's microphone) and the call hears the voice in sync with the lips.

With no virtual camera device, ``VirtualCameraSink`` raises ``OutputDeviceUnavailable`` before
anything else starts, saying what to load.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import cv2
import numpy as np

from clients.sinks import SpeakerSink, VirtualCameraSink


class FrameSink(Protocol):
    def send(self, rgb: np.ndarray) -> bool: ...  # False: the user closed it
    def close(self) -> None: ...


def parse_size(text: str) -> tuple[int, int]:
    """``"1280x720"`` -> (1280, 720); ValueError with the expected form otherwise."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size takes WIDTHxHEIGHT, e.g. 1280x720; got {text!r}") from None
    if not (16 <= w <= 7680 and 16 <= h <= 4320) or w % 2 or h % 2:
        raise ValueError(f"--size must be even numbers from 16x16 to 7680x4320, got {text!r}")
    return w, h


class Framer:
    """Fits portrait-sized frames into a camera of ``size``: scaled to fit, centred on a background
    made once from the portrait (scaled to cover, blurred, darkened). Only the fitted rectangle
    changes per frame, so a frame costs one resize and one copy."""

    def __init__(self, portrait: np.ndarray, size: tuple[int, int] | None):
        h, w = portrait.shape[:2]
        self.out_w, self.out_h = size or (w, h)
        self.identity = (self.out_w, self.out_h) == (w, h)
        scale = min(self.out_w / w, self.out_h / h)
        self.fit_w, self.fit_h = max(2, round(w * scale)), max(2, round(h * scale))
        self.x0, self.y0 = (self.out_w - self.fit_w) // 2, (self.out_h - self.fit_h) // 2
        cover = max(self.out_w / w, self.out_h / h)
        bg = cv2.resize(portrait, (max(self.out_w, round(w * cover)), max(self.out_h, round(h * cover))), interpolation=cv2.INTER_AREA)
        by, bx = (bg.shape[0] - self.out_h) // 2, (bg.shape[1] - self.out_w) // 2
        bg = bg[by : by + self.out_h, bx : bx + self.out_w]
        sigma = max(self.out_w, self.out_h) / 40
        self.background = (cv2.GaussianBlur(bg, (0, 0), sigma) * 0.45).astype(np.uint8)
        self._canvas = self.background.copy()

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if self.identity:
            return frame
        fitted = cv2.resize(frame, (self.fit_w, self.fit_h), interpolation=cv2.INTER_AREA if self.fit_w < frame.shape[1] else cv2.INTER_LINEAR)
        self._canvas[self.y0 : self.y0 + self.fit_h, self.x0 : self.x0 + self.fit_w] = fitted
        return self._canvas


@dataclass
class VcamReport:
    frames: int  # frames sent to the camera
    seconds: float  # wall time from the first frame to the last
    size: tuple[int, int]  # (width, height) sent
    metrics: dict  # the pipeline's metrics snapshot

    @property
    def fps(self) -> float:
        return (self.frames - 1) / self.seconds if self.frames > 1 and self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"frames": self.frames, "seconds": round(self.seconds, 3), "fps": round(self.fps, 2), "size": list(self.size),
                "pipeline_fps": self.metrics.get("fps"), "counters": self.metrics.get("counters", {})}


async def speak(wave: np.ndarray, source, *, rate: int = 48000, chunk_s: float = 0.02) -> None:
    """Push audio into a PushSource in real time, as a microphone would (absolute deadlines, no
    drift), then end its segment."""
    step = round(chunk_s * rate)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for k, i in enumerate(range(0, wave.size, step)):
        delay = t0 + k * chunk_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        source.push_audio(wave[i : i + step], rate)
    source.end_of_segment()


def run_vcam(portrait: str | Path, *, audio: str | Path | None = None, device: str | None = None, size: tuple[int, int] | None = None,
             speaker: str | int | bool | None = None, mic_device: str | None = None, bundle: str | None = None, backend: str = "auto",
             threads: int | None = None, steps: int | None = None, seconds: float | None = None,
             sink: Callable[[int, int, int], FrameSink] | None = None) -> VcamReport:
    """Run until Ctrl-C, the sink closes, or ``seconds`` pass. ``sink(width, height, fps)`` makes
    where frames go (default: the virtual camera ``device``; ``avatar live`` passes a preview window).

    The portrait and the audio file are read first, then the models load, then every device opens
    before the avatar is prepared: a bad file or a missing device is an error before anything runs."""
    from engine.avatar import load_portrait, prepare_avatar
    from engine.pipeline.pipeline import Pipeline, PipelineConfig
    from engine.pipeline.sources import MicrophoneSource, PushSource
    from engine.runtime import load_runtime

    image = load_portrait(portrait)
    wave = None
    if audio is not None:  # decoded first: an unreadable file is a clear error before any device opens
        from engine.audio import decode_audio

        wave = decode_audio(audio, sample_rate_hz=48000)  # full band: the speaker plays it (the pipeline makes its 16 kHz copy)
    framer = Framer(image, size)
    rt = load_runtime(bundle, backend, threads=threads)
    make = sink or (lambda w, h, fps: VirtualCameraSink(w, h, fps, device))
    cam = make(framer.out_w, framer.out_h, rt.bundle.fps)
    spk = None
    try:
        if speaker not in (None, False):
            spk = SpeakerSink(None if speaker is True else speaker)
        source = PushSource() if audio is not None else MicrophoneSource(mic_device)
        avatar = prepare_avatar(image, rt, crop_size_px=rt.bundle.crop_size_px)

        got = {"n": 0, "first": None, "last": None, "metrics": None}  # kept outside main(): Ctrl-C still reports

        def report() -> VcamReport:
            n, t0, t1 = got["n"], got["first"], got["last"]
            metrics = got["metrics"].snapshot() if got["metrics"] is not None else {}
            return VcamReport(n, (t1 - t0) if n else 0.0, (framer.out_w, framer.out_h), metrics)

        async def main() -> VcamReport:
            feeder = None
            async with Pipeline(rt, avatar, PipelineConfig(realtime=True, steps=steps)) as p:
                got["metrics"] = p.metrics
                p.start(source)
                if wave is not None:
                    feeder = asyncio.create_task(speak(wave, source), name="vcam-speak")
                what = f"{Path(audio).name} (then idle)" if audio is not None else "the microphone"
                print(f"{what} -> {getattr(cam, 'name', 'sink')} {framer.out_w}x{framer.out_h} at {rt.bundle.fps} fps on "
                      f"{rt.backend}; Ctrl-C to stop", flush=True)
                t_end = None if seconds is None else time.monotonic() + seconds
                try:
                    async for f in p.frames():
                        if spk is not None:
                            spk.send(f.playback)
                        if not cam.send(framer(f.image)):
                            break
                        got["last"] = time.monotonic()
                        got["first"] = got["first"] or got["last"]
                        got["n"] += 1
                        if t_end is not None and got["last"] >= t_end:
                            break
                        if feeder is not None and feeder.done() and feeder.exception() is not None:
                            raise feeder.exception()  # the file could not be pushed: say so, do not idle on silently
                finally:
                    if feeder is not None:
                        feeder.cancel()
                        await asyncio.gather(feeder, return_exceptions=True)
            return report()

        try:
            return asyncio.run(main())
        except KeyboardInterrupt:
            return report()
    finally:
        cam.close()
        if spk is not None:
            spk.close()
