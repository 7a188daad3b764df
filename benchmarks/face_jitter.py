"""Landmark jitter on still portraits: how much the canonical landmarks move when nothing does.

Each portrait becomes 40 video frames with Gaussian sensor noise (sigma in grey levels),
tracked as video, aligned with the stabilised transform; the jitter is the per-landmark
standard deviation over frames, in pixels of a 256 px crop (mean and worst landmark).
Usage: python -m benchmarks.face_jitter [--out docs/benchmarks/face_jitter.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from engine.face.align import AlignConfig, apply_transform, fit_transform, stabilise_transforms
from engine.face.landmarks import FaceTracker

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "portraits"
PORTRAITS = ["hallo__examples_reference_images_2.jpg", "SadTalker__examples_source_image_people_0.png", "dreamtalk__data_src_img_cropped_f30.png"]


def jitter(rgb: np.ndarray, sigma: float, frames: int = 40, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    cfg = AlignConfig(crop_size_px=256)
    lms = []
    with FaceTracker() as tr:
        for _ in range(frames):
            noisy = np.clip(rgb.astype(np.float32) + rng.normal(0, sigma, rgb.shape), 0, 255).astype(np.uint8)
            lms.append(tr.track(noisy))
    ms = stabilise_transforms(np.stack([fit_transform(lm, cfg) for lm in lms]), cfg.stabilise_sigma_frames)
    std = np.stack([apply_transform(m, lm) for m, lm in zip(ms, lms)]).std(0)  # (478, 2)
    return {"mean_px": float(std.mean()), "worst_px": float(std.max()), "crop_shift_std_px": float(ms[:, :, 2].std(0).max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/face_jitter.json"))
    a = ap.parse_args()
    rows = []
    for name in PORTRAITS:
        rgb = cv2.cvtColor(cv2.imread(str(SHARED / name)), cv2.COLOR_BGR2RGB)
        for sigma in (0.0, 2.0, 4.0):
            rows.append({"portrait": name, "noise_sigma": sigma, **jitter(rgb, sigma)})
            print(json.dumps(rows[-1]))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"crop_size_px": 256, "frames": 40, "rows": rows}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
