"""The region the models generate: a square patch of the aligned crop.

Only the mouth region changes with speech, so the autoencoder and the denoiser work on this
patch and not on the whole face (docs/ARCHITECTURE.md, "Spend the pixels where they show").
Two regions exist; a bundle names its own in its manifest ("region", default lower_face):

- ``lower_face`` (the first bundle's): in a 256 px crop the 128 px square from x 64 and y 112,
  from under the eyes to below the chin (the canonical nose tip is at y 142, the chin at y 218).
- ``mouth`` (issue 13): a quarter of the crop's side centred on the mouth; in a 512 px crop the
  128 px square from x 192 and y 288 (the mouth corners are at x 207 and 306, the lips meet at
  y 345, the nose tip is at y 284). Twice the pixels per face of ``lower_face`` for the same
  latent, so the mouth interior the native compositor pastes is generated at twice the detail.

All numbers scale with the crop. Landmarks given to the A2L and the denoiser's landmark token
stay in ``lower_face`` patch units whatever the region (the A2L is shared by both).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.face.mask import region_mask


@dataclass(frozen=True)
class Region:
    name: str
    x0: float  # left edge of the patch, in crop units
    y0: float  # top edge of the patch, in crop units
    size: float  # side of the patch, in crop units
    mask_kind: str  # engine.face.mask.region_mask kind: what the denoiser repaints inside the patch


LOWER_FACE = Region("lower_face", 0.25, 0.4375, 0.5, "lower_face")
MOUTH = Region("mouth", 0.375, 0.5625, 0.25, "mouth")
REGIONS = {r.name: r for r in (LOWER_FACE, MOUTH)}

PATCH_X0, PATCH_Y0, PATCH_SIZE = LOWER_FACE.x0, LOWER_FACE.y0, LOWER_FACE.size  # the landmark units' square


def region_named(name: str | None) -> Region:
    """A region by its manifest name (None: lower_face, the first bundles')."""
    if name is None:
        return LOWER_FACE
    if name not in REGIONS:
        raise ValueError(f"unknown region {name!r}; known: {sorted(REGIONS)}")
    return REGIONS[name]


def patch_box(crop_size_px: int, region: Region = LOWER_FACE) -> tuple[int, int, int]:
    """(x0, y0, side) of the patch in crop pixels."""
    return int(round(region.x0 * crop_size_px)), int(round(region.y0 * crop_size_px)), int(round(region.size * crop_size_px))


def extract_patch(crops: np.ndarray, region: Region = LOWER_FACE) -> np.ndarray:
    """(..., S, S, C) crops -> (..., P, P, C) patches (a view)."""
    x0, y0, p = patch_box(crops.shape[-2], region)
    return crops[..., y0 : y0 + p, x0 : x0 + p, :]


def crop_to_patch_points(pts_crop: np.ndarray, crop_size_px: int, region: Region = LOWER_FACE) -> np.ndarray:
    """Crop pixel coordinates (..., 2+) -> patch pixel coordinates (..., 2)."""
    x0, y0, _ = patch_box(crop_size_px, region)
    return pts_crop[..., :2] - np.array([x0, y0], dtype=pts_crop.dtype)


def patch_mask(lm_crop: np.ndarray, crop_size_px: int, *, border_px: float | None = None, region: Region = LOWER_FACE) -> np.ndarray:
    """The region's repaint mask (P, P) float32 inside the patch, faded to 0 at the patch border.

    The fade (``border_px``, default 1/16 of the patch) keeps every pasted pixel well inside
    the generated square, so no edge of the square can show in the composite.
    """
    x0, y0, p = patch_box(crop_size_px, region)
    full = region_mask(lm_crop, crop_size_px, kind=region.mask_kind)
    m = full[y0 : y0 + p, x0 : x0 + p].copy()
    b = border_px if border_px is not None else p / 16.0
    ramp = np.clip((np.arange(p, dtype=np.float32) + 0.5) / b, 0.0, 1.0)
    edge = np.minimum(ramp, ramp[::-1])
    m *= np.minimum(edge[:, None], edge[None, :])
    return m


def to_patch_units(pts_crop_units: np.ndarray, region: Region = LOWER_FACE) -> np.ndarray:
    """Points in crop units (x / crop size) -> patch units: (0, 0) and (1, 1) are the patch corners."""
    return (pts_crop_units[..., :2] - np.array([region.x0, region.y0], dtype=np.float32)) / np.float32(region.size)


def from_patch_units(pts_patch_units: np.ndarray, region: Region = LOWER_FACE) -> np.ndarray:
    """The inverse of :func:`to_patch_units`."""
    return pts_patch_units[..., :2] * np.float32(region.size) + np.array([region.x0, region.y0], dtype=np.float32)


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
    leaving them out changes nothing and makes the warp ~4x cheaper. The same set (that of the
    lower_face square, a superset of the mouth region's) serves every region."""
    from engine.face.geometry import template

    p = to_patch_units(template()[:, :2].astype(np.float32))
    inside = np.all((p >= -margin) & (p <= 1 + margin), axis=1)
    return np.unique(np.concatenate([np.nonzero(inside)[0], moving_indices()]))


def pool_mask(px_mask: np.ndarray, factor: int) -> np.ndarray:
    """(P, P) pixel mask -> (P / factor, P / factor): the max over each cell (a cell counts if any pixel does)."""
    p = px_mask.shape[0]
    return px_mask.reshape(p // factor, factor, p // factor, factor).max(axis=(1, 3))
