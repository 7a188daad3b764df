"""The data card of a prepared folder: what went in, what was kept, what was dropped and why."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path


def write_data_card(out: Path, clips: list[str], cfg, run: dict) -> dict:
    """Summarise DIR/clips/*.json for ``clips`` into DIR/data_card.json and .md; return it."""
    records = []
    for c in clips:
        p = out / "clips" / f"{c}.json"
        if p.is_file():
            records.append(json.loads(p.read_text()))
    kept = [r for r in records if r["status"] == "kept"]
    dropped_frames: Counter = Counter()
    for r in records:
        dropped_frames.update(r["frames_dropped"])
    fps = [r["fps"] for r in kept if r.get("fps")]
    card = {
        "clips_total": len(records),
        "clips_kept": len(kept),
        "clips_dropped": [{"clip": r["clip"], "reason": r["reason"]} for r in records if r["status"] != "kept"],
        "identities": len({r["identity"] for r in records}),
        "identities_kept": len({r["identity"] for r in kept}),
        "minutes_source": sum(r["duration_s"] for r in records) / 60,
        "minutes_kept": sum(s["end_s"] - s["start_s"] for r in kept for s in r["segments"]) / 60,
        "segments": sum(len(r["segments"]) for r in kept),
        "frames_total": sum(r["frames_total"] for r in records),
        "frames_kept": sum(r["frames_kept"] for r in records),
        "frames_dropped_by_reason": dict(dropped_frames),
        "camera_cuts": sum(r["camera_cuts"] for r in records),
        "clips_split": [r["clip"] for r in kept if len(r["segments"]) > 1],
        "fps_range": [min(fps), max(fps)] if fps else None,
        "variable_frame_rate_clips": [r["clip"] for r in records if r.get("variable_frame_rate")],
        "notes": {r["clip"]: r["notes"] for r in records if r["notes"]},
        "config": asdict(cfg),
        "run": run,
        "clips": [
            {k: r.get(k) for k in ("clip", "identity", "status", "frames_total", "frames_kept", "frames_dropped", "camera_cuts", "duration_s", "fps", "segments", "reason")}
            for r in records
        ],
    }
    (out / "data_card.json").write_text(json.dumps(card, indent=1))
    (out / "data_card.md").write_text(render_markdown(card))
    return card


def render_markdown(card: dict) -> str:
    lines = [
        "# Data card",
        "",
        f"- clips: {card['clips_kept']} kept of {card['clips_total']}; identities: {card['identities_kept']} kept of {card['identities']}",
        f"- minutes: {card['minutes_kept']:.2f} kept of {card['minutes_source']:.2f} in the sources",
        f"- frames: {card['frames_kept']} kept of {card['frames_total']}; segments: {card['segments']}; camera cuts found: {card['camera_cuts']}",
        f"- frames dropped by reason: {', '.join(f'{k} {v}' for k, v in sorted(card['frames_dropped_by_reason'].items())) or 'none'}",
        f"- clips split into several segments: {', '.join(card['clips_split']) or 'none'}",
        f"- variable-frame-rate clips: {', '.join(card['variable_frame_rate_clips']) or 'none'}",
        f"- crop: {card['config']['crop_size_px']} px; audio {card['config']['sample_rate_hz']} Hz; log-mel {card['config']['mel']['n_mels']} bins, hop {card['config']['mel']['hop_ms']} ms",
    ]
    run = card["run"]
    if run.get("frames_per_s"):
        lines.append(f"- this run: {run['frames_processed']} frames in {run['wall_s']:.0f} s = {run['frames_per_s']:.1f} frames/s with {run['jobs']} jobs")
    if card["clips_dropped"]:
        lines += ["", "## Dropped clips", ""] + [f"- {d['clip']}: {d['reason']}" for d in card["clips_dropped"]]
    if card["notes"]:
        lines += ["", "## Notes", ""] + [f"- {c}: {'; '.join(n)}" for c, n in card["notes"].items()]
    lines += ["", "## Clips", "", "| clip | identity | status | frames kept / total | dropped | cuts | segments | fps |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in card["clips"]:
        dropped = ", ".join(f"{k} {v}" for k, v in (c["frames_dropped"] or {}).items()) or "-"
        fps = f"{c['fps']:.2f}" if c.get("fps") else "-"
        lines.append(f"| {c['clip']} | {c['identity']} | {c['status']} | {c['frames_kept']} / {c['frames_total']} | {dropped} | {c['camera_cuts']} | {len(c['segments'])} | {fps} |")
    return "\n".join(lines) + "\n"
