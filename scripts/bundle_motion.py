"""Give a bundle its motion layers (issue 14): the calibrated articulation gain, the library of real
head motion, and optionally a retrained A2L (re-exported to ONNX and checked against PyTorch).

    python scripts/bundle_motion.py --bundle engine/bundles/default --data out/full out/grid [--a2l runs/a2l_articulate]

Writes into the bundle: ``articulation.json`` (engine/motion/articulation.py, fitted on the
training clips with the bundle's A2L), ``head_motion.json`` (engine/motion/head.py, from the
training talking clips), with ``--a2l`` the run's ``a2l.{json,pt}`` (and its ``a2l_centre.json``
where it has one) and a new ``a2l.onnx``; a
section of the data card; then the manifest again (every file's sha256).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from engine.bundle import write_manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="engine/bundles/default")
    ap.add_argument("--data", nargs="+", required=True, help="prepared folders (avatar prepare) of the talking clips")
    ap.add_argument("--a2l", help="an `avatar train a2l` run whose a2l.{json,pt} replace the bundle's (same audio encoder)")
    a = ap.parse_args()
    import torch

    from engine.models.a2l import A2LConfig, AudioToLandmarks
    from engine.models.audio_encoder import AudioEncoder, AudioEncoderConfig
    from engine.models.io import load_model
    from engine.motion.head import fit_library
    from engine.training.a2l import calibrate_articulation

    d = Path(a.bundle)
    manifest = json.loads((d / "manifest.json").read_text())
    card = json.loads((d / "data_card.json").read_text())
    notes = card.setdefault("motion", {})
    if a.a2l:
        run = Path(a.a2l)
        for ext in (".json", ".pt"):
            shutil.copyfile(run / f"a2l{ext}", d / f"a2l{ext}")
        if (run / "a2l_centre.json").is_file():  # a linear readout's session feature centring (engine/motion/feature_centre.py)
            shutil.copyfile(run / "a2l_centre.json", d / "a2l_centre.json")
        elif (d / "a2l_centre.json").is_file():  # the previous A2L's: not this one's
            (d / "a2l_centre.json").unlink()
        if "a2l" in manifest.get("graphs", {}):
            from export.onnx import export_model
            from export.specs import spec_by_name

            spec = spec_by_name("a2l")
            model = load_model(AudioToLandmarks, A2LConfig, d / "a2l").eval()
            rep = export_model(spec, spec.module_for(model), d / manifest["graphs"]["a2l"])
            print("a2l.onnx:", json.dumps({k: v for k, v in rep.items() if "err" in k}))
        notes["a2l"] = {"run": str(run), "config": json.loads((run / "config.json").read_text()),
                        "held_out": json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else None}
    enc = load_model(AudioEncoder, AudioEncoderConfig, d / "audio_encoder").eval()
    a2l = load_model(AudioToLandmarks, A2LConfig, d / "a2l").eval()
    with torch.no_grad():
        art = calibrate_articulation(enc, a2l, a.data)
    art.save(d / "articulation.json")
    print("articulation:", art)
    lib = fit_library(a.data)
    lib.save(d / "head_motion.json")
    print("head motion:", lib.source, json.dumps(lib.stats()))
    notes["articulation"] = {"gain": art.gain, "max_opening_ratio": art.max_opening_ratio, "calibrated_on": art.calibrated_on}
    notes["head_motion"] = {"source": lib.source, "segments": len(lib.segments), "stats": lib.stats()}
    (d / "data_card.json").write_text(json.dumps(card, indent=1) + "\n")
    text = (d / "data_card.md").read_text()
    head, _, rest = text.partition("\n## Motion layers")
    after = rest[rest.find("\n## "):] if "\n## " in rest else ""  # later sections (the mouth region's) are kept
    md = head.rstrip() + "\n"
    md += ("\n## Motion layers (issue 14)\n\n"
           f"- Articulation gain {art.gain} on the A2L's displacements, openings capped at {art.max_opening_ratio} of the mouth's width "
           f"(`articulation.json`, fitted on {art.calibrated_on}).\n"
           f"- Head motion replayed from real people (`head_motion.json`): {lib.source}.\n")
    if a.a2l:
        md += (f"- A2L replaced: run `{a.a2l}` ({json.loads((Path(a.a2l) / 'a2l.json').read_text()).get('arch', 'gru')}; config and held-out "
               "figures in data_card.json, `motion.a2l`).\n")
    (d / "data_card.md").write_text(md + after)
    keep = {k: v for k, v in manifest.items() if k not in ("format", "fps", "sample_rate_hz", "crop_size_px", "steps", "models", "torch_version", "files")}
    write_manifest(d, fps=manifest["fps"], sample_rate_hz=manifest["sample_rate_hz"], crop_size_px=manifest["crop_size_px"],
                   steps=manifest["steps"], extra=keep)
    print(f"{d}: manifest rewritten")


if __name__ == "__main__":
    main()
