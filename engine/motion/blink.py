"""Blinks: a prior fitted on real face videos, a sampler that streams it, and an eyelid warp.

The prior (rate, duration and closure profile of blinks) is measured from the eye-opening ratio
(lid gap / eye width) of prepared shards: a blink is a dip below ``dip_fraction`` of the segment's
median opening. The sampler draws blink onsets from a Poisson process with a refractory gap and
plays the mean profile, scaled to a sampled duration; it needs no future input, so it streams.
The render closes the lids by a smooth landmark-driven warp of the eye region of the aligned
crop: upper-lid points move down to meet the lower lid, the eye corners and brows stay.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# MediaPipe face-mesh lid contours, outer to inner corner, upper and lower paired point by point
UPPER = (246, 161, 160, 159, 158, 157, 173, 466, 388, 387, 386, 385, 384, 398)
LOWER = (7, 163, 144, 145, 153, 154, 155, 249, 390, 373, 374, 380, 381, 382)
CORNERS = (33, 133, 263, 362)
ANCHORS = (70, 63, 105, 66, 107, 336, 296, 334, 293, 300, 117, 118, 119, 346, 347, 348, 6)  # brows, under the eyes, nose bridge
PROFILE_LEN = 9


@dataclass(frozen=True)
class BlinkPrior:
    rate_per_min: float = 15.0  # mean blinks per minute
    min_gap_s: float = 1.0  # refractory gap between blinks
    duration_mean_s: float = 0.2  # closure duration (opening below the threshold), mean
    duration_std_s: float = 0.05
    profile: tuple[float, ...] = (0.2, 0.55, 0.85, 1.0, 0.9, 0.7, 0.45, 0.25, 0.1)  # closure over the blink, 0 open .. 1 shut
    fitted_on_frames: int = 0  # how much data the numbers come from (0: defaults)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"kind": "BlinkPrior", **dataclasses.asdict(self)}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "BlinkPrior":
        d = json.loads(Path(path).read_text())
        d.pop("kind", None)
        d["profile"] = tuple(d["profile"])
        return cls(**d)


def eye_opening(lm: np.ndarray) -> np.ndarray:
    """(..., 478, 2) landmarks -> (...,) mean lid gap over eye width of both eyes."""
    gap = np.linalg.norm(lm[..., [159, 386], :] - lm[..., [145, 374], :], axis=-1)
    width = np.linalg.norm(lm[..., [33, 263], :] - lm[..., [133, 362], :], axis=-1)
    return (gap / np.maximum(width, 1e-6)).mean(-1)


def fit_blink_prior(segments: list[tuple[np.ndarray, float]], *, dip_fraction: float = 0.6) -> BlinkPrior:
    """Fit from ``(landmarks (F, 478, 2), fps)`` per segment."""
    blinks, durations, profiles, seconds, frames = 0, [], [], 0.0, 0
    for lm, fps in segments:
        op = eye_opening(lm)
        if len(op) < fps * 2:
            continue
        frames += len(op)
        seconds += len(op) / fps
        med = np.median(op)
        closed = op < dip_fraction * med
        edges = np.flatnonzero(np.diff(closed.astype(np.int8)) != 0) + 1
        runs = np.split(np.arange(len(op)), edges)
        for r in runs:
            if not closed[r[0]] or len(r) > fps * 0.6:  # longer closures are not blinks
                continue
            blinks += 1
            durations.append(len(r) / fps)
            c = np.clip(1 - op[max(r[0] - 3, 0) : r[-1] + 4] / med, 0, 1)
            if len(c) >= 3:
                profiles.append(np.interp(np.linspace(0, len(c) - 1, PROFILE_LEN), np.arange(len(c)), c))
    if blinks < 5 or seconds < 30:
        return BlinkPrior()
    prof = np.mean(profiles, axis=0)
    prof = prof / max(prof.max(), 1e-6)
    return BlinkPrior(rate_per_min=round(60 * blinks / seconds, 2), duration_mean_s=round(float(np.mean(durations)) + 0.08, 3),
                      duration_std_s=round(float(np.std(durations)), 3), profile=tuple(round(float(p), 3) for p in prof), fitted_on_frames=frames)


class BlinkSampler:
    """Lid closure in [0, 1] frame by frame, drawn from the prior (deterministic given the seed)."""

    def __init__(self, prior: BlinkPrior, fps: float, seed: int = 0):
        self.prior, self.fps = prior, fps
        self.rng = np.random.default_rng(seed)
        self.current: np.ndarray | None = None
        self.pos = 0
        self.wait = self._gap()

    def _gap(self) -> int:
        mean_gap = 60.0 / max(self.prior.rate_per_min, 1e-3)
        return int(self.fps * (self.prior.min_gap_s + self.rng.exponential(max(mean_gap - self.prior.min_gap_s, 0.1))))

    def next(self) -> float:
        if self.current is None:
            self.wait -= 1
            if self.wait > 0:
                return 0.0
            dur = max(self.rng.normal(self.prior.duration_mean_s, self.prior.duration_std_s), 0.1)
            n = max(int(round(dur * self.fps * 1.8)), 3)  # the profile spans closing + opening
            prof = np.asarray(self.prior.profile)
            self.current = np.interp(np.linspace(0, len(prof) - 1, n), np.arange(len(prof)), prof)
            self.pos = 0
        c = float(self.current[self.pos])
        self.pos += 1
        if self.pos >= len(self.current):
            self.current, self.wait = None, self._gap()
        return c


def close_eyes(crop: np.ndarray, lm_px: np.ndarray, closure: float) -> tuple[np.ndarray, np.ndarray]:
    """Close the lids of ``crop`` (S, S, 3) by ``closure`` in [0, 1]; landmarks ``lm_px`` (478, 2+) in pixels.

    Column by column across each eye, the skin above the upper lid (a band 1.5 eye-gaps tall)
    is stretched down so that the lid edge moves ``closure`` of the way to the lower lid, and the
    visible eye below it is squeezed into what is left. Returns the warped crop and its feathered
    eye mask (S, S) float32 (0 where nothing changed).
    """
    s = crop.shape[0]
    mask = np.zeros((s, s), np.float32)
    if closure <= 1e-3:
        return crop, mask
    p = lm_px[:, :2].astype(np.float64)
    out = crop.copy()
    for half in (slice(0, 7), slice(7, 14)):
        up, lo = p[list(UPPER[half])], p[list(LOWER[half])]
        xs_all = np.concatenate([up[:, 0], lo[:, 0]])
        xa, xb = int(np.floor(xs_all.min())), int(np.ceil(xs_all.max()))
        gap = float(np.max(lo[:, 1] - up[:, 1]))
        if xb - xa < 4 or gap < 1.0:
            continue
        ou, ol = np.argsort(up[:, 0]), np.argsort(lo[:, 0])
        xs = np.arange(max(xa, 0), min(xb + 1, s))
        yu = np.interp(xs, up[ou, 0], up[ou, 1])  # (W,) upper lid edge per column
        yl = np.maximum(np.interp(xs, lo[ol, 0], lo[ol, 1]), yu + 0.5)  # lower lid
        taper = np.sin(np.clip((xs - xa) / max(xb - xa, 1), 0, 1) * np.pi) ** 0.5  # 0 at the corners
        c = closure * taper
        yb = yu - 1.5 * gap  # top of the stretched skin band
        new = yu + c * 0.95 * (yl - yu)  # where the lid edge goes
        y0, y1 = max(int(np.floor(yb.min())), 0), min(int(np.ceil(yl.max())) + 2, s)
        ys = np.arange(y0, y1, dtype=np.float64)[:, None]  # (H, 1)
        above = yb + (ys - yb) * (yu - yb) / np.maximum(new - yb, 1e-6)  # skin band stretched down
        below = yu + (ys - new) * (yl - yu) / np.maximum(yl - new, 1e-6)  # the eye squeezed under it
        src_y = np.where(ys < yb, ys, np.where(ys < new, above, np.where(ys <= yl, below, ys)))
        map_x = np.broadcast_to(xs[None, :], src_y.shape).astype(np.float32)
        region = cv2.remap(crop, map_x, src_y.astype(np.float32), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        out[y0:y1, xs[0] : xs[-1] + 1] = region
        band = ((ys >= yb - 1) & (ys <= yl + 1)).astype(np.float32) * (taper > 0)[None, :]
        mask[y0:y1, xs[0] : xs[-1] + 1] = np.maximum(mask[y0:y1, xs[0] : xs[-1] + 1], band)
    k = max(gap, 1.0) * 0.6
    mask = cv2.GaussianBlur(mask, (0, 0), k)
    mask = np.clip(mask * 1.5, 0, 1)
    mask[mask < 1.0 / 255.0] = 0.0
    return out, mask
