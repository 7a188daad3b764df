"""A calibrated articulation gain on the A2L's landmarks (issue 14), a layer after the model.

An A2L trained with a regression loss on ~35 voices still under-articulates on voices it has
never heard (it hedges towards the mean mouth). This layer scales each frame's displacement of the
moving landmarks from the portrait's own by ``gain`` (fitted on training clips so that the
predicted opening's spread matches the real one's: ``calibrate`` in engine/training/a2l.py), then
keeps the result physical: the inner lips never cross, and the opening never exceeds
``max_opening_ratio`` of the mouth's width (the largest opening seen in the training clips).
Before the gain, the displacement is projected onto the ``basis`` of real mouth motion (the
principal components of the training clips' lip and jaw displacements from each speaker's closed
mouth): the A2L predicts each point on its own, and its small point-to-point disagreements,
invisible on a landmark plot, tear the portrait's pixels along the lips and the jaw line once a
warp follows them exactly. A real mouth moves in a few coordinated ways.
It only runs on speech frames (the pipeline shows the portrait in silence), so it is voice-gated.
Saved in a bundle as ``articulation.json``; ``gain`` 1 turns it off.

``close_reference``: a portrait whose mouth is open (a smile with teeth, a photo taken mid-word)
is first closed on its landmarks, along the same principal motions (the smallest combination of
them that brings the mean inner-lip opening to zero), and the A2L's displacements start from that
closed mouth; the portrait's pixels still start from its own landmarks (the pixel warp moves them
to the closed-based targets). Off in the shipped bundle: with the voice centring
(engine/motion/feature_centre.py) it brought the held-out opening's mean offset to zero but made the
frames worse (ST-LPIPS 0.148 against 0.146, docs/eval/centred_a2l/): the linear readout already
learns most of the closing, and an open portrait's own teeth are then squeezed by the warp.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.face.geometry import OPENING_PAIRS


@dataclass(frozen=True)
class ArticulationConfig:
    gain: float = 1.0  # displacement gain from the portrait's landmarks (1: the A2L as it is)
    max_opening_ratio: float = 0.6  # largest inner-lip opening, as a fraction of the mouth's width (corners 61-291)
    calibrated_on: str = ""  # what the gain was fitted on (provenance)
    basis: tuple = ()  # (k, K*2) orthonormal rows: the principal displacements of the moving landmarks (patch units); () = none
    basis_mean: tuple = ()  # (K*2,) mean displacement the basis is centred on
    close_reference: bool = False  # displacements start from the portrait's mouth closed along the basis (needs one)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ArticulationConfig":
        d = json.loads(Path(path).read_text())
        return cls(**{**d, "basis": tuple(map(tuple, d.get("basis", ()))), "basis_mean": tuple(d.get("basis_mean", ()))})


class Articulation:
    """Applies an :class:`ArticulationConfig` to (F, K, 2) moving landmarks ordered as ``indices``."""

    def __init__(self, config: ArticulationConfig, indices: np.ndarray, reference: np.ndarray):
        """``reference``: (K, 2) the portrait's moving landmarks (the displacements' origin)."""
        self.config = config
        pos = {int(i): k for k, i in enumerate(indices)}
        self.up = np.array([pos[u] for u, _ in OPENING_PAIRS])
        self.lo = np.array([pos[l] for _, l in OPENING_PAIRS])
        self.corners = np.array([pos[61], pos[291]]) if 61 in pos and 291 in pos else None
        self.reference = np.asarray(reference, np.float32)
        self.basis = np.asarray(config.basis, np.float32) if len(config.basis) else None  # (k, K*2)
        self.basis_mean = np.asarray(config.basis_mean, np.float32) if len(config.basis_mean) else None
        if self.basis is not None and self.basis.shape[1] != 2 * len(indices):
            raise ValueError(f"articulation basis has {self.basis.shape[1]} columns for {len(indices)} landmarks")
        if config.close_reference and self.basis is not None:
            self.reference = self.closed(self.reference)  # the origin of the displacements, and the A2L's reference

    def opening(self, lm: np.ndarray) -> np.ndarray:
        """Mean inner-lip opening (lower y - upper y) of (..., K, 2) landmarks, in their units."""
        return (lm[..., self.lo, 1] - lm[..., self.up, 1]).mean(axis=-1)

    def closed(self, reference: np.ndarray) -> np.ndarray:
        """(K, 2) landmarks with the mouth closed along the basis: the smallest combination c of its rows
        (minimum norm) that brings the mean inner-lip opening to zero; a closed mouth is returned as it is."""
        k = len(self.basis)
        opening = float(self.opening(reference))
        if opening <= 0.0:
            return reference
        g = self.opening(self.basis.reshape(k, -1, 2))  # (k,) how much each principal motion opens the mouth
        if float(g @ g) < 1e-12:
            return reference
        c = -opening * g / float(g @ g)
        return (reference + (c @ self.basis).reshape(reference.shape)).astype(np.float32)

    def __call__(self, lm: np.ndarray) -> np.ndarray:
        cfg = self.config
        disp = np.asarray(lm, np.float32) - self.reference  # (F, K, 2)
        if self.basis is not None:
            f = disp.shape[0]
            x = disp.reshape(f, -1) - self.basis_mean  # (F, K*2)
            disp = ((x @ self.basis.T) @ self.basis + self.basis_mean).reshape(disp.shape)
        out = self.reference + cfg.gain * disp  # (F, K, 2)
        # the inner lips never cross: a lower point above its upper partner meets it halfway
        up, lo = out[:, self.up, 1], out[:, self.lo, 1]
        mid = 0.5 * (up + lo)
        crossed = lo < up
        out[:, self.up, 1] = np.where(crossed, mid, up)
        out[:, self.lo, 1] = np.where(crossed, mid, lo)
        if self.corners is not None and cfg.max_opening_ratio > 0:
            width = np.linalg.norm(out[:, self.corners[1]] - out[:, self.corners[0]], axis=-1)  # (F,)
            opening = (out[:, self.lo, 1] - out[:, self.up, 1]).mean(axis=1)  # (F,)
            over = np.maximum(opening - cfg.max_opening_ratio * width, 0.0)  # (F,)
            out[:, self.up, 1] += 0.5 * over[:, None]
            out[:, self.lo, 1] -= 0.5 * over[:, None]
        return out
