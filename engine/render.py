"""Offline render: portrait + speech file -> mp4 (video of the talking portrait, the speech muxed).

The speech is streamed, never held whole: the pipeline's FileSource decodes it at 16 kHz as the
frames are made, and the mp4's audio track reads a second decoder at 48 kHz as the video
advances (engine/audio/decode.py AudioBlocks). Memory is flat in the audio's length: a 40-minute
file renders in what a minute takes (tests/test_render.py; figures in docs/benchmarks/render_memory.json).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.audio.decode import AudioBlocks, audio_duration_s
from engine.avatar import load_portrait, prepare_avatar
from engine.bundle import Bundle, load_bundle
from engine.errors import AvatarInputError
from engine.pipeline.pipeline import Pipeline, PipelineConfig
from engine.pipeline.sources import FileSource
from engine.media.mp4 import Mp4Writer
from engine.provenance import metadata as provenance
from engine.provenance.payload import manifest_hash
from engine.provenance.stamp import bundle_payload, derived_session_id
from engine.runtime import load_runtime

MUX_RATE_HZ = 48000  # the audio track of the mp4 (features use 16 kHz)
_ENCODE_AHEAD = 4  # frames handed to the encoder thread and not yet written (bounds the memory they hold)


def render(portrait: str | Path, audio: str | Path, out: str | Path, *, bundle: Bundle | str | Path | None = None,
           steps: int | None = None, seed: int = 0, blinks: bool = True, threads: int | None = None, progress: bool = True,
           backend: str = "auto", head_motion: bool = True, watermark: bool = True, c2pa: bool = True) -> dict:
    """Render ``out`` and return timings: frames, seconds of audio, wall time per stage.

    ``backend``: auto | torch | onnxruntime | tensorrt (``engine.runtime.load_runtime``).
    ``watermark``: the invisible provenance watermark on every frame (engine/provenance; off: a warning,
    and the file's metadata says so). ``c2pa``: sign a C2PA manifest into the file (the container tags
    are written either way).
    """
    out = Path(out)
    if out.is_dir():
        raise AvatarInputError(f"{out}: is a folder; give the output file's name, e.g. {out / 'out.mp4'}")
    if seed < 0:
        raise AvatarInputError(f"--seed must be >= 0, got {seed}")
    t0 = time.perf_counter()
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    rt = load_runtime(b, backend, threads=threads)
    stated_s = audio_duration_s(audio)  # the file's errors before the portrait is prepared; the progress bar's length
    expected_frames = None if stated_s is None else max(1, int(np.ceil(stated_s * b.fps - 1e-6)))
    image = load_portrait(portrait)
    av_ = prepare_avatar(image, rt, crop_size_px=b.crop_size_px)
    t_prep = time.perf_counter()
    h, w = image.shape[:2]
    partial = out.with_name(out.name + ".partial.mp4")  # a failed render leaves no half-written `out`
    file_id = derived_session_id(av_.image, seed)  # the watermark's 8-bit id: the pipeline derives the same one
    config = PipelineConfig(realtime=False, steps=steps, seed=seed, blinks=blinks, head_motion=head_motion, watermark=watermark, watermark_id=file_id)
    bundle_sha = manifest_hash(b.manifest)
    mark = bundle_payload(b.manifest, file_id) if watermark else None
    record = provenance.provenance_record(bundle_manifest_sha256=bundle_sha, watermark=None if mark is None else {
        "embedded": True, "version": mark.version, "bundle": mark.bundle_hex, "id": mark.session})
    try:
        with Mp4Writer(partial, fps=b.fps, width=w, height=h, audio=AudioBlocks(audio, sample_rate_hz=MUX_RATE_HZ),
                       audio_rate_hz=MUX_RATE_HZ, metadata=provenance.container_tags(record)) as wr:
            kinds, duration_s, stages = asyncio.run(_run_pipeline(rt, av_, config, audio, wr, expected_frames, progress))
        n_frames = sum(kinds.values())  # ceil(duration * fps): the last partial frame keeps the speech's tail
        signed = provenance.sign_c2pa(partial, record, title=out.name) if c2pa else "not signed: --no-c2pa"
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    t_end = time.perf_counter()
    return {"out": str(out), "backend": rt.backend, "frames": n_frames, "fps": b.fps, "audio_s": round(duration_s, 3),
            "steps": int(steps or b.steps), "frame_kinds": kinds, "size": [w, h], "notes": av_.notes,
            "provenance": {"watermark": record["watermark"], "bundle": record["bundle"], "c2pa": signed},
            "seconds": {"load_and_portrait": round(t_prep - t0, 2), "frames": round(t_end - t_prep, 2), "total": round(t_end - t0, 2)},
            "frames_per_s": round(n_frames / max(t_end - t_prep, 1e-9), 2), "stages_ms": stages}


async def _run_pipeline(rt, avatar, config: PipelineConfig, audio: str | Path, wr: Mp4Writer, n_frames: int | None,
                        progress: bool) -> tuple[dict[str, int], float, dict]:
    """The live pipeline in fast mode: the file as the source, the mp4 as the sink; (frame kinds, seconds of audio,
    per-stage wall times: features, denoise, compose, idle, encode).

    Frames are encoded in a thread of their own, in order, a few behind: H.264 at 1280 px costs as much as
    generating a frame, and on the event loop it would hold up the stages' scheduling."""
    kinds: dict[str, int] = {}
    source = FileSource(audio, realtime=False, playback=False)  # the mp4 takes its audio track from the file itself
    loop = asyncio.get_running_loop()
    pending: deque[asyncio.Future] = deque()
    # (leaving the executor waits for queued writes, so a failed render's writer closes after them)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="avatar-encode") as encoder:
        async with Pipeline(rt, avatar, config) as p:
            p.start(source)
            with tqdm(total=n_frames, desc="render", unit="frame", disable=not progress, dynamic_ncols=True) as bar:
                async for f in p.frames():
                    pending.append(loop.run_in_executor(encoder, _timed, p.metrics.stage("encode"), wr.write, f.image))
                    while len(pending) > _ENCODE_AHEAD or (pending and pending[0].done()):
                        await pending.popleft()  # in order; an encoder error surfaces here
                    kinds[f.kind] = kinds.get(f.kind, 0) + 1
                    bar.update(1)
            while pending:
                await pending.popleft()
            stages = {k: v for k, v in p.metrics.snapshot()["stages"].items() if k != "latency"}  # no real-time clock here
        duration_s = source.duration_s
    return kinds, (0.0 if duration_s is None else duration_s), stages


def _timed(hist, fn, *args):
    with hist.time():
        return fn(*args)
