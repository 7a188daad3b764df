"""The linear A2L: its module streams frame by frame and exports, the ridge fit recovers a known map,
cross-validation ranks strengths by held-out error, and a fit on real prepared clips follows the mouth."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.face.region import moving_indices
from engine.models.a2l import A2LConfig, AudioToLandmarks
from engine.models.io import load_model
from engine.training.a2l import opening_columns
from engine.motion.feature_centre import FeatureCentre, FeatureCentreConfig
from engine.training.a2l_centre import choose_centre
from engine.training.a2l_linear import Ridge, cross_validate, design, fit_linear_a2l, spread_gain, with_audio_gain
from tests.tiny import A2L

LINEAR = dataclasses.replace(A2L, arch="linear", hidden=1, layers=1)


def _random_readout(config: A2LConfig, std: float, seed: int) -> AudioToLandmarks:
    """A linear A2L whose readout weights are drawn at random (eval mode)."""
    m = AudioToLandmarks(config).eval()
    with torch.no_grad():
        m.readout.weight.normal_(0, std, generator=torch.Generator().manual_seed(seed))
    return m


def test_linear_a2l_reads_each_frame_alone_and_passes_the_state():
    m = _random_readout(LINEAR, 0.01, 0)
    torch.manual_seed(0)
    audio, ref = torch.randn(1, 6, 16), torch.rand(1, LINEAR.n_landmarks, 2)
    state = torch.full((1, 1, 1), 7.0)
    whole, out_state = m(audio, ref, state)
    assert whole.shape == (1, 6, LINEAR.n_landmarks, 2) and torch.equal(out_state, state)
    parts = torch.cat([m(audio[:, t : t + 1], ref)[0] for t in range(6)], dim=1)
    assert torch.allclose(parts, whole, atol=1e-6)
    audio2 = audio.clone()
    audio2[:, 3] += 1.0  # one frame's audio moves that frame only
    moved = (m(audio2, ref)[0] - whole).abs().amax(dim=(0, 2, 3))
    assert moved[3] > 0 and torch.count_nonzero(moved) == 1
    with torch.no_grad():
        m.readout.weight.zero_()
        m.readout.bias.zero_()
    assert torch.equal(m(audio, ref)[0], ref[:, None].expand(-1, 6, -1, -1))  # no readout: the reference itself
    with pytest.raises(ValueError, match="gru or linear"):
        AudioToLandmarks(dataclasses.replace(A2L, arch="transformer"))


SMOOTH = dataclasses.replace(LINEAR, smoothing=0.5, hidden=2 * A2L.n_landmarks)


def test_smoothed_linear_a2l_low_passes_and_streams_with_its_state():
    m = _random_readout(SMOOTH, 0.05, 2)
    torch.manual_seed(1)
    audio, ref = torch.randn(2, 9, 16), torch.rand(2, SMOOTH.n_landmarks, 2)
    state = 0.01 * torch.randn(1, 2, SMOOTH.hidden)
    whole, last = m(audio, ref, state)
    d = m.readout(torch.cat([audio, ref.reshape(2, 1, -1).expand(-1, 9, -1)], dim=-1))
    s, rec = state[0], []
    for t in range(9):  # the recursion it stands for
        s = s + 0.5 * (d[:, t] - s)
        rec.append(s)
    assert torch.allclose((whole - ref[:, None]).reshape(2, 9, -1), torch.stack(rec, 1), atol=1e-6)
    parts, st = [], state
    for t in range(9):  # frame by frame, carrying the state, equals the whole sequence
        out, st = m(audio[:, t : t + 1], ref, st)
        parts.append(out)
    assert torch.allclose(torch.cat(parts, 1), whole, atol=1e-6) and torch.allclose(st, last, atol=1e-6)
    with pytest.raises(ValueError, match="hidden"):
        AudioToLandmarks(dataclasses.replace(SMOOTH, hidden=1))
    with pytest.raises(ValueError, match="smoothing"):
        AudioToLandmarks(dataclasses.replace(LINEAR, smoothing=0.0))


@pytest.mark.parametrize("config", [LINEAR, SMOOTH], ids=["plain", "smoothed"])
def test_linear_a2l_exports_to_onnx(tmp_path, config):
    from export.onnx import export_model
    from export.specs import spec_by_name

    m = AudioToLandmarks(config).eval()
    with torch.no_grad():
        m.readout.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
    spec = spec_by_name("a2l")
    rep = export_model(spec, spec.module_for(m), tmp_path / "a2l.onnx")  # checked against PyTorch at several T
    assert rep["max_abs_error"]["landmarks"] < 1e-5 and rep["max_abs_error"]["state_out"] < 1e-5


def _synthetic(rng, w_true, b_true, n_ids=6, noise=0.0):
    """Examples as segment_examples returns them: features, a reference, the displacement (linear in both)."""
    out = []
    d, k2 = w_true.shape[0] - w_true.shape[1], w_true.shape[1]
    for i in range(n_ids):
        for _ in range(3):
            e = {"feats": rng.standard_normal((40, d)), "reference": 0.5 + 0.05 * rng.standard_normal(k2), "identity": f"id{i}"}
            e["target"] = design(e) @ w_true + b_true + noise * rng.standard_normal((40, k2))
            out.append(e)
    return out


def _feature_0_opens() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The opening columns and a map (8 features + the reference -> displacement) where feature 0 alone opens the mouth."""
    idx = moving_indices()
    up, lo = opening_columns(idx)
    k2 = 2 * len(idx)
    w_true = np.zeros((8 + k2, k2))
    w_true[0, 2 * lo + 1] = 0.01
    return up, lo, w_true


