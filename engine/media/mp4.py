"""Write RGB frames and mono audio to an mp4 (H.264 + AAC), interleaved as it goes."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


class Mp4Writer:
    """``with Mp4Writer(path, fps, size, audio, audio_rate) as w: w.write(frame) ...``

    The whole audio track is given up front (an offline render knows it); it is encoded in step
    with the video so that the muxer never buffers much. Frames are (H, W, 3) uint8 RGB with even
    sides. The audio is cut or padded with silence to the video's duration on close.
    """

    def __init__(self, path: str | Path, *, fps: int, width: int, height: int, audio: np.ndarray | None, audio_rate_hz: int = 48000, crf: int = 18,
                 metadata: dict[str, str] | None = None):
        """``metadata``: container tags (e.g. engine.provenance.metadata.container_tags: comment, description)."""
        if width % 2 or height % 2:
            raise ValueError(f"frame size must be even for H.264 yuv420p, got {width}x{height}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = fps
        self.c = av.open(str(self.path), "w")
        for k, v in (metadata or {}).items():
            self.c.metadata[k] = v
        self.vs = self.c.add_stream("libx264", rate=Fraction(fps), options={"preset": "veryfast", "crf": str(crf)})
        self.vs.width, self.vs.height, self.vs.pix_fmt = width, height, "yuv420p"
        self.audio = None if audio is None else np.asarray(audio, np.float32)
        self.rate = audio_rate_hz
        if self.audio is not None:
            self.as_ = self.c.add_stream("aac", rate=audio_rate_hz)
            self.as_.layout = "mono"
        self.frames = 0
        self.audio_pos = 0

    def _encode_audio(self, upto: int) -> None:
        n = self.as_.codec_context.frame_size or 1024
        while self.audio_pos + n <= upto:
            chunk = self.audio[self.audio_pos : self.audio_pos + n]
            if len(chunk) < n:
                chunk = np.pad(chunk, (0, n - len(chunk)))
            fr = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
            fr.sample_rate = self.rate
            fr.pts = self.audio_pos
            for pkt in self.as_.encode(fr):
                self.c.mux(pkt)
            self.audio_pos += n

    def write(self, rgb: np.ndarray) -> None:
        fr = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        fr.pts = self.frames
        fr.time_base = Fraction(1, self.fps)
        for pkt in self.vs.encode(fr):
            self.c.mux(pkt)
        self.frames += 1
        if self.audio is not None:
            self._encode_audio(int(self.frames * self.rate / self.fps))

    def close(self) -> None:
        if self.c is None:
            return
        for pkt in self.vs.encode(None):
            self.c.mux(pkt)
        if self.audio is not None:
            total = int(round(self.frames * self.rate / self.fps))
            if len(self.audio) < total:
                self.audio = np.pad(self.audio, (0, total - len(self.audio)))
            self.audio = self.audio[:total]
            n = self.as_.codec_context.frame_size or 1024
            self._encode_audio(((total + n - 1) // n) * n)
            for pkt in self.as_.encode(None):
                self.c.mux(pkt)
        self.c.close()
        self.c = None

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
