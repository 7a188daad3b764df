"""Session centring of the A2L's audio features: a voice's average feature is not its mouth's.

The linear A2L (engine/training/a2l_linear.py) scales the variation of its audio part by a spread
gain around the training clips' mean feature. A voice whose average feature lies away from that
mean (another microphone, room or speaker; about half the training frames are GRID's one
speaker) then has its whole offset scaled too, and the mouth stays open on average: on the unseen
speakers its mean opening was 4.1 px (at 256) above the truth's on every clip, about half the
truth's own spread.

This stage moves each frame's feature by ``strength`` times the session's running mean's distance
from the training mean, before the A2L (the denoiser's audio tokens are left as they are):

    f'_t = f_t - strength * (m_t - mean),   m_t = (prior_frames * mean + f_1 + ... + f_t) / (prior_frames + t)

The running mean is causal (what has been heard so far) and starts at the training mean with the
weight of ``prior_frames`` frames, so the first words are not judged on a few frames. It spans
the whole session, across utterances (a voice stays the same voice), and learns from speech
frames only (the live pipeline runs the A2L on silent frames too, to keep its state: those are
centred with the mean so far and do not move it). ``strength`` is chosen by the identity cross-validation on training
voices (engine/training/a2l_centre.py); saved in a bundle as ``a2l_centre.json``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class FeatureCentreConfig:
    mean: tuple = ()  # (D,) the training frames' mean audio feature
    strength: float = 0.0  # 0: off; 1: the session's mean offset removed in full
    prior_frames: int = 50  # the training mean's weight in the running mean, in frames (2 s at 25 fps)
    chosen_on: str = ""  # provenance: what the strength was chosen on
    cross_validation: dict = field(default_factory=dict)  # the figures it was chosen by

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "FeatureCentreConfig":
        d = json.loads(Path(path).read_text())
        return cls(**{**d, "mean": tuple(d.get("mean", ()))})


class FeatureCentre:
    """The running state of one session: call it on each batch of features (F, D), in order."""

    def __init__(self, config: FeatureCentreConfig):
        if not 0.0 <= config.strength <= 1.0:
            raise ValueError(f"feature centre strength must be in [0, 1], got {config.strength}")
        if config.prior_frames < 1:
            raise ValueError(f"feature centre prior_frames must be >= 1, got {config.prior_frames}")
        self.config = config
        self.mean = np.asarray(config.mean, np.float64)
        self.total = self.mean * config.prior_frames  # the running sum, the prior included
        self.count = float(config.prior_frames)

    def __call__(self, feats: np.ndarray, *, listen: bool = True) -> np.ndarray:
        """``listen``: these frames are the voice's and update the running mean; False (silence, which
        the live pipeline also runs through the A2L) applies the mean so far and leaves it as it is."""
        feats = np.asarray(feats)
        if self.config.strength == 0.0 or len(feats) == 0:
            return feats
        if feats.shape[-1] != len(self.mean):
            raise ValueError(f"feature centre: features of size {feats.shape[-1]}, its mean has {len(self.mean)}")
        if not listen:
            return (feats - self.config.strength * (self.total / self.count - self.mean)).astype(feats.dtype)
        sums = self.total + np.cumsum(feats, axis=0, dtype=np.float64)  # (F, D)
        running = sums / (self.count + np.arange(1, len(feats) + 1))[:, None]
        self.total, self.count = sums[-1], self.count + len(feats)
        return (feats - self.config.strength * (running - self.mean)).astype(feats.dtype)

    def reset(self) -> None:
        """Forget the session (a new voice): back to the training mean."""
        self.total = self.mean * self.config.prior_frames
        self.count = float(self.config.prior_frames)
