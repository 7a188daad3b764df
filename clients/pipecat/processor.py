"""``AvatarVideoProcessor``: a pipecat FrameProcessor that turns a TTS service's audio into the
talking portrait's video and voice, paced and in sync, for any pipecat output transport.

Downstream frames it takes (everything else passes through, in order):

- ``TTSAudioRawFrame``: pushed into the engine (``PushSource.push_audio``; any rate, int16). The
  TTS audio itself does not go on: the avatar's own audio replaces it, frame by frame.
- ``TTSStoppedFrame``: ends the segment (``end_of_segment()``) and is held back until the avatar
  has put out the frame carrying the segment's last audio (``SegmentEnd.FINISHED``); then it
  follows that frame's audio. The output transport turns it into ``BotStoppedSpeakingFrame``
  when that audio has been played, so the bot-speaking state follows the avatar's playback.
- ``InterruptionFrame`` (barge-in): the engine's buffer is cleared (``Pipeline.clear_buffer()``),
  held stop frames are dropped (the transport stops the bot speaking on the interruption
  itself), and the frame goes on.
- ``StartFrame`` / ``EndFrame`` / ``CancelFrame``: the engine's pipeline starts / plays out what
  is queued, then stops / stops now.

What it pushes downstream, one pair per avatar frame (25 fps for the default bundle), each pair
at its slot on a media clock (re-anchored when the engine falls behind by more than
``resync_s``, so there is never a catch-up burst):

- ``OutputImageRawFrame`` (RGB, the portrait's size) with ``sync_with_audio=True``: the output
  transport shows it when the audio before it has been sent, i.e. when its own audio starts.
  Use the transport with ``video_out_enabled=True, video_out_is_live=False,
  video_out_framerate=25`` (with ``sync_with_audio=False`` here: ``video_out_is_live=True``).
- its audio, 40 ms at 48 kHz mono int16 (the TTS's own band: ``OutputFrame.playback``), as ``TTSAudioRawFrame`` while a reply is playing (from
  its first non-silent frame to its end, so the transport reports the bot speaking exactly then).
  Idle frames carry no audio (the transport's ``audio_out_auto_silence`` fills the gaps); with
  ``idle_audio=True`` they carry 40 ms of silence (``OutputAudioRawFrame``), for a transport that
  needs a continuous stream, at the cost of the frames the transport then holds queued (the
  reply's first frame waits behind that silence in the transport's audio queue).

Latency (``avatar bench agent``, docs/benchmarks/voice_agent.json): a reply's first avatar frame is
shown 79 ms p50 / 103 ms p95 after its first TTS audio (20 replies, default bundle, 2 shared cores;
the audio lookahead, 82.5 ms of audio, is ~41 ms of a TTS streaming at 2x real time). The engine's
pipeline is built before the ``StartFrame`` goes on, and a reply's first frame does not wait for the
idle frames' clock (see ``_output``).

Events (``@processor.event_handler(...)``): ``on_segment_finished(processor)`` and
``on_segment_interrupted(processor)``, when the frame with that marker goes downstream.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque

import numpy as np
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from engine.aio import wait_bounded, wait_event
from engine.avatar import Avatar
from engine.pipeline.pipeline import OutputFrame, Pipeline, PipelineConfig, SegmentEnd
from engine.pipeline.sources import PLAYBACK_RATE_HZ, PushSource

log = logging.getLogger("avatar.pipecat")


def _pcm16(audio: np.ndarray) -> bytes:
    """float32 [-1, 1] -> int16 little-endian bytes."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