def test_ridge_recovers_a_known_map():
    rng = np.random.default_rng(0)
    k2 = 2 * len(moving_indices())
    w_true, b_true = 0.01 * rng.standard_normal((8 + k2, k2)), 0.01 * rng.standard_normal(k2)
    ex = _synthetic(rng, w_true, b_true)
    w, b = Ridge(ex, 8).solve(1e-9, 1e-9)
    e = ex[0]
    np.testing.assert_allclose(design(e) @ w + b, e["target"], atol=1e-6)  # the standardisation is folded back exactly
    w_strong, _ = Ridge(ex, 8).solve(1e3, 1e-9)
    assert np.abs(w_strong[:8]).max() < 0.05 * np.abs(w[:8]).max()  # the audio strength shrinks the audio weights only
    assert np.abs(w_strong[8:]).max() > 0.5 * np.abs(w[8:]).max()


def test_cross_validation_prefers_the_strength_that_generalises():
    rng = np.random.default_rng(1)
    up, lo, w_true = _feature_0_opens()
    ex = _synthetic(rng, w_true, np.zeros(w_true.shape[1]), noise=0.002)
    cv = cross_validate(ex, (1e-4, 1e3), 3, up, lo, 8, reference_strengths=(0.01,), smoothings=(1.0, 0.5))
    assert set(cv) == {(1e-4, 0.01, 1.0), (1e3, 0.01, 1.0), (1e-4, 0.01, 0.5), (1e3, 0.01, 0.5)}
    weak, strong = cv[(1e-4, 0.01, 1.0)], cv[(1e3, 0.01, 1.0)]
    assert cv[(1e-4, 0.01, 0.5)]["speed"] < weak["speed"]  # the low-pass slows the mouth
    assert weak["mse"] < strong["mse"] and weak["corr"] > 0.9  # a real signal: weak shrinkage wins on held-out identities
    # the shrunk fit opens the mouth less; the spread gain undoes it around the mean feature, leaving the resting place
    w, b = Ridge(ex, 8).solve(0.05, 0.01)
    gain = spread_gain(ex, w, b, up, lo, 8)
    assert 1.0 < gain <= 3.0
    mean_f = np.concatenate([e["feats"] for e in ex]).mean(0)
    w2, b2 = with_audio_gain(w, b, gain, mean_f, 8)
    e = ex[0]
    at_mean = dict(e, feats=np.repeat(mean_f[None], 2, 0))
    np.testing.assert_allclose(design(at_mean) @ w2 + b2, design(at_mean) @ w + b, atol=1e-12)
    dev = lambda w_, b_: design(e) @ w_ + b_ - (design(at_mean) @ w_ + b_)[:1]
    np.testing.assert_allclose(dev(w2, b2), gain * dev(w, b), atol=1e-9)


def test_feature_centre_is_a_causal_running_mean_that_learns_from_speech_only():
    mean = np.array([1.0, -2.0])
    cfg = FeatureCentreConfig(mean=tuple(mean), strength=1.0, prior_frames=2)
    feats = np.array([[3.0, -2.0], [3.0, -2.0], [5.0, 0.0]])
    out = FeatureCentre(cfg)(feats)
    running = np.array([[5 / 3, -2.0], [2.0, -2.0], [13 / 5, -8 / 5]])  # (2 * mean + what was heard) / (2 + t)
    np.testing.assert_allclose(out, feats - (running - mean), atol=1e-12)
    c = FeatureCentre(cfg)  # frame by frame: the same (causal)
    np.testing.assert_allclose(np.concatenate([c(feats[t : t + 1]) for t in range(3)]), out, atol=1e-12)
    silent = c(np.array([[9.0, 9.0]]), listen=False)  # silence: centred by the mean so far, which it does not move
    np.testing.assert_allclose(silent, np.array([[9.0, 9.0]]) - (running[-1] - mean), atol=1e-12)
    np.testing.assert_allclose(c(np.array([[1.0, -2.0]])), np.array([[1.0, -2.0]]) - [(13 + 1) / 6 - 1, (-8 - 2) / 6 + 2], atol=1e-12)
    c.reset()
    np.testing.assert_allclose(c(feats), out, atol=1e-12)
    half = FeatureCentre(dataclasses.replace(cfg, strength=0.5))(feats)
    np.testing.assert_allclose(half, feats - 0.5 * (running - mean), atol=1e-12)
    np.testing.assert_array_equal(FeatureCentre(dataclasses.replace(cfg, strength=0.0))(feats), feats)
    with pytest.raises(ValueError, match="strength"):
        FeatureCentre(dataclasses.replace(cfg, strength=1.5))
    with pytest.raises(ValueError, match="size 3"):
        FeatureCentre(cfg)(np.zeros((1, 3)))


