"""Held-out self-reconstruction: drive a held-out clip's own face with its own audio and compare.

Protocol (one per held-out segment of the recorded split, engine/data/splits.json):
  - the portrait is the segment's last frame (far from the evaluated span, its first
    ``max_frames`` frames), used as a still aligned crop;
  - the audio is the segment's own; the output is generated frame by frame as in a render;
  - metrics on the lower-face patch (engine/face/region.py), against the ground-truth crops:
    SSIM and PSNR inside the lower-face mask, LPIPS on the patch, the lip-landmark error
    (MediaPipe on the generated crops, pixels at 256), and the sync expert's offset and LSE-C for
    the generated video beside ground truth's own;
  - baselines in the same table: the static portrait, and warp-only (the portrait's latent warped
    to the A2L landmarks and decoded, no diffusion).
The ground truth moves its head while the portrait does not, so every method pays the same pose
penalty; compare methods with each other, not with reconstruction numbers of other papers.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from engine.avatar import Avatar, encode_patch
from engine.bundle import Bundle
from engine.face.geometry import index_sets
from engine.face.region import extract_patch, patch_mask
from engine.generator import FrameGenerator
from engine.metrics import psnr, ssim_map
from engine.runtime import load_runtime
from engine.training.data import FrameStore

METHODS = ("ours", "warp_only", "static_portrait")


def _t(patches: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _masked_ssim(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    m = ssim_map(a, b)  # (B, 3, H - 10, W - 10): valid region of the 11 px window
    wc = w[:, :, 5:-5, 5:-5].expand_as(m)
    return (m * wc).sum(dim=(1, 2, 3)) / wc.sum(dim=(1, 2, 3)).clamp_min(1e-8)


def _lip_error(crops: np.ndarray, gt_lm_px: np.ndarray) -> tuple[float, float]:
    """Mean lip-landmark distance (px) of MediaPipe on ``crops`` against ground truth, and the detection rate."""
    from engine.face.landmarks import FaceOptions, FaceTracker

    lips = index_sets()["lips"]
    errs = []
    with FaceTracker(FaceOptions(min_face_px=32)) as tr:
        for c, g in zip(crops, gt_lm_px):
            try:
                pts = tr.track(c)
            except Exception:  # a frame where no face is found counts as a miss, not as an error
                pts = None
            if pts is not None:
                errs.append(float(np.linalg.norm(pts[lips, :2] - g[lips], axis=1).mean()))
    return (float(np.mean(errs)) if errs else float("nan")), len(errs) / max(len(crops), 1)


def _strip(rows: list[tuple[str, np.ndarray]], frames: list[int], path: Path) -> None:
    tiles = []
    for name, patches in rows:
        row = np.concatenate([patches[f] for f in frames], axis=1)
        label = np.full((row.shape[0], 110, 3), 255, np.uint8)
        cv2.putText(label, name, (4, row.shape[0] // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.concatenate([label, row], axis=1))
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(tiles, axis=0), cv2.COLOR_RGB2BGR))


@torch.no_grad()
def evaluate_selfrecon(bundle: Bundle, data_dirs: list[str], out_dir: str | Path, *, max_frames: int = 100, steps: int | None = None,
                       seed: int = 0, lpips: bool = True, backend: str = "auto", threads: int | None = None) -> dict:
    rt = load_runtime(bundle, backend, threads=threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = FrameStore(data_dirs, split="eval")
    s = store.crop_size_px
    lp = None
    if lpips:
        try:
            from engine.eval.lpips import LPIPS

            lp = LPIPS()
        except ImportError as e:
            print(f"LPIPS skipped: {e}")
    sync = bundle.models.get("sync")
    from engine.models.sync import mouth_from_patches
    from engine.eval.sync_metric import sync_scores

    t0 = time.perf_counter()
    per_seg = []
    totals: dict[str, dict[str, list[float]]] = {m: {} for m in METHODS + ("ground_truth",)}
    for seg_i in store.audio_segments():
        seg = store.segments[seg_i]
        n = min(seg.length - 1, max_frames)
        if n < 10:
            continue
        crops = np.load(Path(_shard_dir(data_dirs, seg.name)) / "crops.npy", mmap_mode="r")
        r = seg.length - 1  # the portrait: the segment's last frame
        crop_r = np.ascontiguousarray(crops[r])
        lm_r = store.landmarks[seg.start + r]
        patch_r = extract_patch(crop_r)
        avatar = Avatar(crop_r, np.array([[1.0, 0, 0], [0, 1.0, 0]]), crop_r, lm_r, encode_patch(rt, patch_r), [])
        gen = FrameGenerator(rt, avatar, steps=steps, seed=seed, blinks=False)  # ground truth blinks when it will
        feats = gen.audio_features_from_mel(seg.mel, seg.mel_index)
        lms = gen.landmarks(feats)
        outs = {"ours": [], "warp_only": []}
        for f in range(n):
            outs["ours"].append(gen.frame(lms[f], gen.audio_tokens(feats, f)))
        gen.reset()
        for f in range(n):
            outs["warp_only"].append(gen.frame(lms[f], gen.audio_tokens(feats, f), warp_only=True))
        gt_crops = np.asarray(crops[:n])
        result_crops = {"ours": np.stack(outs["ours"]), "warp_only": np.stack(outs["warp_only"]),
                        "static_portrait": np.repeat(crop_r[None], n, axis=0), "ground_truth": gt_crops}
        gt_p = _t(extract_patch(gt_crops))
        w = torch.from_numpy(np.stack([patch_mask(store.landmarks[seg.start + f] * s, s) for f in range(n)]))[:, None]
        row = {"segment": seg.name, "frames": n}
        for m, cr in result_crops.items():
            pt = extract_patch(cr)
            met: dict[str, float] = {}
            if m != "ground_truth":
                x = _t(pt)
                met["ssim_lower_face"] = float(_masked_ssim(x, gt_p, w).mean())
                met["psnr_lower_face_db"] = float(psnr(x, gt_p, weight=w).mean())
                if lp is not None:
                    met["lpips_lower_face"] = float(torch.cat([lp(x[i:i + 16], gt_p[i:i + 16]) for i in range(0, n, 16)]).mean())
                met["lip_landmark_error_px"], met["face_found_rate"] = _lip_error(cr, store.landmarks[seg.start:seg.start + n] * s)
            if sync is not None and n >= 2 * 15 + sync.config.frames:
                sc = sync_scores(sync, mouth_from_patches(np.ascontiguousarray(pt), sync.config), seg.mel, seg.mel_index[:n])
                met["sync_offset_frames"], met["sync_lse_d"], met["sync_lse_c"] = sc["offset_frames"], sc["lse_d"], sc["lse_c"]
                met["sync_abs_offset_frames"] = abs(sc["offset_frames"])
            row[m] = met
            for k, v in met.items():
                totals[m].setdefault(k, []).append(v)
        per_seg.append(row)
        _strip([("ground truth", extract_patch(gt_crops)), ("ours", extract_patch(result_crops["ours"])),
                ("warp only", extract_patch(result_crops["warp_only"])), ("static", extract_patch(result_crops["static_portrait"]))],
               list(np.linspace(0, n - 1, 8).astype(int)), out / f"strip_{seg.name}.png")
        print(f"eval {seg.name}: " + ", ".join(f"{m} {row[m].get('lpips_lower_face', row[m].get('ssim_lower_face', 0)):.3f}" for m in METHODS))
    summary = {m: {k: float(np.nanmean(v)) for k, v in d.items()} for m, d in totals.items()}
    report = {"protocol": __doc__.strip().splitlines()[0], "runtime": rt.describe(), "steps": steps or bundle.steps, "seed": seed, "max_frames": max_frames,
              "lpips": getattr(lp, "name", None), "wall_s": round(time.perf_counter() - t0, 1), "summary": summary, "segments": per_seg}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(_markdown(report))
    return report


def _shard_dir(data_dirs: list[str], segment: str) -> Path:
    for d in data_dirs:
        p = Path(d) / "shards" / segment
        if p.is_dir():
            return p
    raise FileNotFoundError(f"shard {segment} not found under {data_dirs}")


def _markdown(rep: dict) -> str:
    keys = ["lpips_lower_face", "ssim_lower_face", "psnr_lower_face_db", "lip_landmark_error_px", "sync_abs_offset_frames", "sync_lse_c"]
    lines = [f"# Held-out self-reconstruction ({rep['steps']} steps, seed {rep['seed']}, up to {rep['max_frames']} frames per segment)", "",
             f"LPIPS: {rep['lpips'] or 'not available'}. Mean over {len(rep['segments'])} held-out segments.", "",
             "| method | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 1)]
    for m, d in rep["summary"].items():
        lines.append(f"| {m} | " + " | ".join(f"{d[k]:.3f}" if k in d else "-" for k in keys) + " |")
    return "\n".join(lines) + "\n"
