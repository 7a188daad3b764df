"""Small idle head motion: a slow, smooth sway of the whole portrait (rotation about the face
centre, a little shift and scale), so that the face is alive when silent and never frozen.

No model: each component is a sum of three sinusoids with incommensurate periods (4-12 s) and
seeded phases, scaled to a fraction of the face size. Deterministic given the seed and the
frame index; applied to the composed frame, so the generated mouth moves with the head.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class SwayConfig:
    angle_deg: float = 0.8  # peak roll about the face centre
    shift_frac: float = 0.008  # peak shift, fraction of the face size (crop side in image pixels)
    scale_frac: float = 0.004  # peak zoom in/out
    periods_s: tuple[float, float, float] = (4.3, 7.1, 11.7)  # the three sinusoids' periods


class HeadSway:
    """``affine(frame_index)`` -> the (2, 3) image warp of that frame; ``apply(image, index)``."""

    def __init__(self, centre_xy: tuple[float, float], face_px: float, fps: float, seed: int = 0, config: SwayConfig = SwayConfig()):
        self.c = np.asarray(centre_xy, np.float64)
        self.face_px, self.fps, self.cfg = float(face_px), float(fps), config
        rng = np.random.default_rng(seed + 7919)
        self.phases = rng.uniform(0, 2 * np.pi, size=(4, 3))  # angle, dx, dy, scale x three sinusoids
        self.weights = np.array([0.5, 0.3, 0.2])

    def _wave(self, k: int, t: float) -> float:
        p = np.asarray(self.cfg.periods_s)
        return float(np.sum(self.weights * np.sin(2 * np.pi * t / p + self.phases[k])))

    def affine(self, index: int) -> np.ndarray:
        t = index / self.fps
        cfg = self.cfg
        ang = cfg.angle_deg * self._wave(0, t)
        dx, dy = (cfg.shift_frac * self.face_px * self._wave(k, t) for k in (1, 2))
        sc = 1.0 + cfg.scale_frac * self._wave(3, t)
        m = cv2.getRotationMatrix2D((float(self.c[0]), float(self.c[1])), ang, sc)
        m[:, 2] += (dx, dy)
        return m

    def apply(self, image: np.ndarray, index: int) -> np.ndarray:
        h, w = image.shape[:2]
        return cv2.warpAffine(image, self.affine(index), (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
