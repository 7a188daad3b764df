"""The per-frame path of the engine on one device, in torch only: what ``benchmarks/gpu.py`` times.

It needs nothing but torch, numpy, the bundle's PyTorch models (engine/models/*), the sampler's
schedule maths (engine/sampling/*) and a small precomputed avatar (``benchmarks/assets/gpu_avatar.npz``,
written by ``scripts/build_gpu_avatar.py``), so that it runs on a bare CUDA machine without
mediapipe, OpenCV, PyAV or ONNX Runtime (``FORBIDDEN_MODULES``; tests/test_bench_gpu.py checks it).

One call of :meth:`FramePath.step` makes one frame for each of ``batch`` concurrent sessions, all
on the device, as ``engine/generator.py`` does with the "patch" compositor:

1. audio: the audio encoder on the mel windows of frames ``k - context .. k + lookahead`` (what
   ``engine/pipeline/features.py`` runs per frame), frame ``k``'s smoothed feature picked;
   the last ``audio_tokens`` features kept as the denoiser's audio tokens
2. A2L one step (GRU state carried), then the articulation layer (engine/motion/articulation.py,
   the same few tensor operations)
3. the avatar's latent warped to the landmarks (engine/models/warp.py)
4. DDIM, ``steps`` denoiser calls (engine/sampling/ddim.py's update, the times made once on the
   device: ``ddim_sample`` makes them on the CPU, which keeps a CUDA graph from capturing the step;
   tests pin the two equal), conditioned on the previous output; the portrait's latent outside the mask
5. decoder; compositing into the 256 px crop (clip, colour shift measured on the mask's rim,
   blend with the mask), uint8 (B, S, S, 3)

Differences from the generator, all on the CPU side there: the pixel mask is fixed (the union of
the per-frame masks over the asset's clip, computed when the asset was built; the generator
rasterises one per frame with OpenCV), and the paste of the crop back into the full portrait,
blinks and head motion are not part of it (the native compositor's pixel warp neither), nor is the
session centring of the A2L's features (engine/motion/feature_centre.py: a running mean of 64
numbers and one subtraction a frame, on the CPU in the engine).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.models.denoiser import latent_mask
from engine.models.warp import warp
from engine.sampling.ddim import ddim_times
from engine.sampling.schedule import alpha_sigma, predict_eps_from_v, predict_x_from_v

ASSET = Path(__file__).resolve().parent / "assets" / "gpu_avatar.npz"
ASSET_FORMAT = "avatar-gpu-asset/1"
FORBIDDEN_MODULES = ("mediapipe", "cv2", "av", "onnxruntime")  # absent on a bare CUDA machine
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROLES = ("audio_encoder", "a2l", "denoiser", "autoencoder")


class BundleMismatch(RuntimeError):
    """The bundle's files differ from its manifest, or from the bundle the asset was built with."""


