"""Audio encoder: per-frame log-mel window -> feature a_t, smoothed by a learned temporal filter.

After DiffTalk (section 3.2): a per-frame feature from the mel window around the frame, then
a temporal filter that attends over neighbouring frames' features and returns their
attention-weighted sum. Here the filter sees ``filter_context_frames`` past frames and at most
``filter_lookahead_frames`` future ones, so that it streams: the lookahead is latency.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F


@dataclass(frozen=True)
class AudioEncoderConfig:
    input_kind: str = "mel"  # "mel": log-mel windows (B, T, W, n_mels); "speech_embedding": (B, T, 96) pretrained embeddings
    embedding_dim: int = 96  # size of a speech embedding (engine/audio/speech_embedding.py)
    n_mels: int = 80  # log-mel bins (engine/audio/mel.py)
    mel_before: int = 12  # mel rows (10 ms each) before the frame's centre row in its window
    mel_after: int = 3  # mel rows after the centre row (audio lookahead inside a frame's window)
    feature_dim: int = 64  # D_A, the per-frame feature size
    hidden: int = 128  # conv width
    filter_context_frames: int = 8  # past video frames the temporal filter attends to
    filter_lookahead_frames: int = 1  # future video frames it attends to (<= 2: it is latency)
    mel_mean: float = 0.0  # normalisation of the input (log-mel or embedding), set from training data
    mel_std: float = 1.0

    @property
    def window_rows(self) -> int:
        return self.mel_before + 1 + self.mel_after

    @property
    def filter_taps(self) -> int:
        return self.filter_context_frames + 1 + self.filter_lookahead_frames


class AudioEncoder(nn.Module):
    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        if config.filter_context_frames < 0 or config.filter_lookahead_frames < 0 or config.mel_before < 0 or config.mel_after < 0:
            raise ValueError("context and lookahead sizes must be >= 0")
        if config.filter_lookahead_frames > 2:
            raise ValueError("filter_lookahead_frames must be at most 2 (it adds latency)")
        if config.input_kind not in ("mel", "speech_embedding"):
            raise ValueError(f"input_kind must be mel or speech_embedding, got {config.input_kind!r}")
        self.config = config
        h, d = config.hidden, config.feature_dim
        if config.input_kind == "mel":
            self.conv = nn.Sequential(
                nn.Conv1d(config.n_mels, h, 3, padding=1), nn.GELU(),
                nn.Conv1d(h, h, 3, stride=2, padding=1), nn.GELU(),
                nn.Conv1d(h, h, 3, stride=2, padding=1), nn.GELU(),
            )
        else:
            self.embed = nn.Sequential(nn.Linear(config.embedding_dim, h), nn.GELU(), nn.Linear(h, h), nn.GELU())
        self.proj = nn.Linear(h, d)
        k = config.filter_taps
        self.filter_score = nn.Sequential(nn.Linear(k * d, 128), nn.GELU(), nn.Linear(128, k))
        self.out_norm = nn.LayerNorm(d)

    def frame_features(self, mel_windows: torch.Tensor) -> torch.Tensor:
        """(B, T, W, n_mels) log-mel windows, or (B, T, 96) speech embeddings -> raw per-frame features (B, T, D)."""
        if self.config.input_kind == "speech_embedding":
            return self.proj(self.embed((mel_windows - self.config.mel_mean) / self.config.mel_std))
        b, t, w, n = mel_windows.shape
        x = (mel_windows - self.config.mel_mean) / self.config.mel_std
        x = x.reshape(b * t, w, n).transpose(1, 2)  # (B*T, n_mels, W)
        x = self.conv(x).mean(dim=2)  # (B*T, H)
        return self.proj(x).reshape(b, t, -1)  # (B, T, D)

    def smooth_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, T, K, D) windows of raw features (K = filter taps, oldest first) -> (B, T, D)."""
        b, t, k, d = windows.shape
        w = torch.softmax(self.filter_score(windows.reshape(b, t, k * d)), dim=-1)  # (B, T, K)
        return self.out_norm((w.unsqueeze(-1) * windows).sum(dim=2))  # (B, T, D)

    def smooth(self, feats: torch.Tensor) -> torch.Tensor:
        """Temporal filter over a whole sequence (B, T, D), edges padded by repetition."""
        c, la = self.config.filter_context_frames, self.config.filter_lookahead_frames
        x = torch.cat([feats[:, :1].expand(-1, c, -1), feats, feats[:, -1:].expand(-1, la, -1)], dim=1)  # (B, T+c+la, D)
        windows = x.unfold(1, c + 1 + la, 1).permute(0, 1, 3, 2)  # (B, T, K, D)
        return self.smooth_windows(windows)

    def forward(self, mel_windows: torch.Tensor) -> torch.Tensor:
        """(B, T, W, n_mels) log-mel windows (or (B, T, 96) embeddings) -> smoothed features (B, T, D)."""
        return self.smooth(self.frame_features(mel_windows))
