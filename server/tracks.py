"""The media side of a session: the pipeline's frames placed on one media clock, and the two
aiortc tracks that send them.

    pipeline.frames() --(FramePacer.run)--> slot j: image, 48 kHz audio
        AvatarVideoTrack: the image of slot j, pts j * 90000 / fps   (time base 1/90000)
        AvatarAudioTrack: 20 ms packets of the slots' audio, pts in samples (time base 1/48000)

One clock. Slot ``j`` plays at ``t0 + j / fps`` on the event loop's clock; ``t0`` is the arrival
of the first frame plus a small lead (the jitter allowance, ``lead_s``). Each pipeline frame takes
the next slot: the video track sends its image when the slot falls due, the audio track sends
its audio (``OutputFrame.playback``: the input audio of the frame's own span at 48 kHz, full band,
as the source gave it) as the 20 ms packets covering the slot, each when it falls due. Both tracks start at
slot 0 and send on time, so RTP timestamps, RTCP sender reports and send times agree, and a
receiver plays lips and sound together (the tracks pace themselves as aiortc's
``VideoStreamTrack`` does). The ``send_latency`` histogram (in the pipeline's metrics) is input
audio in -> its slot sent: the pipeline's latency plus the wait here.

Lateness. A frame that arrives after its slot has begun would put its sound out of place: it
takes a later slot instead; the slots between stay empty (the last image stays on screen, the
audio track sends silence) and ``stream_slots_skipped`` counts them. A frame that arrives early
waits, and the pipeline waits behind it (its output queue is bounded): backpressure.
Each skip adds a frame of delay, and a slow spell of the pipeline (a speech onset on a busy CPU)
would otherwise stay on as latency after the pipeline caught up. So frames that would wait long
are dropped, sound and all: an idle frame (nobody speaks) that would wait more than
``drop_ahead_frames`` periods (``stream_idle_dropped``), and, at most one in ``shrink_every_frames``,
a speech frame that would wait more than ``max_wait_frames`` periods, preferably a quiet one
(its RMS at most the median of the last second's; ``stream_speech_dropped``): 40 ms of sound cut
to take 40 ms of delay back. This assumes a real-time source (a track; pushed audio is paced by
the session): a source bursting ahead of real time would have its frames wait, and cut.

Slow consumers. The video track keeps no queue: a sender that asks late gets the newest frame
already due, the older ones are dropped (``stream_video_superseded``). The audio track never
drops audio (aiortc's Opus RTP timestamps count samples): a late sender gets the due packets at
once.
"""
from __future__ import annotations

import asyncio
import fractions
import math
from collections import deque
from typing import AsyncIterator, Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from engine.pipeline.metrics import PipelineMetrics
from engine.pipeline.pipeline import OutputFrame
from engine.pipeline.sources import PLAYBACK_RATE_HZ, Upsampler  # noqa: F401  (Upsampler: importable here as before)

VIDEO_CLOCK_HZ = 90000  # RTP video clock
AUDIO_RATE_HZ = PLAYBACK_RATE_HZ  # what the audio track sends (Opus runs at 48 kHz): OutputFrame.playback's rate
AUDIO_PACKET_SAMPLES = 960  # 20 ms at 48 kHz: one Opus packet
_END = object()


def _pulse(ev: asyncio.Event) -> asyncio.Event:
    """Wake everyone waiting on ``ev``; returns the event the next waiters use."""
    ev.set()
    return asyncio.Event()


