"""Head motion and blinks against real people (issue 14): a JSON report.

    python -m benchmarks.motion --data out/full out/grid --out docs/benchmarks/motion.json [--minutes 10]

- Head motion: the bundle's replayed motion (engine/motion/head.py) over ``minutes`` of speech and
  of silence, against the held-out talking clips' own in-plane motion measured the same way
  (roll, shift, scale: std and mean speed per second, ours over windows as long as the real
  clips' median segment, since a std grows with the span it is taken over); ratios ours / real; drift (the mean and
  the largest excursion of the last minute against the first).
- Blinks: the bundle's blink sampler over ``minutes``: blinks per minute (people in
  conversation: 10-30).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def run(data_dirs: list[str], *, minutes: float = 10.0, bundle_dir: str | None = None, seed: int = 0) -> dict:
    from engine.bundle import load_bundle
    from engine.motion.blink import BlinkSampler
    from engine.motion.head import CHANNELS, HeadMotion, fit_library, motion_stats

    b = load_bundle(bundle_dir)
    lib = b.head_motion
    if lib is None:
        raise ValueError(f"{b.path}: the bundle has no head_motion.json")
    real = fit_library(data_dirs, split="eval", min_seconds=2.0)
    n = int(minutes * 60 * b.fps)
    t0 = time.perf_counter()
    out = {"bundle": str(b.path), "minutes": minutes, "real_clips": real.source, "real": motion_stats(real.segments, 25.0)}
    for state in ("speaking", "silent"):
        hm = HeadMotion(lib, (0.0, 0.0), 1.0, b.fps, seed)
        tr = np.array([hm.pose(i, state == "speaking") for i in range(n)])  # (n, 4)
        win = int(np.median([len(x) for x in real.segments]))  # compared over windows as long as the real clips
        st = motion_stats([tr[i : i + win] for i in range(0, n - win + 1, win)], float(b.fps))
        minute = 60 * b.fps
        out[state] = {"stats": st, "ratio_to_real": {k: st[k] / max(out["real"][k], 1e-12) for k in st},
                      "drift": {f"{c}_mean_last_minute": float(tr[-minute:, i].mean()) for i, c in enumerate(CHANNELS)}
                      | {f"{c}_max_abs": float(np.abs(tr[:, i]).max()) for i, c in enumerate(CHANNELS)}}
    bs = BlinkSampler(b.blink_prior, b.fps, seed)
    closure = np.array([bs.next() for _ in range(n)])
    onsets = int(((closure[1:] > 0.5) & (closure[:-1] <= 0.5)).sum())
    out["blinks_per_minute"] = onsets / minutes
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", required=True, help="prepared folders holding the held-out talking clips")
    ap.add_argument("--out", default="docs/benchmarks/motion.json")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--bundle", default=None)
    a = ap.parse_args(argv)
    rep = run(a.data, minutes=a.minutes, bundle_dir=a.bundle)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rep, indent=1) + "\n")
    print(json.dumps({k: rep[k] for k in ("real", "blinks_per_minute")}, indent=1))
    for s in ("speaking", "silent"):
        print(s, {k: round(v, 2) for k, v in rep[s]["ratio_to_real"].items()})


if __name__ == "__main__":
    main()
