"""`avatar prepare`: talking-head videos become training shards.

For each clip: decode audio (16 kHz mono, sample 0 at the first video frame) and its log-mel;
track dense landmarks frame by frame; find camera cuts, lost faces, tiny faces and profile
views; cut the clip into clean segments; align each segment's frames to the canonical crop
with a temporally stabilised similarity transform; write one shard per segment:

    DIR/shards/<clip>__sNN/crops.npy   (F, S, S, 3) uint8 RGB aligned crops (memory-mappable)
    DIR/shards/<clip>__sNN/data.npz    per-frame arrays, audio and mel (see ``SHARD_ARRAYS``)
    DIR/shards/<clip>__sNN/meta.json   clip, identity, times, sizes, the config used
    DIR/clips/<clip>.json              the clip's record: segments kept, frames dropped and why
    DIR/data_card.{json,md}            the summary over all clips

A clip's record is written last, after its shards are complete, so an interrupted run
resumes by skipping clips whose record matches the current configuration; nothing
half-written is ever taken for done.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from engine.audio import MelConfig, decode_audio, log_mel, mel_index_for_time
from engine.data.identities import identity_of
from engine.data.video import iter_frames, probe_video
from engine.errors import AvatarInputError, FaceTooSmallError, ImageTooLargeError
from engine.face.align import AlignConfig, apply_transform, fit_transform, stabilise_transforms, warp_to_crop
from engine.face.geometry import head_pose_deg
from engine.face.landmarks import FaceOptions, FaceTracker

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".m4v")

SHARD_ARRAYS = {
    "time_s": "(F,) float64 frame presentation time, seconds from the clip's first frame",
    "frame_index": "(F,) int64 index of the frame in the source clip",
    "landmarks_image": "(F, 478, 3) float32 landmarks in source-image pixels (z: relative depth)",
    "landmarks_crop": "(F, 478, 3) float32 landmarks in crop pixels (z scaled alike)",
    "affine": "(F, 2, 3) float64 image -> crop similarity (stabilised)",
    "pose_deg": "(F, 3) float32 yaw, pitch, roll",
    "audio": "(N,) float32 16 kHz mono, sample 0 at time audio_start_s",
    "mel": "(T, 80) float32 log-mel, row k centred at mel_start_index + k (10 ms hop)",
    "mel_index": "(F,) int64 row of `mel` centred on each frame's time",
}

# Reasons a frame is dropped, as written in records and the data card.
DROP_NO_FACE = "no_face"
DROP_FACE_TOO_SMALL = "face_too_small"
DROP_PROFILE = "profile_or_extreme_pose"
DROP_SHORT = "segment_too_short"
DROP_NO_AUDIO = "beyond_audio_end"
DROP_CUT_TRANSITION = "camera_cut_transition"


@dataclass(frozen=True)
class PrepareConfig:
    """Everything that decides what a shard contains (its hash names a run's configuration)."""

    crop_size_px: int = 256  # aligned crop side: 128, 256 or 512
    stabilise_sigma_frames: float = 1.5  # Gaussian smoothing of the crop transform over time
    sample_rate_hz: int = 16000  # audio rate of shards and of the mel
    min_face_px: int = 48  # faces shorter than this (detector box) are dropped
    max_image_pixels: int = 40_000_000  # larger video frames are refused
    on_multiple: str = "largest"  # "largest" or "refuse" when several faces are in view
    max_abs_yaw_deg: float = 45.0  # frames turned further are dropped (landmarks unreliable)
    max_abs_pitch_deg: float = 35.0  # likewise for looking up or down
    min_segment_s: float = 1.0  # shorter clean runs are dropped
    cut_shift_frac: float = 0.08  # face centre jump (fraction of crop side) that suggests a cut
    cut_log_scale: float = 0.05  # |log| face-scale change in one frame that suggests a cut
    cut_image_diff_ratio: float = 3.0  # ...confirmed when the frame differs this many times the median
    cut_image_diff_levels: float = 20.0  # a mean grey change this large is a cut whatever the face does
    require_audio: bool = True  # refuse clips without audio (lip-sync data needs it)
    mel: MelConfig = field(default_factory=MelConfig)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class _Track:
    """Pass-1 result for one clip: what was seen at every frame."""

    times: list[float] = field(default_factory=list)
    landmarks: list[np.ndarray | None] = field(default_factory=list)
    poses: list[np.ndarray | None] = field(default_factory=list)  # (yaw, pitch, roll) degrees
    reasons: list[str | None] = field(default_factory=list)  # None: usable
    cut_before: list[bool] = field(default_factory=list)  # a camera cut precedes this frame
    notes: list[str] = field(default_factory=list)


def find_videos(sources: list[Path]) -> list[Path]:
    """Video files named or inside the named folders (recursively), sorted, unique."""
    out: list[Path] = []
    for src in sources:
        if src.is_dir():
            out += [p for p in src.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()]
        elif src.is_file():
            out.append(src)
        else:
            raise FileNotFoundError(f"{src}: no such file or folder")
    return sorted(set(out))


def _thumb(rgb: np.ndarray) -> np.ndarray:
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)