class FramePacer:
    """Takes a pipeline's frames, gives each a slot on one media clock, and serves both tracks."""

    def __init__(self, fps: int, *, metrics: PipelineMetrics | None = None, audio: bool = True, lead_s: float = 0.02,
                 guard_s: float = 0.005, drop_ahead_frames: float = 0.75, max_wait_frames: float = 2.0,
                 shrink_every_frames: int = 4, inbox_frames: int = 4):
        if VIDEO_CLOCK_HZ % fps or AUDIO_RATE_HZ % fps:
            raise ValueError(f"fps {fps} does not divide the 90 kHz video clock and 48 kHz audio into whole ticks")
        self.fps = fps
        self.period_s = 1.0 / fps
        self.video_ticks_per_slot = VIDEO_CLOCK_HZ // fps  # 3600 at 25 fps
        self.audio_samples_per_slot = AUDIO_RATE_HZ // fps  # 1920 at 25 fps
        self.audio = audio  # keep audio for an audio track (False: the peer takes no audio)
        self.lead_s = lead_s  # a frame is handed to the tracks this long before its slot (jitter allowance, adds latency)
        self.guard_s = guard_s  # a frame must be there this long before its slot starts, else it takes a later slot
        self.drop_ahead_frames = drop_ahead_frames  # an idle frame that would wait longer than this many periods is dropped
        self.max_wait_frames = max_wait_frames  # a speech frame that would wait longer than this many periods may be dropped
        self.shrink_every_frames = shrink_every_frames  # ... but at most one in this many frames
        self.inbox_frames = inbox_frames  # frames taken from the pipeline ahead of their slot, at most
        self.metrics = metrics or PipelineMetrics()
        for name in ("stream_slots_skipped", "stream_idle_dropped", "stream_speech_dropped", "stream_video_superseded"):
            self.metrics.counter(name)
        self.t0: float | None = None  # loop time of slot 0
        self.started = asyncio.Event()  # t0 is set
        self.wanted = asyncio.Event()  # a track asked for media: its sender runs, start producing
        self.ended = False  # no more slots will come
        self.next_slot = 0  # the slot the next frame takes
        self.last_slot = -1  # the last slot published
        self.tap: Callable[[int, OutputFrame, np.ndarray | None], None] | None = None  # sees (slot, frame, 48 kHz int16 audio) as published
        self._changed = asyncio.Event()  # pulsed when a frame is published or the stream ends
        self._video: deque[tuple[int, np.ndarray]] = deque()  # (slot, (H, W, 3) uint8 RGB) not yet sent
        self._video_sent = False  # the first frame went out
        self._audio: dict[int, np.ndarray] = {}  # slot -> (audio_samples_per_slot,) int16 at 48 kHz, not yet sent
        self._rms: deque[float] = deque(maxlen=fps)  # audio RMS of the last second's frames
        self._since_shrink = 0  # frames placed since the last speech frame was dropped
        self._over = 0  # consecutive speech frames that would have waited too long

    def due(self, slot: int) -> float:
        """Loop time at which ``slot`` starts playing."""
        assert self.t0 is not None
        return self.t0 + slot * self.period_s

    # -- producer: the pump --------------------------------------------------------------------

    async def run(self, frames: AsyncIterator[OutputFrame]) -> None:
        """Place every frame of ``frames`` on the clock until it ends; re-raises its error."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue(maxsize=self.inbox_frames)

        async def read() -> None:
            try:
                async for f in frames:
                    await inbox.put(f)
                await inbox.put(_END)
            except Exception as e:  # the pipeline's error (PipelineError, AvatarInputError): re-raised below
                await inbox.put(e)

        reader = asyncio.create_task(read(), name="pacer-read")
        try:
            while True:
                item = await inbox.get()
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                await self._place(item, loop)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            self.end()

    async def _place(self, f: OutputFrame, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        if self.t0 is None:
            self.t0 = now + self.lead_s
            self.started.set()
        due = self.due(self.next_slot)
        ahead = due - self.lead_s - f.emitted_s  # how long the frame would wait for its slot
        if f.kind == "idle" and ahead > self.drop_ahead_frames * self.period_s:
            self.metrics.counter("stream_idle_dropped").inc()  # ahead of the clock in silence: catch up
            return
        if self._shrink(f, ahead):
            self.metrics.counter("stream_speech_dropped").inc()
            return
        if due - self.guard_s < now:  # its slot has begun: a later one, so that its sound stays in place
            skip = math.ceil((now + self.guard_s - due) / self.period_s)
            self.next_slot += skip
            self.metrics.counter("stream_slots_skipped").inc(skip)
            due = self.due(self.next_slot)
        wait = due - self.lead_s - now
        if wait > 0:
            await asyncio.sleep(wait)
        self._publish(self.next_slot, f, due)
        self.next_slot += 1

    def _shrink(self, f: OutputFrame, ahead: float) -> bool:
        """Drop this frame to take back delay? (speech frames waiting long: a quiet one, or any after a second of it)"""
        rms = float(np.sqrt(np.mean(np.square(f.audio)))) if f.audio.size else 0.0
        quiet = not self._rms or rms <= float(np.median(self._rms))
        self._rms.append(rms)
        self._since_shrink += 1
        self._over = self._over + 1 if ahead > self.max_wait_frames * self.period_s else 0
        if self._over and self._since_shrink >= self.shrink_every_frames and (quiet or self._over >= self.fps):
            self._since_shrink = 0
            return True
        return False

    def _publish(self, slot: int, f: OutputFrame, due: float) -> None:
        self._video.append((slot, f.image))
        while len(self._video) > 4:  # nobody takes video: keep the newest (and slot 0 until it went out)
            del self._video[0 if self._video_sent else 1]
            self.metrics.counter("stream_video_superseded").inc()
        pcm = None
        if self.audio:
            pcm = np.clip(np.round(f.playback * 32767.0), -32768, 32767).astype(np.int16)  # (1920,) at 25 fps
            self._audio[slot] = pcm
            for old in [s for s in self._audio if s < slot - 2 * self.fps]:  # nobody took them for 2 s
                del self._audio[old]
        if f.audio_arrival_s is not None:
            self.metrics.stage("send_latency").observe(1000.0 * (due - f.audio_arrival_s))  # input audio in -> its slot plays
        self.last_slot = slot
        if self.tap is not None:
            self.tap(slot, f, pcm)
        self._changed = _pulse(self._changed)

    def end(self) -> None:
        """No more frames: the tracks end after what was published."""
        self.ended = True
        self._changed = _pulse(self._changed)

    # -- consumers: the tracks -----------------------------------------------------------------

    async def _wait_started(self) -> None:
        while not self.started.is_set():
            if self.ended:
                raise MediaStreamError
            await self._changed.wait()

    async def next_video(self) -> tuple[int, np.ndarray]:
        """The next frame to send, when its slot is due: the newest due one if the sender is late."""
        loop = asyncio.get_running_loop()
        while not self._video:
            if self.ended:
                raise MediaStreamError
            await self._changed.wait()
        now = loop.time()
        while self._video_sent and len(self._video) > 1 and self.due(self._video[1][0]) <= now:  # superseded by a frame already due
            self._video.popleft()
            self.metrics.counter("stream_video_superseded").inc()
        slot, image = self._video.popleft()
        self._video_sent = True  # slot 0 always goes out: a receiver counts timestamps from its first packet
        wait = self.due(slot) - now
        if wait > 0:
            await asyncio.sleep(wait)
        return slot, image

    async def next_audio(self, packet: int) -> np.ndarray:
        """(960,) int16 at 48 kHz for packet ``packet`` (samples ``[960 p, 960 (p + 1))``), when it is due."""
        await self._wait_started()
        start = packet * AUDIO_PACKET_SAMPLES
        if self.ended and start >= (self.last_slot + 1) * self.audio_samples_per_slot:
            raise MediaStreamError
        wait = self.t0 + start / AUDIO_RATE_HZ - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)
        out = np.zeros(AUDIO_PACKET_SAMPLES, np.int16)  # slots that never came: silence
        sps = self.audio_samples_per_slot
        for slot in range(start // sps, (start + AUDIO_PACKET_SAMPLES - 1) // sps + 1):
            pcm = self._audio.get(slot)
            if pcm is None:
                continue
            lo, hi = max(start, slot * sps), min(start + AUDIO_PACKET_SAMPLES, (slot + 1) * sps)
            out[lo - start : hi - start] = pcm[lo - slot * sps : hi - slot * sps]
        for old in [s for s in self._audio if (s + 1) * sps <= start + AUDIO_PACKET_SAMPLES]:
            del self._audio[old]
        return out


class AvatarVideoTrack(MediaStreamTrack):
    """The avatar's frames, one per slot, pts = slot * 90000 / fps."""

    kind = "video"

    def __init__(self, pacer: FramePacer):
        super().__init__()
        self.pacer = pacer

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        self.pacer.wanted.set()
        slot, image = await self.pacer.next_video()
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")  # the encoder converts to yuv420p in its thread
        frame.pts = slot * self.pacer.video_ticks_per_slot
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK_HZ)
        return frame


class AvatarAudioTrack(MediaStreamTrack):
    """The frames' audio (the input, re-emitted in sync) as 20 ms mono s16 frames at 48 kHz, pts in samples."""

    kind = "audio"

    def __init__(self, pacer: FramePacer):
        super().__init__()
        self.pacer = pacer
        self._packet = 0  # the next packet to send

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        self.pacer.wanted.set()
        pcm = await self.pacer.next_audio(self._packet)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")  # (1, 960) packed
        frame.sample_rate = AUDIO_RATE_HZ
        frame.pts = self._packet * AUDIO_PACKET_SAMPLES
        frame.time_base = fractions.Fraction(1, AUDIO_RATE_HZ)
        self._packet += 1
        return frame
