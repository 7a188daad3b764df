"""Similarity alignment of a face to the canonical crop, and its temporal stabilisation.

A crop of ``crop_size_px`` is the canonical square of ``engine.face.geometry``: the rigid
upper-face landmarks are fitted (least squares, Umeyama) to the template scaled to the crop.
The transform maps image pixels to crop pixels, ``crop = M @ [x, y, 1]``, M of shape (2, 3).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from engine.face.geometry import index_sets, template, umeyama


@dataclass(frozen=True)
class AlignConfig:
    """The canonical crop."""

    crop_size_px: int = 256  # side of the aligned square crop: 128, 256 or 512
    stabilise_sigma_frames: float = 1.5  # Gaussian sigma over time for the crop transform (0: off)


def fit_transform(lm: np.ndarray, cfg: AlignConfig) -> np.ndarray:
    """(2, 3) similarity matrix from image pixels to crop pixels for landmarks (478, >=2)."""
    idx = index_sets()["rigid"]
    dst = template()[idx, :2] * cfg.crop_size_px
    scale, rot, trans = umeyama(lm[idx, :2].astype(np.float64), dst)
    return np.concatenate([scale * rot, trans[:, None]], axis=1)  # (2, 3)


def apply_transform(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Points (N, 2) through the affine (2, 3)."""
    return pts[:, :2] @ m[:, :2].T + m[:, 2]


def invert_transform(m: np.ndarray) -> np.ndarray:
    """The inverse of an affine (2, 3)."""
    return cv2.invertAffineTransform(m)


def warp_to_crop(rgb: np.ndarray, m: np.ndarray, cfg: AlignConfig) -> np.ndarray:
    """The aligned crop (S, S, 3); pixels outside the frame are replicated from its border."""
    s = cfg.crop_size_px
    return cv2.warpAffine(rgb, m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _to_params(m: np.ndarray) -> np.ndarray:
    """(..., 2, 3) similarity -> (..., 4) parameters (a, b, tx, ty), M = [[a, -b, tx], [b, a, ty]]."""
    return np.stack([m[..., 0, 0], m[..., 1, 0], m[..., 0, 2], m[..., 1, 2]], axis=-1)


def _from_params(p: np.ndarray) -> np.ndarray:
    a, b, tx, ty = p[..., 0], p[..., 1], p[..., 2], p[..., 3]
    return np.stack([np.stack([a, -b, tx], -1), np.stack([b, a, ty], -1)], -2)


def stabilise_transforms(ms: np.ndarray, sigma_frames: float) -> np.ndarray:
    """Smooth a clip's transforms (F, 2, 3) over time with a centred Gaussian (offline).

    The parameters (a, b, tx, ty) are smoothed, so the result is still a similarity. The
    clip's ends are handled by renormalising the truncated kernel. Landmarks themselves
    are not smoothed: lips move fast and that motion is the signal.
    """
    if sigma_frames <= 0 or len(ms) < 2:
        return ms.copy()
    p = _to_params(ms)  # (F, 4)
    r = int(np.ceil(3 * sigma_frames))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_frames) ** 2)
    n = len(p)
    out = np.empty_like(p)
    for i in range(n):
        lo, hi = max(0, i - r), min(n, i + r + 1)
        w = k[lo - i + r : hi - i + r]
        out[i] = (w[:, None] * p[lo:hi]).sum(0) / w.sum()
    return _from_params(out)
