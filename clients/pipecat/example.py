"""A pipecat voice agent's output side, with the avatar, that runs without any cloud key.

    python -m clients.pipecat.example --replies 3 --out agent.mp4
    python -m clients.pipecat.example --barge-in-after 0.8        # the user interrupts the first reply

The pipeline is ``[WavTTS, AvatarVideoProcessor, LocalOutput, FrameLog]``, run by pipecat's own
``PipelineWorker`` and ``WorkerRunner``:

- ``WavTTS`` stands in for a TTS service: each ``TTSSpeakFrame`` is "spoken" from a wav file
  (the demo voice by default) as a TTS service streams it: ``TTSStartedFrame``, 24 kHz
  ``TTSAudioRawFrame`` pieces of 20 ms (faster than real time), ``TTSStoppedFrame``.
- ``AvatarVideoProcessor`` (``clients.pipecat``) is the avatar.
- ``LocalOutput`` is a ``BaseOutputTransport`` that plays into nothing, in real time (a device
  that takes 40 ms of audio every 40 ms), so pipecat's own output logic runs as it does with a
  real transport: its audio queue, images shown with their audio, bot started / stopped
  speaking, interruptions.
- ``FrameLog`` records what the transport played, in order, with the time.

In a real agent, replace ``WavTTS`` with a TTS service (after an STT and an LLM) and
``LocalOutput`` with a transport's output (Daily, SmallWebRTC, LiveKit, ...), configured with
``video_out_enabled=True, video_out_is_live=False, video_out_framerate=25`` and the portrait's
size.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline as PipecatPipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams
from pipecat.workers.runner import WorkerRunner

from clients.pipecat.processor import AvatarVideoProcessor
from engine.audio.decode import decode_audio
from engine.pipeline.pipeline import PipelineConfig

DEMO_VOICE = Path(__file__).resolve().parents[2] / "engine" / "assets" / "demo" / "demo_voice.wav"
TTS_RATE_HZ = 24000  # what TTS services typically stream
OUT_RATE_HZ = 48000  # the transport's rate here: the avatar's audio as it is (OutputFrame.playback, no resampling)


class WavTTS(FrameProcessor):
    """A TTS stand-in: each ``TTSSpeakFrame`` is answered with a wav file's audio, streamed as a TTS
    service streams (started, 20 ms pieces at ``speed`` x real time, stopped). Frames it pushed
    are timed in ``pushed`` (loop time, frame)."""

    def __init__(self, voice: str | Path = DEMO_VOICE, *, max_s: float | None = None, speed: float = 2.0, **kwargs) -> None:
        super().__init__(**kwargs)
        wave = decode_audio(voice, sample_rate_hz=TTS_RATE_HZ)
        if max_s is not None:
            wave = wave[: int(max_s * TTS_RATE_HZ)]
        self.pcm = (np.clip(wave, -1, 1) * 32767).round().astype("<i2")  # (n,) what every reply says
        self.speed = speed  # how much faster than real time the audio is streamed
        self.pushed: list[tuple[float, Frame]] = []

    async def _say(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        piece = TTS_RATE_HZ // 50  # 20 ms
        context = f"reply-{n}"
        await self._push(TTSStartedFrame(context_id=context))
        t0 = loop.time()
        for i in range(0, len(self.pcm), piece):
            delay = t0 + i / TTS_RATE_HZ / self.speed - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._push(TTSAudioRawFrame(self.pcm[i : i + piece].tobytes(), TTS_RATE_HZ, 1, context_id=context))
        await self._push(TTSStoppedFrame(context_id=context))

    async def _push(self, frame: Frame) -> None:
        self.pushed.append((asyncio.get_running_loop().time(), frame))
        await self.push_frame(frame)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSSpeakFrame):
            await self._say(sum(isinstance(f, TTSStartedFrame) for _, f in self.pushed))
        else:
            await self.push_frame(frame, direction)


class LocalOutput(BaseOutputTransport):
    """An output transport that plays into nothing in real time: each audio write returns when the
    previous chunk has been "played", as a sound device's does; video writes are counted."""

    def __init__(self, params: TransportParams, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self._free_at = 0.0  # loop time when the audio written so far has been played
        self.video_writes = 0

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        loop = asyncio.get_running_loop()
        duration_s = frame.num_frames / frame.sample_rate
        now = loop.time()
        self._free_at = max(self._free_at, now) + duration_s
        if self._free_at - duration_s > now:  # one chunk may wait in the "device"
            await asyncio.sleep(self._free_at - duration_s - now)
        return True

    async def write_video_frame(self, frame: OutputImageRawFrame) -> bool:
        self.video_writes += 1
        return True


class FrameLog(FrameProcessor):
    """After the output transport: every frame it played or emitted, in order, with the loop time."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.frames: list[tuple[float, Frame]] = []
        self.bot_stopped = asyncio.Event()
        self.bot_started = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction is FrameDirection.DOWNSTREAM and not isinstance(frame, StartFrame):
            self.frames.append((asyncio.get_running_loop().time(), frame))
            if isinstance(frame, BotStartedSpeakingFrame):
                self.bot_started.set()
            elif isinstance(frame, BotStoppedSpeakingFrame):
                self.bot_stopped.set()
        await self.push_frame(frame, direction)


@dataclass
class AgentRun:
    """What one run of the example agent produced."""

    tts: WavTTS
    avatar: AvatarVideoProcessor
    output: LocalOutput
    log: FrameLog
    barge_in_s: list[float] = field(default_factory=list)  # loop times of the interruptions sent
    wall_s: float = 0.0  # how long the run took

    def summary(self) -> dict:
        """Per reply: when its first TTS audio was pushed and its first avatar speech frame was
        played, when its last speech audio and its stopped / bot-stopped frames were played."""
        starts = [t for t, f in self.tts.pushed if isinstance(f, TTSStartedFrame)]
        first_tts = [next((t for t, f in self.tts.pushed if isinstance(f, TTSAudioRawFrame) and t >= s), None) for s in starts]
        played = self.log.frames
        speech = [t for t, f in played if isinstance(f, TTSAudioRawFrame)]
        replies = []
        for i, (s, ft) in enumerate(zip(starts, first_tts)):
            end = starts[i + 1] if i + 1 < len(starts) else float("inf")
            sp = [t for t in speech if s <= t < end]
            stopped = [t for t, f in played if isinstance(f, BotStoppedSpeakingFrame) and s <= t < end]
            replies.append({
                "first_tts_audio_s": ft,
                "first_avatar_speech_played_s": sp[0] if sp else None,
                "last_avatar_speech_played_s": sp[-1] if sp else None,
                "bot_stopped_s": stopped[0] if stopped else None,
            })
        return {
            "replies": replies,
            "images_played": sum(isinstance(f, OutputImageRawFrame) for _, f in played),
            "segments_finished": self.avatar.segments_finished,
            "segments_interrupted": self.avatar.segments_interrupted,
            "video_writes": self.output.video_writes,
        }


async def run_agent(runtime, avatar, *, voice: str | Path = DEMO_VOICE, replies: int = 1, max_reply_s: float | None = 3.0,
                    barge_in_after_s: float | None = None, config: PipelineConfig | None = None,
                    tts_speed: float = 2.0, idle_audio: bool = False, timeout_s: float = 120.0,
                    processor_cls: type[AvatarVideoProcessor] = AvatarVideoProcessor) -> AgentRun:
    """Run the agent: ``replies`` replies one after the other (each waits until the bot stopped
    speaking), the first one interrupted ``barge_in_after_s`` after the bot started speaking if
    given, then an EndFrame. Bounded by ``timeout_s`` (the pipeline is cancelled past it).
    ``processor_cls``: the avatar processor (a subclass that records its frames: benchmarks/voice_agent.py)."""
    tts = WavTTS(voice, max_s=max_reply_s, speed=tts_speed)
    av = processor_cls(runtime, avatar, config=config, idle_audio=idle_audio)
    h, w = avatar.image.shape[:2]
    out = LocalOutput(TransportParams(audio_out_enabled=True, audio_out_sample_rate=OUT_RATE_HZ, audio_out_end_silence_secs=0,
                                      video_out_enabled=True, video_out_is_live=False, video_out_width=w, video_out_height=h,
                                      video_out_framerate=runtime.bundle.fps))
    log = FrameLog()
    worker = PipelineWorker(PipecatPipeline([tts, av, out, log]), params=PipelineParams(audio_out_sample_rate=OUT_RATE_HZ),
                            cancel_on_idle_timeout=False, idle_timeout_secs=None)
    run = AgentRun(tts, av, out, log)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(_worker, _frame):
        started.set()

    async def drive() -> None:
        await started.wait()
        for i in range(replies):
            log.bot_started.clear()
            log.bot_stopped.clear()
            await worker.queue_frame(TTSSpeakFrame(text=f"reply {i}"))
            if i == 0 and barge_in_after_s is not None:
                await log.bot_started.wait()
                await asyncio.sleep(barge_in_after_s)
                run.barge_in_s.append(asyncio.get_running_loop().time())
                await worker.queue_frame(InterruptionFrame())
            await log.bot_stopped.wait()
            await asyncio.sleep(0.2)  # the user's turn
        await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    t0 = time.monotonic()
    driver = asyncio.ensure_future(drive())
    try:
        await asyncio.wait_for(runner.run(), timeout_s)
    finally:
        if not driver.done():
            driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
    if driver.done() and not driver.cancelled() and driver.exception() is not None:
        raise driver.exception()
    run.wall_s = time.monotonic() - t0
    return run


def _write_mp4(run: AgentRun, path: Path, fps: int) -> None:
    """The played images and audio, as the transport played them, into an mp4."""
    from engine.media.mp4 import Mp4Writer

    images = [f for _, f in run.log.frames if isinstance(f, OutputImageRawFrame)]
    audio = [np.frombuffer(f.audio, "<i2") for _, f in run.log.frames if isinstance(f, OutputAudioRawFrame)]
    if not images:
        raise SystemExit("no frames were played")
    w, h = images[0].size
    pcm = np.concatenate(audio).astype(np.float32) / 32768.0 if audio else None
    with Mp4Writer(path, fps=fps, width=w, height=h, audio=pcm, audio_rate_hz=OUT_RATE_HZ) as mp4:
        for f in images:
            mp4.write(np.frombuffer(f.image, np.uint8).reshape(h, w, 3))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="A pipecat agent's output with the avatar, no cloud keys (a wav stands in for the TTS).")
    ap.add_argument("--portrait", default=str(DEMO_VOICE.parent / "astronaut.jpg"))
    ap.add_argument("--voice", default=str(DEMO_VOICE), help="what the TTS stand-in says (any audio file)")
    ap.add_argument("--bundle", default=None, help="model bundle (default: the shipped one)")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"])
    ap.add_argument("--replies", type=int, default=2)
    ap.add_argument("--reply-s", type=float, default=3.0, help="seconds of the voice file per reply")
    ap.add_argument("--barge-in-after", type=float, default=None, metavar="S",
                    help="interrupt the first reply S seconds after the bot started speaking")
    ap.add_argument("--out", type=Path, default=None, help="write what was played to this mp4")
    ap.add_argument("--timeout-s", type=float, default=120.0)
    a = ap.parse_args(argv)

    from engine.avatar import load_portrait, prepare_avatar
    from engine.runtime import load_runtime

    rt = load_runtime(a.bundle, a.backend)
    avatar = prepare_avatar(load_portrait(a.portrait), rt, crop_size_px=rt.bundle.crop_size_px)
    run = asyncio.run(run_agent(rt, avatar, voice=a.voice, replies=a.replies, max_reply_s=a.reply_s,
                                barge_in_after_s=a.barge_in_after, timeout_s=a.timeout_s))
    if a.out is not None:
        _write_mp4(run, a.out, rt.bundle.fps)
    print(json.dumps(run.summary(), indent=2))


if __name__ == "__main__":
    main()
