"""Tiny model configs: shapes, determinism, causality (streaming), save/load round trips, warp."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.models.a2l import AudioToLandmarks
from engine.models.audio_encoder import AudioEncoder, AudioEncoderConfig
from engine.models.autoencoder import AutoencoderConfig, AutoencoderKL
from engine.models.denoiser import Denoiser, DenoiserConfig
from engine.models.io import load_model, save_model
from engine.models.warp import warp
from tests.tiny import A2L, AE, DEN, ENC, tiny_models


def _den_inputs(b: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c, s = DEN.latent_channels, DEN.latent_size
    return [torch.randn(b, c, s, s, generator=g), torch.rand(b, generator=g), torch.randn(b, c, s, s, generator=g),
            (torch.rand(b, 1, s, s, generator=g) > 0.5).float(), torch.randn(b, c, s, s, generator=g), torch.randn(b, c, s, s, generator=g),
            torch.rand(b, DEN.n_landmarks, 2, generator=g), torch.randn(b, DEN.audio_tokens, DEN.audio_dim, generator=g)]


def test_autoencoder_shapes_and_scale():
    m = tiny_models()["autoencoder"]
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    z = m.encode(x)
    assert z.shape == (2, 4, 32, 32) and AE.latent_size == 32 and AE.downsample == 4
    assert m.decode(z).shape == (2, 3, 128, 128)
    big = AutoencoderKL(AutoencoderConfig(image_size_px=256, channels=(8, 8, 16)))
    assert big.encode(torch.zeros(1, 3, 256, 256)).shape == (1, 4, 64, 64)  # 256 px by configuration only


def test_audio_encoder_lookahead_is_bounded():
    """Changing mel windows after frame t + lookahead must not change feature t (it streams)."""
    m = AudioEncoder(ENC).eval()
    torch.manual_seed(0)
    mel = torch.randn(1, 20, ENC.window_rows, 80)
    out = m(mel)
    assert out.shape == (1, 20, 16)
    t = 10
    mel2 = mel.clone()
    mel2[:, t + ENC.filter_lookahead_frames + 1 :] += 5.0
    out2 = m(mel2)
    assert torch.allclose(out[:, : t + 1], out2[:, : t + 1], atol=1e-6)
    assert not torch.allclose(out[:, t + 2 :], out2[:, t + 2 :])
    with pytest.raises(ValueError, match="at most 2"):
        AudioEncoder(AudioEncoderConfig(filter_lookahead_frames=3))


def test_a2l_is_causal_and_streams_with_its_state():
    m = AudioToLandmarks(A2L).eval()
    torch.manual_seed(0)
    audio, ref = torch.randn(1, 12, 16), torch.rand(1, A2L.n_landmarks, 2)
    whole, _ = m(audio, ref)
    assert whole.shape == (1, 12, A2L.n_landmarks, 2)
    state, parts = None, []
    for t in range(12):  # frame by frame, carrying the GRU state
        lm, state = m(audio[:, t : t + 1], ref, state)
        parts.append(lm)
    assert torch.allclose(torch.cat(parts, dim=1), whole, atol=1e-5)
    audio2 = audio.clone()
    audio2[:, 8:] = 0
    assert torch.allclose(m(audio2, ref)[0][:, :8], whole[:, :8], atol=1e-6)


def test_denoiser_shapes_zero_init_and_determinism():
    m = Denoiser(DEN).eval()
    x = _den_inputs()
    v = m(*x)
    assert v.shape == x[0].shape
    assert torch.count_nonzero(v) == 0  # zero-initialised output layer: starts as the identity of DDIM's x-prediction
    with torch.no_grad():
        m.out.weight.normal_(0, 0.1)
    assert torch.equal(m(*x), m(*x))
    assert not torch.allclose(m(*x), m(*_den_inputs(seed=1)))


@pytest.mark.parametrize("role", ["autoencoder", "audio_encoder", "a2l", "denoiser"])
def test_save_load_round_trip(tmp_path, role):
    m = tiny_models(seed=3)[role]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    save_model(m, tmp_path / role)
    cfg = json.loads((tmp_path / f"{role}.json").read_text())
    assert cfg["kind"] == type(m.config).__name__
    m2 = load_model(type(m), type(m.config), tmp_path / role)
    assert m2.config == m.config
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_load_model_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="denoiser.json"):
        load_model(Denoiser, DenoiserConfig, tmp_path / "denoiser")
    (tmp_path / "x.json").write_text(json.dumps({"kind": "DenoiserConfig", "bogus": 1}))
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="bogus"):
        load_model(Denoiser, DenoiserConfig, tmp_path / "x")


def test_warp_identity_and_translation():
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 10:14, 10:14] = 1.0
    pts = torch.tensor([[[0.375, 0.375], [0.3, 0.4], [0.45, 0.35]]])
    assert torch.allclose(warp(x, pts, pts), x, atol=1e-6)
    moved = warp(x, pts, pts + torch.tensor([4 / 32, 0.0]), sigma=0.2)  # every landmark 4 cells right
    com = lambda im: (im[0, 0].sum(0) * torch.arange(32)).sum() / im.sum()  # noqa: E731 (x centre of mass)
    assert com(moved) - com(x) == pytest.approx(4.0, abs=0.6)
