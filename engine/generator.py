"""Per-frame generation from a bundle and an avatar: audio features, A2L landmarks, conditional
denoising of the mouth-region latent (conditioned on the previous output), decoding and
compositing into the portrait. The offline render and the live pipeline call these stages;
nothing here knows about files, clocks or transports, nor which backend runs the graphs (it
calls ``engine.runtime`` graphs with numpy arrays).
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import torch

from engine.audio import frame_times_constant, log_mel, mel_index_for_time
from engine.avatar import Avatar, encode_patch
from engine.compositor import InteriorConfig, interior_mask, new_interior
from engine.face.paste import paste_back
from engine.face.pixel_warp import PixelWarpConfig, PortraitWarp
from engine.face.region import extract_patch, from_patch_units, patch_box, patch_mask, pool_mask, to_patch_units, warp_indices
from engine.models.denoiser import latent_mask
from engine.motion.articulation import Articulation
from engine.motion.feature_centre import FeatureCentre
from engine.motion.blink import BlinkSampler, close_eyes
from engine.motion.head import HeadMotion
from engine.motion.sway import HeadSway
from engine.runtime import Runtime
from engine.sampling import ddim_sample


def _sway_for(avatar: Avatar, fps: int, seed: int, library=None) -> HeadSway | HeadMotion:
    """The head motion about the portrait's face centre, scaled to the face's size in the image:
    real motion replayed from ``library`` (engine/motion/head.py), else the procedural sway."""
    from engine.face.align import invert_transform

    inv = invert_transform(avatar.affine)  # crop -> image
    s = avatar.crop_size_px
    centre = inv[:, :2] @ np.array([s / 2, s / 2]) + inv[:, 2]
    face_px = s * float(np.sqrt(abs(np.linalg.det(inv[:, :2]))))
    if library is not None:
        return HeadMotion(library, (float(centre[0]), float(centre[1])), face_px, fps, seed)
    return HeadSway((float(centre[0]), float(centre[1])), face_px, fps, seed)


COMPOSITORS = ("native", "patch")


class FrameGenerator:
    """Generates the avatar's frames for audio features, one frame at a time (keeps the previous output).

    ``compositor``: ``"native"`` (default) moves the portrait's own pixels to the landmarks at its
    resolution and takes only the mouth interior from the generator (engine/face/pixel_warp.py,
    engine/compositor.py); ``"patch"`` pastes the whole decoded lower-face patch (the first
    bundle's way, kept for comparison); default: the bundle manifest's ``compositor``, else native.
    ``pixel_reference`` (native only): the denoiser's reference, the portrait moved by the pixel flow
    so that the generated mouth opens where the interior mask is: ``"latent"`` (default) applies
    the flow to the portrait's latent, ``"encode"`` warps the pixels and runs the encoder (an
    encoder call per frame), ``"none"`` uses the bundle's latent warp graph (whose Gaussian flow
    hardly opens a closed mouth: the generated interior then shows lip and chin).
    """

    def __init__(self, runtime: Runtime, avatar: Avatar, *, steps: int | None = None, seed: int = 0, blinks: bool = True,
                 head_motion: bool = False, compositor: str | None = None, pixel_warp: PixelWarpConfig = PixelWarpConfig(),
                 interior: InteriorConfig = InteriorConfig(), articulation_gain: float | None = None, pixel_reference: str = "latent"):
        bundle = runtime.bundle
        self.runtime, self.bundle, self.avatar = runtime, bundle, avatar
        c = bundle.configs
        self.ae_cfg, self.enc_cfg, self.a2l_cfg, self.den_cfg = c["autoencoder"], c["audio_encoder"], c["a2l"], c["denoiser"]
        self.g_audio, self.g_a2l, self.g_den, self.g_dec, self.g_warp = (runtime[n] for n in ("audio_encoder", "a2l", "denoiser", "decoder", "warp"))
        self.steps = int(steps if steps is not None else bundle.steps)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        self.moving = np.asarray(self.a2l_cfg.landmark_indices)
        self.ref_all = torch.from_numpy(avatar.landmarks_patch_units())[None]  # (1, 478, 2)
        self.ref_moving = self.ref_all[:, self.moving]  # (1, K, 2)
        self.region = avatar.region
        if self.region != bundle.region:
            raise ValueError(f"the avatar was prepared for the {avatar.region.name} region, the bundle generates {bundle.region.name}: "
                             "prepare it with this bundle's runtime")
        art = bundle.articulation
        if articulation_gain is not None:
            if not 0.0 < articulation_gain <= 4.0:
                raise ValueError(f"articulation gain must be in (0, 4], got {articulation_gain}")
            art = dataclasses.replace(art, gain=float(articulation_gain))
        self.articulation = Articulation(art, self.moving, self.ref_moving[0].numpy())
        centre = bundle.a2l_centre  # the A2L's features centred on the session's voice (engine/motion/feature_centre.py)
        self.feature_centre = FeatureCentre(centre) if centre is not None and centre.strength > 0 else None
        # the A2L's reference: the portrait's moving landmarks, or its mouth closed (ArticulationConfig.close_reference)
        self.a2l_reference = torch.from_numpy(self.articulation.reference)[None]  # (1, K, 2)
        g = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(avatar.latent.shape, generator=g)  # one noise for every frame: temporally stable
        self.warp_idx = warp_indices()
        compositor = compositor or bundle.manifest.get("compositor", "native")
        if compositor not in COMPOSITORS:
            raise ValueError(f"compositor must be one of {COMPOSITORS}, got {compositor!r}")
        if pixel_reference not in ("latent", "encode", "none"):
            raise ValueError(f"pixel_reference must be latent, encode or none, got {pixel_reference!r}")
        self.compositor, self.interior, self.pixel_reference = compositor, interior, pixel_reference
        self.pixel_warp = PortraitWarp(avatar.image, avatar.affine, avatar.landmarks, avatar.crop_size_px, self.warp_idx, pixel_warp,
                                       moving=self.moving) \
            if compositor == "native" else None
        # the portrait's own mouth interior (teeth, cavity) where its mouth is open: kept, warped with the lips
        src_int = interior_mask(avatar.landmarks, avatar.crop_size_px, dataclasses.replace(interior, dilate=0.0))
        self.source_interior = src_int if src_int.any() else None
        self.cavity_latent = None  # (1, C, s, s): a patch of the interior colour, encoded once (InteriorConfig.reference_colour)
        if compositor == "native" and interior.reference_colour is not None and pixel_reference != "none":
            side = patch_box(avatar.crop_size_px, self.region)[2]
            self.cavity_latent = encode_patch(runtime, np.full((side, side, 3), interior.reference_colour, np.uint8)).numpy()
        self.avatar_mask = avatar.mask()  # (P, P)
        self.avatar_patch = avatar.patch().astype(np.float32)  # (P, P, 3)
        self.blinks = BlinkSampler(bundle.blink_prior, bundle.fps, seed) if blinks else None
        self.sway = _sway_for(avatar, bundle.fps, seed, bundle.head_motion) if head_motion else None
        self.frame_index = 0  # frames made so far (the sway's clock)
        self.previous: torch.Tensor | None = None
        self.a2l_state: np.ndarray | None = None  # (L, 1, H) GRU state between calls

    # -- audio and landmarks (whole sequences; causal, so equal to running them frame by frame) --
    def audio_features(self, wave_16k: np.ndarray, n_frames: int) -> torch.Tensor:
        """(n_frames, D) smoothed audio features for frames at the bundle's fps."""
        mel = log_mel(wave_16k)  # (T, 80)
        return self.audio_features_from_mel(mel, mel_index_for_time(frame_times_constant(n_frames, self.bundle.fps)))

    def audio_features_from_mel(self, mel: np.ndarray, mel_index: np.ndarray) -> torch.Tensor:
        """(F, D) features from a log-mel (T, 80) and each frame's centre row (F,) (e.g. a prepared shard)."""
        c = self.enc_cfg
        win = np.clip(mel_index[:, None] + np.arange(-c.mel_before, c.mel_after + 1)[None, :], 0, len(mel) - 1)  # (F, W)
        feats = self.g_audio.infer({"mel_windows": mel[win].astype(np.float32)[None]})["features"]  # (1, F, D)
        return torch.from_numpy(feats[0])

    def landmarks(self, feats: torch.Tensor, *, speech: bool = True) -> torch.Tensor:
        """(F, D) features -> (F, K, 2) moving landmarks in patch units (continues the A2L state and the
        feature centre's running mean: frames in order; ``speech`` False: silent frames, which do not
        move that mean)."""
        c = self.a2l_cfg
        state = self.a2l_state if self.a2l_state is not None else np.zeros((c.layers, 1, c.hidden), np.float32)
        a2l_in = feats.numpy() if self.feature_centre is None else self.feature_centre(feats.numpy(), listen=speech)
        out = self.g_a2l.infer({"audio": a2l_in[None].astype(np.float32), "reference": self.a2l_reference.numpy(), "state": state})
        self.a2l_state = out["state_out"]
        return torch.from_numpy(self.articulation(out["landmarks"][0]))  # (F, K, 2)

    def audio_tokens(self, feats: torch.Tensor, f: int) -> torch.Tensor:
        a = self.den_cfg.audio_tokens
        idx = np.clip(np.arange(f - a + 1, f + 1), 0, None)
        return feats[idx][None]  # (1, A, D)

    # -- one frame --
    def frame(self, lm_moving: torch.Tensor, audio: torch.Tensor, *, warp_only: bool = False, steps: int | None = None) -> np.ndarray:
        """Landmarks (K, 2) and audio tokens (1, A, D) -> the full output frame (H, W, 3) uint8.

        ``warp_only``: skip diffusion and show the portrait's latent warped to the landmarks (a baseline).
        ``steps``: denoising steps for this frame (default ``self.steps``; the live pipeline lowers
        it when it falls behind).
        """
        if warp_only and self.compositor == "native":  # the pixel warp alone: no model runs
            lm_all = self.ref_all[0].clone()
            lm_all[self.moving] = lm_moving
            return self._with_blink(self.avatar.crop, np.zeros((self.avatar.crop_size_px,) * 2, np.float32),
                                    base=self.pixel_warp.warp(from_patch_units(lm_all.numpy())))
        return self.compose(*self.latent(lm_moving, audio, warp_only=warp_only, steps=steps))

    def latent(self, lm_moving: torch.Tensor, audio: torch.Tensor, *, warp_only: bool = False,
               steps: int | None = None) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """The first half of ``frame``: warp and denoise -> (the output latent (1, C, s, s), the pixel
        mask (P, P), all 478 target landmarks in crop units). Sets ``previous``, so the next frame's
        latent may start before this one is composed."""
        av = self.avatar
        s = av.crop_size_px
        lm_all = self.ref_all.clone()
        lm_all[:, self.moving] = lm_moving[None]
        px_mask = np.maximum(self.avatar_mask, patch_mask(from_patch_units(lm_all[0].numpy()) * s, s, region=self.region))  # (P, P)
        with torch.no_grad():
            m_lat = latent_mask(torch.from_numpy(pool_mask(px_mask, self.ae_cfg.downsample))[None, None], self.den_cfg.mask_dilate_cells)
        if self.pixel_warp is not None and self.pixel_reference == "encode":
            # the denoiser's reference: the portrait warped by the pixel flow (the mouth opened as far as the
            # frame's landmarks say) and encoded, so that what it paints lines up with the interior mask
            mx, my = self.pixel_warp.crop_maps(from_patch_units(lm_all[0].numpy()), s)
            warped_crop = cv2.remap(av.crop, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            if self.interior.reference_colour is not None:  # the interior shows a mouth's colour, not stretched lips
                m = interior_mask(from_patch_units(lm_all[0].numpy()), s, self.interior)[..., None]
                warped_crop = (warped_crop * (1 - m) + np.asarray(self.interior.reference_colour, np.float32) * m).astype(np.uint8)
            reference = encode_patch(self.runtime, extract_patch(warped_crop, self.region)).numpy()
        elif self.pixel_warp is not None and self.pixel_reference == "latent":
            # the same: the pixel flow applied to the portrait's latent at its own resolution (no encoder run)
            reference = self._latent_reference(from_patch_units(lm_all[0].numpy()))
            if self.cavity_latent is not None:  # the interior shows a mouth's colour, not stretched lips
                reference = self._with_cavity(reference, from_patch_units(lm_all[0].numpy()))
        else:  # the latent warp, in the region's units
            reference = self.g_warp.infer({"x": av.latent.numpy(), "src": self._region_units(self.ref_all[:, self.warp_idx]),
                                           "dst": self._region_units(lm_all[:, self.warp_idx])})["warped"]
        cond = {"masked": (av.latent * (1 - m_lat)).numpy(), "mask": m_lat.numpy(), "reference": reference,
                "previous": (self.previous if self.previous is not None else torch.zeros_like(av.latent)).numpy(),
                "landmarks": lm_moving[None].numpy(), "audio": audio.numpy()}

        def denoise(z: torch.Tensor, t: torch.Tensor, c: dict) -> torch.Tensor:
            return torch.from_numpy(self.g_den.infer({"z": z.numpy().astype(np.float32), "t": t.numpy().astype(np.float32), **c})["v"])

        x0 = torch.from_numpy(reference) if warp_only else ddim_sample(denoise, self.noise, cond, steps=int(steps or self.steps))
        x0 = m_lat * x0 + (1 - m_lat) * av.latent  # repaint only the mask: the rest is the portrait's own latent
        self.previous = x0
        return x0, px_mask, from_patch_units(lm_all[0].numpy())

    def _region_units(self, lm: torch.Tensor) -> np.ndarray:
        """Landmark units (lower_face) -> the generated region's patch units (float32)."""
        if self.region.name == "lower_face":
            return lm.numpy()
        return to_patch_units(from_patch_units(lm.numpy()), self.region).astype(np.float32)

    def _with_cavity(self, reference: np.ndarray, lm_crop: np.ndarray) -> np.ndarray:
        """The reference latent with the target interior (pooled to latent cells) taken from the cavity latent."""
        x0p, y0p, side = patch_box(self.avatar.crop_size_px, self.region)
        m = interior_mask(lm_crop, self.avatar.crop_size_px, self.interior)[y0p : y0p + side, x0p : x0p + side]
        if not m.any():
            return reference
        n = reference.shape[-1]
        m = cv2.resize(m, (n, n), interpolation=cv2.INTER_AREA)[None, None]
        return (reference * (1.0 - m) + self.cavity_latent * m).astype(np.float32)

    def _latent_reference(self, lm_crop: np.ndarray) -> np.ndarray:
        """The portrait's latent (1, C, s, s) moved by the pixel flow: the crop-space maps sampled at each
        latent cell's centre, turned into latent coordinates, one ``cv2.remap`` of the channels."""
        s = self.avatar.crop_size_px
        lat = self.avatar.latent[0].numpy().transpose(1, 2, 0)  # (s_l, s_l, C)
        n = lat.shape[0]
        x0p, y0p, side = patch_box(s, self.region)
        f = side / n  # crop pixels per latent cell
        mx, my = self.pixel_warp.crop_maps(lm_crop, s)
        centres = (np.arange(n) * f + f / 2 - 0.5).astype(np.float32)
        cx, cy = np.meshgrid(x0p + centres, y0p + centres)
        sx = cv2.remap(mx, cx, cy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        sy = cv2.remap(my, cx, cy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        lx, ly = (sx - x0p + 0.5) / f - 0.5, (sy - y0p + 0.5) / f - 0.5  # source positions in latent cells
        out = cv2.remap(np.ascontiguousarray(lat), lx, ly, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return np.ascontiguousarray(out.transpose(2, 0, 1)[None], dtype=np.float32)

    def compose(self, x0: torch.Tensor, px_mask: np.ndarray, lm_crop: np.ndarray) -> np.ndarray:
        """The second half of ``frame``: decode, paste into the portrait (the native path: warp the
        portrait, paste only the mouth interior; the patch path: colour-match, paste the patch), blink, sway."""
        av = self.avatar
        s = av.crop_size_px
        base = None
        if self.compositor == "native":
            base = self.pixel_warp.warp(lm_crop)
            interior = interior_mask(lm_crop, s, self.interior)
            if interior.any() and self.source_interior is not None:
                mx, my = self.pixel_warp.crop_maps(lm_crop, s)
                ys, xs = np.nonzero(interior)  # only where the target interior is does the portrait's own one matter
                b = np.s_[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
                src = cv2.remap(self.source_interior, np.ascontiguousarray(mx[b]), np.ascontiguousarray(my[b]), cv2.INTER_LINEAR, borderValue=0)
                interior[b] = new_interior(interior[b], src)
                interior[interior < 1.0 / 255.0] = 0.0
            if not interior.any():  # a closed mouth: nothing to decode
                return self._with_blink(av.crop, interior, base=base)
        img = self.g_dec.infer({"z": x0.numpy().astype(np.float32)})["image"][0]  # (3, P, P) in about [-1, 1]
        patch = (np.clip(img, -1, 1) + 1) * 127.5
        if base is not None:
            # no colour match: only the interior is pasted, and what surrounds it in the decoded patch (lips) does not
            # line up with the warped portrait's lips, so a ring there measures misplaced lips, not the decoder's drift
            # (a ring match here never found a pixel at 512 px crops; made to, it turned a painted portrait's teeth greener)
            patch = np.clip(np.round(patch.transpose(1, 2, 0)), 0, 255).astype(np.uint8)
        else:
            patch = self._match_colour(patch.transpose(1, 2, 0), px_mask)
        x0p, y0p, side = patch_box(s, self.region)
        crop = av.crop.copy()
        region = crop[y0p : y0p + side, x0p : x0p + side]
        region[px_mask > 0] = patch[px_mask > 0]  # generated pixels only where the mask is; paste_back does the blending
        if base is not None:
            return self._with_blink(crop, interior, base=base)
        mask = np.zeros((s, s), np.float32)
        mask[y0p : y0p + side, x0p : x0p + side] = px_mask
        return self._with_blink(crop, mask)

    def idle_compose(self) -> np.ndarray:
        """An idle frame: the portrait as it is (mouth closed), blinking and swaying; no model runs.
        The caller sets ``previous`` to None (or ``reset()``s), so that the next generated frame
        starts afresh, as at the start of an utterance."""
        s = self.avatar.crop_size_px
        return self._with_blink(self.avatar.crop, np.zeros((s, s), np.float32), speaking=False)

    def _with_blink(self, crop: np.ndarray, mask: np.ndarray, *, base: np.ndarray | None = None, speaking: bool = True) -> np.ndarray:
        """Advance the blink sampler one frame, close the lids if it says so, paste the crop back
        into ``base`` (default: the portrait)."""
        av = self.avatar
        closure = self.blinks.next() if self.blinks is not None else 0.0
        if closure > 0.0:
            crop, eye_mask = close_eyes(crop, av.landmarks * av.crop_size_px, closure)
            mask = np.maximum(mask, eye_mask)
        image = av.image if base is None else base
        out = paste_back(image, crop, av.affine, mask) if mask.any() else image
        self.frame_index += 1
        if isinstance(self.sway, HeadMotion):
            return self.sway.apply(out, self.frame_index - 1, speaking)
        if self.sway is not None:
            return self.sway.apply(out, self.frame_index - 1)
        return out.copy() if out is av.image else out

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
