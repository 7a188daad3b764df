"""The streaming pipeline: audio chunks in, frames of the talking portrait out, each frame carrying
the audio of its own span (so a sink that plays them together is in sync by construction).

One pipeline for live and offline (``avatar render`` runs it with a file source in fast mode):

    source --(reader task)--> chunk queue --(scheduler task: VAD, timeline, clock)-->
        stage A thread (audio features, A2L, warp, denoiser steps) --> in-flight queue (2) -->
        stage B thread (decoder, compositing, blink, sway; overlaps A's next frame) -->
        emitter task (in order) --> bounded output queue --> ``async for frame in pipeline.frames()``

Two copies of the audio. Each chunk's 16 kHz copy feeds VAD and the audio features; its 48 kHz
copy (``AudioChunk.playback``: the input at full band) rides beside it on the same timeline, and each
frame carries both spans: ``OutputFrame.audio`` (16 kHz) and ``OutputFrame.playback`` (48 kHz, what
sinks play). A chunk without a 48 kHz copy gets one upsampled from its 16 kHz copy (nothing above 8 kHz).

Timeline and clock. Input audio is appended to a *timeline* (16 kHz); frame ``k`` of the timeline
covers samples ``[k * 16000 / fps, (k + 1) * 16000 / fps)`` and is ready once the audio lookahead
after it has arrived (``StreamingFeatures.need_samples``: 82.5 ms at 25 fps for the default
bundle). Output frames are numbered by an output counter ``n``; ``pts_s = n / fps`` exactly.

Real-time mode (``realtime=True``, live sources):
- *Idle by the clock*: when the source has nothing (a voice agent between turns, after a
  barge-in), and while an utterance's first frame waits for its audio lookahead, an idle frame
  (the portrait, blinking; no model runs) goes out every frame period, carrying silence: the
  stream never stalls. When audio comes back the timeline starts afresh (a new utterance).
- *Tail*: when the source stops mid-utterance for ``idle_fill_ms``, the frames still waiting for
  their lookahead are completed with silence. For a live source (``AudioSource.live``: microphone,
  WebRTC track, paced file) "stops" is: no chunk for ``idle_fill_ms``. Pushed audio (a voice agent's
  TTS in pieces of 10 ms to seconds, the server's HTTP and WebSocket pushes in pieces of up to 100 ms)
  comes in bursts and carries its own timeline, a playout clock: each 10 ms chunk covers 10 ms of
  real time from where the previous one ran out (or from its arrival, if later), so a piece of N ms
  covers N ms and the gap before the next piece is not silence: nothing is made up or idle inside
  an utterance pushed in real time (tests/test_pipeline_push.py).
- *Due times* (latency, "behind"): a frame's audio is due at its place on the utterance's clock,
  or at its arrival if later. The clock of pushed audio is a playout clock: it starts at the first
  arrival (audio pushed ahead is not behind) and moves on when a piece comes later than its place
  (after a stall, or after silence made up for one), never back: due times follow the output's
  real delay and never drift away from it. A live source is never ahead: its clock is dated by the chunk that
  came earliest for its place (a burst, e.g. a WebRTC track's packets queued before the pipeline
  read them, is audio that waited, not audio ahead).
- *Silence inside a stream* (a microphone between words): VAD (with hangover) marks the frames;
  silent frames are idle frames (audio features and A2L still run, so state stays continuous).
- *Falling behind*: the audio-in to frame-out latency of every frame is measured; above the
  budget, or with frames waiting, the denoiser gets fewer steps (down to ``min_steps``); with
  more than ``max_backlog_frames`` waiting, frames are dropped (the last image is repeated with
  its own audio, so A/V stays continuous); a step comes back after ``recover_frames`` frames
  with room for it (latency plus twice a step's measured cost within budget). All of it is
  counted in the metrics.
- *Barge-in*: ``clear_buffer()`` drops the queued audio (the source's too) and frames not yet
  taken; the next frame, within one period, is idle.

Segments. A source's segment (a TTS reply: ``PushSource.end_of_segment()``; a file) ends on the
output frame that carries its last audio: ``OutputFrame.segment_end == SegmentEnd.FINISHED``
(an end told after that frame went out marks the next frame). ``clear_buffer()`` that cuts a
segment (its audio queued, being generated, or its end not yet taken by the consumer) marks the
next frame ``SegmentEnd.INTERRUPTED`` instead, and that segment never reports finished. So every
segment ends exactly once on the output, one marker per frame, and a consumer knows when the
playback of a reply finished or was cut (voice agents: bot stopped speaking, playback finished).

Fast mode (``realtime=False``, offline): no clock, no degradation, every frame at full steps:
the result depends only on the audio and the seed.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import AsyncIterator

import numpy as np
import torch

from engine.aio import cancel_and_wait, wait_event
from engine.avatar import Avatar
from engine.errors import AvatarInputError
from engine.generator import FrameGenerator
from engine.pipeline.features import StreamingFeatures
from engine.pipeline.metrics import PipelineMetrics
from engine.pipeline.sources import (
    CHUNK_SAMPLES,
    PLAYBACK_CHUNK_SAMPLES,
    PLAYBACK_FACTOR,
    SAMPLE_RATE_HZ,
    AudioChunk,
    AudioSource,
    Upsampler,
)
from engine.pipeline.vad import Vad, VadConfig

log = logging.getLogger("avatar.pipeline")

_END = object()  # end-of-stream sentinel in the queues


@dataclass(frozen=True)
class PipelineConfig:
    realtime: bool = True  # pace on the wall clock (idle frames, tail fill, degradation); False: offline, as fast as possible
    steps: int | None = None  # denoising steps per frame (default: the bundle's)
    min_steps: int = 1  # degradation never goes below this
    latency_budget_ms: float = 150.0  # audio-in to frame-out latency above this makes the pipeline degrade
    degrade: bool = True  # real time only: fewer steps, then dropped frames, when behind
    max_backlog_frames: int = 3  # ready frames waiting beyond this are dropped
    recover_frames: int = 25  # consecutive frames within budget before one step is given back
    idle_fill_ms: float = 60.0  # a source quiet this long after its audio ran out in real time completes the waiting frames with silence / starts idle frames
    speech_pad_frames: int = 2  # a frame counts as speech if VAD heard speech within this many frames of it
    vad: VadConfig = field(default_factory=VadConfig)
    use_vad: bool = True  # False: every frame with audio is generated (no idle frames from silence)
    out_queue_frames: int = 8  # output frames buffered for the consumer (backpressure beyond)
    max_ahead_s: float = 2.0  # input audio read ahead of generation at most this much (push bursts, files)
    seed: int = 0  # the generator's noise and blink seed
    blinks: bool = True
    head_motion: bool = True  # head motion replayed from real people (engine/motion/head.py; the bundle's library), calmer in silence
    articulation_gain: float | None = None  # the A2L's displacement gain (engine/motion/articulation.py); None: the bundle's calibrated one
    watermark: bool = True  # the invisible provenance watermark on every output frame (engine/provenance); False logs a warning
    watermark_id: int | None = None  # its 8-bit session / file id (0-255); None: derived from the portrait and the seed


class SegmentEnd(str, Enum):
    """How a source's segment ended on the output (``OutputFrame.segment_end``)."""

    FINISHED = "finished"  # this frame carries the segment's last audio
    INTERRUPTED = "interrupted"  # clear_buffer() cut the segment; this is the first frame after it


