"""Articulation: does the rendered mouth open as much, as fast and at the same moments as the real one?

Per clip, from a mouth-opening series (the inner-lip distance: MediaPipe on rendered frames, on
ground truth, or the A2L's own landmarks), against ground truth's series on the same frames:
  - amplitude ratio: std of ours / std of ground truth;
  - speed ratio: mean |frame-to-frame change| of ours / of ground truth;
  - correlation: the best Pearson correlation within +-2 frames of lag (and that lag);
  - lip closures: ground truth's closures (local minima of the opening within the lowest 15 % of
    its range) and the share of them where ours is as closed (at or below the same threshold,
    after removing ours' offset to ground truth's median) within +-1 frame.
Ground truth's own amplitude (px) and speed (px/s) are reported beside the ratios.
"""
from __future__ import annotations

import numpy as np

from engine.face.geometry import OPENING_PAIRS


def opening_from_lips(lips: list[np.ndarray | None], lips_indices: np.ndarray) -> np.ndarray:
    """Per frame, the mean inner-lip opening (px) of lip landmark arrays (L, 2) ordered as
    ``lips_indices`` (MediaPipe ids); NaN where no face was found."""
    pos = {int(i): k for k, i in enumerate(lips_indices)}
    up = [pos[u] for u, _ in OPENING_PAIRS]
    lo = [pos[l] for _, l in OPENING_PAIRS]
    return np.array([float((p[lo, 1] - p[up, 1]).mean()) if p is not None else np.nan for p in lips], np.float64)


def opening_from_landmarks(lm: np.ndarray) -> np.ndarray:
    """(F, 478, 2+) landmarks -> (F,) mean inner-lip opening in their units."""
    up = [u for u, _ in OPENING_PAIRS]
    lo = [l for _, l in OPENING_PAIRS]
    return (lm[:, lo, 1] - lm[:, up, 1]).mean(axis=1)


def _fill(x: np.ndarray) -> np.ndarray:
    """Linear interpolation over NaNs (frames where no face was found)."""
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x)
    if ok.all() or not ok.any():
        return x
    idx = np.arange(len(x))
    return np.interp(idx, idx[ok], x[ok])


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or a.std() < 1e-9 or b.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def closures(gt: np.ndarray, *, frac: float = 0.15) -> tuple[np.ndarray, float]:
    """Frames of ground truth's lip closures and the opening threshold that defines them."""
    lo, hi = np.percentile(gt, 2), np.percentile(gt, 98)
    thr = lo + frac * (hi - lo)
    f = [t for t in range(1, len(gt) - 1) if gt[t] <= thr and gt[t] <= gt[t - 1] and gt[t] <= gt[t + 1]]
    # one closure per run of closed frames
    out = [t for i, t in enumerate(f) if i == 0 or t - f[i - 1] > 2]
    return np.asarray(out, np.int64), float(thr)


def articulation(ours: np.ndarray, gt: np.ndarray, *, fps: float = 25.0, max_lag: int = 2) -> dict[str, float]:
    """The module docstring's figures for two opening series of equal length (NaN = missing)."""
    n = min(len(ours), len(gt))
    a, g = _fill(ours[:n]), _fill(gt[:n])
    if n < 10 or not np.isfinite(a).all() or not np.isfinite(g).all():
        return {}
    best, lag = -2.0, 0
    for d in range(-max_lag, max_lag + 1):  # d > 0: ours lags ground truth by d frames
        x, y = (a[d:], g[: n - d]) if d >= 0 else (a[: n + d], g[-d:])
        c = _corr(x, y)
        if c > best:
            best, lag = c, d
    g_speed = np.abs(np.diff(g)).mean()
    ev, thr = closures(g)
    a_shift = a - np.median(a) + np.median(g)
    hits = [bool((a_shift[max(t - 1, 0) : t + 2] <= thr).any()) for t in ev]
    return {"amplitude_ratio": float(a.std() / max(g.std(), 1e-9)), "speed_ratio": float(np.abs(np.diff(a)).mean() / max(g_speed, 1e-9)),
            "correlation": best, "correlation_lag_frames": float(lag), "closures_gt": float(len(ev)),
            "closure_hit_rate": float(np.mean(hits)) if hits else float("nan"),
            "gt_amplitude": float(g.std()), "gt_speed_per_s": float(g_speed * fps)}


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each figure over clips (closure hit rate weighted by the number of closures)."""
    rows = [r for r in rows if r]
    if not rows:
        return {}
    out = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0] if k not in ("closures_gt", "closure_hit_rate")}
    n = np.array([r["closures_gt"] for r in rows])
    h = np.array([r["closure_hit_rate"] if np.isfinite(r["closure_hit_rate"]) else 0.0 for r in rows])
    out["closures_gt"] = float(n.sum())
    out["closure_hit_rate"] = float((n * h).sum() / n.sum()) if n.sum() else float("nan")
    return out
