"""The region the models generate: a square patch over the lower face of the aligned crop.

Only the mouth region changes with speech, so the autoencoder and the denoiser work on this
patch and not on the whole face (docs/ARCHITECTURE.md, "Spend the pixels where they show"). In
a 256 px crop it is the 128 px square from x 64 and y 112: from under the eyes to below the chin
(the canonical nose tip is at y 142 and the chin at y 218). All numbers scale with the crop.
"""
from __future__ import annotations

import numpy as np

from engine.face.mask import region_mask

PATCH_X0 = 0.25  # left edge of the patch, in crop units
PATCH_Y0 = 0.4375  # top edge of the patch, in crop units
PATCH_SIZE = 0.5  # side of the patch, in crop units


def patch_box(crop_size_px: int) -> tuple[int, int, int]:
    """(x0, y0, side) of the patch in crop pixels."""
    return int(round(PATCH_X0 * crop_size_px)), int(round(PATCH_Y0 * crop_size_px)), int(round(PATCH_SIZE * crop_size_px))


def extract_patch(crops: np.ndarray) -> np.ndarray:
    """(..., S, S, C) crops -> (..., P, P, C) patches (a view)."""
    x0, y0, p = patch_box(crops.shape[-2])
    return crops[..., y0 : y0 + p, x0 : x0 + p, :]


def crop_to_patch_points(pts_crop: np.ndarray, crop_size_px: int) -> np.ndarray:
    """Crop pixel coordinates (..., 2+) -> patch pixel coordinates (..., 2)."""
    x0, y0, _ = patch_box(crop_size_px)
    return pts_crop[..., :2] - np.array([x0, y0], dtype=pts_crop.dtype)


def patch_mask(lm_crop: np.ndarray, crop_size_px: int, *, border_px: float | None = None) -> np.ndarray:
    """The lower-face mask (P, P) float32 inside the patch, faded to 0 at the patch border.

    The fade (``border_px``, default 1/16 of the patch) keeps every pasted pixel well inside
    the generated square, so no edge of the square can show in the composite.
    """
    x0, y0, p = patch_box(crop_size_px)
    full = region_mask(lm_crop, crop_size_px, kind="lower_face")
    m = full[y0 : y0 + p, x0 : x0 + p].copy()
    b = border_px if border_px is not None else p / 16.0
    ramp = np.clip((np.arange(p, dtype=np.float32) + 0.5) / b, 0.0, 1.0)
    edge = np.minimum(ramp, ramp[::-1])
    m *= np.minimum(edge[:, None], edge[None, :])
    return m


def to_patch_units(pts_crop_units: np.ndarray) -> np.ndarray:
    """Points in crop units (x / crop size) -> patch units: (0, 0) and (1, 1) are the patch corners."""
    return (pts_crop_units[..., :2] - np.array([PATCH_X0, PATCH_Y0], dtype=np.float32)) / PATCH_SIZE


def from_patch_units(pts_patch_units: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_patch_units`."""
    return pts_patch_units[..., :2] * PATCH_SIZE + np.array([PATCH_X0, PATCH_Y0], dtype=np.float32)


def moving_indices() -> np.ndarray:
    """Landmarks that speech moves: the lips and the jaw line below the nose tip (sorted, unique)."""
    from engine.face.geometry import index_sets, template

    s = index_sets()
    t = template()
    oval = s["oval"]
    jaw = oval[t[oval, 1] >= t[1, 1]]
    return np.unique(np.concatenate([s["lips"], jaw]))


def warp_indices(margin: float = 0.15) -> np.ndarray:
    """Landmarks that steer the patch warp: those whose canonical position lies in the patch
    grown by ``margin`` (patch units). Far landmarks carry no weight in the Gaussian flow, so
    leaving them out changes nothing and makes the warp ~4x cheaper."""
    from engine.face.geometry import template

    p = to_patch_units(template()[:, :2].astype(np.float32))
    inside = np.all((p >= -margin) & (p <= 1 + margin), axis=1)
    return np.unique(np.concatenate([np.nonzero(inside)[0], moving_indices()]))


def pool_mask(px_mask: np.ndarray, factor: int) -> np.ndarray:
    """(P, P) pixel mask -> (P / factor, P / factor): the max over each cell (a cell counts if any pixel does)."""
    p = px_mask.shape[0]
    return px_mask.reshape(p // factor, factor, p // factor, factor).max(axis=(1, 3))
