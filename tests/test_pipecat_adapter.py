"""The pipecat adapter (clients/pipecat) in a real pipecat pipeline, run by pipecat's own
PipelineWorker and WorkerRunner: the example agent's wav TTS stand-in, the avatar, a
BaseOutputTransport that plays in real time, and a log of what it played. No cloud keys, no
network. The engine is the tiny random-weight bundle; every run is bounded in time.

Skipped where the ``[pipecat]`` extra is not installed (``scripts/install.sh --dev --adapters``: pipecat-ai needs
protobuf>=5, which mediapipe 0.10.21's metadata forbids, so it is installed as a second step).
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="pipecat-ai is not installed: scripts/install.sh --dev --adapters (a second pip step: it needs protobuf>=5)")

from pipecat.frames.frames import (  # noqa: E402
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)

from clients.pipecat.example import DEMO_VOICE, run_agent  # noqa: E402
from engine.audio import decode_audio  # noqa: E402
from engine.avatar import load_portrait, prepare_avatar  # noqa: E402
from engine.cli import DEMO  # noqa: E402
from engine.pipeline.pipeline import PipelineConfig  # noqa: E402
from engine.runtime import load_runtime  # noqa: E402
from tests import aio  # noqa: E402
from tests.tiny import tiny_bundle  # noqa: E402

FPS = 25
CFG = PipelineConfig(realtime=True, blinks=False, head_motion=False, watermark=False)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    rt = load_runtime(tiny_bundle(tmp_path_factory.mktemp("pc") / "b"), "torch", threads=1)
    av = prepare_avatar(load_portrait(DEMO / "astronaut.jpg"), rt, crop_size_px=rt.bundle.crop_size_px)
    return rt, av


def _media(frames) -> list:
    return [(t, f) for t, f in frames if isinstance(f, (OutputImageRawFrame, OutputAudioRawFrame))]


@pytest.mark.parametrize("idle_audio", [False, True], ids=["idle-without-audio", "idle-with-silence"])
def test_two_replies_play_as_image_frames_with_their_audio_and_end_after_their_last_audio(rig, idle_audio):
    rt, av = rig
    reply_s = 1.0
    run = aio.run(run_agent(rt, av, replies=2, max_reply_s=reply_s, config=CFG, idle_audio=idle_audio, timeout_s=60), 90)
    played = run.log.frames
    h, w = av.image.shape[:2]

    # images in order, each speech image followed by exactly its own 40 ms of audio (idle images:
    # by 40 ms of silence with idle_audio, else by none)
    media = _media(played)
    kinds = "".join("i" if isinstance(f, OutputImageRawFrame) else "a" for _, f in media)
    assert kinds.count("a") > 2 * reply_s * FPS - 4 and "aa" not in kinds and not kinds.startswith("a"), kinds[:200]
    if idle_audio:
        assert kinds == "ia" * (len(kinds) // 2), kinds[:200]
    assert all(f.size == (w, h) and f.format == "RGB" and len(f.image) == w * h * 3 for _, f in media if isinstance(f, OutputImageRawFrame))
    assert all(f.num_frames == 48000 // FPS and f.sample_rate == 48000 for _, f in media if isinstance(f, OutputAudioRawFrame))
    times = [t for t, _ in media if True]
    assert times == sorted(times)

    # each reply: bot started before its first speech audio, its audio whole and in order, then
    # the TTS stopped frame and bot stopped right after its last speech audio
    order = [type(f) for _, f in played]
    starts = [i for i, c in enumerate(order) if c is TTSStartedFrame]
    assert len(starts) == 2
    ref = decode_audio(DEMO_VOICE, sample_rate_hz=48000)[: int(reply_s * 48000)]
    summary = run.summary()
    for n, s in enumerate(starts):
        e = starts[n + 1] if n + 1 < len(starts) else len(order)
        part = played[s:e]
        speech = [i for i, (_, f) in enumerate(part) if type(f) is TTSAudioRawFrame]
        assert speech, f"reply {n}: no speech audio was played"
        started = [i for i, (_, f) in enumerate(part) if isinstance(f, BotStartedSpeakingFrame)]
        stopped = [i for i, (_, f) in enumerate(part) if isinstance(f, TTSStoppedFrame)]
        bot_stopped = [i for i, (_, f) in enumerate(part) if isinstance(f, BotStoppedSpeakingFrame)]
        assert len(started) == 1 and started[0] < speech[0]
        assert len(stopped) == 1 and stopped[0] > speech[-1], "the segment end came before the reply's last audio"
        assert len(bot_stopped) == 1 and bot_stopped[0] > speech[-1]
        # no audio of the reply between its last speech audio and its end: the end is on that frame
        between = [f for _, f in part[speech[-1] + 1 : stopped[0]] if isinstance(f, OutputAudioRawFrame)]
        assert not between
        t_last = part[speech[-1]][0]
        assert part[bot_stopped[0]][0] - t_last < 1.0 / FPS, "bot stopped speaking more than a frame after the last audio"
        # the reply's audio, as played: the TTS's audio at 48 kHz (same energy, aligned within a frame)
        pcm = np.concatenate([np.frombuffer(f.audio, "<i2") for _, f in part[speech[0] : speech[-1] + 1]
                              if isinstance(f, OutputAudioRawFrame)]).astype(np.float64) / 32768.0
        lead = next(i for i, x in enumerate(np.abs(ref) > 1e-3) if x)  # the reply's first audible sample
        assert float(np.sum(pcm**2)) == pytest.approx(float(np.sum(ref[lead:] ** 2)), rel=0.05)
        p0 = next(i for i, x in enumerate(np.abs(pcm) > 1e-3) if x)
        a, b = pcm[p0 : p0 + 12000], ref[max(0, lead - 480) : lead + 12000 + 480]  # 0.25 s, +-10 ms of alignment
        xc = np.correlate(b, a, mode="valid")
        assert xc.max() / np.sqrt(np.sum(a**2) * np.sum(ref[lead : lead + 12000] ** 2)) > 0.95
        r = summary["replies"][n]
        assert r["first_avatar_speech_played_s"] - r["first_tts_audio_s"] < 0.6  # loose here; the figure is reported
    assert run.avatar.segments_finished == 2 and run.avatar.segments_interrupted == 0


def test_an_interruption_cuts_the_reply_and_the_avatar_is_idle_within_two_frames(rig):
    rt, av = rig
    run = aio.run(run_agent(rt, av, replies=1, max_reply_s=3.0, barge_in_after_s=0.5, config=CFG, timeout_s=60), 90)
    assert len(run.barge_in_s) == 1
    t_barge = run.barge_in_s[0]
    played = run.log.frames
    speech_after = [t for t, f in played if type(f) is TTSAudioRawFrame and t > t_barge + 2.0 / FPS]
    assert not speech_after, f"{len(speech_after)} speech frames were played more than 2 frames after the barge-in"
    bot_stopped = [t for t, f in played if isinstance(f, BotStoppedSpeakingFrame)]
    assert len(bot_stopped) == 1 and 0 <= bot_stopped[0] - t_barge < 2.0 / FPS
    # the pictures go on (idle, with silence), and the cut reply never reports that it finished
    images_after = [t for t, f in played if isinstance(f, OutputImageRawFrame) and t > t_barge]
    assert len(images_after) >= 3
    assert not any(isinstance(f, TTSStoppedFrame) for _, f in played)
    assert run.avatar.segments_interrupted == 1 and run.avatar.segments_finished == 0
    # it played less than the reply: it was cut
    speech = [f for _, f in played if type(f) is TTSAudioRawFrame]
    assert 0 < len(speech) < 3.0 * FPS - 10


def test_the_example_agent_has_a_command_line():
    from clients.pipecat.example import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
