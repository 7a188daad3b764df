"""KL-regularised convolutional autoencoder: an image region to a small latent and back.

Default: a 128 px RGB region (the lower face of a 256 px aligned crop) to a 32 x 32 x 4
latent (downsampling 4). ``image_size_px`` and ``channels`` scale it to 256/512 px regions
and wider networks by configuration only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from engine.models.blocks import ResBlock, group_norm


@dataclass(frozen=True)
class AutoencoderConfig:
    image_size_px: int = 128  # side of the square RGB input, pixels
    channels: tuple[int, ...] = (32, 64, 128)  # widths per resolution; len - 1 = number of 2x downsamplings
    latent_channels: int = 4  # channels of the latent
    latent_scale: float = 1.0  # multiply the encoder mean by this to get unit-variance latents (set after training)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size_px // self.downsample


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.channels
        self.stem = nn.Conv2d(3, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, c in enumerate(ch):
            layers.append(ResBlock(c, c))
            if i + 1 < len(ch):
                layers.append(nn.Conv2d(c, ch[i + 1], 3, stride=2, padding=1))
        self.body = nn.Sequential(*layers)
        self.norm = group_norm(ch[-1])
        self.out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.norm(self.body(self.stem(x)))))  # (B, 2 * Cz, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.channels[::-1]
        self.stem = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, c in enumerate(ch):
            layers.append(ResBlock(c, c))
            if i + 1 < len(ch):
                layers.append(nn.Upsample(scale_factor=2.0, mode="nearest"))
                layers.append(nn.Conv2d(c, ch[i + 1], 3, padding=1))
        self.body = nn.Sequential(*layers)
        self.norm = group_norm(ch[-1])
        self.out = nn.Conv2d(ch[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.norm(self.body(self.stem(z)))))  # (B, 3, H, W)


class AutoencoderKL(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) <-> latents (B, Cz, H/d, W/d), already scaled by ``latent_scale``."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode_dist(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior mean and log-variance, each (B, Cz, h, w)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic latent (posterior mean), scaled: (B, Cz, h, w)."""
        return self.encode_dist(x)[0] * self.config.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in about [-1, 1]: (B, 3, H, W)."""
        return self.decoder(z / self.config.latent_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
