"""``AvatarVideoGenerator``: livekit-agents' ``VideoGenerator`` on the engine's pipeline.

The protocol (``livekit/agents/voice/avatar/_types.py`` and ``_runner.py``, livekit-agents 1.x):

- ``push_audio(frame)``: the agent's TTS audio (``rtc.AudioFrame``, any rate and channel count,
  int16), then ``AudioSegmentEnd()`` when the reply's audio is complete (the agent flushed).
  Here: ``PushSource.push_audio`` / ``end_of_segment()``.
- ``clear_buffer()``: barge-in. Here: ``Pipeline.clear_buffer()``. The runner itself reports the
  interrupted playback to the agent, so no ``AudioSegmentEnd`` follows for a cut segment (the
  engine's ``SegmentEnd.INTERRUPTED`` marker is consumed here).
- ``async for item in generator``: one ``rtc.VideoFrame`` (RGBA, the portrait's size) per engine
  frame, followed, while a reply is playing, by that frame's own 40 ms of audio
  (``rtc.AudioFrame``, 16 kHz mono int16), and by ``AudioSegmentEnd()`` right after the audio of
  the frame that carries the reply's last audio (``SegmentEnd.FINISHED``). Idle frames (the
  portrait between replies) are video only, as in livekit's own avatar examples, so the runner's
  playback position and its ``playback_started`` / ``playback_finished`` follow the reply's audio.

The runner's ``AVSynchronizer`` paces what it is given in real time; the engine's bounded queues
give the backpressure. As in the pipecat adapter, an idle frame with another frame already
waiting behind it is dropped, so that a reply never waits behind idle frames the engine made
while the previous reply was being played out.

Use ``avatar_options()`` for the runner's ``AvatarOptions``.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import cv2
import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarOptions, VideoGenerator

from engine.aio import cancel_and_wait
from engine.avatar import Avatar
from engine.pipeline.pipeline import OutputFrame, Pipeline, PipelineConfig, SegmentEnd
from engine.pipeline.sources import PLAYBACK_RATE_HZ, PushSource

log = logging.getLogger("avatar.livekit")


class AvatarVideoGenerator(VideoGenerator):
    """The talking portrait as a LiveKit ``VideoGenerator`` (see the module docstring).

    ``runtime`` and ``avatar`` are loaded once, outside (``engine.runtime.load_runtime``,
    ``engine.avatar.prepare_avatar``); the engine's pipeline starts at the first ``push_audio``
    or iteration, on the running loop, and stops in ``aclose()``.
    """

    def __init__(self, runtime, avatar: Avatar, *, config: PipelineConfig | None = None, max_buffer_s: float = 30.0) -> None:
        config = config or PipelineConfig(realtime=True)
        if not config.realtime:
            raise ValueError("AvatarVideoGenerator needs PipelineConfig(realtime=True): an avatar worker is live")
        self.runtime, self.avatar, self.config = runtime, avatar, config
        self.max_buffer_s = max_buffer_s  # agent audio queued ahead of the avatar at most this much (push_audio waits beyond)
        self.segments_finished = 0  # replies played to their end (AudioSegmentEnd yielded)
        self.segments_interrupted = 0  # replies cut by clear_buffer()
        self._pipeline: Pipeline | None = None
        self._source: PushSource | None = None
        self._start_lock = asyncio.Lock()
        self._segment_open = False  # audio pushed since the last AudioSegmentEnd
        self._speaking = False  # a reply's audio is being yielded
        self._interrupts = 0  # a frame read before the latest clear_buffer() is stale
        self._tasks: set[asyncio.Task] = set()

    def avatar_options(self) -> AvatarOptions:
        """The ``AvatarOptions`` the runner needs for this generator's frames."""
        h, w = self.avatar.image.shape[:2]
        return AvatarOptions(video_width=w, video_height=h, video_fps=float(self.runtime.bundle.fps),
                             audio_sample_rate=PLAYBACK_RATE_HZ, audio_channels=1)

    @property
    def pipeline(self) -> Pipeline | None:
        """The engine's pipeline once started: its metrics, its lookahead."""
        return self._pipeline

    async def start(self) -> None:
        """Make and start the engine's pipeline (idempotent; called by push_audio and iteration)."""
        async with self._start_lock:
            if self._pipeline is not None:
                return
            loop = asyncio.get_running_loop()
            pipeline = await loop.run_in_executor(None, Pipeline, self.runtime, self.avatar, self.config)
            self._source = PushSource(max_buffer_s=self.max_buffer_s)
            pipeline.start(self._source)
            self._pipeline = pipeline

    # -- VideoGenerator ------------------------------------------------------------------------

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        await self.start()
        assert self._source is not None
        if isinstance(frame, AudioSegmentEnd):
            if self._segment_open:
                self._segment_open = False
                self._source.end_of_segment()
            return
        pcm = np.frombuffer(frame.data, dtype=np.int16)  # (samples * channels,) interleaved
        if pcm.size == 0:
            return
        self._segment_open = True
        while True:
            try:
                self._source.push_audio(pcm, frame.sample_rate, frame.num_channels)
                return
            except BufferError:  # the agent is max_buffer_s ahead of the avatar: wait
                await asyncio.sleep(0.02)

    def clear_buffer(self) -> None:
        self._interrupts += 1
        self._segment_open = False
        self._speaking = False
        if self._pipeline is not None:
            self._pipeline.clear_buffer()

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._stream()

    # -- frames out ----------------------------------------------------------------------------

    async def _stream(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        await self.start()
        assert self._pipeline is not None
        inbox: asyncio.Queue = asyncio.Queue(maxsize=2)  # (interrupts, OutputFrame), then None or the exception
        reader = asyncio.create_task(self._read(self._pipeline, inbox), name="avatar-read")
        self._tasks.add(reader)
        reader.add_done_callback(self._tasks.discard)
        try:
            while True:
                item = await inbox.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                interrupts, f = item
                if interrupts != self._interrupts:
                    continue  # read before a clear_buffer(): its audio was cut
                if f.audio_arrival_s is None and f.segment_end is None and not self._speaking and not inbox.empty():
                    continue  # an idle frame with a newer frame waiting: that one takes its place
                for out in self._translate(f):
                    yield out
        finally:
            if not reader.done():
                await cancel_and_wait([reader], log=log, what="avatar reader")

    async def _read(self, pipeline: Pipeline, inbox: asyncio.Queue) -> None:
        try:
            async for f in pipeline.frames():
                await inbox.put((self._interrupts, f))
        except Exception as e:  # raised in the iterator, i.e. in the runner's task
            await inbox.put(e)
            return
        await inbox.put(None)

    def _translate(self, f: OutputFrame) -> list[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        h, w = f.image.shape[:2]
        rgba = cv2.cvtColor(f.image, cv2.COLOR_RGB2RGBA)  # (H, W, 4): the buffer type livekit's examples use
        out: list = [rtc.VideoFrame(w, h, rtc.VideoBufferType.RGBA, rgba.tobytes())]
        if f.segment_end is SegmentEnd.INTERRUPTED:
            self._speaking = False
            self.segments_interrupted += 1
        if not self._speaking and f.audio_arrival_s is not None and f.audio.any():
            self._speaking = True  # the reply's first audible frame
        if self._speaking:
            pcm = (np.clip(f.playback, -1.0, 1.0) * 32767.0).round().astype(np.int16)  # (1920,) at 48 kHz: the TTS's own band
            out.append(rtc.AudioFrame(pcm.tobytes(), PLAYBACK_RATE_HZ, 1, pcm.size))
        if f.segment_end is SegmentEnd.FINISHED:
            self._speaking = False
            self.segments_finished += 1
            out.append(AudioSegmentEnd())
        return out

    async def aclose(self) -> None:
        """Stop the engine's pipeline and the reader."""
        await cancel_and_wait(list(self._tasks), log=log, what="avatar reader")
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            await pipeline.aclose()
        self._source = None
