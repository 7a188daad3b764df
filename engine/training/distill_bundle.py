"""`avatar distill`: distil a bundle's denoiser round by round and write a new bundle whose
denoiser is the chosen student (its step count in the manifest), exported to ONNX."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine.bundle import DEFAULT_BUNDLE, load_bundle, write_manifest
from engine.training.distill import distill
from engine.training.loop import train_config_from

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "cpu_small" / "distill.json"


def distill_bundle(bundle: str | None, data: list[str], out: str | Path, *, steps: int = 2, teacher_steps: int = 8,
                   config: str | None = None) -> dict:
    src = Path(bundle) if bundle else DEFAULT_BUNDLE
    cfg_path = Path(config) if config else DEFAULT_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"config file not found: {cfg_path}")
    spec = json.loads(cfg_path.read_text())
    tcfg = train_config_from(spec.get("train", {}))
    out = Path(out)
    students = distill(src, data, out / "rounds", teacher_steps=teacher_steps, target_steps=steps, tcfg=tcfg, **spec.get("options", {}))
    teacher = load_bundle(src)
    torch_bundle = out / "bundle_torch"
    if torch_bundle.exists():
        shutil.rmtree(torch_bundle)
    torch_bundle.mkdir(parents=True)
    for name in teacher.manifest["files"]:
        if not name.endswith(".onnx") and name != "export_report.json":
            shutil.copy2(teacher.path / name, torch_bundle / name)
    shutil.copy2(students[steps].with_suffix(".pt"), torch_bundle / "denoiser.pt")
    shutil.copy2(students[steps].with_suffix(".json"), torch_bundle / "denoiser.json")
    keep = {k: v for k, v in teacher.manifest.items() if k not in ("format", "fps", "sample_rate_hz", "crop_size_px", "steps", "models",
                                                                  "files", "graphs", "graph_variants", "export", "torch_version")}
    keep["distilled"] = {"teacher_steps": teacher_steps, "student_steps": steps, "rounds": sorted(students), "config": spec}
    write_manifest(torch_bundle, fps=teacher.fps, sample_rate_hz=int(teacher.manifest["sample_rate_hz"]),
                   crop_size_px=teacher.crop_size_px, steps=steps, extra=keep)
    from export.onnx import export_bundle

    final = out / "bundle"
    export_bundle(torch_bundle, final)
    return {"bundle": str(final), "rounds": {n: str(p) for n, p in students.items()}}
