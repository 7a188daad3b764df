"""Synthetic media for tests: write real mp4 files (H.264 + AAC) from arrays with PyAV."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np


def load_rgb(path: Path) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3)."""
    bgr = cv2.imread(str(path))
    assert bgr is not None, f"cannot read {path}"
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def write_clip(path: Path, frames: list[np.ndarray], fps: int | Fraction = 25, audio: np.ndarray | None = None, sr_hz: int = 16000) -> Path:
    """Write RGB frames (even sizes) and optional mono float audio to an mp4."""
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=Fraction(fps), options={"preset": "ultrafast", "crf": "18"})
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        as_ = c.add_stream("aac", rate=sr_hz) if audio is not None else None
        for f in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if as_ is not None:
            block = 1024
            for i in range(0, len(audio), block):
                chunk = audio[i : i + block].astype(np.float32)[None, :]
                fr = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
                fr.sample_rate, fr.pts = sr_hz, i
                for p in as_.encode(fr):
                    c.mux(p)
            for p in as_.encode():
                c.mux(p)
    return path


def speech_like(seconds: float, sr_hz: int = 16000, seed: int = 0) -> np.ndarray:
    """Amplitude-modulated noise bursts: enough signal for a mel, no claim to be speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr_hz)) / sr_hz
    env = 0.5 * (1 + np.sin(2 * np.pi * 3.0 * t))
    return (0.2 * env * rng.standard_normal(len(t))).astype(np.float32)


def portrait_video(rgb: np.ndarray, n: int, *, size: int = 320, drift_px: float = 0.5) -> list[np.ndarray]:
    """n frames of a still portrait resized to size x size, drifting slowly to the right."""
    base = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    out = []
    for i in range(n):
        m = np.float32([[1, 0, drift_px * i], [0, 1, 0]])
        out.append(cv2.warpAffine(base, m, (size, size), borderMode=cv2.BORDER_REPLICATE))
    return out
