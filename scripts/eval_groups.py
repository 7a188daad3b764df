"""Split an `avatar eval` report by speaker group: voices never trained on vs GRID s1 (a speaker in
training, held-out sentences), since a mean over both hides how the models do on unseen voices.

    python scripts/eval_groups.py docs/eval/native_bundle

Writes REPORT_DIR/groups.json and groups.md from REPORT_DIR/report.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

KEYS = ["lpips_lower_face", "ssim_lower_face", "psnr_lower_face_db", "lpips_full", "ssim_full", "sharpness_ratio",
        "lip_landmark_error_px", "mouth_change_per_frame", "sync_abs_offset_frames", "sync_lse_c"]
ART = ["amplitude_ratio", "speed_ratio", "correlation", "closure_hit_rate"]


def group_of(segment: str) -> str:
    from engine.data.identities import identity_of

    return "grid_s1" if identity_of(segment.split("__s")[0]).startswith("grid_") else "unseen_speakers"


def main(report_dir: str) -> None:
    d = Path(report_dir)
    rep = json.loads((d / "report.json").read_text())
    out: dict = {}
    for seg in rep["segments"]:
        out.setdefault(group_of(seg["segment"]), []).append(seg)
    res = {}
    lines = [f"# {d.name}: by speaker group", ""]
    for g, segs in out.items():
        methods = [m for m in segs[0] if isinstance(segs[0][m], dict) and m != "articulation"]
        table = {m: {k: float(np.nanmean([s[m].get(k, np.nan) for s in segs])) for k in KEYS if any(k in s[m] for s in segs)} for m in methods}
        arts = {}
        for m in segs[0].get("articulation", {}):
            rows = [s["articulation"][m] for s in segs if s["articulation"].get(m)]
            n = np.array([r["closures_gt"] for r in rows])
            h = np.array([r["closure_hit_rate"] if np.isfinite(r["closure_hit_rate"]) else 0.0 for r in rows])
            arts[m] = {k: float(np.mean([r[k] for r in rows])) for k in ART[:3]} | {"closure_hit_rate": float((n * h).sum() / max(n.sum(), 1)),
                                                                                "closures_gt": int(n.sum())}
        res[g] = {"segments": [s["segment"] for s in segs], "summary": table, "articulation": arts}
        lines += [f"## {g} ({len(segs)} segments)", "", "| method | " + " | ".join(KEYS) + " |", "|" + " --- |" * (len(KEYS) + 1)]
        for m, v in table.items():
            lines.append(f"| {m} | " + " | ".join(f"{v[k]:.3f}" if k in v and np.isfinite(v[k]) else "-" for k in KEYS) + " |")
        lines += ["", "| articulation | " + " | ".join(ART) + " | closures_gt |", "|" + " --- |" * (len(ART) + 2)]
        for m, v in arts.items():
            lines.append(f"| {m} | " + " | ".join(f"{v[k]:.3f}" for k in ART) + f" | {v['closures_gt']} |")
        lines.append("")
    (d / "groups.json").write_text(json.dumps(res, indent=1) + "\n")
    (d / "groups.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/eval/native_bundle")