def _face_geometry(lm: np.ndarray) -> tuple[float, float, float]:
    """(log scale, centre x, centre y) of the face: the unsmoothed crop transform's terms."""
    m = fit_transform(lm, AlignConfig())
    side = 256.0 / np.hypot(m[0, 0], m[1, 0])  # crop side in image pixels
    inv = cv2.invertAffineTransform(m)
    cx, cy = inv @ np.array([128.0, 128.0, 1.0])
    return float(np.log(side)), float(cx / side), float(cy / side)


def _track(tracker: FaceTracker, rgb: np.ndarray, what: str) -> tuple[np.ndarray | None, str | None]:
    """Landmarks or None, with the drop reason for a face that is there but too small."""
    try:
        return tracker.track(rgb, what=what), None
    except FaceTooSmallError:
        return None, DROP_FACE_TOO_SMALL


def track_clip(path: Path, cfg: PrepareConfig) -> _Track:
    """Pass 1: landmarks per frame, cut detection, drop reasons."""
    opts = FaceOptions(min_face_px=cfg.min_face_px, max_image_pixels=cfg.max_image_pixels, on_multiple=cfg.on_multiple)
    tr = _Track()
    prev_thumb = None
    prev_geom = None
    diffs: list[float] = []
    with FaceTracker(opts) as tracker:
        for i, (t, rgb) in enumerate(iter_frames(path)):
            thumb = _thumb(rgb)
            diff = float(np.abs(thumb - prev_thumb).mean()) if prev_thumb is not None else 0.0
            prev_thumb = thumb
            # A different shot altogether: reset before tracking, so the new face is detected.
            cut = i > 0 and diff > cfg.cut_image_diff_levels
            if cut:
                tracker.reset()
            lm, reason = _track(tracker, rgb, f"{path.name} frame {i}")
            if lm is not None:
                geom = _face_geometry(lm)
                if prev_geom is not None and not cut:
                    # A face that jumps while the image changes much more than usual: a cut
                    # between two shots of the same scene (a zoom, another camera).
                    jump = np.hypot(geom[1] - prev_geom[1], geom[2] - prev_geom[2])
                    scale_jump = abs(geom[0] - prev_geom[0])
                    median = float(np.median(diffs[-50:])) if diffs else diff
                    moved = jump > cfg.cut_shift_frac or scale_jump > cfg.cut_log_scale
                    if moved and diff > cfg.cut_image_diff_ratio * max(median, 0.5):
                        cut = True
                        tracker.reset()  # the face after a cut is found afresh
                        lm, reason = _track(tracker, rgb, f"{path.name} frame {i}")
                        geom = _face_geometry(lm) if lm is not None else None
                prev_geom = geom
            if lm is None:
                prev_geom = None
                reason = reason or DROP_NO_FACE
            pose = head_pose_deg(lm) if lm is not None else None
            if pose is not None and (abs(pose[0]) > cfg.max_abs_yaw_deg or abs(pose[1]) > cfg.max_abs_pitch_deg):
                reason = DROP_PROFILE
            diffs.append(diff)
            tr.times.append(t)
            tr.landmarks.append(lm)
            tr.poses.append(pose)
            tr.reasons.append(reason)
            tr.cut_before.append(cut)
        tr.notes = sorted(set(tracker.notes))
    # A cut flagged on consecutive frames is one cut whose transition spans several frames
    # (a dissolve, or encoder blending): drop all but the last frame of the run.
    for i in range(len(tr.cut_before) - 1, 0, -1):
        if tr.cut_before[i] and tr.cut_before[i - 1]:
            tr.reasons[i - 1] = DROP_CUT_TRANSITION
    return tr


def count_cuts(cut_before: list[bool]) -> int:
    """Camera cuts: runs of consecutive cut-flagged frames."""
    return sum(1 for i, c in enumerate(cut_before) if c and (i == 0 or not cut_before[i - 1]))