# -- the bundle's models, without engine.bundle.load_bundle (its compatibility check imports OpenCV) --
def load_models(bundle_dir: str | Path | None = None) -> tuple[dict, dict[str, nn.Module]]:
    """(manifest, role -> fp32 nn.Module in eval mode) for the four per-frame models; the sha256 of
    every file read is checked against the manifest."""
    from engine.bundle import DEFAULT_BUNDLE, FORMAT, sha256_file
    from engine.models.a2l import A2LConfig, AudioToLandmarks
    from engine.models.audio_encoder import AudioEncoder, AudioEncoderConfig
    from engine.models.autoencoder import AutoencoderConfig, AutoencoderKL
    from engine.models.denoiser import Denoiser, DenoiserConfig
    from engine.models.io import load_model

    d = Path(bundle_dir) if bundle_dir is not None else DEFAULT_BUNDLE
    manifest = json.loads((d / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise BundleMismatch(f"{d}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    kinds = {"audio_encoder": (AudioEncoder, AudioEncoderConfig), "a2l": (AudioToLandmarks, A2LConfig),
             "denoiser": (Denoiser, DenoiserConfig), "autoencoder": (AutoencoderKL, AutoencoderConfig)}
    models = {}
    for role in ROLES:
        stem = manifest["models"][role]
        for name in (stem + ".json", stem + ".pt"):
            if manifest["files"].get(name) != sha256_file(d / name):
                raise BundleMismatch(f"{d / name}: sha256 does not match the manifest")
        models[role] = load_model(*kinds[role], d / stem)
    return manifest, models


def manifest_sha256(bundle_dir: str | Path | None = None) -> str:
    from engine.bundle import DEFAULT_BUNDLE

    d = Path(bundle_dir) if bundle_dir is not None else DEFAULT_BUNDLE
    return hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest()


# -- the avatar asset --
@dataclass
class AvatarAsset:
    """What the per-frame path needs of a prepared avatar and a clip of speech (all numpy)."""

    latent: np.ndarray  # (1, C, s, s) float32 the portrait's patch latent
    ref_landmarks: np.ndarray  # (478, 2) float32 the portrait's landmarks in patch units
    moving: np.ndarray  # (K,) int64 landmark indices the A2L predicts (its config's landmark_indices)
    warp_idx: np.ndarray  # (Nw,) int64 landmarks that steer the latent warp (engine.face.region.warp_indices())
    px_mask: np.ndarray  # (P, P) float32 pixel mask in the patch: the union of the clip's per-frame masks
    crop: np.ndarray  # (S, S, 3) uint8 the aligned 256 px crop
    mel: np.ndarray  # (T, n_mels) float32 log-mel of the clip (10 ms rows)
    mel_index: np.ndarray  # (F,) int64 each video frame's centre mel row
    art_gain: float  # articulation gain (engine/motion/articulation.py)
    art_max_opening: float  # articulation opening cap (ratio of the mouth width; 0: none)
    art_up: np.ndarray  # (Q,) positions in ``moving`` of the inner upper lip points (OPENING_PAIRS)
    art_lo: np.ndarray  # (Q,) their lower partners
    art_corners: np.ndarray  # (2,) positions of the mouth corners 61, 291 in ``moving`` (empty: none)
    bundle_manifest_sha256: str  # the bundle the asset was made with
    check_frames: int  # the reference below is the output after this many frames (batch 1, fp32, seed 0)
    check_lm: np.ndarray  # (K, 2) landmarks of that frame
    check_x0: np.ndarray  # (C, s, s) its output latent
    check_crop: np.ndarray  # (S, S, 3) uint8 its composited crop
    art_basis: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # (k, K*2) principal displacements (empty: none)
    art_basis_mean: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (K*2,) their mean
    a2l_reference: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))  # (K, 2) the A2L's reference and
    # the displacements' origin where it is not the portrait's own moving landmarks (Articulation's close_reference; empty: theirs)
    region_box: np.ndarray = field(default_factory=lambda: np.array([0.25, 0.4375, 0.5], np.float32))  # the generated region
    # (x0, y0, side) in crop units (engine.face.region: the bundle's; landmarks above are in lower_face units)

    @property
    def n_frames(self) -> int:
        return len(self.mel_index)

    def save(self, path: str | Path) -> None:
        arrays = {k: np.asarray(v) for k, v in self.__dict__.items()}
        np.savez_compressed(path, format=np.array(ASSET_FORMAT), **arrays)

    @classmethod
    def load(cls, path: str | Path = ASSET) -> "AvatarAsset":
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != ASSET_FORMAT:
                raise ValueError(f"{path}: format {str(z['format'])!r}, expected {ASSET_FORMAT!r}")
            kw: dict[str, Any] = {k: z[k] for k in cls.__dataclass_fields__ if k in z.files}  # region_box: absent in older assets
        for k in ("art_gain", "art_max_opening"):
            kw[k] = float(kw[k])
        kw["check_frames"] = int(kw["check_frames"])
        kw["bundle_manifest_sha256"] = str(kw["bundle_manifest_sha256"])
        return cls(**kw)


def _cast_copy(module: nn.Module, precision: str) -> nn.Module:
    """fp32: the module itself; bf16: the engine's reduced-precision copy (weights cast once, inputs
    cast at each weight-owning layer, so the denoiser's time embedding stays fp32)."""
    if precision == "fp32":
        return module
    from engine.runtime.pytorch import reduced_precision_copy

    return reduced_precision_copy(module, DTYPES[precision])


