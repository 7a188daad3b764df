"""Video decoding with PyAV: frames with their true presentation times (any frame rate)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from engine.errors import NoVideoStreamError, UnreadableMediaError


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream."""

    path: str
    width: int
    height: int
    nominal_fps: float  # the stream's average rate; frame times come from pts, not from this
    duration_s: float | None
    has_audio: bool


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Open a container and describe its video stream; raises on unreadable or video-less files."""
    p = Path(path)
    if not p.is_file():
        raise UnreadableMediaError(f"{p}: no such file")
    try:
        with av.open(str(p)) as c:
            if not c.streams.video:
                raise NoVideoStreamError(f"{p}: the file has no video stream")
            vs = c.streams.video[0]
            rate = vs.average_rate or vs.guessed_rate or 0
            dur = float(vs.duration * vs.time_base) if vs.duration else (c.duration / av.time_base if c.duration else None)
            return VideoInfo(str(p), vs.codec_context.width, vs.codec_context.height, float(rate), dur, bool(c.streams.audio))
    except av.FFmpegError as e:
        raise UnreadableMediaError(f"{p}: not a readable media file ({e})") from e


def iter_frames(path: str | os.PathLike) -> Iterator[tuple[float, np.ndarray]]:
    """(time_s, RGB uint8 (H, W, 3)) for every frame; time_s is pts relative to the first frame.

    A decode error part-way (a truncated or corrupt file) raises UnreadableMediaError naming
    the frame where it happened: a caller never gets a silently shortened clip.
    """
    p = Path(path)
    n = 0
    t0: float | None = None
    t_last = 0.0
    declared_s: float | None = None
    frame_s = 0.04
    try:
        with av.open(str(p)) as c:
            if not c.streams.video:
                raise NoVideoStreamError(f"{p}: the file has no video stream")
            vs = c.streams.video[0]
            vs.thread_type = "AUTO"
            if vs.duration:
                declared_s = float(vs.duration * vs.time_base)
            elif c.duration:
                declared_s = c.duration / av.time_base
            frame_s = 1.0 / float(vs.average_rate or 25)
            for frame in c.decode(vs):
                t = frame.time if frame.time is not None else n / float(vs.average_rate or 25)
                if t0 is None:
                    t0 = t
                t_last = t - t0
                yield t_last, frame.to_ndarray(format="rgb24")
                n += 1
    except av.FFmpegError as e:
        raise UnreadableMediaError(f"{p}: decoding failed after {n} frames ({e}); the file is truncated or corrupt") from e
    if n == 0:
        raise UnreadableMediaError(f"{p}: the video stream holds no decodable frame")
    if declared_s and t_last + frame_s < 0.9 * declared_s:
        raise UnreadableMediaError(
            f"{p}: frames end at {t_last + frame_s:.2f} s but the container declares {declared_s:.2f} s; "
            "the file is truncated"
        )
