"""Fit the linear A2L (``A2LConfig(arch="linear")``) in closed form on a frozen audio encoder.

Each training frame gives the encoder's feature (the bundle's own encoder, frozen: its denoiser is
conditioned on the same features), a reference (the segment's most closed frame, the mouth a
portrait usually shows, and random frames, so that an open reference is learnt to close) and the
lip and jaw landmarks' displacement from it. A ridge regression maps features and reference to
the displacement; the audio weights' strength is chosen by cross-validation over held-out
*identities* of the training split (how well it does on a voice it has not heard), never on the
evaluation split. Ridge shrinks: the audio part is then scaled around the mean feature so that the
opening varies as much as the real one (``spread_gain``), inside the readout, which replaces the
articulation layer's gain (that one would also scale the constant part: a mouth open in silence).
A one-pole low-pass (``A2LConfig.smoothing``, chosen by the same cross-validation) takes out the
frame-to-frame jitter of a per-frame readout.

Why not the GRU: on unseen voices the trained GRU's mouth opening follows the truth with a
correlation of 0.22, this readout of the same features with 0.37; a few dozen voices are too few
for the GRU's capacity (docs/training/a2l_readout.json).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from engine.data.identities import identity_of
from engine.face.region import moving_indices, to_patch_units
from engine.models.a2l import A2LConfig, AudioToLandmarks
from engine.models.audio_encoder import AudioEncoder, AudioEncoderConfig
from engine.models.io import load_model, save_model
from engine.training.a2l import evaluate_a2l, neutral_frames, opening_columns
from engine.training.data import FrameStore

LAMBDAS = (0.3, 1.0, 3.0, 10.0, 30.0)  # ridge strengths tried on the audio feature's weights (per frame, standardised inputs)
REFERENCE_STRENGTHS = (0.01,)  # on the reference's weights: free to learn to close an open reference (see fit_linear_a2l)
REFERENCES_PER_SEGMENT = 3  # random references per segment, besides its most closed frame
SMOOTHINGS = (1.0, 0.7, 0.5, 0.35)  # the low-pass's new-frame weights tried (1: none; 0.5 lags about a frame)


@torch.no_grad()
def segment_examples(enc: AudioEncoder, store: FrameStore, segs: list[int], idx: np.ndarray, rng: np.random.Generator,
                     n_random: int = REFERENCES_PER_SEGMENT) -> list[dict]:
    """Per segment and reference (its most closed frame and ``n_random`` random ones, as the GRU was trained):
    encoder features (F, D), the reference (2K,) and the displacement from it (F, 2K), in patch units."""
    neutral = neutral_frames(store, segs, idx)
    c = enc.config
    out = []
    for i in segs:
        s = store.segments[i]
        frames = np.arange(s.length)
        feats = enc(torch.from_numpy(store.mel_window(i, frames, c.mel_before, c.mel_after))[None])[0].numpy().astype(np.float64)
        lm = to_patch_units(store.landmarks[s.start : s.start + s.length][:, idx]).reshape(s.length, -1).astype(np.float64)
        for r in [neutral[i], *rng.integers(0, s.length, n_random)]:
            out.append({"feats": feats, "reference": lm[r], "target": lm - lm[r][None], "identity": identity_of(s.clip)})
    return out


def design(e: dict) -> np.ndarray:
    """(F, D + 2K) regressors of one example: the features and the reference repeated."""
    return np.concatenate([e["feats"], np.repeat(e["reference"][None], len(e["feats"]), 0)], 1)


class Ridge:
    """Ridge regression on standardised regressors, one strength for the audio columns, another for the reference's."""

    def __init__(self, examples: list[dict], n_audio: int):
        x, y = np.concatenate([design(e) for e in examples]), np.concatenate([e["target"] for e in examples])
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-9
        z = (x - self.mu) / self.sd
        self.gram, self.cross, self.my, self.n, self.n_audio = z.T @ z, z.T @ (y - y.mean(0)), y.mean(0), len(z), n_audio

    def solve(self, lam_audio: float, lam_reference: float) -> tuple[np.ndarray, np.ndarray]:
        """(W (D + 2K, 2K), b (2K,)) on the raw regressors (the standardisation folded in)."""
        pen = np.r_[np.full(self.n_audio, lam_audio), np.full(len(self.mu) - self.n_audio, lam_reference)] * self.n
        w = np.linalg.solve(self.gram + np.diag(pen), self.cross) / self.sd[:, None]
        return w, self.my - self.mu @ w


