"""Head motion replayed from real people (issue 14), instead of a procedural sway.

``fit_library`` reads the prepared talking clips' per-frame alignment (the similarity from each
frame to the canonical crop, already smoothed over time by ``avatar prepare``) and keeps, per
segment, the in-plane head motion a still portrait can show: roll (degrees), shift (x, y, as a
fraction of the face's size) and scale (relative). Slow drifts (camera moves, a person leaning
away over many seconds) are removed by subtracting a 4 s moving average, so every trajectory
is zero-mean and the head never wanders off; outliers beyond 4 standard deviations are clipped.

``HeadMotion`` plays random segments of the library one after another with 1 s cross-fades,
at full amplitude while the avatar speaks and at ``idle_gain`` in silence (the gain follows the
speaking state with a 0.4 s time constant, so the head calms down and livens up smoothly).
Deterministic given the seed. Out-of-plane turns (yaw, pitch) need a 3-D model of the head and
are not replayed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CHANNELS = ("roll_deg", "dx_frac", "dy_frac", "scale_frac")


def _moving_average(x: np.ndarray, n: int) -> np.ndarray:
    """Centred moving average of (F, C) over ``n`` frames (edges: the mean of what is there)."""
    k = np.ones(n) / n
    pad = np.pad(x, ((n // 2, n - 1 - n // 2), (0, 0)), mode="edge")
    return np.stack([np.convolve(pad[:, c], k, mode="valid") for c in range(x.shape[1])], axis=1)


def trajectory_from_affines(affine: np.ndarray, crop_size_px: int, *, fps: float, detrend_s: float = 4.0) -> np.ndarray:
    """(F, 2, 3) image -> crop similarities -> (F, 4) roll (deg), dx, dy (fraction of the face size),
    scale (relative), zero-mean after removing a ``detrend_s`` moving average."""
    a = np.asarray(affine, np.float64)
    lin = a[:, :, :2]  # (F, 2, 2)
    det = np.linalg.det(lin)
    s = np.sqrt(np.abs(det))  # image -> crop scale
    inv_lin = np.linalg.inv(lin)  # crop -> image
    centre = np.einsum("fij,fj->fi", inv_lin, np.full((len(a), 2), crop_size_px / 2.0) - a[:, :, 2])  # (F, 2) image px
    face_px = crop_size_px / s  # (F,) the crop's side in image pixels
    roll = -np.degrees(np.arctan2(lin[:, 1, 0], lin[:, 0, 0]))  # the head's in-plane rotation in the image
    ref = np.median(face_px)
    x = np.stack([roll, centre[:, 0] / ref, centre[:, 1] / ref, face_px / ref - 1.0], axis=1)  # (F, 4)
    n = max(int(round(detrend_s * fps)), 3)
    if len(x) >= n:
        x = x - _moving_average(x, n)
    else:
        x = x - x.mean(0)
    return x


@dataclass
class HeadMotionLibrary:
    fps: float
    segments: list[np.ndarray]  # each (F, 4) in CHANNELS order
    source: str = ""

    def save(self, path: str | Path) -> None:
        data = {"fps": self.fps, "channels": list(CHANNELS), "source": self.source,
                "segments": [np.round(s, 4).tolist() for s in self.segments]}
        Path(path).write_text(json.dumps(data, separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "HeadMotionLibrary":
        d = json.loads(Path(path).read_text())
        if d.get("channels") != list(CHANNELS):
            raise ValueError(f"{path}: head motion channels {d.get('channels')} != {list(CHANNELS)}")
        return cls(float(d["fps"]), [np.asarray(s, np.float64) for s in d["segments"]], d.get("source", ""))

    def stats(self) -> dict[str, float]:
        """Mean per segment of each channel's std and mean |speed| per second (the real motion's figures)."""
        return motion_stats(self.segments, self.fps)


def motion_stats(segments: list[np.ndarray], fps: float) -> dict[str, float]:
    out = {}
    for c, name in enumerate(CHANNELS):
        out[f"{name}_std"] = float(np.mean([s[:, c].std() for s in segments]))
        out[f"{name}_speed_per_s"] = float(np.mean([np.abs(np.diff(s[:, c])).mean() * fps for s in segments if len(s) > 1]))
    return out


def fit_library(data_dirs: list[str], *, split: str = "train", min_seconds: float = 3.0, clip_sigmas: float = 4.0) -> HeadMotionLibrary:
    """The library from the prepared talking clips with audio in ``data_dirs`` (``split`` of the
    evaluation split: never the held-out clips for a bundle)."""
    from engine.data.splits import split_of

    segs, fps_all = [], []
    for d in data_dirs:
        for sd in sorted((Path(d) / "shards").iterdir()):
            meta_path = sd / "meta.json"
            if not meta_path.is_file():
                continue
            meta = json.loads(meta_path.read_text())
            if (split != "all" and split_of(meta["clip"]) != split) or not meta.get("has_audio"):
                continue
            fps = float(meta.get("fps", 25.0))
            z = np.load(sd / "data.npz")
            if len(z["affine"]) < min_seconds * fps:
                continue
            tr = trajectory_from_affines(z["affine"], int(meta["crop_size_px"]), fps=fps)
            if abs(fps - 25.0) > 0.5:  # resample to 25 fps
                t = np.arange(len(tr)) / fps
                t25 = np.arange(0, t[-1], 1 / 25.0)
                tr = np.stack([np.interp(t25, t, tr[:, c]) for c in range(tr.shape[1])], 1)
            segs.append(tr)
            fps_all.append(fps)
    if not segs:
        raise ValueError(f"no {split} talking segments of {min_seconds} s or more in {data_dirs}")
    sd = np.concatenate(segs).std(0)
    segs = [np.clip(s, -clip_sigmas * sd, clip_sigmas * sd) for s in segs]
    return HeadMotionLibrary(25.0, segs, f"{len(segs)} {split} talking segments of {', '.join(map(str, data_dirs))}")


@dataclass(frozen=True)
class HeadMotionConfig:
    crossfade_s: float = 1.0  # overlap between one replayed segment and the next
    idle_gain: float = 0.5  # amplitude in silence (1 while speaking)
    gain_tau_s: float = 0.4  # time constant of the amplitude following the speaking state


class HeadMotion:
    """``apply(image, index, speaking)``: the frame moved by the replayed head motion of frame ``index``."""

    def __init__(self, library: HeadMotionLibrary, centre_xy: tuple[float, float], face_px: float, fps: float, seed: int = 0,
                 config: HeadMotionConfig = HeadMotionConfig()):
        if not library.segments:
            raise ValueError("the head motion library is empty")
        self.lib, self.cfg, self.fps = library, config, float(fps)
        self.c = np.asarray(centre_xy, np.float64)
        self.face_px = float(face_px)
        self.rng = np.random.default_rng(seed + 104729)
        self.track = np.zeros((0, 4))  # the replayed motion so far, frame by frame
        self.gain = config.idle_gain
        self.fade = max(int(round(config.crossfade_s * fps)), 1)

    def _extend(self, n: int) -> None:
        """Append random library segments, cross-faded, until the track holds ``n`` frames."""
        while len(self.track) < n:
            seg = self.lib.segments[int(self.rng.integers(len(self.lib.segments)))]
            if len(self.track) == 0:
                self.track = seg.copy()
                continue
            f = min(self.fade, len(seg) // 2, len(self.track))
            w = np.linspace(0.0, 1.0, f + 2)[1:-1, None]  # (f, 1)
            head = self.track[-f:] * (1 - w) + seg[:f] * w
            self.track = np.concatenate([self.track[:-f], head, seg[f:]])

    def pose(self, index: int, speaking: bool = True) -> np.ndarray:
        """(4,) roll (deg), dx, dy (fraction of the face), scale of frame ``index`` (called in order)."""
        self._extend(index + 1 + self.fade)  # a cross-fade never rewrites frames already played
        target = 1.0 if speaking else self.cfg.idle_gain
        a = 1.0 - np.exp(-1.0 / (self.cfg.gain_tau_s * self.fps))
        self.gain += a * (target - self.gain)
        return self.track[index] * self.gain

    def affine(self, index: int, speaking: bool = True) -> np.ndarray:
        roll, dx, dy, sc = self.pose(index, speaking)
        m = cv2.getRotationMatrix2D((float(self.c[0]), float(self.c[1])), float(roll), 1.0 + float(sc))
        m[:, 2] += (dx * self.face_px, dy * self.face_px)
        return m

    def apply(self, image: np.ndarray, index: int, speaking: bool = True) -> np.ndarray:
        h, w = image.shape[:2]
        return cv2.warpAffine(image, self.affine(index, speaking), (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
