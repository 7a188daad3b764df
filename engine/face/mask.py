"""Masks from landmarks, in canonical crop coordinates: the region the models repaint."""
from __future__ import annotations

import cv2
import numpy as np

from engine.face.geometry import index_sets

MASK_KINDS = ("lower_face", "mouth")


def region_mask(lm_crop: np.ndarray, size_px: int, *, kind: str = "lower_face", feather_px: float | None = None) -> np.ndarray:
    """A feathered mask (S, S) float32 in [0, 1] from landmarks in crop pixels (478, >=2).

    ``lower_face``: the face below the nose tip down to the jaw line (cheeks, lips, chin),
    what speech moves, together with the mouth region below (so that a mouth near the
    silhouette in a turned face is still covered). ``mouth``: the lips' hull grown radially
    by 80 %. The region's polygon is grown by the feather width and blurred by half of it,
    so the mask is ~1 (>= 0.97) everywhere on the polygon, falls smoothly to 0 outside it
    (where a jaw that opens can reach), and is exactly 0 below 1/255.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; choose one of {MASK_KINDS}")
    s = index_sets()
    pts = lm_crop[:, :2]
    lips = pts[s["lips"]]
    mouth = lips.mean(0) + (lips - lips.mean(0)) * 1.8  # the lips hull grown radially by 80 %
    if kind == "lower_face":
        oval = pts[s["oval"]]
        below = oval[oval[:, 1] >= pts[1, 1] - 0.02 * size_px]  # jaw line below the nose tip
        poly = np.concatenate([below, mouth, pts[[1, 2, 98, 327]]])
    else:
        poly = mouth
    hull = cv2.convexHull(np.round(poly * 4).astype(np.int32))  # 2 bits of sub-pixel precision
    mask = np.zeros((size_px, size_px), np.uint8)
    cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_AA, shift=2)
    feather = feather_px if feather_px is not None else 0.04 * size_px
    k = max(int(round(feather)), 1)
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)))
    out = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), sigmaX=feather / 2.0)
    out = np.clip(out, 0.0, 1.0)
    out[out < 1.0 / 255.0] = 0.0
    return out