def low_pass(d: np.ndarray, a: float) -> np.ndarray:
    """(F, 2K) displacements through the A2L's one-pole low-pass from a zero state (the reference)."""
    if a >= 1.0:
        return d
    out, s = np.empty_like(d), np.zeros(d.shape[1])
    for t in range(len(d)):
        s = s + a * (d[t] - s)
        out[t] = s
    return out


def _opening(d: np.ndarray, up: np.ndarray, lo: np.ndarray) -> np.ndarray:
    d = d.reshape(len(d), -1, 2)
    return (d[:, lo, 1] - d[:, up, 1]).mean(1)


def cross_validate(examples: list[dict], lambdas, folds: int, up, lo, n_audio: int, seed: int = 0,
                   reference_strengths=REFERENCE_STRENGTHS, smoothings=(1.0,)) -> dict[tuple[float, float, float], dict]:
    """Per (audio strength, reference strength, smoothing), on held-out identities (``folds`` groups of them):
    the displacement's mean squared error (what is minimised; the choice) and the inner-lip opening's
    correlation and spread ratio (reported), each averaged per identity first so that GRID's one speaker
    with many clips does not decide."""
    ids = sorted({e["identity"] for e in examples})
    order = np.random.default_rng(seed).permutation(len(ids))
    fold_of = {ids[j]: k % folds for k, j in enumerate(order)}
    keys = [(la, lr, sm) for la in lambdas for lr in reference_strengths for sm in smoothings]
    res: dict[tuple, dict[str, dict[str, list[float]]]] = {k: {} for k in keys}
    for f in range(folds):
        test = [e for e in examples if fold_of[e["identity"]] == f]
        fit = Ridge([e for e in examples if fold_of[e["identity"]] != f], n_audio)
        for la in lambdas:
            for lr in reference_strengths:
                w, b = fit.solve(la, lr)
                for e in test:
                    raw = design(e) @ w + b
                    for sm in smoothings:
                        p = low_pass(raw, sm)
                        po, go = _opening(p, up, lo), _opening(e["target"], up, lo)
                        m = res[(la, lr, sm)].setdefault(e["identity"], {"mse": [], "corr": [], "spread": [], "speed": []})
                        m["mse"].append(float(((p - e["target"]) ** 2).mean()))
                        m["corr"].append(float(np.corrcoef(po, go)[0, 1]) if po.std() > 0 and go.std() > 0 else 0.0)
                        m["spread"].append(float(po.std() / max(go.std(), 1e-9)))
                        m["speed"].append(float(np.abs(np.diff(po)).mean() / max(np.abs(np.diff(go)).mean(), 1e-9)))
    return {k: {q: float(np.mean([np.mean(v[q]) for v in per_id.values()])) for q in ("mse", "corr", "spread", "speed")}
            for k, per_id in res.items()}


def spread_gain(examples: list[dict], w: np.ndarray, b: np.ndarray, up, lo, n_audio: int, max_gain: float = 3.0,
                smoothing: float = 1.0) -> float:
    """How much the audio part must be scaled for the predicted opening to vary as much as the real one:
    per identity, the ratio of the real and predicted openings' standard deviations pooled over its segments
    (reference: each segment's most closed frame, the first example of each), then the median over identities
    (as ``calibrate_articulation`` does for the GRU), within [1, ``max_gain``]. Ridge shrinks; this undoes it."""
    var: dict[str, list[float]] = {}
    seen = set()
    for e in examples:
        key = id(e["feats"])
        if key in seen:  # one reference per segment: the most closed frame, listed first
            continue
        seen.add(key)
        p = e["feats"] @ w[:n_audio]  # the audio part alone: the reference's part is constant over the segment
        p = low_pass(p - p.mean(0), smoothing)  # as the A2L will smooth it (around its mean: no start-up transient)
        v = var.setdefault(e["identity"], [0.0, 0.0])
        v[0] += float(_opening(e["target"], up, lo).var()) * len(p)
        v[1] += float(_opening(p, up, lo).var()) * len(p)
    return float(np.clip(np.median([np.sqrt(g / max(q, 1e-12)) for g, q in var.values()]), 1.0, max_gain))


