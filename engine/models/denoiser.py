"""Conditional latent denoiser: a UNet over the mouth-region latent with cross-attention (DiffTalk).

Inputs (their names are the ONNX input names):
  z          (B, C, S, S)  noisy latent at time t
  t          (B,)          diffusion time in [0, 1]
  masked     (B, C, S, S)  the avatar's latent with the mouth region zeroed (what stays)
  mask       (B, 1, S, S)  1 where the face is repainted
  reference  (B, C, S, S)  the avatar's latent warped to this frame's landmarks (000's warped motion)
  previous   (B, C, S, S)  the previous output latent (progressive reference, DiffTalk 3.3); zeros if none
  landmarks  (B, K, 2)     this frame's moving landmarks in patch units (from A2L)
  audio      (B, A, D)     audio feature tokens (smoothed a_t of the last A frames), cross-attention keys/values
Output: v (B, C, S, S), the v-prediction (Salimans & Ho 2022).
The spatial conditions are concatenated with z; time and landmarks modulate every block (FiLM);
landmarks (as one token) and audio are the cross-attention context.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from engine.models.blocks import ResBlock, group_norm, timestep_embedding


@dataclass(frozen=True)
class DenoiserConfig:
    latent_channels: int = 4  # C, the autoencoder's latent channels
    latent_size: int = 32  # S, latent side
    widths: tuple[int, ...] = (32, 64, 128)  # UNet widths per resolution (len - 1 downsamplings)
    attention: tuple[bool, ...] = (False, True, True)  # cross-attention at each resolution
    emb_dim: int = 128  # time + landmark embedding size
    n_landmarks: int = 57  # K, landmarks from A2L
    audio_dim: int = 64  # D, audio feature size
    audio_tokens: int = 4  # A, audio frames given as context
    heads: int = 4  # attention heads
    mask_dilate_cells: int = 1  # the binary latent mask is grown by this many cells (the encoder's receptive field leaks the mouth into its neighbours)

    @property
    def in_channels(self) -> int:
        return 4 * self.latent_channels + 1  # z, masked, reference, previous, mask


def latent_mask(pooled: torch.Tensor, dilate_cells: int) -> torch.Tensor:
    """The denoiser's binary mask (B, 1, s, s) from the pixel mask max-pooled to latent cells."""
    m = (pooled > 0.01).float()
    if dilate_cells > 0:
        m = F.max_pool2d(m, 2 * dilate_cells + 1, stride=1, padding=dilate_cells)
    return m


class CrossAttention(nn.Module):
    def __init__(self, ch: int, ctx_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(ch)
        self.q = nn.Linear(ch, ch, bias=False)
        self.kv = nn.Linear(ctx_dim, 2 * ch, bias=False)
        self.out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.q(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        k, v = self.kv(ctx).chunk(2, dim=-1)  # (B, N, C) each
        nh, dh = self.heads, c // self.heads
        q = q.reshape(b, h * w, nh, dh).transpose(1, 2)  # (B, nh, HW, dh)
        k = k.reshape(b, -1, nh, dh).transpose(1, 2)  # (B, nh, N, dh)
        v = v.reshape(b, -1, nh, dh).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) * dh**-0.5, dim=-1)  # (B, nh, HW, N)
        o = (att @ v).transpose(1, 2).reshape(b, h * w, c)  # (B, HW, C)
        return x + self.out(o).transpose(1, 2).reshape(b, c, h, w)


class Level(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int, ctx: int, heads: int, attn: bool):
        super().__init__()
        self.res = ResBlock(c_in, c_out, emb)
        self.attn = CrossAttention(c_out, ctx, heads) if attn else None

    def forward(self, x, emb, ctx):
        x = self.res(x, emb)
        return self.attn(x, ctx) if self.attn is not None else x


class Denoiser(nn.Module):
    def __init__(self, config: DenoiserConfig):
        super().__init__()
        self.config = config
        cfg = config
        e, w = cfg.emb_dim, cfg.widths
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.lm_mlp = nn.Sequential(nn.Linear(2 * cfg.n_landmarks, e), nn.SiLU(), nn.Linear(e, e))
        self.audio_proj = nn.Linear(cfg.audio_dim, e)
        self.audio_pos = nn.Parameter(torch.zeros(1, cfg.audio_tokens, e))
        self.stem = nn.Conv2d(cfg.in_channels, w[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, c in enumerate(w):
            self.down.append(Level(w[i - 1] if i else w[0], c, e, e, cfg.heads, cfg.attention[i]))
            if i + 1 < len(w):
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = Level(w[-1], w[-1], e, e, cfg.heads, True)
        self.up = nn.ModuleList()
        self.upconv = nn.ModuleList()
        for i in reversed(range(len(w))):
            self.up.append(Level(2 * w[i], w[i], e, e, cfg.heads, cfg.attention[i]))
            if i > 0:
                self.upconv.append(nn.Conv2d(w[i], w[i - 1], 3, padding=1))
        self.norm = group_norm(w[0])
        self.out = nn.Conv2d(w[0], cfg.latent_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z, t, masked, mask, reference, previous, landmarks, audio):
        b = z.shape[0]
        lm = self.lm_mlp((landmarks - 0.5).reshape(b, -1))  # (B, E)
        emb = self.time_mlp(timestep_embedding(t, self.config.emb_dim)) + lm  # (B, E)
        ctx = torch.cat([self.audio_proj(audio) + self.audio_pos, lm[:, None]], dim=1)  # (B, A + 1, E)
        x = self.stem(torch.cat([z, masked, reference, previous, mask], dim=1))
        skips = []
        for i, level in enumerate(self.down):
            x = level(x, emb, ctx)
            skips.append(x)
            if i < len(self.downsample):
                x = self.downsample[i](x)
        x = self.mid(x, emb, ctx)
        for j, level in enumerate(self.up):
            x = level(torch.cat([x, skips.pop()], dim=1), emb, ctx)
            if j < len(self.upconv):
                x = self.upconv[j](F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.norm(x)))