def split_segments(tr: _Track, min_frames: int, audio_end_s: float) -> tuple[list[tuple[int, int]], Counter]:
    """Runs [start, end) of usable frames, split at cuts; and the drop counts by reason.

    A frame is usable when it has a reason-free face and the audio reaches its time.
    """
    dropped: Counter = Counter()
    segments: list[tuple[int, int]] = []
    start = None
    n = len(tr.times)
    for i in range(n + 1):
        usable = i < n and tr.reasons[i] is None and tr.times[i] < audio_end_s
        if i < n and tr.reasons[i] is None and not usable:
            dropped[DROP_NO_AUDIO] += 1
        elif i < n and tr.reasons[i] is not None:
            dropped[tr.reasons[i]] += 1
        if start is not None and (not usable or tr.cut_before[i]):
            segments.append((start, i))
            start = None
        if usable and start is None:
            start = i
    kept = []
    for s, e in segments:
        if e - s >= min_frames:
            kept.append((s, e))
        else:
            dropped[DROP_SHORT] += e - s
    return kept, dropped


def _clip_shards(out: Path, clip: str) -> list[Path]:
    """This clip's shard folders (exact names: clip names may hold glob characters)."""
    shards = out / "shards"
    if not shards.is_dir():
        return []
    pat = re.compile(re.escape(clip) + r"__s\d+")
    return [d for d in shards.iterdir() if pat.fullmatch(d.name)]


def _forget(out: Path, clip: str) -> None:
    """Remove a clip's record first, then its shards: a crash in between leaves it not done."""
    (out / "clips" / f"{clip}.json").unlink(missing_ok=True)
    for old in _clip_shards(out, clip):
        shutil.rmtree(old)


def _write_shard(out_dir: Path, crops: np.ndarray, arrays: dict[str, np.ndarray], meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "crops.npy", crops)
    np.savez(out_dir / "data.npz", **arrays)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))


