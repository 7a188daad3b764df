"""A torch bundle for another generated region (engine/face/region.py): a base bundle's audio models,
motion files and sync expert, with a new autoencoder and denoiser trained on that region.

    python scripts/build_region_bundle.py --base engine/bundles/default --region mouth --crop-size 512 \\
        --autoencoder runs/mouth/autoencoder --denoiser runs/mouth/denoiser --steps 8 --out runs/mouth/teacher

The result has no ONNX graphs: it is the teacher that `avatar distill --bundle` distils and exports
(scripts/train_mouth_bundle.sh). The data card gains a section on the new models (their configs,
steps, minutes and held-out figures from the runs' log.jsonl and eval.json).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from engine.bundle import load_bundle, write_manifest
from engine.face.region import region_named

REPLACED = ("autoencoder", "denoiser")


def _run_summary(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()] if (run / "log.jsonl").is_file() else []
    last = rows[-1] if rows else {}
    out = {"steps": last.get("step"), "train_minutes_last_session": round(last.get("elapsed_s", 0) / 60, 1), "final_loss": last.get("loss")}
    if (run / "config.json").is_file():
        out["config"] = json.loads((run / "config.json").read_text())
    if (run / "eval.json").is_file():
        out["held_out"] = json.loads((run / "eval.json").read_text())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="engine/bundles/default", help="the bundle whose other models and motion files are kept")
    ap.add_argument("--region", required=True, help="the generated region's name (engine/face/region.py)")
    ap.add_argument("--crop-size", type=int, required=True, help="the aligned crop size the region's patch is cut from")
    ap.add_argument("--autoencoder", required=True, help="the autoencoder's run folder (holds autoencoder.pt/.json)")
    ap.add_argument("--denoiser", required=True, help="the denoiser's run folder (holds denoiser.pt/.json)")
    ap.add_argument("--steps", type=int, default=8, help="the bundle's default denoising steps")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    region = region_named(a.region)
    base = load_bundle(a.base)
    runs = {"autoencoder": Path(a.autoencoder), "denoiser": Path(a.denoiser)}
    for name, run in runs.items():
        if not (run / f"{name}.pt").is_file():
            raise SystemExit(f"{run}: no {name}.pt (not a finished run)")
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for fname in base.manifest["files"]:
        if fname.endswith(".onnx") or fname in ("export_report.json", "manifest.json") or fname.split(".")[0] in REPLACED:
            continue
        shutil.copy2(base.path / fname, out / fname)
    for name, run in runs.items():
        for ext in (".pt", ".json"):
            shutil.copy2(run / f"{name}{ext}", out / f"{name}{ext}")
    card = json.loads((base.path / "data_card.json").read_text()) if (base.path / "data_card.json").is_file() else {}
    card.setdefault("models", {})
    for name, run in runs.items():
        card["models"][name] = {**_run_summary(run), "region": region.name, "crop_size_px": a.crop_size}
    card["region"] = {"name": region.name, "crop_size_px": a.crop_size, "box_crop_units": [region.x0, region.y0, region.size]}
    (out / "data_card.json").write_text(json.dumps(card, indent=1) + "\n")
    md = (base.path / "data_card.md").read_text() if (base.path / "data_card.md").is_file() else "# Data card\n"
    md += (f"\n## The {region.name} region (issue 13)\n\n"
           f"The autoencoder and the denoiser generate the {region.name} region: the square of side {region.size} crop units at "
           f"({region.x0}, {region.y0}) of a {a.crop_size} px crop, {int(round(region.size * a.crop_size))} px. Both were fine-tuned "
           f"from {a.base}'s models on `avatar prepare --crop-size {a.crop_size}` shards of the same clips (held-out clips excluded).\n\n"
           "| model | steps | minutes (last session) | final loss | held-out |\n| --- | --- | --- | --- | --- |\n")
    for name in runs:
        info = card["models"][name]
        ho = ", ".join(f"{k} {v:.3g}" for k, v in info.get("held_out", {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        loss = f"{info['final_loss']:.4g}" if info.get("final_loss") is not None else "-"
        md += f"| {name} | {info['steps']} | {info['train_minutes_last_session']} | {loss} | {ho} |\n"
    (out / "data_card.md").write_text(md)
    keep = {k: v for k, v in base.manifest.items() if k not in ("format", "fps", "sample_rate_hz", "crop_size_px", "steps", "models", "files",
                                                                "graphs", "graph_variants", "export", "torch_version", "distilled")}
    keep["region"] = region.name
    write_manifest(out, fps=base.fps, sample_rate_hz=int(base.manifest["sample_rate_hz"]), crop_size_px=a.crop_size, steps=a.steps, extra=keep)
    load_bundle(out)  # hashes and model compatibility
    print(f"wrote {out} ({region.name} region, {a.crop_size} px crops, {a.steps} steps)")


if __name__ == "__main__":
    main()
