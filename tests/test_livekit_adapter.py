"""The LiveKit adapter (clients/livekit) against livekit-agents' own classes, without a server:
the generator fed ``rtc.AudioFrame``s and read as ``AvatarRunner`` reads it, then inside a real
``AvatarRunner`` (its ``AVSynchronizer``, ``rtc.AudioSource`` / ``VideoSource``) with
``QueueAudioOutput`` as the agent's audio output; only the room is a stand-in (it publishes
nothing). The engine is the tiny random-weight bundle; every loop is bounded in time.

Skipped where the ``[livekit]`` extra is not installed (``scripts/install.sh --dev --adapters``: livekit needs
protobuf>=5, which mediapipe 0.10.21's metadata forbids, so it is installed as a second step).
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("livekit.agents", reason="livekit-agents is not installed: scripts/install.sh --dev --adapters (a second pip step: it needs protobuf>=5)")

from livekit import rtc  # noqa: E402
from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarRunner, QueueAudioOutput  # noqa: E402

from clients.livekit import AvatarVideoGenerator  # noqa: E402
from clients.livekit.local_room import LocalRoom  # noqa: E402
from engine.audio import decode_audio  # noqa: E402
from engine.avatar import load_portrait, prepare_avatar  # noqa: E402
from engine.cli import DEMO  # noqa: E402
from engine.pipeline.pipeline import PipelineConfig  # noqa: E402
from engine.runtime import load_runtime  # noqa: E402
from tests import aio  # noqa: E402
from tests.tiny import tiny_bundle  # noqa: E402

FPS = 25
TTS_HZ = 24000
PIECE = TTS_HZ // 50  # 20 ms, as the agent's TTS frames
CFG = PipelineConfig(realtime=True, blinks=False, head_motion=False, watermark=False)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    rt = load_runtime(tiny_bundle(tmp_path_factory.mktemp("lk") / "b"), "torch", threads=1)
    av = prepare_avatar(load_portrait(DEMO / "astronaut.jpg"), rt, crop_size_px=rt.bundle.crop_size_px)
    x = decode_audio(DEMO / "demo_voice.wav", sample_rate_hz=TTS_HZ)
    reply = (np.clip(x[:TTS_HZ], -1, 1) * 32767).round().astype(np.int16)  # 1 s
    return rt, av, reply


def _frames(pcm: np.ndarray) -> list[rtc.AudioFrame]:
    return [rtc.AudioFrame(pcm[i : i + PIECE].tobytes(), TTS_HZ, 1, len(pcm[i : i + PIECE])) for i in range(0, len(pcm), PIECE)]


async def _feed(gen: AvatarVideoGenerator, pcm: np.ndarray, *, end: bool = True, speed: float = 2.0) -> None:
    """push_audio as the runner's reader does, ``speed`` x real time, then AudioSegmentEnd."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for k, f in enumerate(_frames(pcm)):
        delay = t0 + k * PIECE / TTS_HZ / speed - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await gen.push_audio(f)
    if end:
        await gen.push_audio(AudioSegmentEnd())