def prepare_clip(path: Path, out: Path, cfg: PrepareConfig) -> dict:
    """Prepare one clip; returns its record (also written to DIR/clips/<clip>.json)."""
    t_start = time.perf_counter()
    clip = path.stem
    info = probe_video(path)
    if info.width * info.height > cfg.max_image_pixels:
        raise ImageTooLargeError(f"{path}: frames are {info.width}x{info.height}, over {cfg.max_image_pixels / 1e6:.0f} MP")
    sr = cfg.sample_rate_hz
    if info.has_audio or cfg.require_audio:
        audio = decode_audio(path, sample_rate_hz=sr, align_to_video=True)
    else:
        audio = np.zeros(0, np.float32)
    mel = log_mel(audio, cfg.mel) if len(audio) else np.zeros((0, cfg.mel.n_mels), np.float32)  # (T, 80)
    tr = track_clip(path, cfg)
    times = np.asarray(tr.times)
    # The typical frame duration (median: robust for variable frame rate) and the mean rate.
    frame_s = float(np.median(np.diff(times))) if len(times) > 1 else 1.0 / (info.nominal_fps or 25)
    mean_fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 1.0 / frame_s
    min_frames = max(int(round(cfg.min_segment_s / frame_s)), 2)
    # A frame is usable when its centre mel row exists (clips without audio: --allow-no-audio).
    n_mel = len(mel)
    audio_end_s = (n_mel - 0.5) * cfg.mel.hop_ms / 1000 if n_mel else (float("inf") if not cfg.require_audio else 0.0)
    segments, dropped = split_segments(tr, min_frames, audio_end_s)

    # Pass 2: crops of the kept frames, with per-segment stabilised transforms.
    acfg = AlignConfig(crop_size_px=cfg.crop_size_px, stabilise_sigma_frames=cfg.stabilise_sigma_frames)
    seg_of = np.full(len(times), -1)
    affines = np.zeros((len(times), 2, 3))
    for k, (s, e) in enumerate(segments):
        seg_of[s:e] = k
        raw = np.stack([fit_transform(tr.landmarks[i], acfg) for i in range(s, e)])
        affines[s:e] = stabilise_transforms(raw, acfg.stabilise_sigma_frames)
    crops: list[list[np.ndarray]] = [[] for _ in segments]
    if segments:
        for i, (_, rgb) in enumerate(iter_frames(path)):
            if i < len(seg_of) and seg_of[i] >= 0:
                crops[seg_of[i]].append(warp_to_crop(rgb, affines[i], acfg))

    tmp = out / ".tmp" / clip
    shutil.rmtree(tmp, ignore_errors=True)
    seg_records = []
    for k, (s, e) in enumerate(segments):
        name = f"{clip}__s{k:02d}"
        idx = np.arange(s, e)
        lm_img = np.stack([tr.landmarks[i] for i in idx]).astype(np.float32)  # (F, 478, 3)
        aff = affines[s:e]
        scale = np.hypot(aff[:, 0, 0], aff[:, 1, 0])  # (F,)
        lm_crop = np.concatenate(
            [np.stack([apply_transform(aff[j], lm_img[j]) for j in range(e - s)]), lm_img[:, :, 2:] * scale[:, None, None]], axis=-1
        ).astype(np.float32)
        pose = np.stack([tr.poses[i] for i in idx])  # (F, 3), from pass 1
        t_seg = times[s:e]
        a0 = int(round(t_seg[0] * sr))
        a1 = min(int(round((t_seg[-1] + frame_s) * sr)), len(audio))
        centre = mel_index_for_time(t_seg, hop_ms=cfg.mel.hop_ms)
        m0 = max(int(centre[0]) - 20, 0) if n_mel else 0  # 200 ms of context either side where the clip has it
        m1 = min(int(centre[-1]) + 21, n_mel)
        if n_mel:
            assert 0 <= centre[0] and centre[-1] < n_mel, "a kept frame has no mel row"
        arrays = {
            "time_s": t_seg,
            "frame_index": idx.astype(np.int64),
            "landmarks_image": lm_img,
            "landmarks_crop": lm_crop,
            "affine": aff,
            "pose_deg": pose.astype(np.float32),
            "audio": audio[a0:a1],
            "mel": mel[m0:m1],
            "mel_index": (centre - m0).astype(np.int64) if n_mel else np.full(len(centre), -1, np.int64),
        }
        meta = {
            "segment": name,
            "clip": clip,
            "identity": identity_of(clip),
            "source": str(path),
            "frames": int(e - s),
            "start_s": float(t_seg[0]),
            "end_s": float(t_seg[-1] + frame_s),
            "fps": float((e - s - 1) / (t_seg[-1] - t_seg[0])) if e - s > 1 else float(mean_fps),
            "audio_start_s": a0 / sr,
            "mel_start_index": m0,
            "sample_rate_hz": sr,
            "has_audio": bool(n_mel),
            "crop_size_px": cfg.crop_size_px,
            "source_size": [info.width, info.height],
            "face_px_median": float(np.median(cfg.crop_size_px / scale * 0.45)),
            "config_fingerprint": cfg.fingerprint(),
            "arrays": SHARD_ARRAYS,
        }
        _write_shard(tmp / name, np.stack(crops[k]), arrays, meta)
        seg_records.append({"segment": name, "frames": int(e - s), "start_s": meta["start_s"], "end_s": meta["end_s"]})

    # Commit: replace this clip's old shards, then write the record last.
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    _forget(out, clip)
    for d in sorted(tmp.glob("*")) if tmp.exists() else []:
        os.replace(d, shards / d.name)
    shutil.rmtree(tmp, ignore_errors=True)
    cuts = count_cuts(tr.cut_before)
    record = {
        "clip": clip,
        "identity": identity_of(clip),
        "source": str(path),
        "status": "kept" if segments else "dropped",
        "reason": None if segments else "no usable segment (" + ", ".join(f"{k}: {v}" for k, v in dropped.items()) + ")",
        "frames_total": len(times),
        "frames_kept": int(sum(e - s for s, e in segments)),
        "frames_dropped": dict(dropped),
        "camera_cuts": cuts,
        "duration_s": float(times[-1] + frame_s) if len(times) else 0.0,
        "fps": float(mean_fps),
        "variable_frame_rate": bool(len(times) > 2 and np.ptp(np.diff(times)) > 0.25 * frame_s),
        "source_size": [info.width, info.height],
        "segments": seg_records,
        "notes": tr.notes,
        "seconds": time.perf_counter() - t_start,
        "config_fingerprint": cfg.fingerprint(),
        "source_stat": _source_stat(path),
    }
    _write_record(out, clip, record)
    return record


def _write_record(out: Path, clip: str, record: dict) -> None:
    (out / "clips").mkdir(parents=True, exist_ok=True)
    tmp = out / "clips" / f".{clip}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out / "clips" / f"{clip}.json")


def failed_record(path: Path, out: Path, cfg: PrepareConfig, err: Exception, *, retry: bool = False) -> dict:
    """The record of a clip that could not be prepared at all.

    Bad input is final for this configuration ("dropped"); an internal error ("error",
    ``retry=True``) is tried again by the next run.
    """
    _forget(out, path.stem)
    record = {
        "clip": path.stem,
        "identity": identity_of(path.stem),
        "source": str(path),
        "status": "error" if retry else "dropped",
        "reason": f"{type(err).__name__}: {err}",
        "frames_total": 0,
        "frames_kept": 0,
        "frames_dropped": {},
        "camera_cuts": 0,
        "duration_s": 0.0,
        "segments": [],
        "notes": [],
        "config_fingerprint": cfg.fingerprint(),
        "source_stat": _source_stat(path) if path.exists() else None,
    }
    _write_record(out, path.stem, record)
    return record


