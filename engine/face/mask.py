"""Masks from landmarks, in canonical crop coordinates: the region the models repaint."""
from __future__ import annotations

import cv2
import numpy as np

from engine.face.geometry import index_sets

MASK_KINDS = ("lower_face", "mouth")


def region_mask(lm_crop: np.ndarray, size_px: int, *, kind: str = "lower_face", feather_px: float | None = None) -> np.ndarray:
    """A feathered mask (S, S) float32 in [0, 1] from landmarks in crop pixels (478, >=2).

    ``lower_face``: the face below the nose tip down to the jaw line (cheeks, lips, chin):
    what speech moves. ``mouth``: the lips' hull grown by a third of the mouth width.
    The mask is 1 well inside the region and falls smoothly to exactly 0 outside it: the
    filled polygon is eroded by the feather width and then blurred by it.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; choose one of {MASK_KINDS}")
    s = index_sets()
    pts = lm_crop[:, :2]
    if kind == "lower_face":
        nose_y = pts[1, 1]
        oval = pts[s["oval"]]
        below = oval[oval[:, 1] >= nose_y - 0.02 * size_px]
        poly = np.concatenate([below, pts[s["lips"]], pts[[1, 2, 98, 327]]])
    else:
        lips = pts[s["lips"]]
        c = lips.mean(0)
        poly = c + (lips - c) * (1.0 + 2.0 / 3.0)  # half-width w/2 grown by w/3
    hull = cv2.convexHull(np.round(poly * 4).astype(np.int32))  # 2 bits of sub-pixel precision
    mask = np.zeros((size_px, size_px), np.uint8)
    cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_AA, shift=2)
    feather = feather_px if feather_px is not None else 0.04 * size_px
    k = max(int(round(feather)), 1)
    mask = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)))
    out = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), sigmaX=feather / 2.0)
    out[out < 1.0 / 255.0] = 0.0
    return out
