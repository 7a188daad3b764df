"""Image metrics in torch (used by training losses, the trainers' held-out reports and evaluation)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _gauss(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 2.0) -> torch.Tensor:
    """Per-pixel SSIM (Wang et al. 2004, 11 px Gaussian window) of (B, C, H, W) images, same shape out (valid region)."""
    c = a.shape[1]
    g = _gauss(device=a.device)
    w = (g[:, None] * g[None, :]).expand(c, 1, -1, -1).to(a.dtype)  # (C, 1, 11, 11)
    mu_a = F.conv2d(a, w, groups=c)
    mu_b = F.conv2d(b, w, groups=c)
    s_aa = F.conv2d(a * a, w, groups=c) - mu_a**2
    s_bb = F.conv2d(b * b, w, groups=c) - mu_b**2
    s_ab = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))


def ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 2.0) -> torch.Tensor:
    """Mean SSIM per image, (B,)."""
    return ssim_map(a, b, data_range=data_range).mean(dim=(1, 2, 3))


def psnr(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 2.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR per image in dB, (B,); ``weight`` (B, 1, H, W) restricts it to a (soft) region."""
    se = (a.float() - b.float()) ** 2
    if weight is None:
        mse = se.mean(dim=(1, 2, 3))
    else:
        w = weight.float().expand_as(se)
        mse = (se * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3)).clamp_min(1e-8)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-10))
