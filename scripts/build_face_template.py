"""Rebuild engine/face/assets/face_template.npy from frames of the shared clips.

Generalised Procrustes analysis (similarity, 3-D) of face-mesh landmarks from a few frames
of every clip, then normalised by ``engine.face.geometry.normalise_template``.
Usage: python scripts/build_face_template.py [--clips ../shared/data/clips] [--per-clip 6]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import av
import numpy as np

from engine.face.geometry import TEMPLATE_PATH, normalise_template, umeyama
from engine.face.landmarks import FaceOptions, FaceTracker


def sample_landmarks(clips: Path, per_clip: int) -> list[np.ndarray]:
    out = []
    for path in sorted(clips.iterdir()):
        with av.open(str(path)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        picks = np.linspace(0, len(frames) - 1, per_clip).round().astype(int)
        with FaceTracker(FaceOptions(), static=True) as tr:
            for i in picks:
                try:
                    out.append(tr.track(frames[i]))
                except Exception as e:  # noqa: BLE001 - a template sample may be skipped, and is reported
                    print(f"skip {path.name} frame {i}: {e}")
    return out


def procrustes_mean(shapes: list[np.ndarray], iters: int = 10) -> np.ndarray:
    x = np.stack(shapes).astype(np.float64)  # (S, 478, 3)
    mean = x[0] - x[0].mean(0)
    for _ in range(iters):
        fitted = []
        for s in x:
            sc, rot, tr = umeyama(s, mean)
            fitted.append(sc * s @ rot.T + tr)
        new = np.mean(fitted, 0)
        new -= new.mean(0)
        new /= np.linalg.norm(new)
        mean = new
    return mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clips", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/clips")
    ap.add_argument("--per-clip", type=int, default=6)
    a = ap.parse_args()
    shapes = sample_landmarks(a.clips, a.per_clip)
    tpl = normalise_template(procrustes_mean(shapes))
    TEMPLATE_PATH.parent.mkdir(parents=True, exist_ok=True)
    np.save(TEMPLATE_PATH, tpl)
    print(f"{len(shapes)} shapes -> {TEMPLATE_PATH}; x range {tpl[:, 0].min():.3f}..{tpl[:, 0].max():.3f}, "
          f"y range {tpl[:, 1].min():.3f}..{tpl[:, 1].max():.3f}")


if __name__ == "__main__":
    main()
