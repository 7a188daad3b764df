"""Noise schedule and v-parameterisation maths (keyword-only pure functions).

Continuous time t in [0, 1]. The cosine schedule of Nichol & Dhariwal (2021) written through
its log signal-to-noise ratio, as in Salimans & Ho (2022, "Progressive distillation", eq. 1-2
and appendix): logsnr(t) = -2 log tan(a t + b), clipped to [logsnr_min, logsnr_max];
alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr), so alpha^2 + sigma^2 = 1.
z_t = alpha_t x + sigma_t eps; v = alpha_t eps - sigma_t x (Salimans & Ho, section 4).
"""
from __future__ import annotations

import math

import torch

LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0


def logsnr(t: torch.Tensor, *, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX) -> torch.Tensor:
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    return -2.0 * torch.log(torch.tan(a * t.double() + b)).to(torch.float32)


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) for times ``t`` (any shape)."""
    ls = logsnr(t)
    return torch.sigmoid(ls).sqrt(), torch.sigmoid(-ls).sqrt()


def _b(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample (B,) tensor against (B, ...)."""
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


def predict_v(*, x: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Training target: v = alpha eps - sigma x."""
    return _b(alpha, x) * eps - _b(sigma, x) * x


def predict_x_from_v(*, z: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x = alpha z - sigma v."""
    return _b(alpha, z) * z - _b(sigma, z) * v


def predict_eps_from_v(*, z: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """eps = sigma z + alpha v."""
    return _b(sigma, z) * z + _b(alpha, z) * v
