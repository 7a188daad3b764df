"""Mouth-opening curves on the held-out clips: ground truth against each bundle's A2L (issue 13).

    python scripts/opening_curves.py --out docs/eval/a2l_opening --bundle "GRU A2L=runs/gru_bundle" \\
        --bundle "linear A2L=engine/bundles/default"

For every held-out talking segment of ``--data`` (engine/data/splits.json), the inner-lip opening
(landmarks 13-14, pixels of a 256 px crop) of ground truth and of each bundle's audio encoder + A2L
+ articulation layer (and the bundle's feature centring) driven by the segment's own audio, the portrait being the segment's last
frame (as `avatar eval` does). No rendering: the motion a renderer is given. Writes
``opening_curves.png`` (one panel a clip) and ``opening_curves.json`` (per clip and bundle:
correlation with the truth, spread and speed ratios, the mean offset (> 0: kept too open) and the
mean absolute error of the opening).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", nargs="+", default=["out/full"], help="prepared folders holding the held-out clips")
    ap.add_argument("--bundle", action="append", required=True, help="NAME=BUNDLE_DIR (repeatable)")
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from engine.bundle import load_bundle
    from engine.face.region import to_patch_units
    from engine.models.a2l import A2LConfig, AudioToLandmarks
    from engine.models.audio_encoder import AudioEncoder, AudioEncoderConfig
    from engine.models.io import load_model
    from engine.motion.articulation import Articulation, ArticulationConfig
    from engine.motion.feature_centre import FeatureCentre
    from engine.training.a2l import make_sample
    from engine.training.data import FrameStore

    bundles = {}
    for spec in a.bundle:
        name, _, path = spec.partition("=")
        d = load_bundle(path).path
        bundles[name] = (load_model(AudioEncoder, AudioEncoderConfig, d / "audio_encoder").eval(), load_model(AudioToLandmarks, A2LConfig, d / "a2l").eval(),
                         ArticulationConfig.load(d / "articulation.json") if (d / "articulation.json").is_file() else ArticulationConfig(),
                         load_bundle(path).a2l_centre)
    store = FrameStore(a.data, split="eval", with_patches=False)
    segs = store.audio_segments()
    scale = 128.0  # patch units -> pixels of a 256 px crop (the patch is half the crop)
    report: dict = {"what": __doc__.splitlines()[0], "unit": "px at 256", "clips": {}}
    fig, axes = plt.subplots(len(segs), 1, figsize=(12, 2.2 * len(segs)), squeeze=False)
    for ax, seg in zip(axes[:, 0], segs):
        s = store.segments[seg]
        t = s.time_s
        curves, row = {}, {}
        for name, (enc, a2l, art, centre) in bundles.items():
            idx = np.asarray(a2l.config.landmark_indices)
            i13, i14 = int(np.where(idx == 13)[0][0]), int(np.where(idx == 14)[0][0])
            mel, lm, ref = make_sample(store, seg, 0, s.length, s.length - 1, enc.config, idx)
            layer = Articulation(art, idx, ref)  # its reference: the portrait's, or its mouth closed (close_reference)
            with torch.no_grad():
                feats = enc(torch.from_numpy(mel)[None])[0].numpy()
                if centre is not None and centre.strength > 0:  # the session's voice centred (a segment is a session)
                    feats = FeatureCentre(centre)(feats)
                pred = a2l(torch.from_numpy(feats)[None], torch.from_numpy(layer.reference)[None])[0][0].numpy()
            pred = layer(pred)
            curves.setdefault("ground truth", (lm[:, i14, 1] - lm[:, i13, 1]) * scale)
            curves[name] = (pred[:, i14, 1] - pred[:, i13, 1]) * scale
        gt = curves["ground truth"]
        for name, c in curves.items():
            if name == "ground truth":
                continue
            row[name] = {"correlation": round(float(np.corrcoef(c, gt)[0, 1]) if c.std() > 0 else 0.0, 3),
                         "spread_ratio": round(float(c.std() / max(gt.std(), 1e-9)), 3),
                         "speed_ratio": round(float(np.abs(np.diff(c)).mean() / max(np.abs(np.diff(gt)).mean(), 1e-9)), 3),
                         "mean_offset_px": round(float(c.mean() - gt.mean()), 2),  # > 0: kept too open on average
                         "abs_error_px": round(float(np.abs(c - gt).mean()), 2)}
        report["clips"][s.name] = row
        for name, c in curves.items():
            ax.plot(t, c, lw=2.0 if name == "ground truth" else 1.2, color="black" if name == "ground truth" else None,
                    label=name if name == "ground truth" else f"{name} (r={row[name]['correlation']:.2f})")
        ax.set_title(s.name, fontsize=9)
        ax.set_ylabel("opening px")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "opening_curves.png", dpi=80)
    report["mean"] = {name: {k: round(float(np.mean([r[name][k] for r in report["clips"].values()])), 3) for k in ("correlation", "spread_ratio", "speed_ratio", "mean_offset_px", "abs_error_px")}
                      for name in bundles}
    (out / "opening_curves.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["mean"]))
    return report


if __name__ == "__main__":
    main()