@dataclass
class OutputFrame:
    index: int  # output counter n
    pts_s: float  # n / fps, exactly
    image: np.ndarray  # (H, W, 3) uint8 RGB, the whole portrait
    audio: np.ndarray  # (16000 / fps,) float32 at 16 kHz: the input audio of this frame's span (silence for idle frames)
    playback: np.ndarray  # (48000 / fps,) float32 at 48 kHz: the same span at full band, what sinks play (PLAYBACK_RATE_HZ)
    kind: str  # "speech" (generated), "idle" (the portrait, blinking), "dropped" (the last image repeated)
    steps: int  # denoising steps used (0 for idle and dropped frames)
    audio_arrival_s: float | None  # monotonic time the audio at the frame's start arrived (None: idle by the clock)
    emitted_s: float  # monotonic time the frame was handed out
    due_s: float | None = None  # when that audio is due in real time: its arrival, or later for audio pushed ahead of time
    segment_end: SegmentEnd | None = None  # a segment finished with this frame's audio, or was interrupted just before it

    @property
    def latency_ms(self) -> float | None:
        """Audio in (the frame's first sample; for audio pushed ahead of real time, the moment it
        is due on the utterance's clock) to frame out."""
        t = self.due_s if self.due_s is not None else self.audio_arrival_s
        return None if t is None else 1000.0 * (self.emitted_s - t)


