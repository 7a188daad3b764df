"""DDIM (Song et al. 2021), deterministic (eta = 0), for a v-prediction denoiser.

The sampler sees only ``denoiser(z, t, cond) -> v``; ``cond`` is passed through untouched.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from engine.sampling.schedule import alpha_sigma, predict_eps_from_v, predict_x_from_v

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def ddim_times(steps: int, *, t_start: float = 1.0) -> torch.Tensor:
    """``steps + 1`` times from ``t_start`` down to 0, evenly spaced."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(t_start, 0.0, steps + 1)


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, z: torch.Tensor, cond: Any, *, steps: int, t_start: float = 1.0) -> torch.Tensor:
    """Run ``steps`` DDIM steps from ``z`` (noise at ``t_start``) and return the clean sample x_0.

    For each step from t to s < t (Song et al. 2021, eq. 12 with sigma_t = 0):
      1. v = D(z_t, t): the model's velocity prediction
      2. x = alpha_t z_t - sigma_t v: the predicted clean sample
      3. eps = sigma_t z_t + alpha_t v: the predicted noise
      4. z_s = alpha_s x + sigma_s eps: the deterministic update; the last step returns x itself
    """
    times = ddim_times(steps, t_start=t_start)
    b = z.shape[0]
    for i in range(steps):
        t, s = times[i], times[i + 1]
        tt = t.expand(b).to(z.device)
        v = denoiser(z, tt, cond)  # 1.
        alpha_t, sigma_t = alpha_sigma(tt)
        x = predict_x_from_v(z=z, v=v, alpha=alpha_t, sigma=sigma_t)  # 2.
        if i == steps - 1:
            return x
        eps = predict_eps_from_v(z=z, v=v, alpha=alpha_t, sigma=sigma_t)  # 3.
        alpha_s, sigma_s = alpha_sigma(s.expand(b).to(z.device))
        z = alpha_s.reshape(-1, *[1] * (z.ndim - 1)) * x + sigma_s.reshape(-1, *[1] * (z.ndim - 1)) * eps  # 4.
    return z
