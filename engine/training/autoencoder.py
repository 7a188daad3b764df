"""Train the autoencoder on lower-face patches of prepared shards (L1 + SSIM + a small KL term)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from engine.metrics import psnr, ssim
from engine.models.autoencoder import AutoencoderConfig, AutoencoderKL
from engine.face.region import region_named
from engine.models.io import load_model, save_model
from engine.training.data import FrameStore
from engine.training.loop import TrainConfig, train


def to_tensor(patches: np.ndarray) -> torch.Tensor:
    """(B, P, P, 3) uint8 -> (B, 3, P, P) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def augment(rng: np.random.Generator, x: torch.Tensor) -> torch.Tensor:
    """Horizontal flips and per-image brightness/contrast/colour jitter (unseen portraits vary)."""
    b = x.shape[0]
    flip = torch.from_numpy(rng.random(b) < 0.5)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    gain = torch.from_numpy(rng.uniform(0.8, 1.2, (b, 3, 1, 1)).astype(np.float32))
    bias = torch.from_numpy(rng.uniform(-0.1, 0.1, (b, 1, 1, 1)).astype(np.float32))
    return (x * gain + bias).clamp(-1, 1)


def train_autoencoder(data_dirs: list[str], out_dir: str, model_cfg: AutoencoderConfig, tcfg: TrainConfig, *, kl_weight: float = 1e-6, ssim_weight: float = 0.5,
                      region: str | None = None, init: str | None = None) -> AutoencoderKL:
    """``region``: the patch (engine/face/region.py, default lower_face); ``init``: a saved model's stem
    to start from (fine-tuning, e.g. the lower_face autoencoder for the mouth region)."""
    reg = region_named(region)
    store = FrameStore(data_dirs, split="train", region=reg)
    if store.patches.shape[1] != model_cfg.image_size_px:
        raise ValueError(f"shards give {store.patches.shape[1]} px patches; the config expects {model_cfg.image_size_px}")
    print(f"autoencoder: {len(store)} training patches from {len(store.segments)} segments")
    torch.manual_seed(tcfg.seed)
    model = AutoencoderKL(model_cfg)
    if init:
        model.load_state_dict(load_model(AutoencoderKL, AutoencoderConfig, init).state_dict())
        print(f"autoencoder: initialised from {init}")
    model = model.to(memory_format=torch.channels_last)
    dev = torch.device(tcfg.device)

    def make_batch(rng):
        idx = rng.integers(0, len(store), tcfg.batch_size)
        return augment(rng, to_tensor(store.patches[idx])).to(dev).contiguous(memory_format=torch.channels_last)

    def loss_fn(m, x):
        mean, logvar = m.encode_dist(x)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        y = m.decoder(z)
        with torch.autocast(x.device.type, enabled=False):  # SSIM's variances underflow in bf16
            y = y.float()
            l1 = (y - x).abs().mean()
            s = ssim(y, x).mean()
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float()).mean()
        return l1 + ssim_weight * (1 - s) + kl_weight * kl, {"l1": l1.item(), "ssim": s.item(), "kl": kl.item()}

    model = train(name="autoencoder", model=model, make_batch=make_batch, loss_fn=loss_fn, cfg=tcfg, out_dir=out_dir)
    model = model.float().to(memory_format=torch.contiguous_format)
    # latent scale: unit variance of the posterior means over a sample of training patches
    with torch.no_grad():
        idx = np.random.default_rng(1).integers(0, len(store), 256)
        means = torch.cat([model.encode_dist(to_tensor(store.patches[idx[i:i + 32]]).to(dev))[0] for i in range(0, 256, 32)])
    scale = float(1.0 / means.std().clamp_min(1e-6))
    model.config = dataclasses.replace(model.config, latent_scale=scale)
    save_model(model.cpu(), Path(out_dir) / "autoencoder")
    report = evaluate_autoencoder(model, data_dirs, region=reg)
    report["latent_scale"] = scale
    (Path(out_dir) / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    print("autoencoder held-out:", report)
    return model


@torch.no_grad()
def evaluate_autoencoder(model: AutoencoderKL, data_dirs: list[str], *, max_frames: int = 512, region=None) -> dict:
    """Held-out reconstruction PSNR and SSIM of the patch (every k-th eval frame)."""
    from engine.face.region import LOWER_FACE, patch_mask

    region = region or LOWER_FACE
    try:
        store = FrameStore(data_dirs, split="eval", region=region)
    except ValueError:  # no held-out clip among these shards
        return {"frames": 0}
    idx = np.linspace(0, len(store) - 1, min(max_frames, len(store))).astype(int)
    try:
        from engine.eval.lpips import LPIPS

        lp = LPIPS()
    except ImportError:
        lp = None
    ps, pm, ss, ls = [], [], [], []
    for i in range(0, len(idx), 32):
        j = idx[i:i + 32]
        x = to_tensor(store.patches[j])
        y = model.decode(model.encode(x)).clamp(-1, 1)
        w = torch.from_numpy(np.stack([patch_mask(store.landmarks[k] * store.crop_size_px, store.crop_size_px, region=region) for k in j]))[:, None]
        ps.append(psnr(y, x))
        pm.append(psnr(y, x, weight=w))
        ss.append(ssim(y, x))
        if lp is not None:
            ls.append(lp(y, x))
    out = {"frames": int(len(idx)), "psnr_db": float(torch.cat(ps).mean()), "psnr_lower_face_db": float(torch.cat(pm).mean()),
           "ssim": float(torch.cat(ss).mean())}
    if lp is not None:
        out["lpips"] = float(torch.cat(ls).mean())
        out["lpips_variant"] = lp.name
    return out
