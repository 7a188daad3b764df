"""Write RGB frames and mono audio to an mp4 (H.264 + AAC), interleaved as it goes."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np


class Mp4Writer:
    """``with Mp4Writer(path, fps, size, audio, audio_rate) as w: w.write(frame) ...``

    The audio track is given up front, whole (an array) or as an iterable of mono float32 blocks that
    is read as the video advances (``engine.audio.decode.AudioBlocks``: a long file is never held
    whole); it is encoded in step with the video so that the muxer never buffers much. Frames are
    (H, W, 3) uint8 RGB with even sides. The audio is cut or padded with silence to the video's
    duration on close.
    """

    def __init__(self, path: str | Path, *, fps: int, width: int, height: int, audio: np.ndarray | Iterable[np.ndarray] | None,
                 audio_rate_hz: int = 48000, crf: int = 18, metadata: dict[str, str] | None = None):
        """``metadata``: container tags (e.g. engine.provenance.metadata.container_tags: comment, description)."""
        if width % 2 or height % 2:
            raise ValueError(f"frame size must be even for H.264 yuv420p, got {width}x{height}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = fps
        self.c = av.open(str(self.path), "w")
        for k, v in (metadata or {}).items():
            self.c.metadata[k] = v
        # veryfast with its cheapest motion search (diamond, subpixel refinement 1): 21 against 32 ms of CPU per
        # 1280 px frame of a render, at the same bitrate within 1 % (docs/benchmarks/mouth/frame_parts.json)
        self.vs = self.c.add_stream("libx264", rate=Fraction(fps), options={"preset": "veryfast", "crf": str(crf),
                                                                            "x264-params": "me=dia:subme=1"})
        self.vs.width, self.vs.height, self.vs.pix_fmt = width, height, "yuv420p"
        self.has_audio = audio is not None  # the file has an audio track
        self._blocks: Iterator[np.ndarray] = iter([np.asarray(audio, np.float32).reshape(-1)] if isinstance(audio, np.ndarray) else audio or ())
        self._buf = np.zeros(0, np.float32)  # samples read from the blocks and not yet encoded
        self._limit: int | None = None  # on close: samples beyond the video's duration are silence
        self.rate = audio_rate_hz
        if self.has_audio:
            self.as_ = self.c.add_stream("aac", rate=audio_rate_hz)
            self.as_.layout = "mono"
        self.frames = 0
        self.audio_pos = 0

    def _take(self, n: int) -> np.ndarray:
        """The next ``n`` samples of the track (silence past its end, or past the video's end on close)."""
        while self._buf.size < n:
            block = next(self._blocks, None)
            if block is None:
                break
            block = np.asarray(block, np.float32).reshape(-1)
            self._buf = block if not self._buf.size else np.concatenate([self._buf, block])
        chunk, self._buf = self._buf[:n], self._buf[n:]
        if self._limit is not None:
            chunk = chunk[: max(0, self._limit - self.audio_pos)]
        return np.pad(chunk, (0, n - chunk.size)) if chunk.size < n else chunk

    def _encode_audio(self, upto: int) -> None:
        n = self.as_.codec_context.frame_size or 1024
        while self.audio_pos + n <= upto:
            chunk = np.ascontiguousarray(self._take(n))
            fr = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
            fr.sample_rate = self.rate
            fr.pts = self.audio_pos
            for pkt in self.as_.encode(fr):
                self.c.mux(pkt)
            self.audio_pos += n

    def write(self, rgb: np.ndarray) -> None:
        # RGB -> I420 by OpenCV: BT.601 limited range, as swscale's default, but 0.65 against 5.6 ms of CPU for a
        # 1280 px frame (docs/benchmarks/mouth/frame_parts.json)
        fr = av.VideoFrame.from_ndarray(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2YUV_I420), format="yuv420p")
        fr.pts = self.frames
        fr.time_base = Fraction(1, self.fps)
        for pkt in self.vs.encode(fr):
            self.c.mux(pkt)
        self.frames += 1
        if self.has_audio:
            self._encode_audio(int(self.frames * self.rate / self.fps))

    def close(self) -> None:
        if self.c is None:
            return
        for pkt in self.vs.encode(None):
            self.c.mux(pkt)
        if self.has_audio:
            total = int(round(self.frames * self.rate / self.fps))
            self._limit = total  # the track is cut or padded to the video's duration
            n = self.as_.codec_context.frame_size or 1024
            self._encode_audio(((total + n - 1) // n) * n)
            for pkt in self.as_.encode(None):
                self.c.mux(pkt)
        self.c.close()
        self.c = None
        self._blocks, self._buf = iter(()), np.zeros(0, np.float32)  # a decoder still open closes its file when dropped

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
