"""Sync expert: a small contrastive audio/mouth model in the spirit of SyncNet (Chung & Zisserman 2016).

Two encoders map a short window of mouth frames and the log-mel window around the same instant
to L2-normalised embeddings that lie close when the two are in sync. The distance between them
gives the LSE-D / LSE-C metrics (engine/eval/sync_metric.py) and can serve as a training loss.

Windows: ``frames`` consecutive mouth frames centred on frame ``t`` and ``mel_rows`` log-mel rows
(10 ms hop) centred on the mel row of frame ``t``: rows ``c - mel_rows // 2 .. c + mel_rows // 2 - 1``
(``mel_before_rows`` / ``mel_after_rows``). With the defaults both span 0.2 s at 25 fps.

No I/O here: ``engine/models/io.py`` saves and loads the model, ``engine/training/sync.py`` trains it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.models.blocks import group_norm


@dataclass(frozen=True)
class SyncConfig:
    patch_size_px: int = 128  # side of the lower-face patch the mouth box refers to
    mouth_box_px: tuple[int, int, int, int] = (28, 36, 72, 64)  # x0, y0, width, height of the mouth crop in patch pixels
    downsample: int = 2  # mouth crop is average-pooled by this factor (1: full resolution)
    frames: int = 5  # video frames per window (odd; centred on the window's frame)
    mel_rows: int = 20  # log-mel rows per window (10 ms each), centred on the window's centre frame
    mel_bins: int = 80  # mel bands per row
    mel_offset: float = -9.0  # subtracted from the natural-log mel before the audio encoder
    mel_scale: float = 3.5  # ...then divided by this (about unit variance on speech)
    normalize_video: bool = True  # standardise each mouth window (mean 0, unit std over frames and pixels): skin tone and lighting drop out
    embed_dim: int = 128  # size of the shared embedding space
    video_channels: tuple[int, ...] = (32, 64, 128, 256)  # conv widths of the video encoder; each after the first halves H and W
    audio_channels: tuple[int, ...] = (128, 192, 256)  # conv1d widths of the audio encoder; each after the first halves time

    @property
    def mouth_size_px(self) -> tuple[int, int]:
        """(h, w) of the mouth images the video encoder takes."""
        _, _, w, h = self.mouth_box_px
        return h // self.downsample, w // self.downsample

    @property
    def mel_before_rows(self) -> int:
        return self.mel_rows // 2

    @property
    def mel_after_rows(self) -> int:
        return self.mel_rows - self.mel_rows // 2 - 1


def mouth_from_patches(patches: np.ndarray, cfg: SyncConfig = SyncConfig(), *, shift_px: tuple[int, int] = (0, 0)) -> np.ndarray:
    """(N, P, P, 3) uint8 RGB patches -> (N, h, w) float32 grayscale mouth crops in [-1, 1].

    Crops ``cfg.mouth_box_px`` (moved by ``shift_px`` = (dx, dy), clamped inside the patch) and
    average-pools by ``cfg.downsample``.
    """
    if patches.ndim != 4 or patches.shape[-1] != 3:
        raise ValueError(f"patches must be (N, P, P, 3), got {patches.shape}")
    p = patches.shape[1]
    if p != cfg.patch_size_px:
        raise ValueError(f"patches are {p} px; the sync config expects {cfg.patch_size_px}")
    x0, y0, w, h = cfg.mouth_box_px
    x0 = int(np.clip(x0 + shift_px[0], 0, p - w))
    y0 = int(np.clip(y0 + shift_px[1], 0, p - h))
    rgb = patches[:, y0 : y0 + h, x0 : x0 + w, :].astype(np.float32)  # (N, h, w, 3)
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)  # (N, h, w)
    d = cfg.downsample
    if d > 1:
        n = len(grey)
        grey = grey[:, : h // d * d, : w // d * d].reshape(n, h // d, d, w // d, d).mean(axis=(2, 4))
    return (grey / 127.5 - 1.0).astype(np.float32)


def _conv2d(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), group_norm(c_out), nn.SiLU())


def _conv1d(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(c_in, c_out, 3, stride=stride, padding=1), group_norm(c_out), nn.SiLU())


class SyncExpert(nn.Module):
    """Video and audio encoders into one unit-norm embedding space (cosine similarity = sync)."""

    def __init__(self, config: SyncConfig = SyncConfig()):
        super().__init__()
        if config.frames % 2 != 1:
            raise ValueError(f"frames must be odd, got {config.frames}")
        self.config = config
        vc, ac = config.video_channels, config.audio_channels
        # video: the window's frames are the input channels (early fusion, as in SyncNet)
        layers = [_conv2d(config.frames, vc[0], 1)]
        layers += [_conv2d(a, b, 2) for a, b in zip(vc[:-1], vc[1:])]
        self.video = nn.Sequential(*layers)
        self.video_head = nn.Linear(vc[-1], config.embed_dim)
        # audio: mel bands are the input channels, convolved along time; the head sees every
        # remaining time step (flattened), so where in the window a sound falls matters
        layers = [_conv1d(config.mel_bins, ac[0], 1)]
        layers += [_conv1d(a, b, 2) for a, b in zip(ac[:-1], ac[1:])]
        self.audio = nn.Sequential(*layers)
        t = config.mel_rows
        for _ in ac[1:]:
            t = (t + 1) // 2
        self.audio_head = nn.Linear(ac[-1] * t, config.embed_dim)
        # CLIP-style learnable temperature for the contrastive loss (not used by the embeddings)
        self.log_logit_scale = nn.Parameter(torch.tensor(float(np.log(10.0))))

    def embed_video(self, mouth: torch.Tensor) -> torch.Tensor:
        """(B, frames, h, w) grayscale mouth windows in [-1, 1] -> (B, D) unit vectors."""
        if self.config.normalize_video:
            mean = mouth.mean(dim=(1, 2, 3), keepdim=True)
            std = mouth.std(dim=(1, 2, 3), keepdim=True)
            mouth = (mouth - mean) / (std + 0.05)
        h = self.video(mouth)  # (B, C, h', w')
        return F.normalize(self.video_head(h.mean(dim=(2, 3))), dim=-1)  # (B, D)

    def embed_audio(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, mel_rows, mel_bins) natural-log mel windows -> (B, D) unit vectors."""
        c = self.config
        x = ((mel - c.mel_offset) / c.mel_scale).transpose(1, 2)  # (B, bins, rows)
        h = self.audio(x)  # (B, C, t)
        return F.normalize(self.audio_head(h.flatten(1)), dim=-1)  # (B, D)

    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.clamp(max=float(np.log(100.0))).exp()
