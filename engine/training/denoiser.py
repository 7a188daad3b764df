"""Train the conditional latent denoiser (v-prediction) on speech shards, with frozen autoencoder
and audio encoder.

Per sample (a target frame t of a training segment):
  - target: the autoencoder latent of frame t's patch;
  - masked: that latent with the mouth region (target's and reference's masks) zeroed;
  - reference: the latent of another frame r of the segment (the "portrait"), warped so that
    its landmarks move to frame t's (engine/models/warp.py);
  - previous: the latent of frame t - d (d in [prev_min, prev_max], never t - 1's near copy by
    default), with noise added, or zeros with probability ``p_no_previous``: at inference it is
    the previous output, which is near but not equal to the target, so an exact neighbour
    would teach the model to copy it (the shortcut DiffTalk warns of);
  - landmarks: frame t's moving landmarks (jittered: at inference they come from A2L);
  - audio: the smoothed audio features of frames t - A + 1 .. t.
Loss: MSE on v, weighted ``1 + mask_weight * mask`` (the model repaints only the mask).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.face.region import moving_indices, patch_mask, pool_mask, region_named, to_patch_units, warp_indices
from engine.models.audio_encoder import AudioEncoder, AudioEncoderConfig
from engine.models.autoencoder import AutoencoderConfig, AutoencoderKL
from engine.models.denoiser import Denoiser, DenoiserConfig, latent_mask
from engine.models.io import config_from_dict, load_model, save_model
from engine.models.warp import warp
from engine.sampling import alpha_sigma, ddim_sample, predict_v
from engine.training.autoencoder import to_tensor
from engine.training.data import FrameStore
from engine.training.loop import TrainConfig, train


def _file_hash(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


class LatentTable:
    """Per-frame conditioning tensors of a FrameStore's audio segments, computed once and cached."""

    def __init__(self, store: FrameStore, ae: AutoencoderKL, enc: AudioEncoder, cache: Path | None, key: str):
        if cache is not None and cache.is_file():
            z = np.load(cache)
            if str(z["key"]) == key:
                self._set(z)
                return
        n = len(store)
        lat = np.zeros((n, ae.config.latent_channels, ae.config.latent_size, ae.config.latent_size), np.float32)
        mask = np.zeros((n, 1, ae.config.latent_size, ae.config.latent_size), np.float32)
        audio = np.zeros((n, enc.config.feature_dim), np.float32)
        usable = np.zeros(n, bool)
        d = ae.config.downsample
        with torch.no_grad():
            for seg_i in store.audio_segments():
                s = store.segments[seg_i]
                sl = slice(s.start, s.start + s.length)
                for i in range(s.start, s.start + s.length, 64):
                    j = slice(i, min(i + 64, s.start + s.length))
                    lat[j] = ae.encode(to_tensor(store.patches[j])).numpy()
                frames = np.arange(s.length)
                mel = store.mel_window(seg_i, frames, enc.config.mel_before, enc.config.mel_after)
                audio[sl] = enc(torch.from_numpy(mel)[None])[0].numpy()
                for k in range(s.start, s.start + s.length):
                    m = patch_mask(store.landmarks[k] * store.crop_size_px, store.crop_size_px, region=store.region)
                    mask[k, 0] = pool_mask(m, d)
                usable[sl] = True
        self.latents, self.masks, self.audio, self.usable = lat, mask, audio, usable
        if cache is not None:
            np.savez(cache, key=key, latents=lat, masks=mask, audio=audio, usable=usable)

    def _set(self, z) -> None:
        self.latents, self.masks, self.audio, self.usable = z["latents"], z["masks"], z["audio"], z["usable"]


def build_batch(store: FrameStore, table: LatentTable, rng: np.random.Generator, idx: np.ndarray, dcfg: DenoiserConfig, opts: dict) -> dict:
    """Conditioning tensors for target frames ``idx`` (global indices)."""
    b = len(idx)
    mov = moving_indices()
    ref = store.neighbour(rng, idx, opts.get("ref_min", 8), opts.get("ref_max", 200))
    prev = store.neighbour(rng, idx, opts.get("prev_min", 2), opts.get("prev_max", 6), before_only=True)
    has_prev = prev >= 0
    prev = np.where(has_prev, prev, idx)
    x = torch.from_numpy(table.latents[idx])
    m_bin = latent_mask(torch.from_numpy(np.maximum(table.masks[idx], table.masks[ref])), dcfg.mask_dilate_cells)
    lm_all_t = torch.from_numpy(to_patch_units(store.landmarks[idx]))  # (B, 478, 2) landmark units (lower_face), the token's
    wi = warp_indices()
    reg = store.region  # the latent warp works in the generated region's units
    reference = warp(torch.from_numpy(table.latents[ref]), torch.from_numpy(to_patch_units(store.landmarks[ref][:, wi], reg)),
                     torch.from_numpy(to_patch_units(store.landmarks[idx][:, wi], reg)))
    previous = torch.from_numpy(table.latents[prev])
    previous = previous + opts.get("prev_noise", 0.1) * torch.randn_like(previous)
    keep = torch.from_numpy((rng.random(b) >= opts.get("p_no_previous", 0.3)) & has_prev).float()[:, None, None, None]
    seg = store.segment_of[idx]
    starts = np.array([store.segments[s].start for s in seg])
    a_idx = np.maximum(idx[:, None] + np.arange(-dcfg.audio_tokens + 1, 1)[None, :], starts[:, None])  # (B, A)
    lm = lm_all_t[:, mov] + opts.get("landmark_jitter", 0.003) * torch.randn(b, len(mov), 2)
    return {"x": x, "masked": x * (1 - m_bin), "mask": m_bin, "reference": reference, "previous": previous * keep,
            "landmarks": lm, "audio": torch.from_numpy(table.audio[a_idx])}


