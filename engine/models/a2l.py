"""Audio-to-landmark (A2L): smoothed audio features + the avatar's reference landmarks -> the
speech-driven landmarks (lips and jaw) of each frame, causally (a GRU: it streams one frame at a
time with its hidden state, after Dimitra++'s audio-driven mouth motion).

``arch="linear"``: the landmarks' displacement from the reference is a linear readout of the
frame's audio feature and the reference landmarks themselves (so that an open-mouthed portrait
is closed where the audio says so), fitted in closed form (ridge regression, engine/training/a2l_linear.py).
With about 35 training voices the GRU learns the voices it heard; on unseen ones the readout
follows the real mouth better (docs/training/a2l_readout.json). The graph's inputs and outputs
stay the same: the state passes through unchanged (its size is 1 x 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class A2LConfig:
    landmark_indices: tuple[int, ...] = ()  # MediaPipe indices of the predicted landmarks (engine/face/region.moving_indices)
    feature_dim: int = 64  # audio feature size (AudioEncoderConfig.feature_dim)
    hidden: int = 192  # GRU width
    layers: int = 2  # GRU layers
    delta_scale: float = 0.1  # output scale: predicted offsets are small in patch units
    dropout: float = 0.0  # dropout on the GRU input (training only)
    arch: str = "gru"  # "gru", or "linear": a ridge readout of the audio feature (no state; layers = hidden = 1)

    @property
    def n_landmarks(self) -> int:
        return len(self.landmark_indices)


class AudioToLandmarks(nn.Module):
    def __init__(self, config: A2LConfig):
        super().__init__()
        if config.n_landmarks == 0:
            raise ValueError("A2LConfig.landmark_indices is empty")
        if config.arch not in ("gru", "linear"):
            raise ValueError(f"A2LConfig.arch must be gru or linear, got {config.arch!r}")
        self.config = config
        k2 = 2 * config.n_landmarks
        if config.arch == "linear":
            self.readout = nn.Linear(config.feature_dim + k2, k2)  # [feature, reference] -> displacement from the reference
            return
        self.ref_proj = nn.Sequential(nn.Linear(k2, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.hidden))
        self.in_proj = nn.Linear(config.feature_dim + config.hidden, config.hidden)
        self.drop = nn.Dropout(config.dropout)
        self.gru = nn.GRU(config.hidden, config.hidden, num_layers=config.layers, batch_first=True)
        self.head = nn.Sequential(nn.Linear(config.hidden * 2, config.hidden), nn.GELU(), nn.Linear(config.hidden, k2))

    def forward(self, audio: torch.Tensor, reference: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """audio (B, T, D), reference (B, K, 2) in patch units -> landmarks (B, T, K, 2), GRU state (L, B, H)."""
        b, t, _ = audio.shape
        if self.config.arch == "linear":
            if state is None:
                state = torch.zeros(self.config.layers, b, self.config.hidden, dtype=audio.dtype, device=audio.device)
            x = torch.cat([audio, reference.reshape(b, 1, -1).expand(-1, t, -1)], dim=-1)
            return reference[:, None] + self.readout(x).reshape(b, t, -1, 2), state
        r = self.ref_proj((reference - 0.5).reshape(b, -1))  # (B, H)
        x = self.drop(self.in_proj(torch.cat([audio, r[:, None].expand(-1, t, -1)], dim=-1)))  # (B, T, H)
        if state is None:
            state = torch.zeros(self.config.layers, b, self.config.hidden, dtype=audio.dtype, device=audio.device)
        h, state = self.gru(x, state)  # (B, T, H)
        delta = self.head(torch.cat([h, r[:, None].expand(-1, t, -1)], dim=-1)) * self.config.delta_scale  # (B, T, 2K)
        return reference[:, None] + delta.reshape(b, t, -1, 2), state
