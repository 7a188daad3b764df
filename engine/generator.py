"""Per-frame generation from a bundle and an avatar: audio features, A2L landmarks, conditional
denoising of the mouth-region latent (conditioned on the previous output), decoding and
compositing into the portrait. The offline render and (later) the live pipeline call these
stages; nothing here knows about files, clocks or transports.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.audio import frame_times_constant, log_mel, mel_index_for_time
from engine.avatar import Avatar
from engine.bundle import Bundle
from engine.face.paste import paste_back
from engine.face.region import extract_patch, from_patch_units, patch_box, patch_mask, pool_mask, warp_indices
from engine.models.denoiser import latent_mask
from engine.models.warp import warp
from engine.motion.blink import BlinkSampler, close_eyes
from engine.sampling import ddim_sample


class FrameGenerator:
    """Generates the avatar's frames for audio features, one frame at a time (keeps the previous output)."""

    def __init__(self, bundle: Bundle, avatar: Avatar, *, steps: int | None = None, seed: int = 0, blinks: bool = True):
        self.bundle, self.avatar = bundle, avatar
        self.ae, self.enc, self.a2l, self.den = bundle.autoencoder, bundle.audio_encoder, bundle.a2l, bundle.denoiser
        self.steps = int(steps if steps is not None else bundle.steps)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        self.moving = np.asarray(self.a2l.config.landmark_indices)
        self.ref_all = torch.from_numpy(avatar.landmarks_patch_units())[None]  # (1, 478, 2)
        self.ref_moving = self.ref_all[:, self.moving]  # (1, K, 2)
        g = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(avatar.latent.shape, generator=g)  # one noise for every frame: temporally stable
        self.warp_idx = warp_indices()
        self.avatar_mask = avatar.mask()  # (P, P)
        self.avatar_patch = extract_patch(avatar.crop).astype(np.float32)  # (P, P, 3)
        self.blinks = BlinkSampler(bundle.blink_prior, bundle.fps, seed) if blinks else None
        self.previous: torch.Tensor | None = None
        self.a2l_state: torch.Tensor | None = None

    # -- audio and landmarks (whole sequences; causal, so equal to running them frame by frame) --
    @torch.no_grad()
    def audio_features(self, wave_16k: np.ndarray, n_frames: int) -> torch.Tensor:
        """(n_frames, D) smoothed audio features for frames at the bundle's fps."""
        mel = log_mel(wave_16k)  # (T, 80)
        return self.audio_features_from_mel(mel, mel_index_for_time(frame_times_constant(n_frames, self.bundle.fps)))

    @torch.no_grad()
    def audio_features_from_mel(self, mel: np.ndarray, mel_index: np.ndarray) -> torch.Tensor:
        """(F, D) features from a log-mel (T, 80) and each frame's centre row (F,) (e.g. a prepared shard)."""
        c = self.enc.config
        win = np.clip(mel_index[:, None] + np.arange(-c.mel_before, c.mel_after + 1)[None, :], 0, len(mel) - 1)
        return self.enc(torch.from_numpy(mel[win].astype(np.float32))[None])[0]

    @torch.no_grad()
    def landmarks(self, feats: torch.Tensor) -> torch.Tensor:
        """(F, D) features -> (F, K, 2) moving landmarks in patch units (continues the A2L state)."""
        lm, self.a2l_state = self.a2l(feats[None], self.ref_moving, self.a2l_state)
        return lm[0]

    def audio_tokens(self, feats: torch.Tensor, f: int) -> torch.Tensor:
        a = self.den.config.audio_tokens
        idx = np.clip(np.arange(f - a + 1, f + 1), 0, None)
        return feats[idx][None]  # (1, A, D)

    # -- one frame --
    @torch.no_grad()
    def frame(self, lm_moving: torch.Tensor, audio: torch.Tensor, *, warp_only: bool = False) -> np.ndarray:
        """Landmarks (K, 2) and audio tokens (1, A, D) -> the full output frame (H, W, 3) uint8.

        ``warp_only``: skip diffusion and show the portrait's latent warped to the landmarks (a baseline).
        """
        av = self.avatar
        s = av.crop_size_px
        lm_all = self.ref_all.clone()
        lm_all[:, self.moving] = lm_moving[None]
        px_mask = np.maximum(self.avatar_mask, patch_mask(from_patch_units(lm_all[0].numpy()) * s, s))  # (P, P)
        m_lat = latent_mask(torch.from_numpy(pool_mask(px_mask, self.ae.config.downsample))[None, None], self.den.config.mask_dilate_cells)
        cond = {"masked": av.latent * (1 - m_lat), "mask": m_lat, "reference": warp(av.latent, self.ref_all[:, self.warp_idx], lm_all[:, self.warp_idx]),
                "previous": self.previous if self.previous is not None else torch.zeros_like(av.latent),
                "landmarks": lm_moving[None], "audio": audio}

        def denoise(z, t, c):
            return self.den(z, t, c["masked"], c["mask"], c["reference"], c["previous"], c["landmarks"], c["audio"])

        x0 = cond["reference"] if warp_only else ddim_sample(denoise, self.noise, cond, steps=self.steps)
        x0 = m_lat * x0 + (1 - m_lat) * av.latent  # repaint only the mask: the rest is the portrait's own latent
        self.previous = x0
        patch = (self.ae.decode(x0)[0].clamp(-1, 1) + 1) * 127.5  # (3, P, P) float
        patch = self._match_colour(patch.permute(1, 2, 0).numpy(), px_mask)
        x0p, y0p, side = patch_box(s)
        crop = av.crop.copy()
        region = crop[y0p : y0p + side, x0p : x0p + side]
        region[px_mask > 0] = patch[px_mask > 0]  # generated pixels only where the mask is; paste_back does the blending
        mask = np.zeros((s, s), np.float32)
        mask[y0p : y0p + side, x0p : x0p + side] = px_mask
        closure = self.blinks.next() if self.blinks is not None else 0.0
        if closure > 0.0:
            crop, eye_mask = close_eyes(crop, av.landmarks * s, closure)
            mask = np.maximum(mask, eye_mask)
        return paste_back(av.image, crop, av.affine, mask)

    def _match_colour(self, patch: np.ndarray, px_mask: np.ndarray) -> np.ndarray:
        """Shift the generated patch's colour to the portrait's, measured on the mask's feathered rim.

        The denoiser's output drifts towards the colours of its training faces; on the rim (mask
        weight 0.05-0.6, upper half of the patch: cheeks and nose, not the jaw line with what lies
        below it) the generated and the portrait's pixels show the same skin, so their median
        difference per channel is the drift. It is removed inside the mask.
        """
        ref = self.avatar_patch
        rim = (px_mask > 0.05) & (px_mask < 0.6)
        rim[px_mask.shape[0] // 2 :] = False
        if rim.sum() >= 32:
            patch = patch - np.median(patch[rim] - ref[rim], axis=0)[None, None, :]
        return np.clip(np.round(patch), 0, 255).astype(np.uint8)

    def reset(self) -> None:
        """Forget the previous output and the A2L state (a new utterance, or re-anchoring)."""
        self.previous = None
        self.a2l_state = None