class AvatarVideoProcessor(FrameProcessor):
    """TTS audio in, the avatar's image frames with their audio out (see the module docstring).

    ``runtime`` and ``avatar`` are loaded once, outside (``engine.runtime.load_runtime``,
    ``engine.avatar.prepare_avatar``); the engine's pipeline is made at ``StartFrame``.
    """

    def __init__(self, runtime, avatar: Avatar, *, config: PipelineConfig | None = None, max_buffer_s: float = 30.0,
                 resync_s: float = 0.2, idle_audio: bool = False, sync_with_audio: bool = True,
                 end_timeout_s: float = 60.0, **kwargs) -> None:
        super().__init__(**kwargs)
        config = config or PipelineConfig(realtime=True)
        if not config.realtime:
            raise ValueError("AvatarVideoProcessor needs PipelineConfig(realtime=True): a voice agent is live")
        self.runtime, self.avatar, self.config = runtime, avatar, config
        self.max_buffer_s = max_buffer_s  # TTS audio queued ahead of the avatar at most this much (a push waits beyond)
        self.resync_s = resync_s  # a frame this late for its slot re-anchors the media clock (no catch-up burst)
        self.idle_audio = idle_audio  # idle frames carry 40 ms of silence (else no audio: the transport's auto silence)
        self.sync_with_audio = sync_with_audio  # images go through the transport's audio queue (shown with their audio)
        self.end_timeout_s = end_timeout_s  # EndFrame: queued speech may play out this long at most
        self.segments_finished = 0  # replies the avatar played to their end
        self.segments_interrupted = 0  # replies cut by an interruption
        self._pipeline: Pipeline | None = None
        self._source: PushSource | None = None
        self._out_task: asyncio.Task | None = None
        self._stops: deque[TTSStoppedFrame] = deque()  # held until the avatar played their segment (FIFO)
        self._contexts: deque[str | None] = deque()  # the TTS context id of each segment not yet finished
        self._segment_open = False  # TTS audio was pushed since the last TTSStoppedFrame
        self._speaking = False  # downstream: a reply's audio is going out as TTSAudioRawFrame
        self._interrupts = 0  # a frame taken before the latest interruption is stale
        self._register_event_handler("on_segment_finished")
        self._register_event_handler("on_segment_interrupted")

    @property
    def pipeline(self) -> Pipeline | None:
        """The engine's pipeline (after StartFrame): its metrics, its lookahead."""
        return self._pipeline

    # -- frames in -------------------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self._make_pipeline()  # before the StartFrame goes on: the pipeline has started when the avatar is ready
            await self.push_frame(frame, direction)
            await self._start()
        elif isinstance(frame, EndFrame):
            await self._finish()
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._stop()
            await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame):
            self._interrupt()
            await self.push_frame(frame, direction)
        elif direction is FrameDirection.DOWNSTREAM and isinstance(frame, TTSAudioRawFrame):
            await self._push_audio(frame)
        elif direction is FrameDirection.DOWNSTREAM and isinstance(frame, TTSStoppedFrame):
            await self._end_segment(frame)
        else:
            await self.push_frame(frame, direction)

    async def _make_pipeline(self) -> None:
        if self._pipeline is not None:
            return
        loop = asyncio.get_running_loop()
        # the generator's setup (portrait warp grids, ~0.2 s) is not for the event loop; done before the StartFrame
        # goes downstream, so that a reply queued when the pipeline started does not wait for it (measured: 185-290 ms)
        self._pipeline = await loop.run_in_executor(None, Pipeline, self.runtime, self.avatar, self.config)

    async def _start(self) -> None:
        await self._make_pipeline()
        if self._source is not None or self._pipeline is None:
            return
        self._source = PushSource(max_buffer_s=self.max_buffer_s)
        self._pipeline.start(self._source)
        self._out_task = self.create_task(self._output(), "avatar-output")

    async def _push_audio(self, frame: TTSAudioRawFrame) -> None:
        if self._source is None:
            return  # before StartFrame: pipecat drops such frames too
        pcm = np.frombuffer(frame.audio, dtype="<i2")  # (n * channels,) interleaved
        if pcm.size < frame.num_channels:
            return
        pcm = pcm[: pcm.size - pcm.size % frame.num_channels]
        if not self._segment_open:
            self._segment_open = True
            self._contexts.append(getattr(frame, "context_id", None))
        while True:
            try:
                self._source.push_audio(pcm, frame.sample_rate, frame.num_channels)
                return
            except BufferError:  # the TTS is max_buffer_s ahead of the avatar: wait (an interruption cancels this)
                await asyncio.sleep(0.02)

    async def _end_segment(self, frame: TTSStoppedFrame) -> None:
        if not self._segment_open or self._source is None:
            await self.push_frame(frame)  # no audio in this segment: nothing to wait for
            return
        self._segment_open = False
        self._stops.append(frame)
        self._source.end_of_segment()

    def _interrupt(self) -> None:
        self._interrupts += 1
        self._stops.clear()
        self._contexts.clear()
        self._segment_open = False
        self._speaking = False
        if self._pipeline is not None:
            self._pipeline.clear_buffer()

    # -- frames out ------------------------------------------------------------------------------

    async def _output(self) -> None:
        """The engine's frames downstream, each at its slot on the media clock.

        A reader takes the engine's frames into a small inbox. An idle frame (the portrait between
        replies) with another frame already waiting behind it is dropped and gives its slot to
        that one: after a reply streamed faster than real time, the engine's idle clock runs
        ahead by the frames buffered for that reply, and the next reply would wait behind them.
        So is an idle frame waiting for its slot when a frame arrives behind it.
        Reply frames are never dropped here: each one plays at its slot. A reply's first frame
        (the first of the engine's timeline after idle frames) does not wait for the idle frames'
        slot: the clock is re-anchored on it (it waited up to a frame period, 0-45 ms, for the
        next idle slot; its audio is its own, so lips and audio stay together).
        """
        assert self._pipeline is not None
        pipeline = self._pipeline
        loop = asyncio.get_running_loop()
        period = 1.0 / pipeline.fps
        inbox: asyncio.Queue = asyncio.Queue(maxsize=2)  # OutputFrame, then None (end) or the exception
        arrived = asyncio.Event()  # the reader put something in the inbox
        reader = self.create_task(self._read(pipeline, inbox, arrived), "avatar-read")
        anchor: float | None = None  # loop time of pts 0
        after_idle = True  # the last frame sent was idle by the clock (no audio of the engine's timeline)
        try:
            while True:
                f = await inbox.get()
                if f is None:
                    return
                if isinstance(f, BaseException):
                    raise f
                idle = f.audio_arrival_s is None and f.segment_end is None and not self._speaking
                if idle and not inbox.empty():
                    if anchor is not None:
                        anchor -= period  # the next frame takes this one's slot
                    continue
                interrupts = self._interrupts
                now = loop.time()
                if (anchor is None or now - (anchor + f.pts_s) > self.resync_s
                        or (after_idle and f.audio_arrival_s is not None and anchor + f.pts_s > now)):
                    anchor = now - f.pts_s  # (re)anchor: this frame's slot is now
                delay = anchor + f.pts_s - now
                if delay > 0 and idle:  # an idle frame gives its slot to a frame that arrives meanwhile
                    arrived.clear()
                    if inbox.empty():
                        await wait_event(arrived, delay)
                    if not inbox.empty():
                        anchor -= period
                        continue
                    delay = anchor + f.pts_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if interrupts != self._interrupts:
                    continue  # taken before an interruption: its audio was cut
                after_idle = f.audio_arrival_s is None
                await self._send(f)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a failed stage of the engine: the agent hears of it
            await self.push_error(f"{self}: the avatar pipeline failed: {e}", exception=e, fatal=True)
        finally:
            if not reader.done():
                await self.cancel_task(reader)

    @staticmethod
    async def _read(pipeline: Pipeline, inbox: asyncio.Queue, arrived: asyncio.Event) -> None:
        try:
            async for f in pipeline.frames():
                await inbox.put(f)
                arrived.set()
        except Exception as e:  # handed to the pacer, which reports it
            await inbox.put(e)
            arrived.set()
            return
        await inbox.put(None)
        arrived.set()

    async def _send(self, f: OutputFrame) -> None:
        h, w = f.image.shape[:2]
        image = OutputImageRawFrame(image=f.image.tobytes(), size=(w, h), format="RGB")
        image.sync_with_audio = self.sync_with_audio
        if f.segment_end is SegmentEnd.INTERRUPTED:
            self._speaking = False
            self.segments_interrupted += 1
            await self._call_event_handler("on_segment_interrupted")
        if not self._speaking and f.audio_arrival_s is not None and f.audio.any():
            self._speaking = True  # the reply's first audible frame
        await self.push_frame(image)
        if self._speaking:
            audio = TTSAudioRawFrame(_pcm16(f.playback), PLAYBACK_RATE_HZ, 1)
            audio.context_id = self._contexts[0] if self._contexts else None
            await self.push_frame(audio)
        elif self.idle_audio:
            await self.push_frame(OutputAudioRawFrame(_pcm16(f.playback), PLAYBACK_RATE_HZ, 1))
        if f.segment_end is SegmentEnd.FINISHED:
            self._speaking = False
            self.segments_finished += 1
            if self._contexts:
                self._contexts.popleft()
            if self._stops:
                await self.push_frame(self._stops.popleft())  # after the segment's last audio
            await self._call_event_handler("on_segment_finished")

    # -- lifecycle -------------------------------------------------------------------------------

    async def _finish(self) -> None:
        """EndFrame: no more audio; what is queued plays out (at most ``end_timeout_s``)."""
        if self._source is not None:
            self._source.close()
        if self._out_task is not None:
            finished, _ = await wait_bounded(asyncio.shield(self._out_task), self.end_timeout_s)
            if not finished:
                log.warning("the avatar did not play out its queued speech within %.0f s; stopping", self.end_timeout_s)
        for stop in self._stops:  # their segments' frames are out (or never will be)
            await self.push_frame(stop)
        self._stops.clear()
        await self._stop()

    async def _stop(self) -> None:
        task, self._out_task = self._out_task, None
        if task is not None and not task.done():
            await self.cancel_task(task)
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            await pipeline.aclose()
        self._source = None

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._stop()

