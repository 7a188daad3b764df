"""Received WebRTC frames into an mp4 (H.264 + AAC) with PyAV, encoded in one worker thread.

Frames keep the timestamps they arrived with (video in 1/90000, audio in 1/48000, both counted
by aiortc's receiver from each stream's first packet), so the file shows what was received,
gaps included. Audio that comes before the first video frame waits for it: an mp4's streams
must all exist before its first packet is written.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import fractions
from pathlib import Path

import av


class Mp4Recorder:
    """``rec = Mp4Recorder(path); rec.video(frame); rec.audio(frame); await rec.close()``"""

    def __init__(self, path: str | Path, *, fps: int = 25):
        self.path = Path(path)
        self.fps = fps  # the nominal rate written in the file (the timestamps are the received ones)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mp4")
        self._error: BaseException | None = None  # the first failure of the worker
        self._container = av.open(str(self.path), mode="w")
        self._vs = None  # the video stream, made at the first video frame (its size)
        self._as = self._container.add_stream("aac", rate=48000)
        self._as.layout = "stereo"
        self._resampler = av.AudioResampler(format="fltp", layout="stereo", rate=48000, frame_size=1024)
        self._held: list[av.AudioFrame] = []  # audio before the first video frame
        self._last_vpts = -1
        self.video_frames = 0
        self.audio_frames = 0

    def video(self, frame: av.VideoFrame) -> None:
        self._submit(self._write_video, frame)

    def audio(self, frame: av.AudioFrame) -> None:
        self._submit(self._write_audio, frame)

    def _submit(self, fn, frame) -> None:
        if self._error is not None:
            raise RuntimeError(f"recording {self.path} failed: {self._error}") from self._error
        self._pool.submit(fn, frame).add_done_callback(self._done)

    def _done(self, fut: concurrent.futures.Future) -> None:
        if not fut.cancelled() and fut.exception() is not None and self._error is None:
            self._error = fut.exception()

    # -- the worker thread ---------------------------------------------------------------------

    def _write_video(self, frame: av.VideoFrame) -> None:
        if self._vs is None:
            vs = self._container.add_stream("libx264", rate=self.fps)
            vs.width, vs.height, vs.pix_fmt = frame.width, frame.height, "yuv420p"
            vs.codec_context.time_base = fractions.Fraction(1, 90000)
            vs.options = {"preset": "veryfast"}
            self._vs = vs
            for held in self._held:
                self._write_audio(held)
            self._held = []
        if frame.pts is None or frame.pts <= self._last_vpts:  # a repeated timestamp would stop the encoder
            return
        self._last_vpts = frame.pts
        f = frame.reformat(format="yuv420p")
        f.pts, f.time_base = frame.pts, fractions.Fraction(1, 90000)
        for packet in self._vs.encode(f):
            self._container.mux(packet)
        self.video_frames += 1

    def _write_audio(self, frame: av.AudioFrame) -> None:
        if self._vs is None:
            self._held.append(frame)
            return
        for f in self._resampler.resample(frame):
            for packet in self._as.encode(f):
                self._container.mux(packet)
        self.audio_frames += 1

    def _finish(self) -> None:
        if self._vs is None:  # no video came: write the audio alone
            for held in self._held:
                for f in self._resampler.resample(held):
                    for packet in self._as.encode(f):
                        self._container.mux(packet)
        else:
            for packet in self._vs.encode(None):
                self._container.mux(packet)
        for f in self._resampler.resample(None):
            for packet in self._as.encode(f):
                self._container.mux(packet)
        for packet in self._as.encode(None):
            self._container.mux(packet)
        self._container.close()

    async def close(self) -> None:
        """Flush the encoders and close the file (waits for the queued frames)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, self._finish)
        finally:
            self._pool.shutdown(wait=True)
        if self._error is not None:
            raise RuntimeError(f"recording {self.path} failed: {self._error}") from self._error