def train_denoiser(data_dirs: list[str], out_dir: str, model_cfg: dict, tcfg: TrainConfig, *, autoencoder: str, audio_encoder: str,
                   mask_weight: float = 4.0, region: str | None = None, init: str | None = None, **opts) -> None:
    """``region``: the generated patch (engine/face/region.py, default lower_face); ``init``: a saved
    denoiser's stem to start from (fine-tuning: same widths, e.g. the first bundle's for the mouth region)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ae = load_model(AutoencoderKL, AutoencoderConfig, autoencoder)
    enc = load_model(AudioEncoder, AudioEncoderConfig, audio_encoder)
    reg = region_named(region)
    opts["region"] = reg.name
    store = FrameStore(data_dirs, split="train", region=reg)
    key = _file_hash(Path(autoencoder).with_suffix(".pt"), Path(audio_encoder).with_suffix(".pt")) + f"-{len(store)}"
    table = LatentTable(store, ae, enc, out / "latent_cache.npz", key)
    dcfg = config_from_dict(DenoiserConfig, {**model_cfg, "latent_channels": ae.config.latent_channels, "latent_size": ae.config.latent_size,
                                             "n_landmarks": len(moving_indices()), "audio_dim": enc.config.feature_dim})
    usable = np.nonzero(table.usable)[0]
    print(f"denoiser: {len(usable)} training frames with audio; latent std {table.latents[usable].std():.3f}")
    torch.manual_seed(tcfg.seed)
    model = Denoiser(dcfg)
    if init:
        model.load_state_dict(load_model(Denoiser, DenoiserConfig, init).state_dict())
        print(f"denoiser: initialised from {init}")

    def make_batch(rng):
        idx = usable[rng.integers(0, len(usable), tcfg.batch_size)]
        batch = build_batch(store, table, rng, idx, dcfg, opts)
        batch["t"] = torch.from_numpy(rng.random(len(idx)).astype(np.float32))
        batch["eps"] = torch.from_numpy(rng.standard_normal(batch["x"].shape).astype(np.float32))
        return batch

    def loss_fn(m, bt):
        alpha, sigma = alpha_sigma(bt["t"])
        z = alpha[:, None, None, None] * bt["x"] + sigma[:, None, None, None] * bt["eps"]
        v = m(z, bt["t"], bt["masked"], bt["mask"], bt["reference"], bt["previous"], bt["landmarks"], bt["audio"])
        target = predict_v(x=bt["x"], eps=bt["eps"], alpha=alpha, sigma=sigma)
        w = 1.0 + mask_weight * bt["mask"]
        loss = (w * (v.float() - target) ** 2).mean() / (1.0 + mask_weight * bt["mask"].mean())
        return loss, {"mse_in_mask": float((((v.detach().float() - target) ** 2) * bt["mask"]).sum() / bt["mask"].sum().clamp_min(1) / v.shape[1])}

    trained = train(name="denoiser", model=model, make_batch=make_batch, loss_fn=loss_fn, cfg=tcfg, out_dir=out)
    save_model(trained, out / "denoiser")
    report = evaluate_denoiser(trained, ae, enc, data_dirs, opts)
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    print("denoiser held-out:", json.dumps(report))


@torch.no_grad()
def evaluate_denoiser(model: Denoiser, ae: AutoencoderKL, enc: AudioEncoder, data_dirs: list[str], opts: dict, *, frames: int = 64, steps: int = 8) -> dict:
    """Held-out single-frame reconstruction (ground-truth landmarks, no previous frame): lower-face
    PSNR of the decoded patch against ground truth, beside the warped-reference baseline."""
    from engine.metrics import psnr

    reg = region_named(opts.get("region"))
    try:
        store = FrameStore(data_dirs, split="eval", region=reg)
    except ValueError:
        return {"frames": 0}
    table = LatentTable(store, ae, enc, None, "")
    usable = np.nonzero(table.usable)[0]
    rng = np.random.default_rng(0)
    idx = usable[np.linspace(0, len(usable) - 1, min(frames, len(usable))).astype(int)]
    bt = build_batch(store, table, rng, idx, model.config, {**opts, "p_no_previous": 1.0, "landmark_jitter": 0.0})
    cond = bt

    def d(z, t, c):
        return model(z, t, c["masked"], c["mask"], c["reference"], c["previous"], c["landmarks"], c["audio"])

    g = torch.Generator().manual_seed(0)
    x0 = ddim_sample(d, torch.randn(bt["x"].shape, generator=g), cond, steps=steps)
    gt = to_tensor(store.patches[idx])
    w = torch.from_numpy(np.stack([patch_mask(store.landmarks[k] * store.crop_size_px, store.crop_size_px, region=reg) for k in idx]))[:, None]
    gen = ae.decode(x0).clamp(-1, 1)
    warped = ae.decode(bt["reference"]).clamp(-1, 1)
    recon = ae.decode(bt["x"]).clamp(-1, 1)
    return {"frames": int(len(idx)), "steps": steps,
            "psnr_lower_face_db": float(psnr(gen, gt, weight=w).mean()),
            "warp_only_psnr_lower_face_db": float(psnr(warped, gt, weight=w).mean()),
            "autoencoder_ceiling_psnr_lower_face_db": float(psnr(recon, gt, weight=w).mean())}
