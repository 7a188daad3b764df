"""Segment ends on the output: ``end_of_segment()`` on the input becomes ``SegmentEnd.FINISHED`` on
the frame that carries the segment's last audio, ``clear_buffer()`` that cuts a segment becomes
``SegmentEnd.INTERRUPTED`` on the next frame, and every segment ends exactly once.

Real pipeline runs (the tiny random-weight bundle on the PyTorch runtime, the shipped portrait
and voice), audio pushed as a TTS engine streams it: 24 kHz int16 in 20 ms pieces, slightly ahead
of real time. Every loop is bounded in frames and in time; timing is asserted loosely.
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
from engine.pipeline.sources import FileSource, PushSource
from engine.runtime import load_runtime
from tests import aio
from tests.tiny import tiny_bundle

FPS = 25
FRAME = 16000 // FPS
TTS_HZ = 24000  # what TTS engines typically stream
PIECE = TTS_HZ // 50  # 20 ms pieces
# realtime, no degradation, no blinks or sway: what is asserted is the audio and the markers
LIVE = PipelineConfig(realtime=True, degrade=False, blinks=False, head_motion=False, watermark=False)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """(runtime, avatar, two replies of the demo voice at 24 kHz int16 that end in speech)."""
    d = tmp_path_factory.mktemp("seg")
    rt = load_runtime(tiny_bundle(d / "b"), "torch", threads=1)
    av = prepare_avatar(load_portrait(DEMO / "astronaut.jpg"), rt, crop_size_px=rt.bundle.crop_size_px)
    x = decode_audio(DEMO / "demo_voice.wav", sample_rate_hz=TTS_HZ)
    pcm = (np.clip(x, -1, 1) * 32767).round().astype(np.int16)
    replies = [pcm[: TTS_HZ // 2], pcm[int(0.96 * TTS_HZ) : int(1.46 * TTS_HZ)]]  # 0.5 s each, loud at the end
    return rt, av, replies


async def _push_paced(src: PushSource, pcm: np.ndarray, *, lead_s: float = 0.04) -> float:
    """Push ``pcm`` in 20 ms pieces on the loop's clock, ``lead_s`` ahead of real time, then end the
    segment; returns the loop time the reply's audio runs out in real time."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i in range(0, len(pcm), PIECE):
        delay = t0 + i / TTS_HZ - lead_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        src.push_audio(pcm[i : i + PIECE], TTS_HZ)
    src.end_of_segment()
    return t0 + len(pcm) / TTS_HZ


async def _take(it, n: int | None = None, *, until=None, timeout_s: float = 10.0) -> list[OutputFrame]:
    """Frames from ``it`` until ``n`` were taken or ``until(frame)`` holds (that frame included)."""
    out: list[OutputFrame] = []
    deadline = time.monotonic() + timeout_s
    while n is None or len(out) < n:
        f = await asyncio.wait_for(it.__anext__(), max(0.1, deadline - time.monotonic()))
        out.append(f)
        if until is not None and until(f):
            break
    return out


def _reply16() -> np.ndarray:
    """0.5 s of the demo voice at 16 kHz (pushed at 16 kHz it passes through the source unchanged)."""
    return decode_audio(DEMO / "demo_voice.wav", sample_rate_hz=16000)[:8000]


def _markers(frames: list[OutputFrame]) -> list[tuple[int, SegmentEnd]]:
    return [(f.index, f.segment_end) for f in frames if f.segment_end is not None]


def _assert_last_audio_on_marker(frames: list[OutputFrame], marker_pos: int) -> None:
    """The marked frame carries audio, and no frame after it (up to the list's end) carries any:
    so the segment's last audio is on the marked frame."""
    assert np.abs(frames[marker_pos].audio).max() > 0.01, "the FINISHED frame carries no audio"
    after = [f.index for f in frames[marker_pos + 1 :] if f.audio.any()]
    assert not after, f"audio after the FINISHED frame, in frames {after}"


