"""Held-out self-reconstruction: drive a held-out clip's own face with its own audio and compare.

Protocol (one per held-out segment of the recorded split, engine/data/splits.json):
  - the portrait is the segment's last frame (far from the evaluated span, its first
    ``max_frames`` frames), used as a still aligned crop;
  - the audio is the segment's own; the output is generated frame by frame as in a render;
  - metrics on the lower-face patch (engine/face/region.py), against the ground-truth crops:
    SSIM and PSNR inside the lower-face mask, LPIPS on the patch, the lip-landmark error
    (MediaPipe on the generated crops, pixels at 256), and the sync expert's offset and LSE-C for
    the generated video beside ground truth's own;
  - also on the whole 256 px crop: PSNR, SSIM and LPIPS; mouth temporal jitter (mean second
    difference of MediaPipe's lip landmarks, px) beside ground truth's own;
  - baselines in the same table: the static portrait, warp-only (the portrait's latent warped
    to the A2L landmarks and decoded, no diffusion), and any further generators given as
    variants (the teacher at full steps, students at 4, 2 and 1 steps);
  - with ``true_motion``: ours and warp-only driven by ground truth's own lip and jaw landmarks
    instead of the A2L's (rows ``ours_true_motion``, ``warp_only_true_motion``): what the renderer
    does given the right motion, apart from what the A2L gets wrong;
  - mouth stability in silence: mean |frame-to-frame change| inside the portrait's mouth box over
    the pairs of frames that the pipeline's VAD (engine/pipeline/vad.py) calls silent, beside
    ground truth's own (``mouth_change_silent``), and the same over speech frames;
  - cross-identity driving: the portrait of one held-out person with another's audio, sync only;
  - identity drift: one long render (the held-out audio looped), LPIPS of the lower face to the
    portrait over the first and the last 5 s.
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
from engine.eval.articulation import articulation, opening_from_landmarks, opening_from_lips, summarise
from engine.bundle import Bundle
from engine.face.geometry import index_sets
from engine.face.region import extract_patch, from_patch_units, patch_mask, to_patch_units
from engine.generator import FrameGenerator
from engine.metrics import psnr, ssim_map
from engine.runtime import load_runtime
from engine.training.data import FrameStore

METHODS = ("ours", "warp_only", "static_portrait")


def silent_frames(wave_16k: np.ndarray, time_s: np.ndarray) -> np.ndarray:
    """(F,) bool: the frames (starting at ``time_s``, seconds from sample 0 of ``wave_16k``) that the
    pipeline's VAD (smoothed webrtcvad, engine/pipeline/vad.py) calls silent throughout."""
    from engine.pipeline.sources import CHUNK_SAMPLES, SAMPLE_RATE_HZ
    from engine.pipeline.vad import Vad

    vad = Vad()
    chunks = len(wave_16k) // CHUNK_SAMPLES
    speaking = np.array([vad.process(np.ascontiguousarray(wave_16k[i * CHUNK_SAMPLES:(i + 1) * CHUNK_SAMPLES], np.float32))
                         for i in range(chunks)], bool)
    t = np.asarray(time_s, np.float64)
    ends = np.append(t[1:], t[-1] + (t[-1] - t[-2] if len(t) > 1 else 0.04))
    out = np.zeros(len(t), bool)
    chunk_s = CHUNK_SAMPLES / SAMPLE_RATE_HZ
    for f in range(len(t)):
        lo, hi = int(np.floor(t[f] / chunk_s)), int(np.ceil(ends[f] / chunk_s))
        out[f] = hi <= chunks and not speaking[max(lo, 0):hi].any()
    return out


def _t(patches: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(patches, dtype=np.float32)).permute(0, 3, 1, 2).div(127.5).sub(1.0)