def _source_stat(path: Path) -> list:
    """Size and modification time: a replaced source file is prepared again."""
    st = path.stat()
    return [st.st_size, int(st.st_mtime)]


def is_done(path: Path, out: Path, cfg: PrepareConfig) -> bool:
    """True when the clip's record exists for this configuration (resume skips it)."""
    rec = out / "clips" / f"{path.stem}.json"
    if not rec.is_file():
        return False
    try:
        r = json.loads(rec.read_text())
    except json.JSONDecodeError:
        return False
    shards_there = all((out / "shards" / seg["segment"] / "meta.json").is_file() for seg in r.get("segments", []))
    return (
        r.get("status") != "error"
        and r.get("config_fingerprint") == cfg.fingerprint()
        and r.get("source_stat") == _source_stat(path)
        and shards_there
    )


_LOG_REDIRECTED = False


def _redirect_native_logs(out: Path) -> None:
    """Send this worker's native stderr (MediaPipe/TFLite chatter) to DIR/logs/, once."""
    global _LOG_REDIRECTED
    if _LOG_REDIRECTED:
        return
    (out / "logs").mkdir(parents=True, exist_ok=True)
    fd = os.open(out / "logs" / f"worker-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    _LOG_REDIRECTED = True


def _worker(args: tuple[Path, Path, PrepareConfig]) -> dict:
    """One clip in a worker process: native logs to a file, one thread (the pool is the parallelism)."""
    path, out, cfg = args
    _redirect_native_logs(out)
    cv2.setNumThreads(1)
    return _worker_inline(args)


def _worker_inline(args: tuple[Path, Path, PrepareConfig]) -> dict:
    """One clip in this process (``jobs=1``): the caller's stderr is left alone."""
    path, out, cfg = args
    try:
        return prepare_clip(path, out, cfg)
    except AvatarInputError as e:
        return failed_record(path, out, cfg, e)
    except Exception as e:  # noqa: BLE001 - one clip's bug must not lose the other clips' work
        import traceback

        tb = traceback.format_exc(limit=-3).strip().replace("\n", " | ")
        return failed_record(path, out, cfg, RuntimeError(f"internal error (please report): {e!r}; {tb}"), retry=True)


def prepare(sources: list[Path], out: Path, cfg: PrepareConfig = PrepareConfig(), *, jobs: int = 2, force: bool = False, progress: bool = True) -> dict:
    """Prepare every clip under ``sources`` into ``out``; returns the data card (also written)."""
    from engine.data.card import write_data_card

    videos = find_videos(sources)
    if not videos:
        raise FileNotFoundError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) in {', '.join(map(str, sources))}")
    stems = Counter(p.stem for p in videos)
    dup = [s for s, c in stems.items() if c > 1]
    if dup:
        raise ValueError(f"clip names must be unique (they name the shards); repeated: {', '.join(dup)}")
    out.mkdir(parents=True, exist_ok=True)
    todo = [p for p in videos if force or not is_done(p, out, cfg)]
    t0 = time.perf_counter()
    frames = 0
    if todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="clip", disable=not progress, desc="prepare")
        args = [(p, out, cfg) for p in todo]
        if jobs > 1 and len(todo) > 1:
            import multiprocessing as mpc

            ctx = mpc.get_context("spawn")
            with ctx.Pool(min(jobs, len(todo)), maxtasksperchild=8) as pool:
                for rec in pool.imap_unordered(_worker, args):
                    frames += rec["frames_total"]
                    bar.set_postfix(clip=rec["clip"][:24], fps=f"{frames / (time.perf_counter() - t0):.1f}")
                    bar.update()
        else:
            for a in args:
                rec = _worker_inline(a)
                frames += rec["frames_total"]
                bar.set_postfix(clip=rec["clip"][:24], fps=f"{frames / (time.perf_counter() - t0):.1f}")
                bar.update()
        bar.close()
    wall = time.perf_counter() - t0
    run = {"clips_processed": len(todo), "clips_skipped_resume": len(videos) - len(todo), "frames_processed": frames,
           "wall_s": wall, "frames_per_s": frames / wall if wall > 0 and frames else None, "jobs": jobs}
    return write_data_card(out, [p.stem for p in videos], cfg, run)
