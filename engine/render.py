"""Offline render: portrait + speech file -> mp4 (video of the talking portrait, the speech muxed)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.audio import decode_audio
from engine.avatar import load_portrait, prepare_avatar
from engine.bundle import Bundle, load_bundle
from engine.errors import AvatarInputError
from engine.generator import FrameGenerator
from engine.media.mp4 import Mp4Writer
from engine.runtime import load_runtime

MUX_RATE_HZ = 48000  # the audio track of the mp4 (features use 16 kHz)


def render(portrait: str | Path, audio: str | Path, out: str | Path, *, bundle: Bundle | str | Path | None = None,
           steps: int | None = None, seed: int = 0, blinks: bool = True, threads: int | None = None, progress: bool = True,
           backend: str = "auto") -> dict:
    """Render ``out`` and return timings: frames, seconds of audio, wall time per stage.

    ``backend``: auto | torch | onnxruntime | tensorrt (``engine.runtime.load_runtime``).
    """
    out = Path(out)
    if out.is_dir():
        raise AvatarInputError(f"{out}: is a folder; give the output file's name, e.g. {out / 'out.mp4'}")
    if seed < 0:
        raise AvatarInputError(f"--seed must be >= 0, got {seed}")
    t0 = time.perf_counter()
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    rt = load_runtime(b, backend, threads=threads)
    wave = decode_audio(audio, sample_rate_hz=16000)
    mux = decode_audio(audio, sample_rate_hz=MUX_RATE_HZ)
    duration_s = len(wave) / 16000.0
    n_frames = max(1, int(np.ceil(duration_s * b.fps - 1e-6)))  # the last partial frame keeps the speech's tail
    image = load_portrait(portrait)
    av_ = prepare_avatar(image, rt, crop_size_px=b.crop_size_px)
    t_prep = time.perf_counter()
    gen = FrameGenerator(rt, av_, steps=steps, seed=seed, blinks=blinks)
    feats = gen.audio_features(wave, n_frames)
    lms = gen.landmarks(feats)
    t_audio = time.perf_counter()
    h, w = image.shape[:2]
    out = Path(out)
    partial = out.with_name(out.name + ".partial.mp4")  # a failed render leaves no half-written `out`
    try:
        with Mp4Writer(partial, fps=b.fps, width=w, height=h, audio=mux, audio_rate_hz=MUX_RATE_HZ) as wr:
            for f in tqdm(range(n_frames), desc="render", unit="frame", disable=not progress, dynamic_ncols=True):
                wr.write(gen.frame(lms[f], gen.audio_tokens(feats, f)))
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    t_end = time.perf_counter()
    return {"out": str(out), "backend": rt.backend, "frames": n_frames, "fps": b.fps, "audio_s": round(duration_s, 3), "steps": gen.steps,
            "size": [w, h], "notes": av_.notes,
            "seconds": {"load_and_portrait": round(t_prep - t0, 2), "audio_and_landmarks": round(t_audio - t_prep, 2),
                        "frames": round(t_end - t_audio, 2), "total": round(t_end - t0, 2)},
            "frames_per_s": round(n_frames / max(t_end - t_audio, 1e-9), 2)}
