"""Assemble a model bundle from training runs: copy the model files, write the data card and manifest,
export the ONNX graphs and their int8 variants (``avatar export``).

    python scripts/build_bundle.py --runs runs --out engine/bundles/default --steps 4

Reads RUNS/{autoencoder,a2l,denoiser,sync}/ (the folders `avatar train` wrote): the models, their
config.json (the recipe), log.jsonl (training time) and eval.json (held-out metrics). Copies each
run's loss curve to docs/training/<model>_loss.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from engine.bundle import write_manifest
from engine.data.splits import eval_clips

FILES = {"autoencoder": ["autoencoder"], "a2l": ["audio_encoder", "a2l"], "denoiser": ["denoiser"], "sync": ["sync"]}


def _run_info(run: Path) -> dict:
    if not run.is_dir():
        return {"steps": None, "train_minutes_last_session": 0.0, "final_loss": None, "config": None}
    rows = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if l.strip()] if (run / "log.jsonl").is_file() else []
    last = rows[-1] if rows else {}
    info = {"steps": last.get("step"), "train_minutes_last_session": round(last.get("elapsed_s", 0) / 60, 1),
            "final_loss": last.get("loss"), "config": json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else None}
    if (run / "eval.json").is_file():
        info["held_out"] = json.loads((run / "eval.json").read_text())
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--out", default="engine/bundles/default")
    ap.add_argument("--steps", type=int, default=4, help="default denoising steps")
    ap.add_argument("--data", nargs="+", default=["out/full", "out/grid", "out/motion"], help="the prepared folders trained on (recorded)")
    ap.add_argument("--notes", default="", help="a line for the data card")
    a = ap.parse_args()
    runs, final = Path(a.runs), Path(a.out)
    for name in ("autoencoder", "a2l", "denoiser"):
        info = _run_info(runs / name)
        wanted = (info.get("config") or {}).get("train", {}).get("steps")
        if not (runs / name).is_dir() or info["steps"] is None or (wanted and info["steps"] < wanted):
            raise SystemExit(f"{runs / name}: not a finished run (step {info['steps']} of {wanted}); the bundle is left as it was")
    out = final.with_name(final.name + ".building")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    card = {"recipe": "scripts/train_default_bundle.sh", "trained_on": a.data, "held_out_clips": sorted(eval_clips()), "models": {}}
    docs = Path("docs/training")
    docs.mkdir(parents=True, exist_ok=True)
    for run_name, stems in FILES.items():
        run = runs / run_name
        if not run.is_dir():
            continue
        for stem in stems:
            for ext in (".json", ".pt"):
                shutil.copyfile(run / f"{stem}{ext}", out / f"{stem}{ext}")
        card["models"][run_name] = _run_info(run)
        if (run / "loss.png").is_file():
            shutil.copyfile(run / "loss.png", docs / f"{run_name}_loss.png")
        if (run / "log.jsonl").is_file():
            shutil.copyfile(run / "log.jsonl", docs / f"{run_name}_log.jsonl")
    # the blink prior, fitted on the training clips' landmarks (motion clips and speech clips)
    from engine.motion.blink import fit_blink_prior
    from engine.training.data import FrameStore

    segs = []
    for d in a.data:
        if Path(d, "shards").is_dir():
            st = FrameStore([d], split="train", with_patches=False)
            segs += [(st.landmarks[g.start : g.start + g.length], (g.length - 1) / max(g.time_s[-1], 1e-6)) for g in st.segments if g.length > 1]
    prior = fit_blink_prior(segs)
    prior.save(out / "motion_prior.json")
    card["blink_prior"] = dataclasses.asdict(prior)
    (out / "data_card.json").write_text(json.dumps(card, indent=1) + "\n")
    lines = ["# Default bundle: data card", "", a.notes, "",
             f"Trained on the prepared shards of {', '.join(a.data)} (from ../shared/data: clips, grid_s1, motion_clips),",
             "except the held-out clips (engine/data/splits.json), never trained on by any model:", ""]
    lines += [f"- {c}" for c in card["held_out_clips"]] + ["", "| model | steps | minutes (last session) | final loss | held-out |", "| --- | --- | --- | --- | --- |"]
    for name, info in card["models"].items():
        ho = info.get("held_out", {})
        ho_s = ", ".join(f"{k} {v:.3g}" for k, v in ho.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        loss = f"{info['final_loss']:.4g}" if info["final_loss"] is not None else "-"
        lines.append(f"| {name} | {info['steps']} | {info['train_minutes_last_session']} | {loss} | {ho_s} |")
    lines += ["", "Configs: configs/cpu_small/*.json (copied into data_card.json). Loss curves: docs/training/."]
    (out / "data_card.md").write_text("\n".join(lines) + "\n")
    m = write_manifest(out, fps=25, sample_rate_hz=16000, crop_size_px=256, steps=a.steps, extra={"data_card": "data_card.md"})
    from engine.bundle import load_bundle

    load_bundle(out)  # hashes and model compatibility, before it replaces anything
    # the ONNX graphs and their int8 variants (export/onnx.py: each checked against PyTorch, the variants on the demo)
    from export.onnx import export_bundle

    exported = final.with_name(final.name + ".exported")
    shutil.rmtree(exported, ignore_errors=True)
    export_bundle(out, exported)
    shutil.rmtree(out)
    m = load_bundle(exported).manifest
    size = sum((exported / f).stat().st_size for f in m["files"])
    shutil.rmtree(final, ignore_errors=True)
    exported.rename(final)
    print(f"wrote {final}: {len(m['files'])} files, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
