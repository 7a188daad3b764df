"""The streaming pipeline with real stages (a tiny random-weight bundle on the PyTorch runtime, the
shipped demo portrait and voice, real sources): timestamps, A/V, idle frames, degradation,
barge-in, errors. Every loop is bounded in frames and in time."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from engine.audio import decode_audio
from engine.avatar import load_portrait, prepare_avatar
from engine.cli import DEMO
from engine.pipeline.pipeline import OutputFrame, Pipeline, PipelineConfig, PipelineError
from engine.pipeline.sources import FileSource, PushSource
from engine.runtime import load_runtime
from tests import aio
from tests.tiny import tiny_bundle

FPS = 25
FRAME = 16000 // FPS


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """(runtime, avatar, a 1.6 s excerpt of the demo voice as a wav file, its samples)."""
    import wave

    d = tmp_path_factory.mktemp("pipe")
    rt = load_runtime(tiny_bundle(d / "b"), "torch", threads=1)
    av = prepare_avatar(load_portrait(DEMO / "astronaut.jpg"), rt, crop_size_px=rt.bundle.crop_size_px)
    x = decode_audio(DEMO / "demo_voice.wav", sample_rate_hz=16000)[4000 : 4000 + 25600 + 300]  # 1.619 s: a partial last frame
    path = d / "speech.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((x * 32767).round().astype(np.int16).tobytes())
    return rt, av, path, decode_audio(path, sample_rate_hz=16000)


async def _collect(p: Pipeline, limit: int = 500, timeout_s: float = 60.0) -> list[OutputFrame]:
    out = []

    async def take():
        async for f in p.frames():
            out.append(f)
            if len(out) >= limit:
                return

    await asyncio.wait_for(take(), timeout_s)
    return out


def _run(rt, av, source, config: PipelineConfig, **kw) -> tuple[list[OutputFrame], Pipeline]:
    async def main():
        async with Pipeline(rt, av, config) as p:
            p.start(source)
            return await _collect(p, **kw), p

    return aio.run(main())


def test_fast_mode_frames_timestamps_and_audio(rig):
    rt, av, path, wave = rig
    frames, p = _run(rt, av, FileSource(path, realtime=False), PipelineConfig(realtime=False, blinks=False, head_motion=False))
    assert len(frames) == int(np.ceil(len(wave) / FRAME))  # the last partial frame is kept
    assert [f.index for f in frames] == list(range(len(frames)))
    assert all(f.pts_s == f.index / FPS for f in frames)  # exact multiples of the frame period
    assert all(f.image.shape == av.image.shape and f.image.dtype == np.uint8 for f in frames)
    # A/V by construction: each frame carries its own span of the input, so the audio re-emitted
    # alongside the frames IS the input, with offset 0 (not merely within a frame)
    audio = np.concatenate([f.audio for f in frames])
    np.testing.assert_array_equal(audio[: len(wave)], wave)
    assert not audio[len(wave):].any()
    kinds = {f.kind for f in frames}
    assert "speech" in kinds and all(f.steps == rt.bundle.steps for f in frames if f.kind == "speech")
    assert not p._tasks  # every task finished or was cancelled and awaited


def test_paced_file_reproduces_the_offline_render_frame_for_frame(rig):
    rt, av, path, wave = rig
    offline, _ = _run(rt, av, FileSource(path, realtime=False), PipelineConfig(realtime=False, blinks=False, head_motion=False))
    no_degrade = PipelineConfig(realtime=True, degrade=False, blinks=False, head_motion=False)
    t0 = time.perf_counter()
    live, p = _run(rt, av, FileSource(path, realtime=True), no_degrade)
    wall = time.perf_counter() - t0
    assert wall >= 0.9 * len(wave) / 16000  # it really was paced
    while live and live[0].audio_arrival_s is None:  # idle frames on the clock before the file's first audio arrived
        live.pop(0)
    assert len(live) == len(offline)
    for a, b in zip(offline, live):
        assert a.kind == b.kind and a.steps == b.steps
        np.testing.assert_array_equal(a.image, b.image)
    # no frame can come before its audio lookahead has arrived; but the last frames, whose lookahead
    # runs past the end of the file, are completed with silence once the input stops (idle_fill_ms)
    end_s = len(wave) / 16000
    lat = [f.latency_ms for f in live if f.latency_ms is not None and f.pts_s + 1 / FPS + p.lookahead_ms / 1000 <= end_s]
    assert lat and min(lat) >= p.lookahead_ms - 15


def test_silence_gives_idle_frames_that_are_the_portrait(rig, tmp_path: Path):
    import wave

    rt, av, _, _ = rig
    path = tmp_path / "silence.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(16000, np.int16).tobytes())
    frames, p = _run(rt, av, FileSource(path, realtime=False), PipelineConfig(realtime=False, blinks=False, head_motion=False, watermark=False))
    assert len(frames) == FPS and all(f.kind == "idle" and f.steps == 0 for f in frames)
    assert all(np.array_equal(f.image, av.image) for f in frames)  # (with the watermark on: the marked portrait, tests/test_watermark.py)
    assert p.metrics.counter("idle_frames").value == FPS
    assert p.metrics.stage("denoise").count == 0 and p.metrics.stage("compose").count == 0  # no model ran for them


class _Slow:
    """A real graph made slow on purpose (sleeps before each call): the pipeline must notice."""

    def __init__(self, graph, delay_s: float):
        self.g, self.delay_s = graph, delay_s
        self.name, self.backend, self.precision = graph.name, graph.backend, graph.precision
        self.input_names, self.output_names = graph.input_names, graph.output_names

    def infer(self, feed):
        time.sleep(self.delay_s)
        return self.g.infer(feed)


def test_slow_denoiser_degrades_and_latency_stays_bounded(rig):
    rt, av, path, wave = rig
    from dataclasses import replace

    slow = replace(rt, graphs={**rt.graphs, "denoiser": _Slow(rt.graphs["denoiser"], 0.03)})  # 2 steps: 60 ms > the 40 ms period
    cfg = PipelineConfig(realtime=True, latency_budget_ms=150.0, max_backlog_frames=3)
    frames, p = _run(slow, av, FileSource(path, realtime=True), cfg)
    snap = p.metrics.snapshot()["counters"]
    assert snap["frames_degraded"] > 0
    assert min(f.steps for f in frames if f.kind == "speech") == cfg.min_steps
    lat = np.array([f.latency_ms for f in frames if f.latency_ms is not None])
    # bounded: the last second is no worse than the first (no growing queue), and never runaway
    half = len(lat) // 2
    assert np.percentile(lat[half:], 90) <= np.percentile(lat[:half], 90) + 120
    assert lat.max() < 1000
    timeline = [f for f in frames if f.audio_arrival_s is not None]  # not the idle frames before the first audio arrived
    assert len(timeline) == int(np.ceil(len(wave) / FRAME))  # degraded or dropped, every slot of the audio still has a frame


def test_a_step_comes_back_when_the_latency_leaves_room_for_it(rig):
    """One step is given back after recover_frames frames whose latency plus twice a step's measured cost fits the
    budget: 120 ms with 6 ms steps fits 150 ms (a fixed frame period of headroom, 110 ms, never let it back)."""
    rt, av, _, _ = rig
    cfg = PipelineConfig(realtime=True, latency_budget_ms=150.0, recover_frames=5, min_steps=1)

    async def main():
        async with Pipeline(rt, av, cfg) as p:
            loop = asyncio.get_running_loop()
            p.steps = 1
            p._step_ms = 20.0  # 120 + 2 x 20 > 150: no room
            for _ in range(10):
                p._adapt(loop.time() - 0.120, 0, "speech")
            held = p.steps
            p._step_ms = 6.0  # 120 + 2 x 6 < 150: room
            for _ in range(5):
                p._adapt(loop.time() - 0.120, 0, "speech")
            back = p.steps
            p._adapt(loop.time() - 0.160, 0, "speech")  # over budget: down again at once
            return held, back, p.steps

    held, back, after = asyncio.run(main())
    assert (held, back, after) == (1, 2, 1)


def test_push_source_idle_on_the_clock_then_speech_then_barge_in(rig):
    rt, av, _, wave = rig

    async def main():
        src = PushSource(max_buffer_s=30.0)
        cfg = PipelineConfig(realtime=True, degrade=False, blinks=False, head_motion=False)
        async with Pipeline(rt, av, cfg) as p:
            p.start(src)
            it = p.frames().__aiter__()
            idle = [await asyncio.wait_for(it.__anext__(), 1.0) for _ in range(5)]  # nothing pushed: idle on the clock
            assert all(f.kind == "idle" and f.audio_arrival_s is None and not f.audio.any() for f in idle)
            gaps = np.diff([f.emitted_s for f in idle])
            assert gaps.mean() == pytest.approx(1 / FPS, abs=0.02)
            src.push_audio(np.tile(wave, 3), 16000)  # ~4.9 s at once, as a TTS engine does
            speech = []
            for _ in range(60):
                f = await asyncio.wait_for(it.__anext__(), 5.0)
                speech.append(f)
                if sum(g.kind == "speech" for g in speech) >= 10:
                    break
            assert any(f.kind == "speech" for f in speech)
            t_clear = asyncio.get_running_loop().time()
            dropped_s = p.clear_buffer()
            assert dropped_s > 2.0 and src.available_s == 0
            nxt = await asyncio.wait_for(it.__anext__(), 1.0)
            assert nxt.kind == "idle"  # the face is idle again ...
            assert nxt.emitted_s - t_clear < 2.5 / FPS  # ... within about one frame period
            after = [await asyncio.wait_for(it.__anext__(), 1.0) for _ in range(5)]
            assert all(f.kind == "idle" for f in after)
            idx = [f.index for f in idle + speech + [nxt] + after]
            assert idx == list(range(len(idx)))  # output timestamps stay continuous across the barge-in
            assert p.metrics.counter("barge_ins").value == 1
        assert not p._tasks

    aio.run(main())


class _Broken:
    def __init__(self, graph):
        self.name, self.backend, self.precision = graph.name, graph.backend, graph.precision
        self.input_names, self.output_names = graph.input_names, graph.output_names

    def infer(self, feed):
        raise RuntimeError("the GPU fell off the bus")


def test_a_crashed_stage_surfaces_in_the_caller(rig):
    rt, av, path, _ = rig
    from dataclasses import replace

    broken = replace(rt, graphs={**rt.graphs, "denoiser": _Broken(rt.graphs["denoiser"])})
    with pytest.raises(PipelineError, match="fell off the bus"):
        _run(broken, av, FileSource(path, realtime=False), PipelineConfig(realtime=False))


def test_bad_audio_file_raises_its_own_clear_error(rig, tmp_path: Path):
    from engine.errors import UnreadableMediaError

    rt, av, _, _ = rig
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(UnreadableMediaError, match="bad.wav"):
        _run(rt, av, FileSource(bad, realtime=False), PipelineConfig(realtime=False))


def test_audio_pushed_ahead_of_real_time_is_not_behind(rig):
    """A voice agent pushes a whole reply at once: its frames are ready long before they are due,
    which is not falling behind; the same frames are behind once real time passes their due time."""
    rt, av, _, wave = rig
    p = Pipeline(rt, av, PipelineConfig(realtime=True))
    from engine.pipeline.sources import AudioChunk

    t0 = 1000.0
    x = np.tile(wave, 2)[: 160 * 300]  # 3 s
    for i in range(300):  # every chunk arrives at t0: a burst
        p._ingest(AudioChunk(np.ascontiguousarray(x[160 * i : 160 * (i + 1)]), i / 100), t0)
    assert p._ready(60)  # many frames are ready at once ...
    assert p._backlog(t0 + 0.01) == 0  # ... but none is overdue
    assert p._due(50, t0) == pytest.approx(t0 + 2.0)  # frame 50 is due 2 s into the utterance
    la = p.lookahead_ms / 1000
    assert p._backlog(t0 + 1.0 + la) == 25  # one second later, frames 1..25 (beyond the next, 0) are overdue
    p._executor.shutdown()


def test_stage_b_of_a_frame_overlaps_stage_a_of_the_next(rig):
    """The two stages run in two threads: composing frame k (decoder, paste) overlaps denoising frame
    k + 1. Each stage is slowed by a sleep (which releases the GIL, as the runtimes do), so the
    overlap is there by construction or not at all."""
    rt, av, path, _ = rig
    spans: dict[str, list[tuple[float, float]]] = {"latent": [], "compose": []}

    async def main():
        async with Pipeline(rt, av, PipelineConfig(realtime=False, blinks=False, head_motion=False)) as p:
            for name in spans:
                inner = getattr(p.gen, name)

                def slowed(*a, _inner=inner, _name=name, **kw):
                    t0 = time.perf_counter()
                    time.sleep(0.01)
                    r = _inner(*a, **kw)
                    spans[_name].append((t0, time.perf_counter()))
                    return r

                setattr(p.gen, name, slowed)
            p.start(FileSource(path, realtime=False))
            return await _collect(p)

    frames = aio.run(main())
    assert sum(f.kind == "speech" for f in frames) >= 10
    overlapping = sum(any(a0 < c1 and c0 < a1 for c0, c1 in spans["compose"]) for a0, a1 in spans["latent"])
    assert overlapping >= len(spans["latent"]) // 2, (overlapping, len(spans["latent"]))


def test_a_silence_inside_a_stream_restarts_the_previous_frame_condition(rig):
    """Frames the VAD calls silent are idle frames, and the first speech frame after them is denoised
    without the previous output (as at an utterance's start); inside speech, every frame has it."""
    rt, av, _, wave = rig
    gap = np.zeros(16000, np.float32)  # 1 s of silence between two stretches of speech
    x = np.concatenate([wave, gap, wave])
    had_previous: list[bool] = []

    async def main():
        async with Pipeline(rt, av, PipelineConfig(realtime=False, blinks=False, head_motion=False)) as p:
            inner = p.gen.latent

            def watched(*a, **kw):
                had_previous.append(p.gen.previous is not None)
                return inner(*a, **kw)

            p.gen.latent = watched
            src = PushSource(max_buffer_s=10.0)
            src.push_audio(x, 16000)
            src.close()
            p.start(src)
            return await _collect(p)

    frames = aio.run(main())
    kinds = "".join("s" if f.kind == "speech" else "i" for f in frames)
    assert "s" in kinds and "i" * 10 in kinds.strip("i"), kinds  # speech, a run of idle frames, speech again
    assert len(had_previous) == kinds.count("s")
    starts = [i for i, h in enumerate(had_previous) if not h]  # latent calls without a previous frame
    assert len(starts) >= 2 and starts[0] == 0, starts  # the stream's first speech frame and the one after the gap
    assert sum(had_previous) >= len(had_previous) - 4, had_previous  # inside speech the previous frame is used
