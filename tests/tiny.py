"""Tiny model configs and a tiny (random-weight) bundle for fast CPU tests of shapes and plumbing."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.bundle import write_manifest
from engine.face.region import moving_indices
from engine.models.a2l import A2LConfig, AudioToLandmarks
from engine.models.audio_encoder import AudioEncoder, AudioEncoderConfig
from engine.models.autoencoder import AutoencoderConfig, AutoencoderKL
from engine.models.denoiser import Denoiser, DenoiserConfig
from engine.models.io import save_model

AE = AutoencoderConfig(image_size_px=128, channels=(8, 8, 16), latent_channels=4)
ENC = AudioEncoderConfig(feature_dim=16, hidden=16)
A2L = A2LConfig(landmark_indices=tuple(int(i) for i in moving_indices()), feature_dim=16, hidden=16, layers=1)
DEN = DenoiserConfig(widths=(8, 16), attention=(False, True), emb_dim=16, n_landmarks=A2L.n_landmarks, audio_dim=16, audio_tokens=2, heads=2)


def tiny_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return {"autoencoder": AutoencoderKL(AE).eval(), "audio_encoder": AudioEncoder(ENC).eval(), "a2l": AudioToLandmarks(A2L).eval(),
            "denoiser": Denoiser(DEN).eval()}


def tiny_bundle(d: Path, seed: int = 0, steps: int = 2, *, region: str | None = None, crop_size_px: int = 256, compositor: str = "patch") -> Path:
    """A complete bundle of random-weight tiny models: real files, real manifest (``region``: the
    generated region's name, engine/face/region.py; its patch must be 128 px in ``crop_size_px``)."""
    d.mkdir(parents=True, exist_ok=True)
    models = tiny_models(seed)
    with torch.no_grad():  # a non-zero output layer, so that the denoiser's output is not trivially 0
        models["denoiser"].out.weight.normal_(0, 0.01)
    for role, m in models.items():
        save_model(m, d / role)
    # random weights hardly move the landmarks, so the native path would show the portrait almost
    # unchanged: tiny bundles paste the whole decoded patch, which makes speech frames easy to tell from idle
    # ones in plumbing tests (the native path is tested with the shipped bundle: tests/test_native*.py)
    extra = {"compositor": compositor, **({"region": region} if region else {})}
    write_manifest(d, fps=25, sample_rate_hz=16000, crop_size_px=crop_size_px, steps=steps, extra=extra)
    return d
