"""Audio pushed in real-time pieces is never cut (issue 15, item 4).

A voice agent pushes its TTS through a PushSource (the server's POST /sessions/{id}/audio and its
WebSocket do the same, in pieces of at most 100 ms) in pieces of any size, each as it is due:
a piece of N ms covers N ms of output, so the gap between two pieces is not silence. Whatever the
piece size, the utterance's frames must come out one for each 40 ms of pushed audio, in order, each
with its own audio: no idle frame inserted inside the utterance, no silence made up, no speech frame
dropped, and the latency measured from when each frame's audio is due (it drifted to -143 s when
the gaps were filled with silence).

Real pipeline runs (the tiny random-weight bundle on the PyTorch runtime, the shipped portrait and
voice), bounded in frames and in time; plus the clock's decisions over an hour of virtual time.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from engine.audio import decode_audio
from engine.avatar import load_portrait, prepare_avatar
from engine.cli import DEMO
from engine.pipeline.pipeline import OutputFrame, Pipeline, PipelineConfig, SegmentEnd
from engine.pipeline.sources import CHUNK_SAMPLES, AudioChunk, PushSource
from engine.runtime import load_runtime
from tests import aio
from tests.tiny import tiny_bundle

FPS = 25
FRAME = 16000 // FPS
SPEECH_S = 3.0  # pushed per piece size
# real time with degradation on (so a frame the clock wrongly thinks behind would be dropped);
# no VAD, so that every frame of the utterance is a speech frame and an idle one is an insertion
LIVE = PipelineConfig(realtime=True, use_vad=False, blinks=False, head_motion=False, watermark=False)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """(runtime, avatar, SPEECH_S seconds of the demo voice at 16 kHz)."""
    d = tmp_path_factory.mktemp("push")
    rt = load_runtime(tiny_bundle(d / "b"), "torch", threads=1)
    av = prepare_avatar(load_portrait(DEMO / "astronaut.jpg"), rt, crop_size_px=rt.bundle.crop_size_px)
    x = decode_audio(DEMO / "demo_voice.wav", sample_rate_hz=16000)[: int(SPEECH_S * 16000)]
    return rt, av, np.ascontiguousarray(x, dtype=np.float32)


async def _push_in_real_time(src: PushSource, x: np.ndarray, piece_ms: int) -> tuple[float, float]:
    """Push ``x`` (16 kHz) in ``piece_ms`` pieces, each at its own start in real time (absolute
    deadlines: piece i at t0 + i * piece_ms), then end the segment; returns (t0, latest push lateness)."""
    loop = asyncio.get_running_loop()
    step = 16 * piece_ms
    t0 = loop.time()
    worst = 0.0
    for i in range(0, len(x), step):
        delay = t0 + i / 16000 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        worst = max(worst, loop.time() - (t0 + i / 16000))
        src.push_audio(x[i : i + step], 16000)  # 16 kHz passes through the source unchanged
    src.end_of_segment()
    return t0, worst


async def _take_until_finished(it, *, timeout_s: float) -> list[OutputFrame]:
    out: list[OutputFrame] = []
    deadline = time.monotonic() + timeout_s
    while True:
        f = await asyncio.wait_for(it.__anext__(), max(0.1, deadline - time.monotonic()))
        out.append(f)
        if f.segment_end is not None:
            return out


def _run_pushed(rt, av, x: np.ndarray, piece_ms: int) -> tuple[list[OutputFrame], float, float, dict]:
    """One real-time run: (frames from the first pushed one to the FINISHED one, t0, the pusher's
    worst lateness in s, the pipeline's metrics snapshot)."""

    async def main():
        src = PushSource(max_buffer_s=10.0)
        async with Pipeline(rt, av, LIVE) as p:
            p.start(src)
            it = p.frames().__aiter__()
            for _ in range(3):  # idle on the clock before anything is pushed
                await asyncio.wait_for(it.__anext__(), 2.0)
            pusher = asyncio.create_task(_push_in_real_time(src, x, piece_ms))
            frames = await _take_until_finished(it, timeout_s=SPEECH_S + 10)
            t0, worst = await pusher
            return frames, t0, worst, p.metrics.snapshot()

    return aio.run(main(), 60)


def _check_pushed(frames: list[OutputFrame], t0: float, snap: dict, x: np.ndarray, piece_ms: int) -> None:
    first = next(i for i, f in enumerate(frames) if f.audio_arrival_s is not None)
    utterance = frames[first:]
    kinds = "".join({"speech": "s", "idle": "i", "dropped": "d"}[f.kind] for f in utterance)
    # one frame per 40 ms of pushed audio (the last one partial), all of them speech: nothing inserted, nothing dropped
    assert kinds == "s" * int(np.ceil(len(x) / FRAME)), kinds
    assert all(f.audio_arrival_s is not None for f in utterance)  # no idle frame of the clock inside
    assert snap["counters"]["frames_dropped"] == 0 and snap["counters"]["idle_frames"] == 3 + first
    idx = [f.index for f in frames]
    assert idx == list(range(idx[0], idx[0] + len(idx)))
    # the frames' audio is the pushed audio, in order, sample for sample (then the last frame's zero padding)
    audio = np.concatenate([f.audio for f in utterance])
    np.testing.assert_array_equal(audio[: len(x)], x)
    assert not audio[len(x) :].any()
    assert utterance[-1].segment_end is SegmentEnd.FINISHED
    # latency from when each frame's audio is due on the pushed audio's own clock: below zero by at
    # most a piece (a frame made from audio pushed ahead of real time), never runaway
    lat = np.array([f.latency_ms for f in utterance])
    assert lat.min() > -piece_ms - 50, lat.min()
    assert np.percentile(lat, 50) < piece_ms + 300, np.percentile(lat, 50)
    # the frames come at the audio's pace, not faster (no silence made up): the last one no earlier than its audio is due
    assert utterance[-1].emitted_s >= t0 + (len(utterance) - 1) / FPS - piece_ms / 1000 - 0.05


@pytest.mark.parametrize("piece_ms", [20, 100, 200, 500])
def test_audio_pushed_in_real_time_pieces_is_never_cut(rig, piece_ms):
    """On a machine shared with other work the test's own pusher can be late (its pieces then really
    come late, and the clock rightly fills) or the stages starved (frames rightly dropped): such a
    run is repeated (3 tries), and only a failure in a run without either counts."""
    rt, av, x = rig
    starved = []
    for _ in range(3):
        frames, t0, worst, snap = _run_pushed(rt, av, x, piece_ms)
        slowest_ms = max(snap["stages"][s]["max_ms"] for s in ("features", "denoise", "compose"))
        if worst < 0.04 and slowest_ms < 2000 / FPS:  # the pusher on time, no stage call over two frame periods
            _check_pushed(frames, t0, snap, x, piece_ms)
            return
        try:
            _check_pushed(frames, t0, snap, x, piece_ms)
            return
        except AssertionError as e:
            starved.append(f"pusher {1000 * worst:.0f} ms late, slowest stage call {slowest_ms:.0f} ms: {str(e)[:200]}")
    pytest.skip("machine too loaded for a real-time run: " + " | ".join(starved))


def test_the_clock_over_an_hour_of_pushed_pieces(rig):
    """The clock's decisions in virtual time: an hour of 100 ms pieces pushed in real time by a
    pusher with jitter (up to 40 ms late) whose clock runs 200 ppm slow. The source is never taken
    for quiet between pieces (no silence made up, no idle frames), and each frame's audio is due
    within a piece of its place on the pusher's own clock (no drift)."""
    rt, av, _ = rig
    p = Pipeline(rt, av, LIVE)
    try:
        rng = np.random.default_rng(0)
        zeros = np.zeros(CHUNK_SAMPLES, np.float32)
        zeros.setflags(write=False)
        quiet_s = p.config.idle_fill_ms / 1000
        t0, s, piece = 1000.0, 0, 10  # chunks per piece
        worst_gap = 0.0
        for i in range(36_000):  # 3600 s
            nominal = t0 + i * 0.1 * (1 + 200e-6)
            arrived = nominal + rng.uniform(0, 0.04)
            # just before this piece arrives, the source is not quiet
            if i:
                worst_gap = max(worst_gap, p._quiet_for(arrived - 1e-6))
            for _ in range(piece):
                p._ingest(AudioChunk(zeros, s / 16000), arrived)
                s += CHUNK_SAMPLES
            k = (s - CHUNK_SAMPLES) // FRAME  # a frame of this piece
            due = p._due(k, arrived)
            assert nominal - 0.001 <= due <= nominal + 0.1 + 0.05, (i, due - nominal)
            # what the emitter would have consumed by now: keep the virtual run's memory flat
            p._k = k
            p._arrivals.clear()
            p._audio.clear()
            p._speech.clear()
            p._pending.clear()
        assert worst_gap < quiet_s, worst_gap
        # once the pieces stop it is quiet, at most the jitter after the last piece's audio ran out
        assert p._quiet_for(arrived + 0.1 + 0.04 + quiet_s + 0.001) > quiet_s
    finally:
        p._executor.shutdown()
        p._compose_executor.shutdown()


def test_a_live_sources_burst_is_audio_that_waited_not_audio_ahead(rig):
    """A WebRTC track's packets queued before the pipeline read them come as a burst (~200 ms at once),
    then one every 20 ms. For a live source that burst is late audio: the frames after it are due
    when their audio arrived (latency >= 0 from there), not 200 ms later as for a push (the
    pipeline latency of track sessions read about -150 ms that way); quiet is since the last chunk."""
    rt, av, _ = rig
    p = Pipeline(rt, av, LIVE)
    try:
        p._live = True  # what start() reads from TrackSource.live
        zeros = np.zeros(CHUNK_SAMPLES, np.float32)
        t0, s = 1000.0, 0
        for _ in range(20):  # 200 ms at once
            p._ingest(AudioChunk(zeros, s / 16000), t0)
            s += CHUNK_SAMPLES
        for i in range(100):  # then real time: 20 ms packets, each 2 chunks
            t = t0 + 0.02 * (i + 1)
            for _ in range(2):
                p._ingest(AudioChunk(zeros, s / 16000), t)
                s += CHUNK_SAMPLES
        k = (s - CHUNK_SAMPLES) // FRAME  # the last frame
        arrived = t0 + 0.02 * 100
        assert p._due(k, arrived) == pytest.approx(arrived, abs=0.045)  # due about when its audio came, not 200 ms on
        assert p._due(k, arrived) <= arrived + 1e-9
        assert p._quiet_for(arrived + 0.05) == pytest.approx(0.05)  # quiet since the last chunk's arrival
    finally:
        p._executor.shutdown()
        p._compose_executor.shutdown()


@pytest.mark.parametrize("gap_s", [0.07, 0.3])
def test_after_an_underrun_the_clock_moves_on_by_the_real_gap(rig, gap_s):
    """The pusher stalls: its audio ran out, silence completes the waiting frames (as the clock does
    past idle_fill_ms), then the audio comes back. It plays after that silence, or from its arrival
    if that is later: due times follow the output's real delay (before: the silence pushed every
    later due time on, and the latency read more negative with each stall, to -143 s)."""
    rt, av, _ = rig
    p = Pipeline(rt, av, LIVE)
    try:
        zeros = np.zeros(CHUNK_SAMPLES, np.float32)
        t0, s = 1000.0, 0
        for i in range(10):  # 1 s in 100 ms pieces, in real time
            for _ in range(10):
                p._ingest(AudioChunk(zeros, s / 16000), t0 + 0.1 * i)
                s += CHUNK_SAMPLES
        p._k = 24  # frames before the tail went out: frame 24 waits for audio past the end
        end = t0 + 1.0  # the audio ran out here
        now = end + p.config.idle_fill_ms / 1000 + 0.001
        assert p._quiet_for(now) > p.config.idle_fill_ms / 1000
        p._fill_silence(p._need(p._k), now)  # what the clock does now
        assert p._n_samples > p._real_samples
        silence_end = t0 + p._n_samples / 16000  # on the utterance's clock
        back = end + gap_s
        s_back = p._n_samples
        for _ in range(50):  # 500 ms at once
            p._ingest(AudioChunk(zeros, p._n_samples / 16000), back)
        plays = max(back, silence_end)  # where the audio that came back starts on the output
        for offset_s in (0.0, 0.2, 0.4):  # frames of that piece: each where it plays, not earlier (not "behind")
            k = -(-(s_back + int(offset_s * 16000)) // FRAME)  # the first frame starting at or after that offset
            on_output = plays + (k * FRAME - s_back) / 16000
            assert p._due(k, back) == pytest.approx(on_output, abs=0.011), (offset_s, p._due(k, back) - on_output)
    finally:
        p._executor.shutdown()
        p._compose_executor.shutdown()


def test_frames_carry_the_pushed_voice_at_full_band_in_step_with_the_16k_copy(rig):
    """A 48 kHz push (a 1 kHz and a 12 kHz tone): each frame's ``playback`` is 40 ms at 48 kHz and
    holds the 12 kHz tone (what the frame's 16 kHz ``audio`` cannot), and the two copies of the
    utterance are not shifted against each other (lips, read from the 16 kHz copy, and sound at offset 0)."""
    rt, av, _ = rig
    t = np.arange(48000) / 48000
    x = (0.3 * np.sin(2 * np.pi * 1000 * t) + 0.3 * np.sin(2 * np.pi * 12000 * t)).astype(np.float32)  # 1 s

    async def main() -> list[OutputFrame]:
        src = PushSource()
        frames: list[OutputFrame] = []
        async with Pipeline(rt, av, LIVE) as p:
            p.start(src)
            for i in range(0, x.size, 960):  # 20 ms pieces, pushed at once (the pipeline paces them)
                src.push_audio(x[i : i + 960], 48000)
            src.end_of_segment()
            src.close()
            async for f in p.frames():
                frames.append(f)
        return frames

    frames = aio.run(main(), 60)
    assert all(f.playback.shape == (48000 // FPS,) and f.playback.dtype == np.float32 for f in frames)
    speech = [f for f in frames if f.audio_arrival_s is not None]
    wide = np.concatenate([f.playback for f in speech])
    narrow = np.concatenate([f.audio for f in speech])
    assert abs(narrow.size - 16000) <= FRAME and wide.size == 3 * narrow.size
    mid = wide[4800:43200]
    s = np.abs(np.fft.rfft(mid * np.hanning(mid.size))) ** 2
    f = np.fft.rfftfreq(mid.size, 1 / 48000)
    assert s[(f > 11800) & (f < 12200)].sum() > 0.3 * s.sum()  # the 12 kHz tone, about half the energy
    low = np.convolve(wide, np.hanning(31) / np.hanning(31).sum(), mode="same")[::3]  # the 1 kHz tone at 16 kHz
    a, b = narrow[1600:14400], low[1600:14400]
    lags = {k: float(np.dot(a[8:-8], b[8 + k : b.size - 8 + k])) for k in range(-8, 9)}
    assert max(lags, key=lags.get) == 0
