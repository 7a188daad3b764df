"""Give a bundle with a linear A2L its session feature centring (engine/motion/feature_centre.py).

    python scripts/bundle_centre.py --bundle engine/bundles/default --data out/full out/grid [--report docs/training/a2l_centre.json]

The strength is chosen by the identity cross-validation on the training split of ``--data``
(engine/training/a2l_centre.py), with the readout's own ridge strengths and low-pass (from the data
card's ``motion.a2l``, else the defaults the shipped readout was fitted with). Writes
``a2l_centre.json`` into the bundle, a line of its data card, then the manifest again.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="engine/bundles/default")
    ap.add_argument("--data", nargs="+", required=True, help="prepared folders (avatar prepare) of the training clips")
    ap.add_argument("--report", help="also write the choice and its cross-validation table here (JSON)")
    a = ap.parse_args(argv)
    import numpy as np
    import torch

    from engine.bundle import load_bundle, write_manifest
    from engine.face.region import moving_indices
    from engine.models.a2l import A2LConfig
    from engine.models.audio_encoder import AudioEncoder, AudioEncoderConfig
    from engine.models.io import load_model
    from engine.training.a2l import opening_columns
    from engine.training.a2l_centre import choose_centre
    from engine.training.a2l_linear import segment_examples
    from engine.training.data import FrameStore

    d = Path(a.bundle)
    bundle = load_bundle(d)
    a2l_cfg = bundle.configs["a2l"]
    if not isinstance(a2l_cfg, A2LConfig) or a2l_cfg.arch != "linear":
        raise SystemExit(f"{d}: the feature centring is chosen for a linear A2L (arch linear); this bundle's is {getattr(a2l_cfg, 'arch', '?')}")
    card = json.loads((d / "data_card.json").read_text())
    held = ((card.get("motion") or {}).get("a2l") or {}).get("held_out") or {}
    fit = {"audio_strength": held.get("audio_strength", 1.0), "reference_strength": held.get("reference_strength", 0.01),
           "smoothing": held.get("smoothing", a2l_cfg.smoothing)}
    enc = load_model(AudioEncoder, AudioEncoderConfig, d / "audio_encoder").eval()
    store = FrameStore(a.data, split="train", with_patches=False)
    idx = moving_indices()
    up, lo = opening_columns(idx)
    with torch.no_grad():
        examples = segment_examples(enc, store, store.audio_segments(), idx, np.random.default_rng(0))
    cfg = choose_centre(examples, up, lo, enc.config.feature_dim, **fit)
    cfg.save(d / "a2l_centre.json")
    print("a2l_centre:", json.dumps({k: v for k, v in cfg.__dict__.items() if k != "mean"}))
    card.setdefault("motion", {})["a2l_centre"] = {"strength": cfg.strength, "prior_frames": cfg.prior_frames, "chosen_on": cfg.chosen_on,
                                                   "cross_validation": cfg.cross_validation, "readout_fit": fit}
    (d / "data_card.json").write_text(json.dumps(card, indent=1) + "\n")
    md = (d / "data_card.md").read_text()
    line = (f"- The A2L's audio features centred on the session's voice (`a2l_centre.json`, engine/motion/feature_centre.py): "
            f"strength {cfg.strength}, chosen by {cfg.chosen_on}.\n")
    md = "".join(ln for ln in md.splitlines(keepends=True) if not ln.startswith("- The A2L's audio features centred"))
    head, sep, rest = md.partition("\n## Motion layers (issue 14)\n\n")
    md = head + sep + line + rest if sep else md.rstrip() + "\n\n" + line
    (d / "data_card.md").write_text(md)
    manifest = json.loads((d / "manifest.json").read_text())
    keep = {k: v for k, v in manifest.items() if k not in ("format", "fps", "sample_rate_hz", "crop_size_px", "steps", "models", "torch_version", "files")}
    write_manifest(d, fps=manifest["fps"], sample_rate_hz=manifest["sample_rate_hz"], crop_size_px=manifest["crop_size_px"],
                   steps=manifest["steps"], extra=keep)
    report = {"what": __doc__.splitlines()[0], "bundle": str(d), "data": a.data, "strength": cfg.strength, "prior_frames": cfg.prior_frames,
              "chosen_on": cfg.chosen_on, "readout_fit": fit, **cfg.cross_validation}
    if a.report:
        Path(a.report).parent.mkdir(parents=True, exist_ok=True)
        Path(a.report).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
