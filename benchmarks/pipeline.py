"""``avatar bench pipeline``: the live pipeline on a real speech file paced in real time.

It measures what a live user gets: sustained output fps, audio-in to frame-out latency (from the
moment the audio at a frame's start arrived to the moment the frame is handed out) p50/p95/p99,
first-frame latency (pipeline start to the first frame; and first audio to the first speech
frame), degraded and dropped frames, per-stage times, the A/V offset of the re-emitted audio
(measured: each frame's audio is located in the input by correlation), and identity drift (the
generated lower face against the portrait's, early in the session and late). It writes JSON and
a latency histogram PNG beside it.

The default speech is ``../shared/data/speech/MuseTalk__data_audio_eng.wav`` (60 s of English);
without the shared data, the shipped demo voice is looped to ``--duration``.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import time
import wave
from pathlib import Path

import numpy as np

from engine.audio import decode_audio
from engine.avatar import load_portrait, prepare_avatar
from engine.bundle import DEFAULT_BUNDLE
from engine.face.region import extract_patch
from engine.pipeline.pipeline import Pipeline, PipelineConfig
from engine.pipeline.sources import FileSource
from engine.runtime import load_runtime

REPO = Path(__file__).resolve().parents[1]
SHARED_SPEECH = REPO.parent / "shared" / "data" / "speech" / "MuseTalk__data_audio_eng.wav"
DEMO = REPO / "engine" / "assets" / "demo"


def _speech(path: str | None, duration_s: float, tmp: Path) -> tuple[Path, str]:
    """A wav of at least ``duration_s`` of speech (the file looped if shorter)."""
    src = Path(path) if path else (SHARED_SPEECH if SHARED_SPEECH.is_file() else DEMO / "demo_voice.wav")
    x = decode_audio(src, sample_rate_hz=16000)
    reps = int(np.ceil(duration_s * 16000 / len(x)))
    y = np.tile(x, reps)[: int(duration_s * 16000)] if duration_s > 0 else x
    out = tmp / "bench_speech.wav"
    with wave.open(str(out), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(y, -1, 1) * 32767).round().astype(np.int16).tobytes())
    return out, f"{src.name}" + (f" looped x{reps}" if reps > 1 else "")


def _av_offset_frames(frames: list, wave_16k: np.ndarray, frame_samples: int, max_lag_frames: int = 3) -> dict:
    """For each frame made from the file's audio, where its re-emitted audio sits in the input,
    in frames relative to where its timestamp says (0 = in sync)."""
    timeline = [f for f in frames if f.audio_arrival_s is not None]
    offsets = []
    for k in range(0, len(timeline), max(1, len(timeline) // 200)):  # up to ~200 frames, spread over the run
        f = timeline[k]
        if not np.abs(f.audio).max() > 1e-3:
            continue
        best, best_lag = -np.inf, None
        for lag in range(-max_lag_frames, max_lag_frames + 1):
            lo = (k + lag) * frame_samples
            if lo < 0 or lo + frame_samples > len(wave_16k):
                continue
            ref = wave_16k[lo : lo + frame_samples]
            c = float(np.dot(ref, f.audio) / (np.linalg.norm(ref) * np.linalg.norm(f.audio) + 1e-9))
            if c > best:
                best, best_lag = c, lag
        if best_lag is not None:
            offsets.append(best_lag)
    o = np.abs(np.array(offsets)) if offsets else np.zeros(0)
    return {"frames_checked": len(offsets), "max_abs_offset_frames": int(o.max()) if len(o) else None,
            "mean_abs_offset_frames": float(o.mean()) if len(o) else None}


def _drift(frames: list, avatar, window_s: float, fps: int) -> dict:
    """Mean absolute difference (0-255) of the generated lower-face patch to the portrait's,
    over the first and the last ``window_s`` of speech frames (identity drift shows as growth)."""
    s = avatar.crop_size_px
    ref = extract_patch(avatar.crop).astype(np.float32)
    import cv2

    def patch(img):
        crop = cv2.warpAffine(img, avatar.affine, (s, s), flags=cv2.INTER_LINEAR)
        return extract_patch(crop).astype(np.float32)

    speech = [f for f in frames if f.kind == "speech"]
    n = int(window_s * fps)
    if len(speech) < 2 * n:
        return {"note": f"fewer than {2 * n} speech frames"}
    first = float(np.mean([np.abs(patch(f.image) - ref).mean() for f in speech[:n]]))
    last = float(np.mean([np.abs(patch(f.image) - ref).mean() for f in speech[-n:]]))
    return {"window_s": window_s, "first_mad": round(first, 3), "last_mad": round(last, 3), "ratio_last_to_first": round(last / max(first, 1e-9), 3),
            "session_s": round(speech[-1].pts_s - speech[0].pts_s, 1)}


def bench_pipeline(out: str | Path, *, bundle: str | None = None, audio: str | None = None, portrait: str | None = None,
                   duration_s: float = 60.0, backend: str = "auto", threads: int | None = None, steps: int | None = None,
                   budget_ms: float = 150.0) -> dict:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rt = load_runtime(bundle or DEFAULT_BUNDLE, backend, threads=threads)
    av = prepare_avatar(load_portrait(portrait or DEMO / "astronaut.jpg"), rt, crop_size_px=rt.bundle.crop_size_px)
    speech, speech_name = _speech(audio, duration_s, out.parent)
    wave_16k = decode_audio(speech, sample_rate_hz=16000)
    cfg = PipelineConfig(realtime=True, steps=steps, latency_budget_ms=budget_ms)
    frames: list = []

    async def run() -> Pipeline:
        async with Pipeline(rt, av, cfg) as p:
            p.start(FileSource(speech, realtime=True))
            async for f in p.frames():
                frames.append(f)
            return p

    t0 = time.perf_counter()
    p = asyncio.run(run())
    wall = time.perf_counter() - t0
    speech.unlink(missing_ok=True)
    lat = np.array([f.latency_ms for f in frames if f.latency_ms is not None and f.kind != "dropped"])
    lat_speech = np.array([f.latency_ms for f in frames if f.kind == "speech"])
    kinds = {k: sum(f.kind == k for f in frames) for k in ("speech", "idle", "dropped")}
    emitted = np.array([f.emitted_s for f in frames])
    first_audio = min((f.audio_arrival_s for f in frames if f.audio_arrival_s is not None), default=None)
    first_timeline = next((f for f in frames if f.audio_arrival_s is not None), None)
    snap = p.metrics.snapshot()

    def q(a: np.ndarray, x: float) -> float | None:
        return round(float(np.percentile(a, x)), 1) if len(a) else None

    steps_used = [f.steps for f in frames if f.kind == "speech"]
    rep = {
        "what": "live pipeline, real speech file paced in real time",
        "speech": speech_name, "audio_s": round(len(wave_16k) / 16000, 2), "wall_s": round(wall, 2),
        "runtime": rt.describe(), "fps_target": rt.bundle.fps, "steps_full": p.full_steps, "latency_budget_ms": budget_ms,
        "audio_lookahead_ms": p.lookahead_ms,
        "frames": len(frames), "frame_kinds": kinds,
        "sustained_fps": round((len(frames) - 1) / max(emitted[-1] - emitted[0], 1e-9), 2) if len(frames) > 1 else None,
        "latency_ms": {"p50": q(lat, 50), "p95": q(lat, 95), "p99": q(lat, 99), "max": q(lat, 100), "count": len(lat)},
        "latency_speech_frames_ms": {"p50": q(lat_speech, 50), "p95": q(lat_speech, 95), "p99": q(lat_speech, 99)},
        "first_frame_ms": round(1000 * (p.first_frame_s - p.started_s), 1) if p.first_frame_s else None,
        "first_audio_to_first_frame_ms": round(1000 * (first_timeline.emitted_s - first_audio), 1) if first_timeline and first_audio else None,
        "degraded_frames": int(snap["counters"].get("frames_degraded", 0)), "dropped_frames": int(snap["counters"].get("frames_dropped", 0)),
        "steps_used": {str(s): steps_used.count(s) for s in sorted(set(steps_used))},
        "av_offset": _av_offset_frames(frames, wave_16k, p.frame_samples),
        "identity_drift": _drift(frames, av, 5.0, rt.bundle.fps),
        "stages_ms": snap["stages"],
        "machine": {"cpu": _cpu_name(), "cores_usable": len(os.sched_getaffinity(0)), "python": platform.python_version()},
    }
    out.write_text(json.dumps(rep, indent=1) + "\n")
    _plot(lat, lat_speech, rep, out.with_suffix(".png"))
    return rep


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _plot(lat: np.ndarray, lat_speech: np.ndarray, rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    if len(lat):
        bins = np.linspace(0, max(300.0, float(np.percentile(lat, 99.5))), 60)
        ax.hist(lat, bins=bins, color="#9ab", label="all frames with audio")
        if len(lat_speech):
            ax.hist(lat_speech, bins=bins, color="#c53", alpha=0.7, label="generated (speech) frames")
        for k, ls in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            v = rep["latency_ms"][k]
            if v is not None:
                ax.axvline(v, color="k", ls=ls, lw=1, label=f"{k} {v:.0f} ms")
    ax.axvline(rep["latency_budget_ms"], color="#c00", lw=1.5, label=f"goal p95 <= {rep['latency_budget_ms']:.0f} ms")
    ax.set_xlabel("audio in -> frame out latency (ms)")
    ax.set_ylabel("frames")
    ax.set_title(f"{rep['sustained_fps']} fps sustained, {rep['frame_kinds']}, degraded {rep['degraded_frames']}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