def test_the_generator_yields_video_with_its_audio_and_the_segment_end_after_the_last_audio(rig):
    rt, av, reply = rig
    h, w = av.image.shape[:2]

    async def main():
        gen = AvatarVideoGenerator(rt, av, config=CFG)
        items: list[tuple[float, object]] = []
        try:
            it = gen.__aiter__()
            feeder = None
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                item = await asyncio.wait_for(it.__anext__(), 2.0)
                items.append((time.monotonic(), item))
                if feeder is None and len(items) >= 3:  # idle first, then a reply
                    feeder = asyncio.ensure_future(_feed(gen, reply))
                if isinstance(item, AudioSegmentEnd):
                    break
            for _ in range(5):  # the frames after the end: idle, video only
                items.append((time.monotonic(), await asyncio.wait_for(it.__anext__(), 2.0)))
            await feeder
            await it.aclose()
        finally:
            await gen.aclose()
        return items, gen

    items, gen = aio.run(main(), 60)
    kinds = "".join("v" if isinstance(x, rtc.VideoFrame) else "a" if isinstance(x, rtc.AudioFrame) else "E" for _, x in items)
    assert kinds.count("E") == 1 and kinds.startswith("vvv")
    # every audio frame follows its own video frame; the end follows the last audio frame at once
    assert "aa" not in kinds and not kinds.startswith("a")
    assert kinds.index("E") == kinds.rindex("a") + 1, kinds
    assert "a" not in kinds[kinds.index("E") :]
    videos = [x for _, x in items if isinstance(x, rtc.VideoFrame)]
    assert all(v.width == w and v.height == h and v.type == rtc.VideoBufferType.RGBA for v in videos)
    audio = [x for _, x in items if isinstance(x, rtc.AudioFrame)]
    assert all(a.sample_rate == 48000 and a.num_channels == 1 and a.samples_per_channel == 48000 // FPS for a in audio)
    pcm = np.concatenate([np.frombuffer(a.data, np.int16) for a in audio]).astype(np.float64) / 32768.0
    ref = reply.astype(np.float64) / 32768.0
    assert float(np.sum(pcm**2)) == pytest.approx(float(np.sum(ref**2)) * 48000 / TTS_HZ, rel=0.05)  # the whole reply
    assert gen.segments_finished == 1


def test_clear_buffer_cuts_the_reply_without_a_segment_end(rig):
    rt, av, reply = rig
    long_reply = np.tile(reply, 4)  # 4 s

    async def main():
        gen = AvatarVideoGenerator(rt, av, config=CFG)
        items: list[tuple[float, object]] = []
        try:
            it = gen.__aiter__()
            feeder = asyncio.ensure_future(_feed(gen, long_reply, speed=4.0))
            n_audio = 0
            while n_audio < 10:
                item = await asyncio.wait_for(it.__anext__(), 2.0)
                n_audio += isinstance(item, rtc.AudioFrame)
            await feeder
            t_clear = time.monotonic()
            gen.clear_buffer()
            for _ in range(20):
                items.append((time.monotonic(), await asyncio.wait_for(it.__anext__(), 2.0)))
            await it.aclose()
        finally:
            await gen.aclose()
        return t_clear, items, gen

    t_clear, items, gen = aio.run(main(), 60)
    assert not any(isinstance(x, AudioSegmentEnd) for _, x in items)  # the runner reports the interruption itself
    assert not any(isinstance(x, rtc.AudioFrame) for _, x in items), "audio of the cut reply after clear_buffer()"
    assert items[0][0] - t_clear < 2.0 / FPS + 0.05  # the next (idle) frame comes within about a frame
    assert gen.segments_interrupted == 1 and gen.segments_finished == 0


def test_avatar_runner_reports_playback_finished_and_interrupted_from_the_avatars_playback(rig):
    rt, av, reply = rig

    async def main():
        gen = AvatarVideoGenerator(rt, av, config=CFG)
        agent_out = QueueAudioOutput(wait_playback_start=True)  # the agent's side: started when the avatar starts
        room = LocalRoom()
        runner = AvatarRunner(room, audio_recv=agent_out, video_gen=gen, options=gen.avatar_options())
        events: list[tuple[float, str, object]] = []
        agent_out.on("playback_started", lambda ev: events.append((time.monotonic(), "started", ev)))
        agent_out.on("playback_finished", lambda ev: events.append((time.monotonic(), "finished", ev)))
        await runner.start()
        try:
            t0 = time.monotonic()
            for f in _frames(reply):  # a whole reply, as fast as the agent's TTS gives it
                await agent_out.capture_frame(f)
            agent_out.flush()
            first = await asyncio.wait_for(agent_out.wait_for_playout(), 10)
            t_first = time.monotonic()
            for f in _frames(np.tile(reply, 3)):  # a 3 s reply, cut after 0.5 s
                await agent_out.capture_frame(f)
            await asyncio.sleep(0.5)
            agent_out.clear_buffer()
            second = await asyncio.wait_for(agent_out.wait_for_playout(), 10)
        finally:
            await runner.aclose()
            await gen.aclose()
        return t0, t_first, first, second, events, room

    t0, t_first, first, second, events, room = aio.run(main(), 60)
    assert not first.interrupted and first.playback_position == pytest.approx(1.0, abs=1.5 / FPS)
    assert 0.9 <= t_first - t0 < 2.5  # played out in real time, not as fast as it was pushed
    assert second.interrupted and 0.2 < second.playback_position < 1.0
    assert [e[1] for e in events] == ["started", "finished", "started", "finished"]
    assert len(room.local_participant.published) == 2  # the runner published its audio and video tracks


def test_the_example_worker_has_a_command_line():
    from clients.livekit.worker import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
