"""Choose the session feature centring's strength (engine/motion/feature_centre.py) for a linear A2L.

The same identity cross-validation as the readout's own (engine/training/a2l_linear.py): per fold
of training identities, the readout refitted on the others (its chosen ridge strengths, spread gain
and low-pass), then each held-out voice's segments run through the centring at each strength in
``STRENGTHS`` (0: off; (g - 1) / g: only the spread gain's share of the offset, g the fold's gain;
1: the whole offset), scored by the displacement's mean squared error, averaged per identity (the
choice, as for the readout), with the inner-lip opening's correlation, mean offset and absolute
error reported beside it. Each segment is a session: its running mean starts at the fold's
training mean.
"""
from __future__ import annotations

import numpy as np

from engine.motion.feature_centre import FeatureCentre, FeatureCentreConfig
from engine.training.a2l_linear import Ridge, _opening, design, low_pass, spread_gain, with_audio_gain

STRENGTHS = (0.0, "gain", 1.0)  # "gain": (g - 1) / g


def choose_centre(examples: list[dict], up: np.ndarray, lo: np.ndarray, n_audio: int, *, audio_strength: float, reference_strength: float,
                  smoothing: float, folds: int = 5, seed: int = 0, prior_frames: int = 50) -> FeatureCentreConfig:
    """``examples``: a2l_linear.segment_examples of the training split. Returns the config with the
    strength of least cross-validated error and the training frames' mean feature."""
    ids = sorted({e["identity"] for e in examples})
    order = np.random.default_rng(seed).permutation(len(ids))
    fold_of = {ids[j]: k % folds for k, j in enumerate(order)}
    scores: dict[str, dict[str, dict[str, list[float]]]] = {str(s): {} for s in STRENGTHS}
    gains = []
    for f in range(folds):
        train = [e for e in examples if fold_of[e["identity"]] != f]
        w, b = Ridge(train, n_audio).solve(audio_strength, reference_strength)
        g = spread_gain(train, w, b, up, lo, n_audio, smoothing=smoothing)
        gains.append(g)
        mean = np.concatenate([e["feats"] for e in train]).mean(0)
        w, b = with_audio_gain(w, b, g, mean, n_audio)
        for s in STRENGTHS:
            k = (g - 1.0) / g if s == "gain" else float(s)
            for e in (e for e in examples if fold_of[e["identity"]] == f):
                centre = FeatureCentre(FeatureCentreConfig(mean=tuple(mean), strength=k, prior_frames=prior_frames))
                p = low_pass(design(dict(e, feats=centre(e["feats"]))) @ w + b, smoothing)
                po, go = _opening(p, up, lo) * 128.0, _opening(e["target"], up, lo) * 128.0  # px at 256
                m = scores[str(s)].setdefault(e["identity"], {"mse": [], "corr": [], "offset_px": [], "abs_error_px": []})
                m["mse"].append(float(((p - e["target"]) ** 2).mean()))
                m["corr"].append(float(np.corrcoef(po, go)[0, 1]) if po.std() > 0 and go.std() > 0 else 0.0)
                m["offset_px"].append(float(po.mean() - go.mean()))
                m["abs_error_px"].append(float(np.abs(po - go).mean()))
    table = {s: {q: round(float(np.mean([np.mean(v[q]) for v in per_id.values()])), 7 if q == "mse" else 3)
                 for q in ("mse", "corr", "offset_px", "abs_error_px")} for s, per_id in scores.items()}
    best = min(table, key=lambda s: table[s]["mse"])
    if best == "gain":  # the gain the readout fitted on every training voice has
        g_all = spread_gain(examples, *Ridge(examples, n_audio).solve(audio_strength, reference_strength), up, lo, n_audio, smoothing=smoothing)
        strength = (g_all - 1.0) / g_all
    else:
        strength = float(best)
    return FeatureCentreConfig(mean=tuple(round(float(x), 7) for x in np.concatenate([e["feats"] for e in examples]).mean(0)),
                               strength=round(float(strength), 4), prior_frames=prior_frames,
                               chosen_on=f"{folds}-fold identity cross-validation, {len(ids)} training identities (least displacement MSE)",
                               cross_validation={"strengths": table, "fold_gains": [round(g, 4) for g in gains], "chosen": best})