class PipelineError(RuntimeError):
    """A stage of the pipeline failed; the original exception is the cause."""


class Pipeline:
    """``async with Pipeline(runtime, avatar, config) as p: p.start(source); async for f in p.frames(): ...``"""

    def __init__(self, runtime, avatar: Avatar, config: PipelineConfig = PipelineConfig(), *, metrics: PipelineMetrics | None = None):
        self.runtime, self.avatar, self.config = runtime, avatar, config
        self.fps = runtime.bundle.fps
        if SAMPLE_RATE_HZ % self.fps:
            raise ValueError(f"fps {self.fps} does not divide {SAMPLE_RATE_HZ} Hz into whole samples per frame")
        self.frame_samples = SAMPLE_RATE_HZ // self.fps
        self.metrics = metrics or PipelineMetrics()
        self.gen = FrameGenerator(runtime, avatar, steps=config.steps, seed=config.seed, blinks=config.blinks,
                                  head_motion=config.head_motion, articulation_gain=config.articulation_gain)
        self.full_steps = self.gen.steps
        # the provenance watermark, on every path's frames (issue 17); imported here, not at the first frame, where its
        # ~0.1 s of imports (scipy.fft) stalled the event loop and with it pushed audio's arrival (a made-up silence)
        from engine.provenance.stamp import stamp

        self._stamp = stamp
        self.steps = self.full_steps  # current steps (degradation lowers it)
        # two stages in two threads, so that frame k is composed while frame k+1 is denoised:
        # A = features, A2L, warp, denoiser steps (sequential: each frame needs the previous latent);
        # B = decoder, compositing, blink, sway (sequential: blink and sway advance per frame)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="avatar-denoise")
        self._compose_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="avatar-compose")
        self._chunks: asyncio.Queue = asyncio.Queue(maxsize=256)
        self._out: asyncio.Queue = asyncio.Queue(maxsize=config.out_queue_frames)
        self._inflight: asyncio.Queue = asyncio.Queue(maxsize=2)  # (stage-B future, frame facts) in output order
        self._wake = asyncio.Event()  # input arrived / the ingest wants attention
        self._progress = asyncio.Event()  # a frame went out (the ingest may read further ahead)
        self._tasks: set[asyncio.Task] = set()
        self._source: AudioSource | None = None
        self._error: BaseException | None = None
        self._vad = Vad(config.vad)
        probe = StreamingFeatures(runtime, fps=self.fps)
        self._need = probe.need_samples  # samples frame k waits for
        self.lookahead_ms = probe.lookahead_ms  # the audio lookahead: the latency floor before compute
        self._closed = False
        self._live = False  # the source is captured live (AudioSource.live; set by start()): see _ingest
        self._segment_open = False  # audio of a source segment was ingested and its end was not (yet)
        self._ends_pending = 0  # segment ends ingested whose FINISHED frame the consumer has not taken yet
        self._late_markers: deque[SegmentEnd] = deque()  # markers for the next frames out (one per frame)
        self._clears = 0  # clear_buffer() calls: chunks read before the latest one are stale
        self._min_index = 0  # frames numbered below this were made before the latest clear_buffer()
        self._new_segment()
        self._n_out = 0
        self._last_image = avatar.image
        self._good = 0
        self._step_ms = 500.0 / self.fps  # moving mean of one denoising step's wall time (stage A, with the warp's share)
        self.first_frame_s: float | None = None  # monotonic time of the first frame handed out
        self.started_s: float | None = None

    # -- the timeline of the current segment (event-loop side) --
    def _new_segment(self) -> None:
        self._epoch = getattr(self, "_epoch", -1) + 1
        self._n_samples = 0  # samples in this segment's timeline
        self._pending: list[np.ndarray] = []  # samples not yet handed to the worker
        self._arrivals: deque[tuple[int, float]] = deque()  # (first sample of a chunk, arrival time)
        self._speech: deque[tuple[int, bool]] = deque()  # (first sample of a chunk, VAD speaking)
        self._audio: deque[tuple[int, np.ndarray, np.ndarray]] = deque()  # (first sample, pcm, its 48 kHz copy) kept until emitted
        self._up = Upsampler()  # the 48 kHz copy of chunks that come without one
        self._k = 0  # next timeline frame to generate
        self._seg_ends: deque[int] = deque()  # timeline sample just after each ended segment's last audio, frame not yet made
        self._ended = False  # the source ended (no more audio, ever)
        self._reset_worker = True  # the worker starts fresh features, A2L state and previous output
        self._real_samples = 0  # samples of the timeline that came from the source (not silence filled in)
        self._seg_t0: float | None = None  # when this utterance's sample 0 was due in real time (its clock: see _ingest)
        self._src_end_s: float | None = None  # when the source's audio so far ran out in real time (quiet after it)

    # -- public API --
    def start(self, source: AudioSource) -> None:
        """Start reading ``source`` and generating. Call once."""
        if self._source is not None:
            raise RuntimeError("Pipeline.start() was already called")
        self._source = source
        self._live = bool(getattr(source, "live", True))
        loop = asyncio.get_running_loop()
        self.started_s = loop.time()
        for coro in (self._read(), self._run(), self._emit_loop()):
            t = asyncio.create_task(coro)
            self._tasks.add(t)
            t.add_done_callback(self._task_done)

    async def frames(self) -> AsyncIterator[OutputFrame]:
        """Every output frame in order; ends after the source ends; raises PipelineError if a stage failed."""
        while True:
            item = await self._out.get()
            if item is _END:
                if isinstance(self._error, AvatarInputError):  # bad input: the user's error, as it was raised
                    raise self._error
                if self._error is not None:
                    raise PipelineError(f"pipeline stage failed: {type(self._error).__name__}: {self._error}") from self._error
                return
            if item.index < self._min_index:  # made before a clear_buffer() (its put was waiting on a full queue)
                continue
            if item.segment_end is not None:
                self.metrics.counter(f"segments_{item.segment_end.value}").inc()
                if item.segment_end is SegmentEnd.FINISHED:
                    self._ends_pending = max(0, self._ends_pending - 1)
            item.emitted_s = asyncio.get_running_loop().time()
            if self.first_frame_s is None:
                self.first_frame_s = item.emitted_s
            self.metrics.frame_out(item.emitted_s)
            if item.latency_ms is not None:
                self.metrics.stage("latency").observe(item.latency_ms)
            self._progress.set()
            yield item

    def clear_buffer(self) -> float:
        """Barge-in: drop queued input (the source's too) and frames not yet taken; the next frame
        is idle, marked ``SegmentEnd.INTERRUPTED`` if a segment was cut. Returns the seconds of
        audio dropped."""
        dropped = 0.0
        clear = getattr(self._source, "clear_buffer", None)
        if callable(clear):
            dropped += clear()
        cut = dropped > 0 or self._segment_open or self._ends_pending > 0
        while not self._chunks.empty():
            item = self._chunks.get_nowait()
            if item is _END:  # keep the end of the stream
                self._chunks.put_nowait(_END)
                break
            cut = cut or item[0].valid_samples > 0
            dropped += CHUNK_SAMPLES / SAMPLE_RATE_HZ
        self._clears += 1  # a chunk the reader holds now is stale
        self._min_index = self._n_out  # so is a frame made before now
        self._segment_open, self._ends_pending = False, 0  # the source's end of the cut segment is ignored
        self._late_markers.clear()
        if cut:
            self._late_markers.append(SegmentEnd.INTERRUPTED)
        dropped += max(0, self._n_samples - self._k * self.frame_samples) / SAMPLE_RATE_HZ
        ended = self._ended
        self._new_segment()
        self._ended = ended
        while not self._out.empty():
            item = self._out.get_nowait()
            if item is _END:
                self._out.put_nowait(_END)
                break
        self._vad.reset()
        self.steps = self.full_steps
        self.metrics.counter("barge_ins").inc()
        self._wake.set()
        return dropped

    async def aclose(self) -> None:
        """Cancel and await every task, stop the worker, close the source."""
        if self._closed:
            return
        self._closed = True
        await cancel_and_wait(list(self._tasks), log=log, what="pipeline")
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._compose_executor.shutdown(wait=True, cancel_futures=True)
        if self._source is not None:
            await self._source.aclose()

    async def __aenter__(self) -> "Pipeline":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # -- tasks --
    def _task_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if t.cancelled():
            return
        e = t.exception()
        if e is not None and self._error is None:
            self._error = e
            self._put_end_nowait()

    def _put_end_nowait(self) -> None:
        while True:
            try:
                self._out.put_nowait(_END)
                return
            except asyncio.QueueFull:
                self._out.get_nowait()  # a failed pipeline's frames are not wanted; the error is

    async def _read(self) -> None:
        """The source, as fast as it gives, into the chunk queue (bounded)."""
        assert self._source is not None
        async for chunk in self._source:
            await self._chunks.put((chunk, asyncio.get_running_loop().time(), self._clears))
            self._wake.set()
        await self._chunks.put(_END)
        self._wake.set()

    def _ingest(self, chunk: AudioChunk, arrived_s: float) -> None:
        if chunk.valid_samples == 0:  # an end-of-segment marker only: the segment's last audio came before
            if chunk.end_of_segment:
                self._end_segment(self._real_samples)
            return
        s = self._n_samples
        t0 = arrived_s - s / SAMPLE_RATE_HZ  # when sample 0 was due, were this chunk on time
        if self._seg_t0 is None:  # the utterance's first audio
            self._seg_t0 = t0
        elif self._live:  # captured live, never ahead of real time: a burst is audio that waited, the earliest chunk dates the rest
            self._seg_t0 = min(self._seg_t0, t0)
        else:  # pushed: it plays at its place on its own timeline (after any silence made up), or from its arrival if
            self._seg_t0 = max(self._seg_t0, t0)  # later: a late piece moves the clock on (never back), an early one is ahead
        speaking = self._vad.process(chunk) if self.config.use_vad else True
        self._arrivals.append((s, arrived_s))
        self._speech.append((s, speaking))
        wide = chunk.playback if chunk.playback is not None else self._up.process(chunk.pcm)  # (480,)
        self._audio.append((s, chunk.pcm, wide))
        self._pending.append(chunk.pcm)
        self._n_samples += CHUNK_SAMPLES
        self._real_samples = self._n_samples
        if self._live:  # a live source is quiet from its last chunk's arrival
            self._src_end_s = arrived_s
        else:  # pushed audio's own timeline: a chunk covers 10 ms from where the previous one ran out, or from its arrival
            # if later (a piece of N ms pushed at once covers N ms: the gap before the next piece is no silence)
            self._src_end_s = max(arrived_s if self._src_end_s is None else self._src_end_s, arrived_s) + CHUNK_SAMPLES / SAMPLE_RATE_HZ
        self._segment_open = True
        if chunk.end_of_segment:
            self._end_segment(s + chunk.valid_samples)

    def _end_segment(self, end: int) -> None:
        """The open segment's last audio is timeline sample ``end - 1``: the frame holding it gets
        the FINISHED marker, or the next frame out if that one has gone already."""
        if not self._segment_open:  # nothing since the last end, or the segment was cut by clear_buffer()
            return
        self._segment_open = False
        self._ends_pending += 1
        if end > self._k * self.frame_samples:
            self._seg_ends.append(end)
        else:
            self._late_markers.append(SegmentEnd.FINISHED)

    def _fill_silence(self, upto: int, now: float) -> None:
        """Complete the timeline with silence up to sample ``upto`` (a tail whose source went quiet)."""
        zeros = np.zeros(CHUNK_SAMPLES, np.float32)
        wide_zeros = np.zeros(PLAYBACK_CHUNK_SAMPLES, np.float32)
        while self._n_samples < upto:
            s = self._n_samples
            self._arrivals.append((s, now))
            self._speech.append((s, False))
            self._audio.append((s, zeros, wide_zeros))
            self._pending.append(zeros)
            self._n_samples += CHUNK_SAMPLES

    def _quiet_for(self, now: float) -> float:
        """Seconds the source has been quiet at ``now``: since its audio ran out in real time (negative
        while pushed audio still covers ``now``; infinite before any audio of this utterance)."""
        return float("inf") if self._src_end_s is None else now - self._src_end_s

    def _ready(self, k: int) -> bool:
        if self._ended:
            return k * self.frame_samples < self._n_samples
        return self._n_samples >= self._need(k)

    def _due(self, k: int, arrival: float | None) -> float | None:
        """When frame k's audio is due in real time: its arrival, or its place on the utterance's
        clock if it came earlier (a voice agent pushing a whole reply at once is not "behind")."""
        if self._seg_t0 is None:
            return arrival
        on_clock = self._seg_t0 + k / self.fps
        return on_clock if arrival is None else max(arrival, on_clock)

    def _backlog(self, now: float) -> int:
        """Frames beyond the next one that are ready AND overdue: their audio's due time plus the
        audio lookahead has passed (so in real time they would already be generated)."""
        n, k = 0, self._k + 1
        la = self.lookahead_ms / 1000.0
        while self._ready(k):
            due = self._due(k, None)
            if due is not None and due + la > now:
                break
            n += 1
            k += 1
        return n

    async def _put_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """An idle frame (the portrait, blinking) in the in-flight queue, outside the audio timeline."""
        fut = loop.run_in_executor(self._compose_executor, self._compose, "idle", None)
        silence = (np.zeros(self.frame_samples, np.float32), np.zeros(self.frame_samples * PLAYBACK_FACTOR, np.float32))
        await self._inflight.put((fut, (self._clears, silence, "idle", 0, None, None, 0, False, None)))

    async def _run(self) -> None:
        """Ingest input and schedule frames until the source ends and every frame is out."""
        loop = asyncio.get_running_loop()
        period = 1.0 / self.fps
        next_idle = loop.time()  # when the next idle frame is due (real time, nothing to generate)
        source_done = False
        while True:
            # 1. take whatever input has arrived (bounded read-ahead)
            while not self._chunks.empty() and (self._n_samples - self._k * self.frame_samples) < self.config.max_ahead_s * SAMPLE_RATE_HZ:
                item = self._chunks.get_nowait()
                if item is _END:
                    source_done = True
                    self._ended = True
                    break
                if item[2] == self._clears:  # not read before a clear_buffer()
                    self._ingest(item[0], item[1])
            now = loop.time()
            # 2. a frame of the timeline is ready: generate it
            if self._ready(self._k):
                await self._emit_timeline_frame()
                next_idle = loop.time() + period
                continue
            if source_done and self._ended and not self._ready(self._k):
                for _ in range(len(self._late_markers)):  # a marker whose frame went out already still gets one
                    await self._put_idle(loop)
                await self._inflight.put(_END)
                return
            if self.config.realtime:
                late = self._quiet_for(now) > self.config.idle_fill_ms / 1000.0
                has_tail = self._real_samples > self._k * self.frame_samples
                if late and has_tail:  # 3. the source went quiet mid-utterance: complete the waiting frames with silence
                    self._fill_silence(self._need(self._k), now)
                    continue
                # 4. nothing to say, or an utterance's first frame still waits for its lookahead: an idle frame on
                # the clock (so the stream never stalls; the utterance's frames take the slots after it)
                if (late or self._k == 0) and now >= next_idle:
                    if late and self._n_samples:  # audio comes back later as a new utterance
                        self._new_segment()
                    await self._put_idle(loop)  # A resets at the next utterance
                    next_idle = max(next_idle + period, loop.time() - period)
                    continue
                until_late = self.config.idle_fill_ms / 1000.0 - self._quiet_for(now)  # <= 0: late already (or no audio)
                timeout = max(0.0, min(next_idle - now, until_late if until_late > 0 else period)) + 1e-3
            else:
                timeout = None
            self._wake.clear()
            if self._chunks.empty():
                await wait_event(self._wake, timeout)  # not asyncio.wait_for: it can swallow a cancellation (engine/aio.py)

    async def _emit_timeline_frame(self) -> None:
        """Generate (or drop) timeline frame k and put it out."""
        k, epoch = self._k, self._epoch
        lo, hi = k * self.frame_samples, (k + 1) * self.frame_samples
        pending, self._pending = (np.concatenate(self._pending) if self._pending else np.zeros(0, np.float32)), []
        reset, self._reset_worker = self._reset_worker, False
        ended = self._ended
        pad = self.config.speech_pad_frames * self.frame_samples
        speaking = any(sp for s, sp in self._speech if lo - pad <= s < hi + pad)
        arrival = next((t for s, t in self._arrivals if s <= lo < s + CHUNK_SAMPLES), None)
        audio = self._frame_audio(lo, hi)
        degrade = self.config.realtime and self.config.degrade
        loop = asyncio.get_running_loop()
        due = self._due(k, arrival)
        backlog = self._backlog(loop.time()) if degrade else 0
        self.metrics.gauge("backlog_frames").set(backlog)
        drop = degrade and backlog > self.config.max_backlog_frames
        steps = self.steps
        kind, payload = await loop.run_in_executor(self._executor, self._work, k, pending, reset, ended, speaking, drop, steps)
        if epoch != self._epoch:  # a barge-in happened meanwhile: this frame belongs to dropped audio
            return
        self._k = k + 1
        while self._speech and self._speech[0][0] < lo - pad:
            self._speech.popleft()
        while self._arrivals and self._arrivals[0][0] + CHUNK_SAMPLES <= hi:
            self._arrivals.popleft()
        end = None  # one segment end per frame: a second one in the same frame goes on the next
        if self._seg_ends and self._seg_ends[0] <= hi:
            self._seg_ends.popleft()
            end = SegmentEnd.FINISHED
        fut = loop.run_in_executor(self._compose_executor, self._compose, kind, payload)
        await self._inflight.put((fut, (self._clears, audio, kind, steps if kind == "speech" else 0, arrival, due, backlog, degrade, end)))

    def _compose(self, kind: str, payload) -> np.ndarray | None:
        """Stage B: the frame's image (None for a dropped frame: the emitter repeats the last image)."""
        t0 = time.perf_counter()
        if kind == "speech":
            img = self.gen.compose(*payload)
            self.metrics.stage("compose").observe(1000.0 * (time.perf_counter() - t0))
            return img
        if kind == "idle":
            img = self.gen.idle_compose()
            self.metrics.stage("idle").observe(1000.0 * (time.perf_counter() - t0))
            return img
        return None

    async def _emit_loop(self) -> None:
        """Frames out in order as stage B finishes them; adapts the steps to the measured latency."""
        while True:
            item = await self._inflight.get()
            if item is _END:
                await self._out.put(_END)
                return
            fut, (clears, audio, kind, steps, arrival, due, backlog, degrade, end) = item
            image = await fut
            if clears != self._clears:  # a barge-in came while it was made (not a new utterance: its frames are due)
                continue
            if image is None:
                image = self._last_image
            self._last_image = image
            if kind == "dropped":  # counted here, after the epoch check: frames a barge-in discarded are not counted
                self.metrics.counter("frames_dropped").inc()
            elif kind == "idle":
                self.metrics.counter("idle_frames").inc()
            elif steps < self.full_steps:
                self.metrics.counter("frames_degraded").inc()
            await self._emit(image, audio[0], audio[1], kind, steps, arrival, due, end)
            if degrade and kind != "dropped":
                self._adapt(due, backlog, kind)

    def _frame_audio(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Timeline samples [lo, hi): the 16 kHz copy (hi - lo,) and the 48 kHz copy (3 (hi - lo),)."""
        while self._audio and self._audio[0][0] + CHUNK_SAMPLES <= lo:
            self._audio.popleft()
        held = [(pcm, wide) for s, pcm, wide in self._audio if s < hi and s + CHUNK_SAMPLES > lo]
        start = self._audio[0][0] if self._audio else lo
        out = []
        for i, f in enumerate((1, PLAYBACK_FACTOR)):
            a = np.concatenate([h[i] for h in held]) if held else np.zeros(0, np.float32)
            a = a[f * max(0, lo - start) : f * (max(0, lo - start) + (hi - lo))]
            out.append(np.pad(a, (0, f * (hi - lo) - len(a))).astype(np.float32))
        return out[0], out[1]

    def _work(self, k: int, pending: np.ndarray, reset: bool, ended: bool, speaking: bool, drop: bool, steps: int) -> tuple[str, object]:
        """Stage A: features and A2L for frame k, then its latent (speech), or nothing (idle, dropped)."""
        if reset:
            self.features = StreamingFeatures(self.runtime, fps=self.fps)
            self.gen.reset()
        fe = self.features
        if len(pending):
            fe.push(pending)
        if ended and not fe.ended:
            fe.end()
        t0 = time.perf_counter()
        f = fe.feature(k)
        lm = self.gen.landmarks(torch.from_numpy(f[None]), speech=speaking)[0]  # (K, 2)
        t1 = time.perf_counter()
        self.metrics.stage("features").observe(1000.0 * (t1 - t0))
        if drop:
            return "dropped", None
        if not speaking:
            self.gen.previous = None  # the next speech frame starts afresh, as after an idle frame
            return "idle", None
        latent = self.gen.latent(lm, torch.from_numpy(fe.tokens(k, self.gen.den_cfg.audio_tokens)), steps=steps)
        dt_ms = 1000.0 * (time.perf_counter() - t1)
        self.metrics.stage("denoise").observe(dt_ms)
        self._step_ms += 0.1 * (dt_ms / max(steps, 1) - self._step_ms)  # what a step costs here (read by _adapt)
        return "speech", latent

    async def _emit(self, image: np.ndarray, audio: np.ndarray, playback: np.ndarray, kind: str, steps: int, arrival: float | None,
                    due: float | None = None, end: SegmentEnd | None = None) -> None:
        clears = self._clears
        image = await asyncio.get_running_loop().run_in_executor(None, self._stamp, self, image)  # ~1 ms at 512 px, off the loop
        if clears != self._clears:  # a barge-in came while it was marked
            return
        if end is not None:  # markers go out in order, one per frame
            self._late_markers.append(end)
        marker = self._late_markers.popleft() if self._late_markers else None
        fr = OutputFrame(self._n_out, self._n_out / self.fps, image, audio, playback, kind, steps, arrival, 0.0, due, marker)
        self._n_out += 1
        self.metrics.gauge("out_queue_depth").set(self._out.qsize())
        await self._out.put(fr)

    def _adapt(self, due: float | None, backlog: int, kind: str) -> None:
        """Fewer steps when behind; one step back after ``recover_frames`` frames whose latency left room for it:
        twice the measured cost of a denoising step below the budget (before any is measured, half a frame period,
        so a frame period of headroom). A fixed frame period of headroom kept a large portrait at one step for
        good: its latency at full steps was within budget, but never a period below it."""
        if due is None or kind != "speech":
            return
        lat_ms = 1000.0 * (asyncio.get_running_loop().time() - due)
        budget = self.config.latency_budget_ms
        if lat_ms > budget or backlog >= 2:
            self.steps = max(self.config.min_steps, self.steps - 1)
            self._good = 0
        elif lat_ms + 2.0 * self._step_ms < budget and backlog == 0:  # room for the step given back, twice over
            self._good += 1
            if self._good >= self.config.recover_frames and self.steps < self.full_steps:
                self.steps += 1
                self._good = 0
        self.metrics.gauge("steps").set(self.steps)