def test_a_file_in_fast_mode_finishes_on_its_last_frame(rig, tmp_path):
    import wave

    rt, av, replies = rig
    path = tmp_path / "reply.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(TTS_HZ)
        w.writeframes(replies[0].tobytes())

    async def main():
        async with Pipeline(rt, av, PipelineConfig(realtime=False, blinks=False, head_motion=False, watermark=False)) as p:
            p.start(FileSource(path, realtime=False))
            return [f async for f in p.frames()], p

    frames, p = aio.run(main(), 60)
    assert _markers(frames) == [(frames[-1].index, SegmentEnd.FINISHED)]
    assert frames[-1].segment_end == "finished"  # a str enum: JSON and logs see the plain word
    assert p.metrics.counter("segments_finished").value == 1


def test_replies_pushed_in_real_time_pieces_finish_on_the_frame_with_their_last_audio(rig):
    rt, av, replies = rig

    async def main():
        src = PushSource(max_buffer_s=10.0)
        async with Pipeline(rt, av, LIVE) as p:
            p.start(src)
            it = p.frames().__aiter__()
            before = await _take(it, 3)  # idle on the clock, nothing pushed yet
            results = []
            for reply in replies:
                pusher = asyncio.create_task(_push_paced(src, reply))
                frames = await _take(it, until=lambda f: f.segment_end is not None)
                audio_end_s = await pusher
                frames += await _take(it, 4)  # the frames after the end: idle, silent
                results.append((frames, audio_end_s))
            return before, results, p

    before, results, p = aio.run(main(), 90)
    assert not _markers(before)
    for reply, (frames, audio_end_s) in zip(replies, results):
        marks = _markers(frames)
        assert [m for _, m in marks] == [SegmentEnd.FINISHED], marks  # exactly one end per reply
        pos = next(i for i, f in enumerate(frames) if f.segment_end is not None)
        _assert_last_audio_on_marker(frames, pos)
        # the reply's frames, in order, with their own audio: as much audio as was pushed (16 kHz)
        first = next(i for i, f in enumerate(frames) if f.audio_arrival_s is not None)
        idx = [f.index for f in frames]
        assert idx == list(range(idx[0], idx[0] + len(idx)))
        carried = sum(float(np.sum(f.audio.astype(np.float64) ** 2)) for f in frames[first : pos + 1])  # energy at 16 kHz
        pushed = float(np.sum((reply.astype(np.float64) / 32768.0) ** 2)) * 16000 / TTS_HZ
        assert carried == pytest.approx(pushed, rel=0.03)
        # the end is reported soon after the reply's audio runs out in real time (tail fill: 60 ms)
        assert frames[pos].emitted_s - audio_end_s < 0.5
    assert p.metrics.counter("segments_finished").value == 2
    assert p.metrics.counter("segments_interrupted").value == 0


def test_an_end_told_after_the_last_frame_went_out_marks_the_next_frame(rig):
    rt, av, replies = rig

    async def main():
        src = PushSource(max_buffer_s=10.0)
        async with Pipeline(rt, av, LIVE) as p:
            p.start(src)
            it = p.frames().__aiter__()
            # the whole reply at once, its end not told; at 16 kHz, so that no resampler tail is
            # left to flush at the end (that tail would be the segment's last audio, in a frame of its own)
            src.push_audio(_reply16(), 16000)
            seen_audio = False

            def idle_after_audio(f: OutputFrame) -> bool:
                nonlocal seen_audio
                seen_audio = seen_audio or f.audio.any()
                return seen_audio and f.kind == "idle" and f.audio_arrival_s is None

            frames = await _take(it, until=idle_after_audio)  # the reply is over on the output
            src.end_of_segment()  # only now does the agent say so
            frames += await _take(it, 3)
            return frames

    frames = aio.run(main(), 60)
    marks = _markers(frames)
    assert [m for _, m in marks] == [SegmentEnd.FINISHED], marks
    pos = next(i for i, f in enumerate(frames) if f.segment_end is not None)
    assert frames[pos].kind == "idle" and not frames[pos].audio.any()
    assert not any(f.audio.any() for f in frames[pos:])


