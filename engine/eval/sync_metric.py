"""LSE-D and LSE-C (lip-sync error distance / confidence) with the sync expert, as SyncNet defines them.

For every offset ``o`` in ``[-max_offset_frames, max_offset_frames]`` the mean, over the frames ``t``
where both windows exist, of the distance between the video window embedding at frame ``t`` and
the audio window embedding at frame ``t + o``. Then

- ``offset_frames`` = the offset of the smallest mean distance. **Positive means the audio lags the
  video**: the sound that goes with video frame ``t`` arrives ``offset`` frames later, so
  delaying the video by ``offset`` frames (or advancing the audio) would sync them.
- ``lse_d`` = that smallest mean distance (lower is better),
- ``lse_c`` = the median over offsets of the mean distance minus the smallest (higher is better).

Distances are Euclidean between unit embeddings (so in [0, 2]); the numbers are comparable between
runs of this sync expert, not with the published numbers of the original SyncNet.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from engine.models.sync import SyncConfig


class SyncModel(Protocol):
    config: SyncConfig

    def embed_video(self, mouth: torch.Tensor) -> torch.Tensor: ...

    def embed_audio(self, mel: torch.Tensor) -> torch.Tensor: ...


@torch.no_grad()
def _embed(fn, x: np.ndarray, chunk: int) -> torch.Tensor:
    return torch.cat([fn(torch.from_numpy(np.ascontiguousarray(x[i : i + chunk]))).float() for i in range(0, len(x), chunk)])


@torch.no_grad()
def sync_scores(model: SyncModel, mouth: np.ndarray, mel: np.ndarray, mel_index: np.ndarray, *, max_offset_frames: int = 15,
                chunk: int = 256) -> dict:
    """Sync of one segment: ``mouth`` (F, h, w) float in [-1, 1] (``mouth_from_patches``), ``mel`` (T, 80) log-mel,
    ``mel_index`` (F,) the mel row centred on each frame.

    Returns ``offset_frames`` (int), ``lse_d``, ``lse_c`` (floats), ``distance_by_offset`` (list over
    ``offsets``, NaN where no frame pair exists) and ``frames`` (video windows used at offset 0).
    """
    cfg = model.config
    n = len(mouth)
    if len(mel_index) != n:
        raise ValueError(f"mouth has {n} frames but mel_index has {len(mel_index)}")
    half = cfg.frames // 2
    if n < cfg.frames:
        raise ValueError(f"segment of {n} frames is shorter than a {cfg.frames}-frame window")
    if was_training := getattr(model, "training", False):
        model.eval()
    try:
        # video windows centred on frames half .. n - 1 - half
        win = np.lib.stride_tricks.sliding_window_view(mouth.astype(np.float32), cfg.frames, axis=0)  # (n - 2 half, h, w, frames)
        video = _embed(model.embed_video, np.moveaxis(win, -1, 1), chunk)  # (Fv, D)
        v_frames = np.arange(half, n - half)
        # audio windows centred on every frame whose rows lie inside the mel
        rows = mel_index[:, None] + np.arange(-cfg.mel_before_rows, cfg.mel_after_rows + 1)[None, :]  # (F, rows)
        a_ok = (rows.min(axis=1) >= 0) & (rows.max(axis=1) < len(mel))
        a_frames = np.flatnonzero(a_ok)
        if len(a_frames) == 0:
            raise ValueError("no frame has a complete audio window")
        audio = _embed(model.embed_audio, mel.astype(np.float32)[rows[a_frames]], chunk)  # (Fa, D)
    finally:
        if was_training:
            model.train()
    # per offset: the frames t with a video window at t and an audio window at t + o
    v_row = np.full(n, -1)
    v_row[v_frames] = np.arange(len(v_frames))
    a_row = np.full(n, -1)
    a_row[a_frames] = np.arange(len(a_frames))
    offsets = np.arange(-max_offset_frames, max_offset_frames + 1)
    means = np.full(len(offsets), np.nan)
    for k, o in enumerate(offsets):
        t = v_frames[(v_frames + o >= 0) & (v_frames + o < n)]
        t = t[a_row[t + o] >= 0]
        if len(t):
            means[k] = float((video[v_row[t]] - audio[a_row[t + o]]).norm(dim=1).mean())
    if np.all(np.isnan(means)):
        raise ValueError("no offset has a frame pair with both windows")
    best = int(np.nanargmin(means))
    lse_d = float(means[best])
    return {"offset_frames": int(offsets[best]), "lse_d": lse_d, "lse_c": float(np.nanmedian(means) - lse_d),
            "offsets": offsets.tolist(), "distance_by_offset": [float(m) for m in means],
            "frames": int((a_row[v_frames] >= 0).sum())}
