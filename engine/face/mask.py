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
    feather = feather_px if feather_px is not None else 0.04 * size_px
    k = max(int(round(feather)), 1)
    return grow_and_feather(poly, size_px, dilate_px=k, sigma_px=feather / 2.0, convex=True)


def grow_and_feather(poly_px: np.ndarray, size_px: int, *, dilate_px: int, sigma_px: float, convex: bool = False,
                     window: bool = True) -> np.ndarray:
    """A polygon (N, 2) in pixels filled (anti-aliased; its convex hull if ``convex``), dilated by
    ``dilate_px``, blurred with ``sigma_px``: an (S, S) float32 mask in [0, 1], exactly 0 below 1/255.

    ``window``: the work is done on the polygon's box grown by what the dilation and the blur can
    reach (the same values as on the whole square, at a fraction of the cost in a 512 px crop).
    """
    pts = np.round(np.asarray(poly_px, np.float64)[:, :2] * 4).astype(np.int32)  # 2 bits of sub-pixel precision
    x0 = y0 = 0
    w = h = size_px
    if window:
        reach = dilate_px + int(np.ceil(4.0 * sigma_px)) + 3  # OpenCV's float Gaussian kernel reaches 4 sigma
        x0 = int(np.clip(pts[:, 0].min() // 4 - reach, 0, size_px))
        y0 = int(np.clip(pts[:, 1].min() // 4 - reach, 0, size_px))
        x1 = int(np.clip(pts[:, 0].max() // 4 + reach + 2, 0, size_px))
        y1 = int(np.clip(pts[:, 1].max() // 4 + reach + 2, 0, size_px))
        w, h = x1 - x0, y1 - y0
        pts = pts - np.array([x0 * 4, y0 * 4], np.int32)
    out = np.zeros((size_px, size_px), np.float32)
    if w <= 0 or h <= 0:
        return out
    m8 = np.zeros((h, w), np.uint8)
    if convex:
        cv2.fillConvexPoly(m8, cv2.convexHull(pts), 255, lineType=cv2.LINE_AA, shift=2)
    else:
        cv2.fillPoly(m8, [pts], 255, lineType=cv2.LINE_AA, shift=2)
    if dilate_px > 0:
        m8 = cv2.dilate(m8, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1)))
    blurred = np.clip(cv2.GaussianBlur(m8.astype(np.float32) / 255.0, (0, 0), sigmaX=sigma_px), 0.0, 1.0)
    blurred[blurred < 1.0 / 255.0] = 0.0
    out[y0 : y0 + h, x0 : x0 + w] = blurred
    return out