class FramePath:
    """The per-frame path for ``batch`` sessions of one avatar on ``device`` (module docstring).

    State between frames (every tensor on the device, float32): ``(k, tokens, gru, previous)``:
    each session's next frame index (B,), its last audio tokens (B, A, D), the A2L's GRU state
    (L, B, H), the previous output latent (B, C, s, s). :meth:`step` is a pure function of that
    state, so that ``torch.compile(mode="reduce-overhead")`` can capture it as CUDA graphs.
    """

    def __init__(self, models: dict[str, nn.Module], asset: AvatarAsset, *, batch: int, device: str | torch.device = "cpu",
                 precision: str = "fp32", steps: int = 2, seed: int = 0, session_offset: int = 7,
                 module_cache: dict[tuple[str, str], nn.Module] | None = None, keep_fp32: tuple[str, ...] = ()):
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.device, self.batch, self.steps, self.precision = torch.device(device), int(batch), int(steps), precision
        dev, b = self.device, self.batch
        cache = module_cache if module_cache is not None else {}  # shared by paths of other batch sizes: one compile serves them

        def module(role: str, m: nn.Module) -> nn.Module:  # ``keep_fp32``: roles left in fp32 (e.g. a GRU without bf16 kernels)
            prec = "fp32" if role in keep_fp32 else precision
            if (role, prec) not in cache:
                cache[(role, prec)] = _cast_copy(m, prec).to(dev)
            return cache[(role, prec)]

        self.enc = module("audio_encoder", models["audio_encoder"])
        self.a2l = module("a2l", models["a2l"])
        self.den = module("denoiser", models["denoiser"])
        self.dec = module("decoder", models["autoencoder"].decoder)
        self.latent_scale = float(models["autoencoder"].config.latent_scale)
        ec, ac, dc = models["audio_encoder"].config, models["a2l"].config, models["denoiser"].config
        self.context, self.lookahead, self.n_tokens = ec.filter_context_frames, ec.filter_lookahead_frames, dc.audio_tokens
        self.gru_shape = (ac.layers, b, ac.hidden)
        self.downsample = models["autoencoder"].config.downsample
        self.dilate = dc.mask_dilate_cells
        if list(asset.moving) != list(ac.landmark_indices):
            raise BundleMismatch("the asset's moving landmarks differ from the bundle's A2L (rebuild the asset: scripts/build_gpu_avatar.py)")

        def t(x: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(x)).to(device=dev, dtype=dtype)

        # audio: every frame's mel window (F, W, n_mels), as FrameGenerator.audio_features_from_mel builds it
        rows = asset.mel_index[:, None] + np.arange(-ec.mel_before, ec.mel_after + 1)[None, :]  # (F, W)
        self.windows = t(asset.mel[np.clip(rows, 0, len(asset.mel) - 1)])  # (F, W, n_mels)
        self.n_frames = asset.n_frames
        self.offsets = t(np.arange(-self.context, self.lookahead + 1), torch.long)  # (T,) frames around k
        self.k0 = t((np.arange(b) * session_offset) % self.n_frames, torch.long)  # (B,) each session's first frame
        # landmarks
        ref = t(asset.ref_landmarks)  # (478, 2)
        a2l_ref = t(asset.a2l_reference) if len(asset.a2l_reference) else ref[t(asset.moving, torch.long)]  # (K, 2)
        self.ref_moving = a2l_ref[None].expand(b, -1, -1).contiguous()  # (B, K, 2) the A2L's reference, the displacements' origin
        self.ref_warp = ref[t(asset.warp_idx, torch.long)][None].expand(b, -1, -1).contiguous()  # (B, Nw, 2)
        pos = {int(i): j for j, i in enumerate(asset.moving)}
        w_pos = [j for j, i in enumerate(asset.warp_idx) if int(i) in pos]
        self.warp_pos = t(np.array(w_pos), torch.long)  # positions in warp_idx of the moving landmarks ...
        self.moving_pos = t(np.array([pos[int(asset.warp_idx[j])] for j in w_pos]), torch.long)  # ... and in moving
        self.art_gain, self.art_max_opening = asset.art_gain, asset.art_max_opening
        self.art_up, self.art_lo = t(asset.art_up, torch.long), t(asset.art_lo, torch.long)
        self.art_corners = t(asset.art_corners, torch.long) if len(asset.art_corners) == 2 else None
        self.art_basis = t(asset.art_basis) if asset.art_basis.size else None  # Articulation's projection on real mouth motion
        self.art_basis_mean = t(asset.art_basis_mean) if asset.art_basis.size else None
        # latents and masks
        self.latent = t(asset.latent).expand(b, -1, -1, -1).contiguous()  # (B, C, s, s)
        g = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(asset.latent.shape, generator=g).to(dev).expand(b, -1, -1, -1).contiguous()  # one noise for every frame
        self.times = ddim_times(self.steps).to(dev)  # (steps + 1,)
        self.px_mask = t(asset.px_mask)  # (P, P)
        # compositing
        s = asset.crop.shape[0]
        p = asset.px_mask.shape[0]
        rx, ry, rs = (float(v) for v in asset.region_box)
        self.box = (int(round(rx * s)), int(round(ry * s)), p)  # engine.face.region.patch_box (x0, y0, side)
        # landmark units (lower_face) -> the region's units, for the latent warp (FrameGenerator._region_units)
        self.to_region = (t(np.array([0.5 / rs, 0.5 / rs], np.float32)), t(np.array([(0.25 - rx) / rs, (0.4375 - ry) / rs], np.float32)))
        x0, y0, _ = self.box
        self.crop = t(asset.crop).permute(2, 0, 1).contiguous()  # (3, S, S) float 0..255
        self.crop_patch = self.crop[:, y0 : y0 + p, x0 : x0 + p].contiguous()  # (3, P, P)
        rim = (asset.px_mask > 0.05) & (asset.px_mask < 0.6)
        rim[p // 2 :] = False  # FrameGenerator._match_colour: the upper half's rim only
        self.rim = t(np.flatnonzero(rim), torch.long) if rim.sum() >= 32 else None  # (N,) flat patch indices

    # -- state --
    def init_state(self) -> tuple[torch.Tensor, ...]:
        """(k, tokens, gru, previous) before a session's first frame (previous output: zeros, as the generator's)."""
        b = self.batch
        d = self.enc.out_norm.normalized_shape[0]
        z = lambda *shape: torch.zeros(*shape, device=self.device)  # noqa: E731
        return self.k0.clone(), z(b, self.n_tokens, d), z(*self.gru_shape), torch.zeros_like(self.latent)

    # -- stages --
    def audio(self, k: torch.Tensor) -> torch.Tensor:
        """Frame indices (B,) -> each session's smoothed audio feature (B, D)."""
        j = (k[:, None] + self.offsets[None]).clamp(0, self.n_frames - 1)  # (B, T)
        feats = self.enc(self.windows[j]).float()  # (B, T, W, n_mels) -> (B, T, D)
        return feats[:, self.context]  # (B, D)

    def landmarks(self, f: torch.Tensor, gru: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, D), GRU state -> articulated moving landmarks (B, K, 2) in patch units, new state."""
        lm, gru = self.a2l(f[:, None], self.ref_moving, gru)  # (B, 1, K, 2), (L, B, H)
        return self.articulate(lm[:, 0].float()), gru.float()

    def articulate(self, lm: torch.Tensor) -> torch.Tensor:
        """engine.motion.articulation.Articulation on (B, K, 2): basis projection, gain, lips never cross, opening capped."""
        ref = self.ref_moving
        disp = lm - ref  # (B, K, 2)
        if self.art_basis is not None:  # projected on the principal displacements of real mouths
            x = disp.reshape(disp.shape[0], -1) - self.art_basis_mean
            disp = ((x @ self.art_basis.T) @ self.art_basis + self.art_basis_mean).reshape(disp.shape)
        out = ref + self.art_gain * disp
        up, lo = out[:, self.art_up, 1], out[:, self.art_lo, 1]  # (B, Q)
        mid = 0.5 * (up + lo)
        crossed = lo < up
        up, lo = torch.where(crossed, mid, up), torch.where(crossed, mid, lo)
        if self.art_corners is not None and self.art_max_opening > 0:
            c = out[:, self.art_corners]  # (B, 2, 2)
            width = (c[:, 1] - c[:, 0]).norm(dim=-1)  # (B,)
            over = ((lo - up).mean(dim=1) - self.art_max_opening * width).clamp_min(0.0)  # (B,)
            up, lo = up + 0.5 * over[:, None], lo - 0.5 * over[:, None]
        out = out.clone()
        out[:, self.art_up, 1] = up
        out[:, self.art_lo, 1] = lo
        return out

    def reference(self, lm: torch.Tensor) -> torch.Tensor:
        """The portrait's latent warped so that its landmarks move to ``lm`` (B, K, 2): (B, C, s, s)."""
        dst = self.ref_warp.clone()
        dst[:, self.warp_pos] = lm[:, self.moving_pos]
        scale, shift = self.to_region
        return warp(self.latent, self.ref_warp * scale + shift, dst * scale + shift)

    def latent_mask(self) -> torch.Tensor:
        """(1, 1, s, s) the denoiser's binary mask from the pixel mask (FrameGenerator.latent's)."""
        pooled = F.max_pool2d(self.px_mask[None, None], self.downsample)  # engine.face.region.pool_mask
        return latent_mask(pooled, self.dilate)

    def conditions(self, lm: torch.Tensor, tokens: torch.Tensor, previous: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.latent_mask().expand(lm.shape[0], -1, -1, -1)
        return {"masked": self.latent * (1 - m), "mask": m, "reference": self.reference(lm), "previous": previous,
                "landmarks": lm, "audio": tokens}

    def denoise(self, z: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.den(z, t, **cond).float()

    def sample(self, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """DDIM (eta = 0) from the fixed noise: engine.sampling.ddim.ddim_sample's steps 1-4 with its
        times on the device. Returns x_0 (B, C, s, s)."""
        z = self.noise
        b = z.shape[0]  # sizes from tensors, not attributes: a compiled step may then serve every batch size
        for i in range(self.steps):
            tt = self.times[i].expand(b)
            v = self.denoise(z, tt, cond)  # 1.
            alpha_t, sigma_t = alpha_sigma(tt)
            x = predict_x_from_v(z=z, v=v, alpha=alpha_t, sigma=sigma_t)  # 2.
            if i == self.steps - 1:
                return x
            eps = predict_eps_from_v(z=z, v=v, alpha=alpha_t, sigma=sigma_t)  # 3.
            alpha_s, sigma_s = alpha_sigma(self.times[i + 1].expand(b))
            z = alpha_s.reshape(-1, 1, 1, 1) * x + sigma_s.reshape(-1, 1, 1, 1) * eps  # 4.
        return z

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, C, s, s) latent -> (B, 3, P, P) image in about [-1, 1]."""
        return self.dec(x0 / self.latent_scale).float()

    def compose(self, img: torch.Tensor) -> torch.Tensor:
        """Decoded patches (B, 3, P, P) -> the crops with them blended in by the mask, (B, S, S, 3) uint8."""
        x0, y0, p = self.box
        patch = (img.clamp(-1, 1) + 1) * 127.5  # (B, 3, P, P) 0..255
        if self.rim is not None:  # FrameGenerator._match_colour: the median drift on the rim removed
            drift = patch.flatten(2)[:, :, self.rim] - self.crop_patch.flatten(1)[None, :, self.rim]  # (B, 3, N)
            patch = patch - torch.quantile(drift, 0.5, dim=-1)[:, :, None, None]
        patch = patch.round().clamp(0, 255)
        blended = self.crop_patch + (patch - self.crop_patch) * self.px_mask  # (B, 3, P, P)
        out = self.crop[None].expand(img.shape[0], -1, -1, -1).clone()  # (B, 3, S, S)
        out[:, :, y0 : y0 + p, x0 : x0 + p] = blended
        return out.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (B, S, S, 3)

    # -- one frame --
    def step(self, k: torch.Tensor, tokens: torch.Tensor, gru: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One frame for every session: (k, tokens, gru, previous) -> (the next state..., landmarks (B, K, 2),
        crops (B, S, S, 3) uint8). The new ``previous`` is this frame's output latent."""
        f = self.audio(k)  # (B, D)
        tokens = torch.cat([tokens[:, 1:], f[:, None]], dim=1)  # (B, A, D)
        lm, gru = self.landmarks(f, gru)
        m = self.latent_mask()
        x0 = self.sample(self.conditions(lm, tokens, previous))
        x0 = m * x0 + (1 - m) * self.latent  # repaint only the mask
        crops = self.compose(self.decode(x0))
        return (k + 1) % self.n_frames, tokens, gru, x0, lm, crops


def run_frames(path: FramePath, n: int) -> tuple[torch.Tensor, ...]:
    """``n`` frames from the initial state (eager); returns the last step's outputs."""
    state = path.init_state()
    out: tuple[torch.Tensor, ...] = ()
    with torch.no_grad():
        for _ in range(n):
            out = path.step(*state)
            state = out[:4]
    return out
