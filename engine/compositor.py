"""Where generated pixels go in the native path (issue 13): only into the mouth interior.

The portrait's lower face is moved to the frame's landmarks by the pixel warp
(engine/face/pixel_warp.py), so lips, chin and cheeks keep the portrait's own pixels. What no
warp can show is what lies between the lips when they part (teeth, tongue, the dark cavity) and
the inner lip edge: the compositor takes those from the decoded patch, inside the inner-lip
polygon of the target landmarks grown by ``dilate`` and feathered by ``feather``. A closed mouth
takes nothing from the generator; where the portrait's own mouth is open, its interior (teeth,
say) is warped along with the lips and kept: only what opens beyond it is generated
(:func:`new_interior`).

The denoiser's reference for the interior: the portrait warped to the frame's landmarks has its
lips stretched across the opening (red where the mouth should be dark), and the denoiser, which
starts from that reference, then paints a narrow mouth with lip below it inside a wide interior
mask: a thick, smeared lower lip. ``reference_colour`` fills the interior of the reference with the
median colour of real mouth interiors (teeth, tongue and cavity together, measured on the training
crops' open mouths), so that it paints an open mouth where the mask is (engine/generator.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.face.geometry import OPENING_PAIRS, index_sets
from engine.face.mask import grow_and_feather


@dataclass(frozen=True)
class InteriorConfig:
    dilate: float = 0.008  # crop units the inner-lip polygon grows by (covers the inner lip edge)
    feather: float = 0.006  # crop units: Gaussian sigma of the mask's edge
    min_opening: float = 0.003  # crop units: a mouth opened less than this takes nothing from the generator
    # RGB the denoiser's reference shows inside the interior (None: the warped portrait's stretched lips); the median
    # of 1254 open training mouths (out/full512, inner-lip polygon, opening > 0.02 crop units)
    reference_colour: tuple[int, int, int] | None = (140, 98, 93)


def mouth_opening(lm: np.ndarray) -> float:
    """Mean inner-lip opening (lower y - upper y) of (478, 2+) landmarks, in their units."""
    up = [u for u, _ in OPENING_PAIRS]
    lo = [l for _, l in OPENING_PAIRS]
    return float((lm[lo, 1] - lm[up, 1]).mean())


def interior_mask(lm_crop_units: np.ndarray, size_px: int, config: InteriorConfig = InteriorConfig()) -> np.ndarray:
    """The mouth interior (S, S) float32 in [0, 1] of landmarks (478, 2+) in crop units: the inner-lip
    polygon, grown and feathered; zeros when the mouth is (nearly) closed."""
    if mouth_opening(lm_crop_units) < config.min_opening:
        return np.zeros((size_px, size_px), np.float32)
    poly = lm_crop_units[index_sets()["lips_inner"], :2] * size_px
    return grow_and_feather(poly, size_px, dilate_px=int(round(config.dilate * size_px)), sigma_px=max(config.feather * size_px, 0.5))


def new_interior(target: np.ndarray, source_warped: np.ndarray) -> np.ndarray:
    """The part of the target interior mask (S, S) that the portrait's own interior, moved by the
    warp (``source_warped``, its interior mask remapped with the crop-space flow), does not cover."""
    return target * (1.0 - np.clip(source_warped, 0.0, 1.0))
