"""Audio sources of the live pipeline: a file, pushed PCM, a microphone, a WebRTC track.

Every source is an async iterator of :class:`AudioChunk`: exactly 10 ms (160 samples) of 16 kHz
mono float32 in [-1, 1], the copy that VAD and the audio features read, and beside it the same 10 ms
at full band (``playback``: 480 samples at 48 kHz), the copy that is played back with the frames.
The playback copy is made from the input as it came (48 kHz from WebRTC or a microphone passes
through untouched; 24 / 44.1 kHz TTS is resampled up to 48 kHz, which keeps every band the input
has), never from the 16 kHz copy, so a voice keeps its 8-24 kHz. FFmpeg's resampler keeps both
copies on the input's time axis (sample n of each is input time n / rate: measured on a pulse,
no offset), so chunk k of each covers the same 10 ms. A chunk's ``pts_s`` is its start on the *source's media clock*: the
number of samples the source produced before it, divided by 16000 (so chunk k has
``pts_s == k / 100`` exactly, as a float). It is counted from samples, never read from a wall
clock, so it neither drifts nor jitters; it is up to the consumer to place that clock on its
own (the pipeline's frame clock keeps running, with idle frames, while a source has nothing).

A *segment* is an utterance (a file, a TTS turn, a track's life). Its last chunk carries
``end_of_segment=True``; the audio it holds is its first ``valid_samples`` samples, the rest is
zero padding. Where the segment's end is only known after its last audio has already been
yielded (a push source told ``end_of_segment()`` late, a track that stops), the flag travels on
an extra all-padding chunk with ``valid_samples == 0``.

Resampling to 16 kHz mono (and to 48 kHz mono) uses FFmpeg's resampler (``av.AudioResampler``), kept alive across
pushes and frames so that chunk boundaries do not click, and drained at a segment's end so that
no tail is lost. Stereo is mixed down as :func:`engine.audio.decode.decode_audio` does.
"""
from __future__ import annotations

import asyncio
import math
import os
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from engine.audio.decode import AudioBlocks
from engine.errors import AvatarInputError

SAMPLE_RATE_HZ = 16000  # every source yields audio at this rate (VAD, features)
CHUNK_MS = 10  # every chunk is this long (webrtcvad takes 10, 20 or 30 ms frames)
CHUNK_SAMPLES = SAMPLE_RATE_HZ * CHUNK_MS // 1000  # 160 samples per chunk
PLAYBACK_RATE_HZ = 48000  # the full-band copy played with the frames (Opus and AAC run at 48 kHz)
PLAYBACK_FACTOR = PLAYBACK_RATE_HZ // SAMPLE_RATE_HZ  # 3 playback samples per feature sample
PLAYBACK_CHUNK_SAMPLES = CHUNK_SAMPLES * PLAYBACK_FACTOR  # 480 samples per chunk


class AudioDeviceUnavailable(AvatarInputError):
    """PortAudio is missing, or no audio input device can record 48 kHz mono float32."""