def with_audio_gain(w: np.ndarray, b: np.ndarray, gain: float, mean_feature: np.ndarray, n_audio: int) -> tuple[np.ndarray, np.ndarray]:
    """The audio weights scaled by ``gain`` around the mean feature: the same prediction for an average frame
    (so the mouth's resting place does not move), ``gain`` times the variation around it. Applied after the
    layer that comes later (engine/motion/articulation.py) would scale the constant part too: a mouth open in silence."""
    w2 = w.copy()
    w2[:n_audio] *= gain
    return w2, b - (gain - 1.0) * (mean_feature @ w[:n_audio])


def fit_linear_a2l(data_dirs: list[str], out_dir: str, *, audio_encoder: str, lambdas: tuple[float, ...] = LAMBDAS, folds: int = 5,
                   seed: int = 0, smoothings: tuple[float, ...] = SMOOTHINGS) -> dict:
    """Fit, choose the audio strength by identity cross-validation, save ``a2l`` and ``audio_encoder`` (a copy
    of the frozen one) in ``out_dir`` with ``eval.json``; returns the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    enc = load_model(AudioEncoder, AudioEncoderConfig, audio_encoder).eval()
    store = FrameStore(data_dirs, split="train", with_patches=False)
    segs = store.audio_segments()
    idx = moving_indices()
    up, lo = opening_columns(idx)
    examples = segment_examples(enc, store, segs, idx, np.random.default_rng(seed))
    d = enc.config.feature_dim
    cv = cross_validate(examples, lambdas, folds, up, lo, d, seed, smoothings=smoothings)
    lam, lam_ref, smoothing = min(cv, key=lambda k: cv[k]["mse"])
    w, b = Ridge(examples, d).solve(lam, lam_ref)
    gain = spread_gain(examples, w, b, up, lo, d, smoothing=smoothing)
    w, b = with_audio_gain(w, b, gain, np.concatenate([e["feats"] for e in examples]).mean(0), d)
    k2 = 2 * len(idx)
    a2l = AudioToLandmarks(A2LConfig(landmark_indices=tuple(int(i) for i in idx), feature_dim=d, arch="linear", smoothing=smoothing,
                                     layers=1, hidden=k2 if smoothing < 1.0 else 1))
    with torch.no_grad():
        a2l.readout.weight.copy_(torch.from_numpy(w.T.astype(np.float32)))
        a2l.readout.bias.copy_(torch.from_numpy(b.astype(np.float32)))
    save_model(a2l, out / "a2l")
    save_model(enc, out / "audio_encoder")
    from engine.training.a2l_centre import choose_centre  # it refits this module's readout per fold

    centre = choose_centre(examples, up, lo, d, audio_strength=lam, reference_strength=lam_ref, smoothing=smoothing, folds=folds, seed=seed)
    centre.save(out / "a2l_centre.json")  # the session centring of its features (engine/motion/feature_centre.py)
    report = {"audio_strength": lam, "reference_strength": lam_ref, "smoothing": smoothing, "audio_gain": round(gain, 4),
              "references_per_segment": 1 + REFERENCES_PER_SEGMENT,
              "identity_cv": {f"audio {k[0]}, reference {k[1]}, smoothing {k[2]}": {m: round(v, 6 if m == "mse" else 4) for m, v in r.items()}
                              for k, r in cv.items()},
              "folds": folds,
              "feature_centre": {"strength": centre.strength, **centre.cross_validation},
              "training": {"segments": len(segs), "frames": int(sum(len(store.segments[i].mel_index) for i in segs)),
                           "identities": len({e["identity"] for e in examples})},
              "held_out": {name: evaluate_a2l(enc, a2l, [dd]) for name, dd in _eval_groups(data_dirs)}}
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    print("a2l (linear):", json.dumps({k: v for k, v in report.items() if k != "held_out"}))
    return report


def _eval_groups(data_dirs: list[str]) -> list[tuple[str, str]]:
    """One held-out report per data folder (unseen speakers and GRID's held-out sentences are apart)."""
    return [(Path(d).name, d) for d in data_dirs]