def test_barge_in_marks_interrupted_once_and_the_cut_reply_never_finishes(rig):
    rt, av, replies = rig
    long_reply = np.tile(replies[0], 10)  # 5 s pushed at once: the pipeline's chunk queue fills up

    async def main():
        src = PushSource(max_buffer_s=30.0)
        async with Pipeline(rt, av, LIVE) as p:
            p.start(src)
            it = p.frames().__aiter__()
            src.push_audio(long_reply, TTS_HZ)
            src.end_of_segment()  # the end is told: had it played out, it would finish
            with_audio = 0

            def eight_with_audio(f: OutputFrame) -> bool:
                nonlocal with_audio
                with_audio += bool(f.audio.any())
                return with_audio >= 8

            frames = await _take(it, until=eight_with_audio)
            p.clear_buffer()
            after = await _take(it, 15)  # 0.6 s: the cut reply must not come back, nor finish
            pusher = asyncio.create_task(_push_paced(src, replies[1]))
            after += await _take(it, until=lambda f: f.segment_end is not None)
            await pusher
            after += await _take(it, 3)
            return frames, after, p

    frames, after, p = aio.run(main(), 90)
    assert not _markers(frames)  # nothing ended before the barge-in
    assert after[0].segment_end is SegmentEnd.INTERRUPTED and after[0].kind == "idle"
    marks = [m for _, m in _markers(after)]
    assert marks == [SegmentEnd.INTERRUPTED, SegmentEnd.FINISHED], marks  # the cut reply never finishes
    cut = after[:15]
    assert not any(f.audio.any() for f in cut), "audio of the cut reply came after the barge-in"
    pos = next(i for i, f in enumerate(after) if f.segment_end is SegmentEnd.FINISHED)
    _assert_last_audio_on_marker(after, pos)
    assert p.metrics.counter("segments_interrupted").value == 1
    assert p.metrics.counter("segments_finished").value == 1


def test_clear_buffer_with_nothing_playing_marks_nothing(rig):
    rt, av, replies = rig

    async def main():
        src = PushSource(max_buffer_s=10.0)
        async with Pipeline(rt, av, LIVE) as p:
            p.start(src)
            it = p.frames().__aiter__()
            frames = await _take(it, 3)
            p.clear_buffer()  # idle: nothing to cut
            frames += await _take(it, 3)
            src.push_audio(replies[0], TTS_HZ)
            src.end_of_segment()
            frames += await _take(it, until=lambda f: f.segment_end is not None)
            frames += await _take(it, 3)  # the reply is over: a barge-in now cuts nothing
            p.clear_buffer()
            frames += await _take(it, 3)
            return frames

    frames = aio.run(main(), 60)
    assert [m for _, m in _markers(frames)] == [SegmentEnd.FINISHED]


def test_a_slow_compositor_still_delivers_a_replys_last_frame_and_its_end(rig):
    """Stage B slower than the frame period: the reply's last frames are still being composed when
    the input has been quiet long enough for the clock to go idle. They are due (not cut by a
    barge-in), so they come out, with the reply's end."""
    rt, av, replies = rig
    x16 = _reply16()

    async def main():
        src = PushSource(max_buffer_s=10.0)
        async with Pipeline(rt, av, LIVE) as p:
            inner = p.gen.compose

            def slow(*a, **kw):
                time.sleep(0.07)  # > the 40 ms frame period (sleep releases the GIL, as the runtimes do)
                return inner(*a, **kw)

            p.gen.compose = slow
            p.start(src)
            it = p.frames().__aiter__()
            src.push_audio(x16, 16000)
            src.end_of_segment()
            frames = await _take(it, until=lambda f: f.segment_end is not None, timeout_s=20)
            frames += await _take(it, 3)
            return frames

    frames = aio.run(main(), 60)
    assert [m for _, m in _markers(frames)] == [SegmentEnd.FINISHED]
    audio = np.concatenate([f.audio for f in frames if f.audio_arrival_s is not None])
    np.testing.assert_array_equal(audio[: len(x16)], x16)  # every sample of the reply, in order
    pos = next(i for i, f in enumerate(frames) if f.segment_end is not None)
    _assert_last_audio_on_marker(frames, pos)
