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
    arch: str = "gru"  # "gru", or "linear": a ridge readout of the audio feature and the reference
    smoothing: float = 1.0  # linear only: weight of the new frame in a one-pole low-pass of the displacement (1: none);
    #                         below 1 the state carries the last smoothed displacement: layers 1, hidden 2K

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
            if not 0.0 < config.smoothing <= 1.0:
                raise ValueError(f"A2LConfig.smoothing must be in (0, 1], got {config.smoothing}")
            if config.smoothing < 1.0 and (config.layers, config.hidden) != (1, k2):
                raise ValueError(f"a smoothed linear A2L carries its displacement as the state: layers 1, hidden {k2}")
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
            d = self.readout(x)  # (B, T, 2K)
            if self.config.smoothing < 1.0:
                d, state = self._low_pass(d, state)
            return reference[:, None] + d.reshape(b, t, -1, 2), state
        r = self.ref_proj((reference - 0.5).reshape(b, -1))  # (B, H)  (the GRU)
        x = self.drop(self.in_proj(torch.cat([audio, r[:, None].expand(-1, t, -1)], dim=-1)))  # (B, T, H)
        if state is None:
            state = torch.zeros(self.config.layers, b, self.config.hidden, dtype=audio.dtype, device=audio.device)
        h, state = self.gru(x, state)  # (B, T, H)
        delta = self.head(torch.cat([h, r[:, None].expand(-1, t, -1)], dim=-1)) * self.config.delta_scale  # (B, T, 2K)
        return reference[:, None] + delta.reshape(b, t, -1, 2), state

    def _low_pass(self, d: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """s_t = s_(t-1) + a (d_t - s_(t-1)) over (B, T, 2K), from ``state`` (1, B, 2K), in closed form (a (T, T)
        lower-triangular weight matrix: exports to ONNX for any T, and frame by frame equals the whole sequence)."""
        a = self.config.smoothing
        t = torch.arange(d.shape[1], device=d.device)
        lag = (t[:, None] - t[None, :]).to(d.dtype)  # (T, T)
        keep = torch.full_like(lag, 1.0 - a)
        w = torch.where(lag >= 0, a * torch.pow(keep, lag.clamp(min=0.0)), torch.zeros_like(lag))
        decay = torch.pow(torch.full_like(t, 1.0 - a, dtype=d.dtype), (t + 1).to(d.dtype))  # (T,)
        s = torch.einsum("tk,bkd->btd", w, d) + decay[None, :, None] * state[0][:, None, :]
        return s, s[:, -1:].transpose(0, 1).contiguous()