@dataclass(frozen=True, eq=False)
class AudioChunk:
    """10 ms of 16 kHz mono audio with its time on the source's media clock (and the same 10 ms at 48 kHz)."""

    pcm: np.ndarray = field(repr=False)  # (160,) float32 in [-1, 1], read-only; zero past valid_samples
    pts_s: float  # start of the chunk on the source's media clock: samples before it / 16000
    end_of_segment: bool = False  # the last chunk of a segment (utterance, file, track)
    valid_samples: int = CHUNK_SAMPLES  # leading samples that are audio (< 160 only at a segment end)
    # (480,) float32 at 48 kHz, read-only: the same 10 ms at full band, what is played back (zero past
    # 3 * valid_samples); None: the source made none (the pipeline then upsamples pcm, band-limited to 8 kHz)
    playback: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.pcm.shape != (CHUNK_SAMPLES,) or self.pcm.dtype != np.float32:
            raise ValueError(
                f"AudioChunk.pcm must be ({CHUNK_SAMPLES},) float32, "
                f"got {self.pcm.shape} {self.pcm.dtype}"
            )
        if self.playback is not None and (self.playback.shape != (PLAYBACK_CHUNK_SAMPLES,) or self.playback.dtype != np.float32):
            raise ValueError(
                f"AudioChunk.playback must be ({PLAYBACK_CHUNK_SAMPLES},) float32, "
                f"got {self.playback.shape} {self.playback.dtype}"
            )
        if not 0 <= self.valid_samples <= CHUNK_SAMPLES:
            raise ValueError(f"valid_samples must be in [0, {CHUNK_SAMPLES}], got {self.valid_samples}")


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate 1-D float32 arrays (an empty list gives an empty array)."""
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class Rechunker:
    """Cuts a stream of 16 kHz mono samples into exact 10 ms :class:`AudioChunk`\\ s.

    Samples that do not fill a chunk wait for the next :meth:`push`. The chunks' ``pts_s`` come
    from a sample counter: the index of a chunk's first sample divided by 16000.

    With ``playback=True`` every push also brings the same audio at 48 kHz (``playback=``), and a
    chunk is cut once both copies fill it (the two resamplers release their samples a little
    apart); at a segment's end the 16 kHz copy decides how many chunks there are, the 48 kHz copy
    is cut beside it (zero-padded where it is short, its last few samples dropped where it is long).
    """

    def __init__(self, *, start_sample: int = 0, playback: bool = False) -> None:
        self._pending = np.zeros(0, dtype=np.float32)  # (n,) 16 kHz samples not yet in a chunk
        self._next_sample = start_sample  # sample index where the next chunk starts
        self.playback = playback  # chunks carry the 48 kHz copy too
        self._pending_wide = np.zeros(0, dtype=np.float32)  # (m,) 48 kHz samples not yet in a chunk

    @property
    def pending_samples(self) -> int:
        """Samples held back because they do not fill a chunk yet."""
        return int(self._pending.size)

    @property
    def next_sample(self) -> int:
        """Sample index (on the media clock) of the next chunk's first sample."""
        return self._next_sample

    def reset(self, *, start_sample: int) -> None:
        """Drop the pending samples and restart the counter at ``start_sample``."""
        self._pending = np.zeros(0, dtype=np.float32)
        self._pending_wide = np.zeros(0, dtype=np.float32)
        self._next_sample = start_sample

    def _make(self, pcm: np.ndarray, wide: np.ndarray | None, *, end_of_segment: bool, valid_samples: int) -> AudioChunk:
        pcm.setflags(write=False)
        if wide is not None:
            wide.setflags(write=False)
        chunk = AudioChunk(
            pcm=pcm,
            pts_s=self._next_sample / SAMPLE_RATE_HZ,
            end_of_segment=end_of_segment,
            valid_samples=valid_samples,
            playback=wide,
        )
        self._next_sample += CHUNK_SAMPLES
        return chunk

    def push(self, samples: np.ndarray, *, playback: np.ndarray | None = None, end_of_segment: bool = False) -> list[AudioChunk]:
        """Append ``samples`` (16 kHz mono float, shape (n,)) and, with ``playback=True`` at
        construction, ``playback`` (the same audio at 48 kHz, shape (about 3n,)); cut chunks.

        With ``end_of_segment=True`` the remainder is zero-padded into a last chunk and that
        chunk is flagged; if nothing remains, the last chunk cut here is flagged instead; if
        this call cuts no chunk at all, an all-padding flagged chunk (``valid_samples=0``)
        carries the flag.
        """
        if self.playback != (playback is not None):
            raise ValueError("a Rechunker(playback=True) takes playback= with every push, and only it does")
        x = np.asarray(samples, dtype=np.float32).reshape(-1)  # (n,)
        if self._pending.size:
            x = np.concatenate([self._pending, x])
        # clip makes a fresh array: chunks never alias a caller's (or PortAudio's) buffer
        x = np.clip(x, -1.0, 1.0)
        w = None
        n_full = x.size // CHUNK_SAMPLES
        if playback is not None:
            w = np.asarray(playback, dtype=np.float32).reshape(-1)  # (m,) at 48 kHz
            if self._pending_wide.size:
                w = np.concatenate([self._pending_wide, w])
            w = np.clip(w, -1.0, 1.0)
            n_full = min(n_full, w.size // PLAYBACK_CHUNK_SAMPLES)
        W = PLAYBACK_CHUNK_SAMPLES
        chunks = [
            self._make(
                x[i * CHUNK_SAMPLES : (i + 1) * CHUNK_SAMPLES],
                None if w is None else w[i * W : (i + 1) * W],
                end_of_segment=False,
                valid_samples=CHUNK_SAMPLES,
            )
            for i in range(n_full)
        ]
        rest = x[n_full * CHUNK_SAMPLES :]
        wrest = None if w is None else w[n_full * W :]
        if not end_of_segment:
            self._pending = rest.copy()  # a copy, so that the chunks' buffer is not kept writable
            if wrest is not None:
                self._pending_wide = wrest.copy()
            return chunks
        self._pending = np.zeros(0, dtype=np.float32)
        self._pending_wide = np.zeros(0, dtype=np.float32)
        while rest.size:  # one chunk (two, if the 48 kHz copy lagged behind) of the rest, zero-padded
            take = min(CHUNK_SAMPLES, rest.size)
            pcm = np.zeros(CHUNK_SAMPLES, dtype=np.float32)
            pcm[:take] = rest[:take]
            wide = None
            if wrest is not None:
                wide = np.zeros(W, dtype=np.float32)
                m = min(W if take == CHUNK_SAMPLES else take * PLAYBACK_FACTOR, wrest.size)
                wide[:m] = wrest[:m]
                wrest = wrest[W:]
            rest = rest[take:]
            chunks.append(self._make(pcm, wide, end_of_segment=not rest.size, valid_samples=int(take)))
            if not rest.size:
                return chunks
        if chunks:
            chunks[-1] = replace(chunks[-1], end_of_segment=True)
        else:
            chunks.append(
                self._make(np.zeros(CHUNK_SAMPLES, dtype=np.float32),
                           None if w is None else np.zeros(W, dtype=np.float32), end_of_segment=True, valid_samples=0)
            )
        return chunks


def _layout_name(channels: int) -> str:
    """FFmpeg channel layout name for an interleaved buffer of ``channels`` channels."""
    return {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")


class _Resampler:
    """``av.AudioResampler`` to 16 kHz (or ``rate_hz``) mono float32 that keeps its filter state across calls.

    When the input's format, layout or rate changes, the old resampler is drained (its tail
    kept) and a new one is built, as :func:`engine.audio.decode.decode_audio` does.

    :meth:`cut` ends a segment without tearing the resampler down (a pushed TTS reply's end): a
    fresh FFmpeg resampler's first call sets up its filter graph, which takes ~8 ms per resampler
    when other threads hold the GIL (the pipeline's stages), and a reply's first push paid that
    twice (measured: 12-16 ms of the first avatar frame's latency, benchmarks/voice_agent.py).
    """

    CUT_MS = 10  # silence fed by cut() to bring the held-back tail out (the filter spans ~1 ms)

    def __init__(self, rate_hz: int = SAMPLE_RATE_HZ) -> None:
        self.rate_hz = rate_hz  # of the output
        self._resampler: av.AudioResampler | None = None
        self._setup: tuple[str, str, int] | None = None  # (format, layout, rate) it was built for
        self._channels = 1  # of the input it was built for
        self._fed = 0  # input samples (per channel) fed since it was built or last cut
        self._made = 0  # output samples handed out since then
        self._drop = 0  # output samples still to drop: the silence cut() fed, not yet out

    @staticmethod
    def _take(frames: list[av.AudioFrame]) -> list[np.ndarray]:
        return [f.to_ndarray().reshape(-1) for f in frames]  # (1, n) packed mono -> (n,)

    def _out(self, frames: list[av.AudioFrame]) -> np.ndarray:
        """The resampler's output less the silence still to drop; counted."""
        y = _concat(self._take(frames))
        if self._drop:
            k = min(self._drop, y.size)
            y, self._drop = y[k:], self._drop - k
        self._made += y.size
        return y

    def process_frame(self, frame: av.AudioFrame) -> np.ndarray:
        """Resample one frame; returns the (n,) float32 samples the resampler released."""
        setup = (frame.format.name, frame.layout.name, int(frame.sample_rate))
        parts: list[np.ndarray] = []
        if self._resampler is not None and setup != self._setup:
            parts.append(self.flush())
        if self._resampler is None:
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=self.rate_hz)
            self._setup = setup
            self._channels = len(frame.layout.channels)
        parts.append(self._out(self._resampler.resample(frame)))
        self._fed += frame.samples
        return _concat(parts)

    def process_array(self, interleaved: np.ndarray, *, sample_rate_hz: int, channels: int) -> np.ndarray:
        """Resample an interleaved 1-D int16 or float32 buffer of ``channels`` channels."""
        fmt = "s16" if interleaved.dtype == np.int16 else "flt"
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(interleaved).reshape(1, -1),  # (1, n * channels) packed
            format=fmt,
            layout=_layout_name(channels),
        )
        frame.sample_rate = sample_rate_hz
        return self.process_frame(frame)

    def flush(self) -> np.ndarray:
        """Drain the buffered tail; the next input starts a fresh resampler."""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        tail = self._out(self._resampler.resample(None))
        self.reset()
        return tail

    def cut(self) -> np.ndarray:
        """The buffered tail of the audio fed so far, as :meth:`flush` gives it, keeping the resampler
        (no new filter graph at the next input): ``CUT_MS`` of silence brings the tail out; what the
        silence itself makes is dropped, now and from the next input's output. The next input starts
        as after a flush (its filter history is silence), within a sample."""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        fmt, layout, rate = self._setup
        if fmt not in ("s16", "flt"):  # only packed input (process_array's) is fed silence here
            return self.flush()
        unit = rate // math.gcd(rate, self.rate_hz)  # input samples that make whole output samples
        n = -(-(self._fed + max(1, rate * self.CUT_MS // 1000)) // unit) * unit - self._fed  # so (fed + n) is whole units:
        # the next input starts on the resampler's phase 0, as a fresh one does
        zeros = av.AudioFrame.from_ndarray(np.zeros((1, n * self._channels), np.int16 if fmt == "s16" else np.float32),
                                           format=fmt, layout=layout)
        zeros.sample_rate = rate
        want = round(self._fed * self.rate_hz / rate) - self._made  # output samples the real audio still owes
        y = self._out(self._resampler.resample(zeros))
        tail = y[: max(0, min(want, y.size))]
        self._drop = max(0, round((self._fed + n) * self.rate_hz / rate) - self._made)  # the silence still held back
        self._fed = self._made = 0
        return tail

    def discard(self) -> None:
        """Drop the buffered tail (barge-in), keeping the resampler: the next input starts from silence."""
        self.cut()

    def reset(self) -> None:
        """Forget the buffered tail: the next input starts a fresh resampler."""
        self._resampler = None
        self._setup = None
        self._fed = self._made = self._drop = 0


class Upsampler:
    """16 kHz -> 48 kHz: a Kaiser-windowed sinc low-pass applied polyphase, with its state kept
    across calls, so every call returns exactly 3 output samples per input sample (a frame's span
    stays its span) and chunk boundaries do not click. Delay: (taps - 1) / 2 = 24 output samples
    (0.5 ms). Only for chunks a source made without their 48 kHz copy (nothing above 8 kHz)."""

    factor = PLAYBACK_FACTOR  # 3

    def __init__(self, *, taps_per_phase: int = 16, cutoff_hz: float = 7200.0, beta: float = 7.0):
        n_taps = taps_per_phase * self.factor + 1
        n = np.arange(n_taps) - (n_taps - 1) / 2
        fc = cutoff_hz / PLAYBACK_RATE_HZ  # cycles per output sample
        h = 2 * fc * np.sinc(2 * fc * n) * np.kaiser(n_taps, beta)
        h *= self.factor / h.sum()  # unity gain after zero-stuffing
        k = -(-n_taps // self.factor)  # taps per phase, rounded up
        h = np.pad(h, (0, k * self.factor - n_taps))
        self._phases = [h[p :: self.factor].astype(np.float32) for p in range(self.factor)]  # each (k,)
        self._hist = np.zeros(k - 1, np.float32)  # the last k - 1 input samples

    def process(self, x: np.ndarray) -> np.ndarray:
        """(n,) float32 at 16 kHz -> (3n,) float32 at 48 kHz."""
        x = np.asarray(x, np.float32).reshape(-1)
        buf = np.concatenate([self._hist, x])  # (k - 1 + n,)
        out = np.empty(x.size * self.factor, np.float32)
        for p, hp in enumerate(self._phases):
            out[p :: self.factor] = np.convolve(buf, hp, mode="valid")  # y[3m + p] = sum_k h[3k + p] x[m - k]
        self._hist = buf[buf.size - self._hist.size :]
        return out

    def reset(self) -> None:
        """Forget the history (a new segment starts from silence)."""
        self._hist[:] = 0.0


class AudioSource(ABC):
    """An async iterator of :class:`AudioChunk` that can be closed.

    Use ``async for chunk in source`` and ``await source.aclose()`` (or ``async with source``).
    """

    # True: each chunk is released as its audio is captured (a microphone, a WebRTC track, a file paced
    # in real time), never ahead of real time, so a burst of chunks is audio that waited. False: the
    # audio carries its own timeline and may come ahead of it, in bursts (pushed TTS; a file read as
    # fast as taken): a burst of N ms covers the next N ms. The pipeline's clock reads it.
    live: bool = True

    def __aiter__(self) -> AudioSource:
        return self

    @abstractmethod
    async def __anext__(self) -> AudioChunk:
        """The next chunk; raises StopAsyncIteration when the source has ended or was closed."""

    @abstractmethod
    async def aclose(self) -> None:
        """Stop now: release the device or track; the iterator ends at its next step."""

    async def __aenter__(self) -> AudioSource:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()


class FileSource(AudioSource):
    """The audio of a media file as one segment, paced in real time or as fast as consumed.

    The file is decoded incrementally (:class:`engine.audio.decode.AudioBlocks`, in an executor,
    about ``read_ahead_s`` at a time, only when the chunks decoded before are all taken), so memory
    is flat in the file's length: an hour of audio holds what a second does. The first
    ``__anext__`` raises the errors found on opening (UnreadableMediaError, NoAudioStreamError,
    EmptyAudioError); a decoding failure or a truncation (the container promised more) is raised
    where it is found, by the ``__anext__`` that reaches it. With ``realtime=True`` chunk k is
    released at ``t0 + k * 10 ms`` on the event loop's clock, t0 being when chunk 0 was released;
    deadlines are absolute, so no drift accumulates, and a consumer that stalls receives the chunks
    that fell due at once rather than shifting the rest of the file later. With ``playback=True``
    (the default) a second decoder gives the chunks their 48 kHz copy, in step with the first;
    ``avatar render`` takes the file's audio track from the file itself and passes False.
    """

    def __init__(self, path: str | os.PathLike, *, realtime: bool, read_ahead_s: float = 1.0, playback: bool = True) -> None:
        if not read_ahead_s > 0:
            raise ValueError(f"read_ahead_s must be positive, got {read_ahead_s}")
        self.path = Path(path)  # the media file (any container PyAV opens with an audio stream)
        self.realtime = realtime  # pace chunks at 10 ms on the loop clock, else as fast as taken
        self.live = realtime  # paced: released as if captured; else ahead of real time (AudioSource.live)
        self.read_ahead_s = read_ahead_s  # decoded per executor call (and so held at most, plus one block)
        self.playback = playback  # chunks carry the 48 kHz copy (a second decoder)
        self._decoder: AudioBlocks | None = None
        self._blocks: Iterator[np.ndarray] | None = None  # the decoder's iterator, after the first __anext__
        self._wide_blocks: Iterator[np.ndarray] | None = None  # the 48 kHz decoder's iterator (playback)
        self._wide: list[np.ndarray] = []  # 48 kHz samples decoded and not yet given to the rechunker
        self._wide_n = 0  # their count
        self._held: np.ndarray | None = None  # the last block decoded, held until it is known whether it is the file's last
        self._rechunker = Rechunker(playback=playback)
        self._ready: deque[AudioChunk] = deque()  # chunks decoded and not yet yielded
        self._decoded_all = False  # the decoder is exhausted: the last chunk is cut (and flagged)
        self._index = 0  # index of the next chunk to yield
        self._t0: float | None = None  # loop time at which chunk 0 was released
        self._closed = False

    @property
    def duration_s(self) -> float | None:
        """Duration of the decoded audio in seconds, once the whole file was decoded (None before)."""
        return self._decoder.samples / SAMPLE_RATE_HZ if self._decoded_all and self._decoder is not None else None

    def _wide_take(self, n: int | None) -> np.ndarray | None:
        """The next ``n`` samples of the 48 kHz copy (fewer at its end; None: all that is left), or None without playback."""
        if not self.playback:
            return None
        if self._wide_blocks is None:  # closed meanwhile (aclose): what this decode makes is dropped anyway
            return np.zeros(n or 0, np.float32)
        while n is None or self._wide_n < n:
            try:
                block = next(self._wide_blocks)
            except StopIteration:
                break
            self._wide.append(block)
            self._wide_n += block.size
        x = _concat(self._wide)
        n = x.size if n is None else min(n, x.size)
        rest = x[n:]
        self._wide, self._wide_n = ([rest] if rest.size else []), int(rest.size)
        return x[:n]

    def _decode_more(self) -> list[AudioChunk]:
        """In an executor: about ``read_ahead_s`` more chunks; the file's last chunk carries end_of_segment."""
        if self._blocks is None:
            self._decoder = AudioBlocks(self.path, sample_rate_hz=SAMPLE_RATE_HZ)
            self._blocks = iter(self._decoder)
            if self.playback:
                self._wide_blocks = iter(AudioBlocks(self.path, sample_rate_hz=PLAYBACK_RATE_HZ))
        blocks, out = self._blocks, []
        want = max(1, int(self.read_ahead_s * SAMPLE_RATE_HZ) // CHUNK_SAMPLES)
        while len(out) < want and not self._closed:
            try:
                block = next(blocks)
            except StopIteration:
                held = self._held if self._held is not None else np.zeros(0, np.float32)
                out.extend(self._rechunker.push(held, playback=self._wide_take(None), end_of_segment=True))
                self._held, self._decoded_all = None, True
                self._wide_blocks, self._wide = None, []
                break
            if self._held is not None:
                out.extend(self._rechunker.push(self._held, playback=self._wide_take(self._held.size * PLAYBACK_FACTOR)))
            self._held = block
        return out

    async def __anext__(self) -> AudioChunk:
        if self._closed:
            raise StopAsyncIteration
        if not self._ready:
            if self._decoded_all:
                raise StopAsyncIteration
            chunks = await asyncio.get_running_loop().run_in_executor(None, self._decode_more)
            if self._closed:
                raise StopAsyncIteration
            self._ready.extend(chunks)
            if not self._ready:
                raise StopAsyncIteration
        if self.realtime:
            loop = asyncio.get_running_loop()
            if self._t0 is None:
                self._t0 = loop.time()
            delay_s = self._t0 + self._index * CHUNK_MS / 1000 - loop.time()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            if self._closed:
                raise StopAsyncIteration
        self._index += 1
        return self._ready.popleft()

    async def aclose(self) -> None:
        self._closed = True
        self._ready.clear()
        self._held = None
        self._blocks = None  # the decoder closes its file when dropped (after a decode still running, if any)
        self._wide_blocks, self._wide = None, []


def _is_int(value: object) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class PushSource(AudioSource):
    """PCM pushed by a voice agent (TTS), after livekit/agents' avatar API.

    ``push_audio`` any rate and channel count (int16 or float), ``end_of_segment()`` after each
    turn, ``clear_buffer()`` on barge-in, ``close()`` when done. The iterator waits while
    nothing is queued (no silence is made up here). The push methods are synchronous and cheap;
    they may be called from the event loop or from another thread.

    ``pts_s`` counts the samples *yielded*: :meth:`clear_buffer` rewinds the counter to the first
    dropped chunk, so the yielded chunks always tile the media clock without gaps.
    """

    live = False  # pushed audio comes ahead of real time, in pieces that each cover their own duration

    def __init__(self, *, max_buffer_s: float = 10.0) -> None:
        if not max_buffer_s > 0:
            raise ValueError(f"max_buffer_s must be positive, got {max_buffer_s}")
        self.max_buffer_s = max_buffer_s  # push_audio refuses audio that would queue more than this
        self._lock = threading.Lock()  # guards everything below: pushes may come from threads
        self._queue: deque[AudioChunk] = deque()  # chunks cut and not yet yielded
        self._rechunker = Rechunker(playback=True)
        self._resampler = _Resampler()  # -> 16 kHz, for VAD and features
        self._wide_resampler = _Resampler(PLAYBACK_RATE_HZ)  # -> 48 kHz, played back (a 48 kHz push passes through)
        # a 16 kHz push has nothing above 8 kHz: its 48 kHz copy is upsampled from the 16 kHz one, which holds
        # nothing back (FFmpeg's 16 -> 48 kHz holds 1 ms, and a piece's last chunk would wait for the next piece)
        self._up = Upsampler()
        self._next_yield_sample = 0  # sample index after the last yielded chunk
        self._segment_open = False  # audio was pushed since the last end of segment
        self._open_segment_yielded = False  # the consumer has seen part of a segment but not its end
        self._input_closed = False  # close(): no more pushes; the iterator ends once drained
        self._stopped = False  # aclose(): the iterator ends now
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the iterator waits on
        self._event: asyncio.Event | None = None  # set when there is something to yield

    # -- state seen by the producer ------------------------------------------------------------

    def _available_samples_locked(self) -> int:
        return sum(c.valid_samples for c in self._queue) + self._rechunker.pending_samples

    @property
    def available_s(self) -> float:
        """Seconds of audio queued and not yet yielded (not counting the resampler's few ms)."""
        with self._lock:
            return self._available_samples_locked() / SAMPLE_RATE_HZ

    def _wake(self) -> None:
        loop, event = self._loop, self._event
        if loop is None or event is None:
            return  # nobody has waited yet: the first __anext__ finds the queue as it is
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        else:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass  # the loop is closed: nobody is left to wake

    # -- producer API --------------------------------------------------------------------------

    def push_audio(self, pcm: np.ndarray, sample_rate_hz: int, channels: int = 1) -> None:
        """Queue PCM: int16 or float in [-1, 1], interleaved 1-D ``(n * channels,)`` or ``(n, channels)``.

        Raises:
            TypeError: ``pcm`` is neither int16 nor floating point.
            ValueError: a bad rate, channel count or shape, or non-finite samples.
            BufferError: the queue would exceed ``max_buffer_s``; this push is refused whole and
                nothing already queued is lost (wait for ``available_s`` to fall and retry).
            RuntimeError: the source was closed.
        """
        x = np.asarray(pcm)
        if x.dtype != np.int16 and not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"push_audio takes int16 or float PCM, got dtype {x.dtype}")
        if not _is_int(sample_rate_hz) or sample_rate_hz <= 0:
            raise ValueError(f"sample_rate_hz must be a positive integer, got {sample_rate_hz!r}")
        if not _is_int(channels) or not 1 <= channels <= 64:
            raise ValueError(f"channels must be an integer in [1, 64], got {channels!r}")
        if x.ndim == 2:
            if x.shape[1] != channels:
                raise ValueError(f"pcm of shape {x.shape} is not (samples, channels={channels})")
            x = x.reshape(-1)  # (n, C) -> (n * C,) interleaved
        elif x.ndim != 1 or x.size % channels:
            raise ValueError(
                f"pcm must be interleaved 1-D with a multiple of channels={channels} values "
                f"or (samples, channels); got shape {x.shape}"
            )
        if x.dtype != np.int16:
            x = x.astype(np.float32, copy=False)
            if not np.isfinite(x).all():
                raise ValueError("pcm contains NaN or infinite samples")
        n_frames = x.size // channels
        if n_frames == 0:
            return
        incoming_s = n_frames / sample_rate_hz
        with self._lock:
            if self._input_closed or self._stopped:
                raise RuntimeError("push_audio on a closed PushSource")
            queued_s = self._available_samples_locked() / SAMPLE_RATE_HZ
            if queued_s + incoming_s > self.max_buffer_s:
                raise BufferError(
                    f"PushSource buffer full: {queued_s:.3f} s queued + {incoming_s:.3f} s pushed "
                    f"> max_buffer_s={self.max_buffer_s:.3f} s; the push was refused and nothing "
                    f"queued was lost (push at most real time, or raise max_buffer_s)"
                )
            samples = self._resampler.process_array(
                x, sample_rate_hz=int(sample_rate_hz), channels=int(channels)
            )
            if sample_rate_hz == SAMPLE_RATE_HZ:
                wide = _concat([self._wide_resampler.flush(), self._up.process(samples)])  # (a tail if the rate changed)
            else:
                wide = self._wide_resampler.process_array(x, sample_rate_hz=int(sample_rate_hz), channels=int(channels))
            self._queue.extend(self._rechunker.push(samples, playback=wide))
            self._segment_open = True
        self._wake()

    def _end_segment_locked(self) -> None:
        if not self._segment_open:
            return
        tail = self._resampler.cut()  # not flush(): the next reply's first push would build new filter graphs
        wide_tail = self._wide_resampler.cut()
        if (
            tail.size == 0
            and self._rechunker.pending_samples == 0
            and self._queue
            and not self._queue[-1].end_of_segment
        ):
            self._queue[-1] = replace(self._queue[-1], end_of_segment=True)
        else:
            self._queue.extend(self._rechunker.push(tail, playback=wide_tail, end_of_segment=True))
        self._segment_open = False

    def end_of_segment(self) -> None:
        """Mark the end of the current turn: its tail is flushed and its last chunk flagged.

        A no-op when nothing was pushed since the last end of segment.
        """
        with self._lock:
            self._end_segment_locked()
        self._wake()

    def clear_buffer(self) -> float:
        """Barge-in: drop everything queued and not yet yielded; returns the seconds dropped.

        If the consumer has already seen part of the interrupted segment, an all-padding chunk
        flagged ``end_of_segment`` follows, so every segment the consumer started also ends.
        """
        with self._lock:
            dropped = self._available_samples_locked()
            self._queue.clear()
            self._resampler.discard()
            self._wide_resampler.discard()
            self._up.reset()
            self._rechunker.reset(start_sample=self._next_yield_sample)
            self._segment_open = False
            if self._open_segment_yielded:
                self._queue.extend(self._rechunker.push(np.zeros(0, np.float32), playback=np.zeros(0, np.float32), end_of_segment=True))
        self._wake()
        return dropped / SAMPLE_RATE_HZ

    def close(self) -> None:
        """No more audio: the open segment is ended, and the iterator stops once it is drained."""
        with self._lock:
            if self._input_closed:
                return
            self._end_segment_locked()
            self._input_closed = True
        self._wake()

    # -- consumer ------------------------------------------------------------------------------

    async def __anext__(self) -> AudioChunk:
        while True:
            with self._lock:
                if self._stopped:
                    raise StopAsyncIteration
                if self._queue:
                    chunk = self._queue.popleft()
                    self._next_yield_sample += CHUNK_SAMPLES
                    self._open_segment_yielded = not chunk.end_of_segment
                    return chunk
                if self._input_closed:
                    self._stopped = True
                    raise StopAsyncIteration
                if self._event is None:
                    self._event = asyncio.Event()
                self._loop = asyncio.get_running_loop()
                self._event.clear()
            await self._event.wait()

    async def aclose(self) -> None:
        """Stop now, dropping whatever is queued (use :meth:`close` to let the queue drain)."""
        with self._lock:
            self._stopped = True
            self._input_closed = True
            self._queue.clear()
            self._rechunker.reset(start_sample=self._next_yield_sample)
            self._resampler.reset()
            self._wide_resampler.reset()
        self._wake()


def _describe_input_device(device: int | str | None) -> str:
    """The device as the errors name it: "the default input" or "device 'name'"."""
    return "the default input" if device is None else f"device {device!r}"


def _import_sounddevice(device: int | str | None = None) -> ModuleType:
    """Import sounddevice (which loads PortAudio), mapping failure to AudioDeviceUnavailable.

    The message names the device asked for and says that the library, not the device, is
    what is missing, with the package to install.
    """
    try:
        import sounddevice
    except (ImportError, OSError) as e:  # OSError: "PortAudio library not found"
        raise AudioDeviceUnavailable(
            f"no audio input device: {_describe_input_device(device)} cannot be opened because "
            f"the PortAudio library could not be loaded ({e}); install it "
            "(Debian/Ubuntu: apt-get install libportaudio2, or scripts/install.sh --dev as root)"
        ) from e
    return sounddevice


class MicrophoneSource(AudioSource):
    """A live microphone through PortAudio (sounddevice): 48 kHz mono float32, 10 ms blocks, kept
    as the chunks' playback copy and resampled to 16 kHz (FFmpeg's resampler, in the callback) for the rest.

    The device is checked in the constructor (raising :class:`AudioDeviceUnavailable` with the
    cause) and opened at the first ``__anext__``. PortAudio's callback thread cuts chunks and
    hands them to the event loop with ``call_soon_threadsafe``; the queue holds at most
    ``max_queue_chunks`` and, when the consumer falls behind, drops the oldest chunk and counts
    it in :attr:`overflows` (the chunks' ``pts_s`` then show the gap).
    """

    def __init__(self, device: int | str | None = None, *, max_queue_chunks: int = 50) -> None:
        if max_queue_chunks < 1:
            raise ValueError(f"max_queue_chunks must be >= 1, got {max_queue_chunks}")
        self.device = device  # PortAudio device index or name substring; None: the default input
        self.max_queue_chunks = max_queue_chunks  # bound of the chunk queue (50 = 0.5 s)
        self.overflows = 0  # chunks dropped because the consumer fell behind
        self.input_overflows = 0  # blocks where PortAudio reported an input overflow (device-side loss)
        self._sd = _import_sounddevice(device)
        try:
            self._sd.check_input_settings(
                device=device, channels=1, dtype="float32", samplerate=PLAYBACK_RATE_HZ
            )
        except (self._sd.PortAudioError, ValueError) as e:
            raise AudioDeviceUnavailable(self._unavailable_message(e)) from e
        self._rechunker = Rechunker(playback=True)  # used only by PortAudio's callback thread
        self._resampler = _Resampler()  # 48 -> 16 kHz, in PortAudio's callback thread
        self._queue: asyncio.Queue[AudioChunk | None] | None = None  # None: end of stream
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: Any = None  # sounddevice.InputStream once started
        self._closed = False

    def _unavailable_message(self, e: BaseException) -> str:
        which = _describe_input_device(self.device)
        return (
            f"no audio input device: {which} cannot record {PLAYBACK_RATE_HZ} Hz mono float32 "
            f"({e}); connect a microphone or pass device= one of sounddevice.query_devices()"
        )

    def _enqueue(self, chunks: list[AudioChunk]) -> None:
        """On the loop: queue chunks, dropping the oldest when full."""
        if self._closed or self._queue is None:
            return
        for chunk in chunks:
            if self._queue.full():
                self._queue.get_nowait()
                self.overflows += 1
            self._queue.put_nowait(chunk)

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        """PortAudio's thread: cut the (frames, 1) block into chunks and hand them to the loop."""
        if status.input_overflow:
            self.input_overflows += 1
        wide = np.array(indata[:, 0], dtype=np.float32)  # (frames,) a copy: PortAudio reuses indata
        samples = self._resampler.process_array(wide, sample_rate_hz=PLAYBACK_RATE_HZ, channels=1)
        chunks = self._rechunker.push(samples, playback=wide)
        loop = self._loop
        if chunks and loop is not None:
            try:
                loop.call_soon_threadsafe(self._enqueue, chunks)
            except RuntimeError:
                pass  # the loop closed while the stream was still running

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(maxsize=self.max_queue_chunks)
        sd = self._sd
        try:
            stream = sd.InputStream(
                samplerate=PLAYBACK_RATE_HZ,
                blocksize=PLAYBACK_CHUNK_SAMPLES,
                device=self.device,
                channels=1,
                dtype="float32",
                callback=self._callback,
            )
            stream.start()
        except (sd.PortAudioError, ValueError) as e:
            raise AudioDeviceUnavailable(self._unavailable_message(e)) from e
        self._stream = stream

    async def __anext__(self) -> AudioChunk:
        if self._closed:
            raise StopAsyncIteration
        if self._stream is None:
            self._start()
        assert self._queue is not None
        chunk = await self._queue.get()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        stream, self._stream = self._stream, None
        if stream is not None:
            # abort() discards buffered input and returns promptly; run off the loop anyway
            await asyncio.get_running_loop().run_in_executor(None, lambda: (stream.abort(), stream.close()))
        if self._queue is not None:
            while self._queue.full():
                self._queue.get_nowait()
            self._queue.put_nowait(None)  # wake a waiting consumer


class TrackSource(AudioSource):
    """An aiortc audio track (a WebRTC peer's microphone), resampled and cut into 10 ms chunks.

    Frames from ``await track.recv()`` (typically 48 kHz stereo s16, 20 ms) go through two
    ``av.AudioResampler``\\ s kept across frames: to 16 kHz mono (VAD, features) and to 48 kHz mono
    (played back: the peer's full band, only mixed down). When the track ends (aiortc raises
    ``MediaStreamError``) the resampler is drained, the last chunk is flagged
    ``end_of_segment`` and the iterator ends. ``pts_s`` counts samples received, not the RTP
    timestamps: packets lost upstream shift nothing here. The track is not stopped by
    :meth:`aclose` (it may be shared, e.g. through a MediaRelay); its owner stops it.
    """

    def __init__(self, track: MediaStreamTrack) -> None:
        if getattr(track, "kind", None) != "audio":
            raise ValueError(f"TrackSource needs an audio track, got kind={getattr(track, 'kind', None)!r}")
        self.track = track  # the aiortc track read from
        self._resampler = _Resampler()
        self._wide_resampler = _Resampler(PLAYBACK_RATE_HZ)
        self._rechunker = Rechunker(playback=True)
        self._ready: deque[AudioChunk] = deque()  # chunks cut and not yet yielded
        self._any_audio = False  # at least one sample arrived (so the segment needs an end)
        self._ended = False  # the track ended
        self._closed = False  # aclose() was called

    async def __anext__(self) -> AudioChunk:
        while not self._ready:
            if self._closed or self._ended:
                raise StopAsyncIteration
            try:
                frame = await self.track.recv()
            except MediaStreamError:
                self._ended = True
                tail = self._resampler.flush()
                wide_tail = self._wide_resampler.flush()
                if self._any_audio or tail.size:
                    self._ready.extend(self._rechunker.push(tail, playback=wide_tail, end_of_segment=True))
                continue
            if self._closed:
                raise StopAsyncIteration
            samples = self._resampler.process_frame(frame)
            wide = self._wide_resampler.process_frame(frame)
            self._any_audio = self._any_audio or frame.samples > 0
            self._ready.extend(self._rechunker.push(samples, playback=wide))
        return self._ready.popleft()

    async def aclose(self) -> None:
        self._closed = True
        self._ready.clear()