def _masked_ssim(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    m = ssim_map(a, b)  # (B, 3, H - 10, W - 10): valid region of the 11 px window
    wc = w[:, :, 5:-5, 5:-5].expand_as(m)
    return (m * wc).sum(dim=(1, 2, 3)) / wc.sum(dim=(1, 2, 3)).clamp_min(1e-8)


def sharpness(img: np.ndarray) -> float:
    """Laplacian energy of the lower-face patch over that of the upper face (a band across the eyes
    and brow) of an aligned crop (S, S, 3): codec or camera blur that hits the whole face cancels."""
    s = img.shape[0]
    g = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY).astype(np.float32)
    lap = cv2.Laplacian(g, cv2.CV_32F) ** 2
    lower = extract_patch(lap[..., None])[..., 0]
    upper = lap[int(0.25 * s) : int(0.42 * s), int(0.25 * s) : int(0.75 * s)]
    return float(lower.mean() / max(upper.mean(), 1e-6))


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
                       seed: int = 0, lpips: bool = True, backend: str = "auto", threads: int | None = None,
                       variants: dict[str, tuple[Bundle, int | None]] | None = None, drift_seconds: float = 60.0,
                       cross_identity: bool = True, compositors: dict[str, str] | None = None, true_motion: bool = False) -> dict:
    """The protocol of the module docstring. ``variants``: further generators in the same table,
    name -> (bundle, steps) (e.g. the teacher at 8 steps, students at 4, 2, 1). ``compositors``:
    name -> "native" or "patch" (engine/generator.py; default native)."""
    compositors = compositors or {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = {"ours": (bundle, steps), **(variants or {})}
    rts = {name: load_runtime(b, backend, threads=threads) for name, (b, _) in runs.items()}
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

    def _lp(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(torch.cat([lp(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)]).mean())

    def _sync(patches: np.ndarray, mel: np.ndarray, mel_index: np.ndarray) -> dict[str, float]:
        n = len(patches)
        if sync is None or n < 2 * 15 + sync.config.frames:
            return {}
        if patches.shape[1] != sync.config.patch_size_px:  # a larger crop's lower face, at the expert's size
            q = sync.config.patch_size_px
            patches = np.stack([cv2.resize(np.ascontiguousarray(p), (q, q), interpolation=cv2.INTER_AREA) for p in patches])
        sc = sync_scores(sync, mouth_from_patches(np.ascontiguousarray(patches), sync.config), mel, mel_index[:n])
        return {"sync_offset_frames": sc["offset_frames"], "sync_abs_offset_frames": abs(sc["offset_frames"]),
                "sync_lse_d": sc["lse_d"], "sync_lse_c": sc["lse_c"]}

    def _avatar(name: str, crop: np.ndarray, lm: np.ndarray) -> Avatar:
        b = rts[name].bundle
        if crop.shape[0] != b.crop_size_px:  # a bundle of another crop size sees the crop at its own size
            crop = cv2.resize(crop, (b.crop_size_px,) * 2, interpolation=cv2.INTER_AREA if crop.shape[0] > b.crop_size_px else cv2.INTER_CUBIC)
        return Avatar(crop, np.array([[1.0, 0, 0], [0, 1.0, 0]]), crop, lm, encode_patch(rts[name], extract_patch(crop, b.region)), [], b.region)

    def _at_store_size(frames: np.ndarray) -> np.ndarray:
        """Generated crops (F, S', S', 3) at the store's crop size (every row is measured at one size)."""
        if frames.shape[1] == s:
            return frames
        return np.stack([cv2.resize(f, (s, s), interpolation=cv2.INTER_CUBIC if f.shape[0] < s else cv2.INTER_AREA) for f in frames])

    def _generate(name: str, avatar: Avatar, mel: np.ndarray, mel_index: np.ndarray, n: int, *, warp_only: bool = False,
                  landmarks: np.ndarray | None = None) -> np.ndarray:
        """``landmarks``: (F, 478, 2) crop units to drive the moving landmarks with instead of the A2L's."""
        gen = FrameGenerator(rts[name], avatar, steps=runs[name][1], seed=seed, blinks=False,  # ground truth blinks when it will
                             compositor=compositors.get(name, "native"))
        feats = gen.audio_features_from_mel(mel, mel_index)
        if landmarks is None:
            lms = gen.landmarks(feats)
            a2l_lms[name] = lms.numpy()
        else:
            lms = torch.from_numpy(to_patch_units(landmarks[:n][:, gen.moving]).astype(np.float32))
        return _at_store_size(np.stack([gen.frame(lms[f], gen.audio_tokens(feats, f), warp_only=warp_only) for f in range(n)]))

    a2l_lms: dict[str, np.ndarray] = {}  # the last _generate's A2L landmarks per run (F, K, 2), patch units
    t0 = time.perf_counter()
    per_seg = []
    methods = (*runs, "warp_only", "static_portrait") + (("ours_true_motion", "warp_only_true_motion") if true_motion else ())
    totals: dict[str, dict[str, list[float]]] = {m: {} for m in methods + ("ground_truth",)}
    art_rows: dict[str, list[dict]] = {m: [] for m in (*methods, *(f"a2l_only:{n}" for n in runs))}
    lips_ids = index_sets()["lips"]
    segs = []
    for seg_i in store.audio_segments():
        seg = store.segments[seg_i]
        n = min(seg.length - 1, max_frames)
        if n < 10:
            continue
        segs.append((seg_i, n))
        crops = np.load(Path(_shard_dir(data_dirs, seg.name)) / "crops.npy", mmap_mode="r")
        r = seg.length - 1  # the portrait: the segment's last frame
        crop_r = np.ascontiguousarray(crops[r])
        lm_r = store.landmarks[seg.start + r]
        result_crops, a2l_open = {}, {}
        for name in runs:
            result_crops[name] = _generate(name, _avatar(name, crop_r, lm_r), seg.mel, seg.mel_index, n)
            lm_full = np.repeat(lm_r[None], n, axis=0).copy()  # (n, 478, 2) crop units
            lm_full[:, np.asarray(runs[name][0].configs["a2l"].landmark_indices)] = from_patch_units(a2l_lms[name][:n])
            a2l_open[name] = opening_from_landmarks(lm_full) * s
        result_crops["warp_only"] = _generate("ours", _avatar("ours", crop_r, lm_r), seg.mel, seg.mel_index, n, warp_only=True)
        result_crops["static_portrait"] = np.repeat(crop_r[None], n, axis=0)
        if true_motion:
            gt_lms = store.landmarks[seg.start:seg.start + n]
            result_crops["ours_true_motion"] = _generate("ours", _avatar("ours", crop_r, lm_r), seg.mel, seg.mel_index, n, landmarks=gt_lms)
            result_crops["warp_only_true_motion"] = _generate("ours", _avatar("ours", crop_r, lm_r), seg.mel, seg.mel_index, n,
                                                              warp_only=True, landmarks=gt_lms)
        silent = silent_frames(seg.wave, seg.time_s[:n])  # (n,) bool
        quiet_pairs, speech_pairs = silent[1:] & silent[:-1], ~silent[1:] & ~silent[:-1]
        row_silent = int(silent.sum())
        gt_crops = np.asarray(crops[:n])
        result_crops["ground_truth"] = gt_crops
        gt_p, gt_full = _t(extract_patch(gt_crops)), _t(gt_crops)
        gt_lm = store.landmarks[seg.start:seg.start + n] * s
        w = torch.from_numpy(np.stack([patch_mask(store.landmarks[seg.start + f] * s, s) for f in range(n)]))[:, None]
        row = {"segment": seg.name, "frames": n, "silent_frames": row_silent}
        gt_jitter = None
        gt_open = None
        sharp_r = sharpness(crop_r)
        lip_px = lm_r[index_sets()["lips"]] * s
        pad = 0.25 * (lip_px[:, 0].max() - lip_px[:, 0].min())
        mouth_box = [int(max(lip_px[:, 0].min() - pad, 0)), int(max(lip_px[:, 1].min() - pad, 0)),
                     int(min(lip_px[:, 0].max() + pad, s)), int(min(lip_px[:, 1].max() + pad, s))]
        for m in ("ground_truth",) + methods:
            cr = result_crops[m]
            pt = extract_patch(cr)
            met: dict[str, float] = {}
            lips = _lip_track(cr)
            jit = _jitter(lips)
            opening = opening_from_lips(lips, lips_ids)
            met["sharpness_ratio"] = float(np.mean([sharpness(c) for c in cr[:: max(n // 10, 1)]])) / max(sharp_r, 1e-9)
            # temporal stability of the mouth: mean |frame-to-frame change| inside the portrait's mouth box (grey levels)
            box = cr[:, mouth_box[1] : mouth_box[3], mouth_box[0] : mouth_box[2]].astype(np.float32)
            change = np.abs(np.diff(box, axis=0)).mean(axis=(1, 2, 3)) if len(box) > 1 else np.zeros(0)
            met["mouth_change_per_frame"] = float(change.mean()) if len(change) else 0.0
            if quiet_pairs.any():  # a method that moves the mouth in silence shows it here, against ground truth's own
                met["mouth_change_silent"] = float(change[quiet_pairs].mean())
            if speech_pairs.any():
                met["mouth_change_speech"] = float(change[speech_pairs].mean())
            if m == "ground_truth":
                gt_jitter = jit
                gt_open = opening
                met["mouth_jitter_px"] = jit
            else:
                x, xf = _t(pt), _t(cr)
                met["ssim_lower_face"] = float(_masked_ssim(x, gt_p, w).mean())
                met["psnr_lower_face_db"] = float(psnr(x, gt_p, weight=w).mean())
                met["psnr_full_db"] = float(psnr(xf, gt_full).mean())
                met["ssim_full"] = float(ssim_map(xf, gt_full).mean())
                if lp is not None:
                    met["lpips_lower_face"] = _lp(x, gt_p)
                    met["lpips_full"] = _lp(xf, gt_full)
                met["lip_landmark_error_px"], met["face_found_rate"] = _lip_error_from(lips, gt_lm)
                met["mouth_jitter_px"] = jit
                if gt_jitter:
                    met["mouth_jitter_vs_gt"] = jit / gt_jitter
                art = articulation(opening, gt_open)
                art_rows[m].append(art)
                row.setdefault("articulation", {})[m] = art
            met.update(_sync(pt, seg.mel, seg.mel_index))
            row[m] = met
            for k, v in met.items():
                totals[m].setdefault(k, []).append(v)
        for name in runs:
            art = articulation(a2l_open[name], opening_from_landmarks(gt_lm))
            art_rows[f"a2l_only:{name}"].append(art)
            row.setdefault("articulation", {})[f"a2l_only:{name}"] = art
        per_seg.append(row)
        _strip([("ground truth", extract_patch(gt_crops))] + [(m.replace("_", " "), extract_patch(result_crops[m])) for m in methods],
               list(np.linspace(0, n - 1, 8).astype(int)), out / f"strip_{seg.name}.png")
        print(f"eval {seg.name}: " + ", ".join(f"{m} {row[m].get('lpips_lower_face', row[m].get('ssim_lower_face', 0)):.3f}" for m in methods))
    summary = {m: {k: float(np.nanmean(v)) for k, v in d.items()} for m, d in totals.items()}
    report = {"protocol": __doc__.strip().splitlines()[0], "runtime": {n: rt.describe() for n, rt in rts.items()},
              "steps": {n: (st or b.steps) for n, (b, st) in runs.items()}, "seed": seed, "max_frames": max_frames,
              "lpips": getattr(lp, "name", None), "summary": summary, "compositors": {n: compositors.get(n, "native") for n in runs},
              "articulation": {m: summarise(r) for m, r in art_rows.items()}, "segments": per_seg}
    if cross_identity and len(segs) >= 2:
        report["cross_identity"] = _cross_identity(store, data_dirs, segs, runs, _avatar, _generate, _sync)
    if drift_seconds > 0 and segs and lp is not None:
        report["identity_drift"] = _identity_drift(store, data_dirs, segs[0][0], runs, _avatar, rts, seed, drift_seconds, lp)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(_markdown(report))
    return report


def _lip_track(crops: np.ndarray) -> list[np.ndarray | None]:
    """MediaPipe lip landmarks (px) per crop, None where no face is found."""
    from engine.face.landmarks import FaceOptions, FaceTracker

    lips = index_sets()["lips"]
    out: list[np.ndarray | None] = []
    with FaceTracker(FaceOptions(min_face_px=32)) as tr:
        for c in crops:
            try:
                pts = tr.track(np.ascontiguousarray(c))
            except Exception:  # a frame where no face is found counts as a miss, not as an error
                pts = None
            out.append(None if pts is None else pts[lips, :2])
    return out


def _lip_error_from(lips: list[np.ndarray | None], gt_lm_px: np.ndarray) -> tuple[float, float]:
    idx = index_sets()["lips"]
    errs = [float(np.linalg.norm(p - g[idx], axis=1).mean()) for p, g in zip(lips, gt_lm_px) if p is not None]
    return (float(np.mean(errs)) if errs else float("nan")), len(errs) / max(len(lips), 1)


def _jitter(lips: list[np.ndarray | None]) -> float:
    """Mouth temporal jitter: mean |second difference| of the lip landmarks over consecutive found frames (px)."""
    acc = [np.linalg.norm(a - 2 * b + c, axis=1).mean() for a, b, c in zip(lips, lips[1:], lips[2:])
           if a is not None and b is not None and c is not None]
    return float(np.mean(acc)) if acc else float("nan")


def _cross_identity(store, data_dirs, segs, runs, _avatar, _generate, _sync) -> dict:
    """Portrait of held-out segment i driven by the audio of segment i + 1 (another person): sync, and the
    rendered mouth's articulation against the speaker's own real mouth (amplitude and speed ratios)."""
    rows, totals, arts = [], {m: [] for m in runs}, {}
    for (seg_i, n), (seg_j, n_j) in zip(segs, segs[1:] + segs[:1]):
        a, b = store.segments[seg_i], store.segments[seg_j]
        crops = np.load(Path(_shard_dir(data_dirs, a.name)) / "crops.npy", mmap_mode="r")
        crop_r = np.ascontiguousarray(crops[a.length - 1])
        lm_r = store.landmarks[a.start + a.length - 1]
        m_n = min(n_j, b.length - 1)
        row = {"portrait": a.name, "audio": b.name}
        s = store.crop_size_px
        speaker_open = opening_from_landmarks(store.landmarks[b.start : b.start + m_n]) * s  # the speaker's own real mouth
        for m in runs:
            cr = _generate(m, _avatar(m, crop_r, lm_r), b.mel, b.mel_index, m_n)
            row[m] = _sync(extract_patch(cr), b.mel, b.mel_index)
            if row[m]:
                totals[m].append(row[m])
            art = articulation(opening_from_lips(_lip_track(cr), index_sets()["lips"]), speaker_open)
            row.setdefault("articulation", {})[m] = art
            arts.setdefault(m, []).append(art)
        rows.append(row)
    summary = {m: {k: float(np.mean([r[k] for r in v])) for k in v[0]} for m, v in totals.items() if v}
    return {"summary": summary, "articulation": {m: summarise(v) for m, v in arts.items()}, "pairs": rows}


def _identity_drift(store, data_dirs, seg_i, runs, _avatar, rts, seed, seconds, lp, drift_variants: bool = False) -> dict:
    """One long render of the bundle under test (and of every variant if ``drift_variants``): a held-out portrait, the held-out audio looped to ``seconds``;
    LPIPS of the lower-face patch to the portrait's over the first and the last 5 s."""
    seg = store.segments[seg_i]
    crops = np.load(Path(_shard_dir(data_dirs, seg.name)) / "crops.npy", mmap_mode="r")
    crop_r = np.ascontiguousarray(crops[seg.length - 1])
    lm_r = store.landmarks[seg.start + seg.length - 1]
    ref = _t(extract_patch(crop_r)[None])
    fps = 25
    n = int(seconds * fps)
    win = min(5 * fps, n // 2)
    out = {"seconds": seconds, "portrait": seg.name}
    for m, (b, steps) in runs.items():
        if m != "ours" and not drift_variants:
            continue
        gen = FrameGenerator(rts[m], _avatar(m, crop_r, lm_r), steps=steps, seed=seed, blinks=False)
        feats = gen.audio_features_from_mel(seg.mel, seg.mel_index)  # (F, D), looped below
        reps = int(np.ceil(n / len(feats)))
        feats = torch.cat([feats] * reps)[:n]
        lms = gen.landmarks(feats)
        d = []
        for f in range(n):
            img = gen.frame(lms[f], gen.audio_tokens(feats, f))
            if f < win or f >= n - win:
                d.append(float(lp(_t(extract_patch(img)[None]), ref)))
        out[m] = {"window_frames": win, "lpips_to_portrait_first_5s": float(np.mean(d[:win])), "lpips_to_portrait_last_5s": float(np.mean(d[win:])),
                  "ratio": float(np.mean(d[win:]) / max(np.mean(d[:win]), 1e-9))}
    return out


def prepare_eval_clips(clips_dir: str | Path, out_dir: str | Path, *, jobs: int = 2) -> Path:
    """Prepare only the held-out clips (engine/data/splits.json) found under ``clips_dir`` into
    ``out_dir`` (resumable: prepared clips are skipped); returns ``out_dir``."""
    from engine.data.prepare import PrepareConfig, find_videos, prepare
    from engine.data.splits import eval_clips

    want = eval_clips()
    found = [p for p in find_videos([Path(clips_dir)]) if p.stem in want]
    if not found:
        raise FileNotFoundError(f"{clips_dir}: none of the held-out clips {sorted(want)} is there")
    prepare(found, Path(out_dir), PrepareConfig(), jobs=jobs, progress=False)
    return Path(out_dir)


def _shard_dir(data_dirs: list[str], segment: str) -> Path:
    for d in data_dirs:
        p = Path(d) / "shards" / segment
        if p.is_dir():
            return p
    raise FileNotFoundError(f"shard {segment} not found under {data_dirs}")


def _markdown(rep: dict) -> str:
    keys = ["lpips_lower_face", "ssim_lower_face", "psnr_lower_face_db", "lpips_full", "ssim_full", "sharpness_ratio", "lip_landmark_error_px",
            "mouth_jitter_vs_gt", "mouth_change_per_frame", "mouth_change_silent", "mouth_change_speech", "sync_abs_offset_frames", "sync_lse_c"]
    head = "| method | steps | " + " | ".join(keys) + " |"
    lines = [f"# Held-out self-reconstruction (seed {rep['seed']}, up to {rep['max_frames']} frames per segment)", "",
             f"LPIPS: {rep['lpips'] or 'not available'}. Mean over {len(rep['segments'])} held-out segments.", "",
             head, "|" + " --- |" * (len(keys) + 2)]
    for m, d in rep["summary"].items():
        st = rep["steps"].get(m, "-")
        lines.append(f"| {m} | {st} | " + " | ".join(f"{d[k]:.3f}" if k in d else "-" for k in keys) + " |")
    art = rep.get("articulation")
    if art:
        ak = ["amplitude_ratio", "speed_ratio", "correlation", "correlation_lag_frames", "closure_hit_rate", "closures_gt", "gt_amplitude", "gt_speed_per_s"]
        lines += ["", "## Articulation (mouth opening: MediaPipe on the frames; a2l_only: the A2L's own landmarks)", "",
                  "Ratios are ours over ground truth on the same frames (1.0 is ground truth's own value); gt_amplitude (px at 256) and "
                  "gt_speed_per_s are ground truth's own figures.", "",
                  "| method | " + " | ".join(ak) + " |", "|" + " --- |" * (len(ak) + 1)]
        for m, d in art.items():
            if d:
                lines.append(f"| {m} | " + " | ".join(f"{d[k]:.3f}" if k in d else "-" for k in ak) + " |")
    ci = rep.get("cross_identity")
    if ci:
        lines += ["", "## Cross-identity driving (portrait of one held-out person, audio of another)", "",
                  "Articulation ratios are against the speaker's own real mouth on the same audio.", "",
                  "| method | sync abs offset | LSE-C | amplitude ratio | speed ratio | correlation |", "| --- | --- | --- | --- | --- | --- |"]
        for m, d in ci["summary"].items():
            ar = ci.get("articulation", {}).get(m, {})
            lines.append(f"| {m} | {d.get('sync_abs_offset_frames', float('nan')):.2f} | {d.get('sync_lse_c', float('nan')):.3f} | "
                         f"{ar.get('amplitude_ratio', float('nan')):.3f} | {ar.get('speed_ratio', float('nan')):.3f} | {ar.get('correlation', float('nan')):.3f} |")
    dr = rep.get("identity_drift")
    if dr:
        lines += ["", f"## Identity drift over a {dr['seconds']:.0f} s render (LPIPS of the lower face to the portrait)", "",
                  "| method | first 5 s | last 5 s | ratio |", "| --- | --- | --- | --- |"]
        for m, d in dr.items():
            if isinstance(d, dict):
                lines.append(f"| {m} | {d['lpips_to_portrait_first_5s']:.3f} | {d['lpips_to_portrait_last_5s']:.3f} | {d['ratio']:.2f} |")
    lines += ["", f"Wall time {rep.get('wall_s', 0)} s."]
    return "\n".join(lines) + "\n"