@pytest.mark.parametrize("offset_moves_the_mouth", [False, True])
def test_centre_strength_is_chosen_by_held_out_voices(offset_moves_the_mouth: bool):
    """Each voice's features carry a constant offset. Where the mouth ignores it (a microphone's colour),
    removing it is chosen; where the mouth follows it (a voice that opens wider throughout), keeping it is."""
    rng = np.random.default_rng(3)
    up, lo, w_true = _feature_0_opens()
    k2 = w_true.shape[1]
    ex = []
    for i in range(8):
        offset = np.zeros(8)
        offset[0] = rng.choice([-1.5, 1.5]) + 0.3 * rng.standard_normal()
        for _ in range(3):
            clean = rng.standard_normal((60, 8))
            e = {"feats": clean + offset, "reference": 0.5 + 0.05 * rng.standard_normal(k2), "identity": f"id{i}"}
            e["target"] = design(e if offset_moves_the_mouth else dict(e, feats=clean)) @ w_true + 0.002 * rng.standard_normal((60, k2))
            ex.append(e)
    cfg = choose_centre(ex, up, lo, 8, audio_strength=0.01, reference_strength=0.01, smoothing=1.0, folds=4, prior_frames=5)
    table = cfg.cross_validation["strengths"]
    assert set(table) == {"0.0", "gain", "1.0"} and len(cfg.mean) == 8
    assert cfg.strength == (0.0 if offset_moves_the_mouth else 1.0), table


@pytest.mark.shared_data
def test_fit_on_real_clips_follows_the_mouth(shared_data: Path, tmp_path: Path):
    from engine.data.prepare import PrepareConfig, prepare

    clips = shared_data / "clips"
    names = ["LipNet__evaluation_samples_GRID_bbaf2n.mpg", "LipNet__evaluation_samples_id2_vcd_swwp2s.mpg", "vox2__Input_00010.mp4",
             "vox2__Audio_Source_00086.mp4"]  # three training identities and one held out (engine/data/splits.json)
    prepare([clips / n for n in names], tmp_path / "p", PrepareConfig(crop_size_px=256), jobs=2, progress=False)
    enc = Path(__file__).resolve().parents[1] / "engine" / "bundles" / "default" / "audio_encoder"
    rep = fit_linear_a2l([str(tmp_path / "p")], str(tmp_path / "run"), audio_encoder=str(enc), lambdas=(0.1, 1.0), folds=3, smoothings=(1.0, 0.5))
    assert rep["training"]["identities"] == 3 and rep["audio_strength"] in (0.1, 1.0) and 1.0 <= rep["audio_gain"] <= 3.0
    assert rep["smoothing"] in (1.0, 0.5) and len(rep["identity_cv"]) == 4
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["held_out"]["p"]["segments"] == 1
    centre = FeatureCentreConfig.load(tmp_path / "run" / "a2l_centre.json")  # its session centring, chosen the same way
    assert len(centre.mean) == 64 and 0.0 <= centre.strength <= 1.0 and rep["feature_centre"]["chosen"] in ("0.0", "gain", "1.0")
    m = load_model(AudioToLandmarks, A2LConfig, tmp_path / "run" / "a2l")
    assert m.config.arch == "linear" and (tmp_path / "run" / "audio_encoder.pt").is_file()
    held = rep["held_out"]["p"]
    assert np.isfinite(held["mouth_opening_correlation"]) and held["lip_error_px_at_256"] < 2 * held["static_reference_lip_error_px_at_256"]
    # on the clips it was fitted on, the readout's opening follows the real one (the fit worked on real landmarks and audio)
    from engine.models.audio_encoder import AudioEncoder, AudioEncoderConfig
    from engine.training.a2l_linear import _opening, segment_examples
    from engine.training.data import FrameStore

    store = FrameStore([tmp_path / "p"], split="train", with_patches=False)
    idx = np.asarray(m.config.landmark_indices)
    up, lo = opening_columns(idx)
    w, b = m.readout.weight.detach().double().numpy().T, m.readout.bias.detach().double().numpy()
    corr = [np.corrcoef(_opening(design(e) @ w + b, up, lo), _opening(e["target"], up, lo))[0, 1]
            for e in segment_examples(load_model(AudioEncoder, AudioEncoderConfig, enc).eval(), store, store.audio_segments(), idx,
                                      np.random.default_rng(0), n_random=0)]
    print("in-sample opening correlation", corr)
    assert np.mean(corr) > 0.5
