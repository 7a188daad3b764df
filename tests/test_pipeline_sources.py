"""Audio sources: exact 10 ms chunks, sample-counted pts, resampling, pacing, barge-in, errors.

Everything is real: files decoded by PyAV, FFmpeg's resampler, an aiortc track (also received
over a loopback WebRTC connection, Opus and all), PortAudio (which finds no device here).
Timing is asserted only as lower bounds and loose upper bounds.
"""
from __future__ import annotations

import asyncio
import fractions
import math
import threading
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, VideoStreamTrack

from engine.audio.decode import decode_audio
from engine.errors import AvatarInputError, UnreadableMediaError
from engine.pipeline.sources import (
    CHUNK_MS,
    CHUNK_SAMPLES,
    SAMPLE_RATE_HZ,
    AudioChunk,
    AudioDeviceUnavailable,
    FileSource,
    MicrophoneSource,
    PushSource,
    Rechunker,
    TrackSource,
)
from tests import aio

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_VOICE = REPO_ROOT / "engine" / "assets" / "demo" / "demo_voice.wav"
TIMEOUT_S = 5.0  # bound on every await that could hang if a source were broken


def _run(coro, timeout_s: float = 15.0):
    """Run a coroutine to completion with an overall bound."""
    return aio.run(coro, timeout_s)


async def _collect(source, limit: int = 100_000) -> list[AudioChunk]:
    chunks: list[AudioChunk] = []
    async for chunk in source:
        chunks.append(chunk)
        if len(chunks) >= limit:
            break
    return chunks


def _sine(freq_hz: float, n: int, sr_hz: int, amplitude: float = 0.5, phase_samples: int = 0) -> np.ndarray:
    t = (np.arange(n) + phase_samples) / sr_hz
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, sr_hz: int = SAMPLE_RATE_HZ) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spectrum) * sr_hz / x.size)


def _assert_tiled(chunks: list[AudioChunk], start_index: int = 0) -> None:
    """Chunk k has pts k/100 exactly (a float from the sample counter) and 160 float32 samples."""
    for k, chunk in enumerate(chunks, start=start_index):
        assert chunk.pts_s == k / 100, (k, chunk.pts_s)
        assert chunk.pcm.shape == (CHUNK_SAMPLES,) and chunk.pcm.dtype == np.float32
        assert not chunk.pcm.flags.writeable
        assert np.abs(chunk.pcm).max() <= 1.0


def _write_wav(path: Path, samples: np.ndarray, sr_hz: int) -> Path:
    """A real 16-bit mono WAV file."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr_hz)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def _valid_audio(chunks: list[AudioChunk]) -> np.ndarray:
    return np.concatenate([c.pcm[: c.valid_samples] for c in chunks]) if chunks else np.zeros(0)


# ---------------------------------------------------------------------------------------------
# AudioChunk and Rechunker


def test_constants_and_chunk_validation() -> None:
    assert (SAMPLE_RATE_HZ, CHUNK_MS, CHUNK_SAMPLES) == (16000, 10, 160)
    with pytest.raises(ValueError, match="160"):
        AudioChunk(pcm=np.zeros(80, np.float32), pts_s=0.0)
    with pytest.raises(ValueError, match="float32"):
        AudioChunk(pcm=np.zeros(160, np.float64), pts_s=0.0)
    chunk = AudioChunk(pcm=np.zeros(160, np.float32), pts_s=0.5)
    with pytest.raises(AttributeError):
        chunk.pts_s = 1.0  # frozen
    assert "pcm" not in repr(chunk)


def test_rechunker_odd_pushes_keep_samples_and_pts() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 16000).astype(np.float32)
    rechunker = Rechunker()
    chunks: list[AudioChunk] = []
    i = 0
    while i < x.size:
        n = int(rng.integers(1, 700))
        chunks += rechunker.push(x[i : i + n])
        i += n
    assert rechunker.pending_samples == x.size % CHUNK_SAMPLES == 0
    _assert_tiled(chunks)
    assert len(chunks) == 100
    np.testing.assert_array_equal(np.concatenate([c.pcm for c in chunks]), x)


@pytest.mark.parametrize(
    "n, expect_chunks, expect_valid",
    [(170, 2, 10), (320, 2, 160), (0, 1, 0)],
)
def test_rechunker_end_of_segment(n: int, expect_chunks: int, expect_valid: int) -> None:
    rechunker = Rechunker()
    x = np.full(n, 0.25, np.float32)
    chunks = rechunker.push(x, end_of_segment=True)
    assert len(chunks) == expect_chunks
    assert [c.end_of_segment for c in chunks] == [False] * (expect_chunks - 1) + [True]
    assert chunks[-1].valid_samples == expect_valid
    assert np.all(chunks[-1].pcm[expect_valid:] == 0)  # zero padding
    assert rechunker.pending_samples == 0 and rechunker.next_sample == expect_chunks * 160
    _assert_tiled(chunks)


def test_rechunker_clips_and_never_aliases_input() -> None:
    x = np.full(160, 2.0, np.float32)
    (chunk,) = Rechunker().push(x)
    assert np.all(chunk.pcm == 1.0)
    x[:] = 0.0
    assert np.all(chunk.pcm == 1.0)


# ---------------------------------------------------------------------------------------------
# FileSource


def test_file_source_fast_yields_the_decoded_file_exactly() -> None:
    wave_ref = decode_audio(DEMO_VOICE, sample_rate_hz=SAMPLE_RATE_HZ)
    source = FileSource(DEMO_VOICE, realtime=False)
    chunks = _run(_collect(source))
    assert len(chunks) == math.ceil(wave_ref.size / CHUNK_SAMPLES)
    _assert_tiled(chunks)
    assert [c.end_of_segment for c in chunks].count(True) == 1 and chunks[-1].end_of_segment
    assert chunks[-1].valid_samples == wave_ref.size - (len(chunks) - 1) * CHUNK_SAMPLES
    np.testing.assert_array_equal(_valid_audio(chunks), wave_ref)
    assert source.duration_s == pytest.approx(wave_ref.size / SAMPLE_RATE_HZ)


def test_file_source_realtime_paces_against_the_loop_clock(tmp_path: Path) -> None:
    path = _write_wav(tmp_path / "one_second.wav", _sine(220, 16000, 16000), 16000)

    async def main() -> tuple[list[AudioChunk], list[float], float]:
        loop = asyncio.get_running_loop()
        source = FileSource(path, realtime=True)
        chunks, released = [], []
        async for chunk in source:
            released.append(loop.time())
            chunks.append(chunk)
        return chunks, released, released[-1] - released[0]

    chunks, released, span_s = _run(main())
    assert len(chunks) == 100  # ceil(1 s / 10 ms)
    _assert_tiled(chunks)
    # Absolute deadlines: chunk k never comes before t0 + k * 10 ms ...
    t0 = released[0]
    assert all(t >= t0 + k * 0.01 - 1e-6 for k, t in enumerate(released))
    # ... and the whole file takes about its duration (0.99 s from first to last; loose bound).
    assert 0.98 <= span_s < 3.0


def test_file_source_close_ends_the_iterator() -> None:
    async def main() -> list[AudioChunk]:
        source = FileSource(DEMO_VOICE, realtime=False)
        first = [await source.__anext__() for _ in range(3)]
        await source.aclose()
        rest = await _collect(source)
        return first + rest

    assert len(_run(main())) == 3


def test_file_source_errors_propagate(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not a media file" * 10)
    for path in (tmp_path / "missing.wav", garbage):
        with pytest.raises(UnreadableMediaError, match=path.name):
            _run(_collect(FileSource(path, realtime=False)))


def test_file_source_decodes_as_it_goes_memory_flat_in_the_length(tmp_path: Path) -> None:
    """Five minutes of audio through the source: the chunks are the decoded file, sample for sample,
    while what Python holds at any time (tracemalloc: numpy's buffers included) stays far below the
    decoded wave's 19 MB; it held the whole wave (twice during the decode) before."""
    import tracemalloc

    x = np.tile(_sine(220, 16000, 16000, amplitude=0.3), 300)  # 5 min at 16 kHz
    path = _write_wav(tmp_path / "long.wav", x, 16000)
    ref = (np.clip(x, -1, 1) * 32767).astype("<i2").astype(np.float32) / 32768.0
    del x

    async def main() -> tuple[int, float, int]:
        source = FileSource(path, realtime=False)
        n, pos, mismatches = 0, 0, 0
        async for chunk in source:
            v = chunk.pcm[: chunk.valid_samples]
            mismatches += int(not np.array_equal(v, ref[pos : pos + v.size]))
            pos += v.size
            n += 1
        return n, source.duration_s, mismatches

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        n, duration_s, mismatches = _run(main(), 120)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert n == 30000 and duration_s == pytest.approx(300.0) and mismatches == 0
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB held at the peak"


def test_file_source_reports_a_truncated_file_where_it_is_found(tmp_path: Path) -> None:
    path = _write_wav(tmp_path / "cut.wav", _sine(220, 32000, 16000), 16000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # the header still declares 2 s

    async def main() -> int:
        n = 0
        async for _ in FileSource(path, realtime=False):
            n += 1
        return n

    with pytest.raises(UnreadableMediaError, match="truncated"):
        _run(main())


# ---------------------------------------------------------------------------------------------
# PushSource


def test_push_source_resamples_48k_stereo_int16_in_odd_pieces() -> None:
    sr = 48000
    tone = _sine(440, sr, sr, amplitude=0.3)  # 1 s
    stereo = (np.stack([tone, tone], axis=1) * 32767).astype(np.int16)  # (n, 2)
    rng = np.random.default_rng(1)

    async def main() -> list[AudioChunk]:
        source = PushSource()
        i = 0
        while i < sr:
            n = int(rng.integers(1, 1500))
            piece = stereo[i : i + n]
            # alternate the two accepted shapes: (n, channels) and interleaved (n * channels,)
            source.push_audio(piece if i % 2 else piece.reshape(-1), sr, channels=2)
            i += n
        assert 0.98 <= source.available_s <= 1.0
        source.end_of_segment()
        source.close()
        return await _collect(source)

    chunks = _run(main())
    _assert_tiled(chunks)
    assert chunks[-1].end_of_segment and not any(c.end_of_segment for c in chunks[:-1])
    y = _valid_audio(chunks)
    assert abs(y.size - 16000) <= 16  # 1 s at 16 kHz, give or take the resampler's rounding
    assert abs(_peak_hz(y) - 440) <= 2
    # Continuity across the pushes: no sample step larger than a 440 Hz sine can make
    # (stereo is mixed at -3 dB per channel, as decode_audio does: amplitude 0.3 * sqrt(2)).
    steady = y[200:-200]
    max_step = 2 * np.pi * 440 / 16000 * 0.3 * math.sqrt(2)
    assert np.abs(np.diff(steady)).max() <= max_step * 1.05


def test_push_source_16k_mono_float_passes_through_and_flags_the_queued_tail() -> None:
    x = np.random.default_rng(2).uniform(-0.5, 0.5, 320).astype(np.float32)

    async def main() -> list[AudioChunk]:
        source = PushSource()
        source.push_audio(x, SAMPLE_RATE_HZ)
        source.end_of_segment()
        source.end_of_segment()  # a second call without new audio is a no-op
        source.close()
        return await _collect(source)

    chunks = _run(main())
    _assert_tiled(chunks)
    # 16 kHz mono goes through unchanged; the end flag lands on the still-queued last chunk
    # instead of an extra padding chunk.
    assert [(c.end_of_segment, c.valid_samples) for c in chunks] == [(False, 160), (True, 160)]
    np.testing.assert_allclose(_valid_audio(chunks), x, atol=1e-6)


def test_push_source_waits_without_pushes_and_wakes_from_another_thread() -> None:
    async def main() -> tuple[AudioChunk, AudioChunk]:
        source = PushSource()
        # Nothing pushed: the iterator waits (no made-up silence).
        waiter = asyncio.ensure_future(source.__anext__())
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), 0.05)
        assert not waiter.done()
        # A push from a foreign thread (a TTS callback) wakes the waiting consumer.
        pcm = np.full(160, 0.1, np.float32)
        pusher = threading.Thread(target=source.push_audio, args=(pcm, SAMPLE_RATE_HZ))
        pusher.start()
        first = await asyncio.wait_for(waiter, TIMEOUT_S)
        pusher.join()
        source.end_of_segment()  # everything was yielded: the flag comes on an all-padding chunk
        marker = await asyncio.wait_for(source.__anext__(), TIMEOUT_S)
        await source.aclose()
        return first, marker

    first, marker = _run(main())
    assert first.pts_s == 0.0 and np.allclose(first.pcm, 0.1) and not first.end_of_segment
    assert marker.end_of_segment and marker.valid_samples == 0 and marker.pts_s == 0.01
    assert np.all(marker.pcm == 0)


def test_push_source_clear_buffer_drops_queued_audio_and_ends_the_segment() -> None:
    async def main() -> tuple[list[AudioChunk], float, float, list[AudioChunk]]:
        source = PushSource()
        source.push_audio(_sine(300, 32000, 16000), SAMPLE_RATE_HZ)  # 2 s
        head = [await source.__anext__() for _ in range(50)]  # 0.5 s consumed
        dropped_s = source.clear_buffer()
        available_after_s = source.available_s
        # A new turn after the barge-in.
        source.push_audio(_sine(300, 1600, 16000), SAMPLE_RATE_HZ)
        source.end_of_segment()
        source.close()
        return head, dropped_s, available_after_s, await _collect(source)

    head, dropped_s, available_after_s, rest = _run(main())
    assert dropped_s == pytest.approx(1.5, abs=0.002)
    assert available_after_s == 0.0
    # The interrupted segment is closed by an all-padding chunk, and pts go on without a gap.
    assert rest[0].end_of_segment and rest[0].valid_samples == 0
    _assert_tiled(head + rest)
    assert len(rest) == 1 + 10 and rest[-1].end_of_segment


def test_push_source_overflow_refuses_the_push_and_loses_nothing() -> None:
    async def main() -> None:
        source = PushSource(max_buffer_s=1.0)
        source.push_audio(np.zeros(12800, np.int16), SAMPLE_RATE_HZ)  # 0.8 s
        before_s = source.available_s
        with pytest.raises(BufferError, match="max_buffer_s"):
            source.push_audio(np.zeros(8000, np.int16), SAMPLE_RATE_HZ)  # + 0.5 s
        assert source.available_s == before_s == 0.8
        for _ in range(40):  # the consumer takes 0.4 s
            await source.__anext__()
        source.push_audio(np.zeros(8000, np.int16), SAMPLE_RATE_HZ)  # now it fits
        assert source.available_s == pytest.approx(0.9)
        await source.aclose()

    _run(main())


def test_push_source_rejects_bad_input_and_pushes_after_close() -> None:
    source = PushSource()
    with pytest.raises(TypeError, match="int16 or float"):
        source.push_audio(np.zeros(160, np.int32), 16000)
    with pytest.raises(ValueError, match="sample_rate_hz"):
        source.push_audio(np.zeros(160, np.int16), 0)
    with pytest.raises(ValueError, match="channels"):
        source.push_audio(np.zeros(161, np.int16), 48000, channels=2)
    with pytest.raises(ValueError, match="samples, channels"):
        source.push_audio(np.zeros((160, 1), np.int16), 48000, channels=2)
    with pytest.raises(ValueError, match="NaN"):
        source.push_audio(np.full(160, np.nan, np.float32), 16000)
    with pytest.raises(ValueError, match="max_buffer_s"):
        PushSource(max_buffer_s=0)
    assert source.available_s == 0.0
    source.close()
    with pytest.raises(RuntimeError, match="closed"):
        source.push_audio(np.zeros(160, np.int16), 16000)
    assert _run(_collect(source)) == []


def test_push_source_aclose_ends_now() -> None:
    async def main() -> list[AudioChunk]:
        source = PushSource()
        source.push_audio(np.zeros(1600, np.float32), SAMPLE_RATE_HZ)
        waiter = asyncio.ensure_future(_collect(source))
        await asyncio.sleep(0)
        await source.aclose()
        return await asyncio.wait_for(waiter, TIMEOUT_S)

    assert len(_run(main())) <= 10


# ---------------------------------------------------------------------------------------------
# TrackSource


class SineTrack(AudioStreamTrack):
    """An aiortc audio track: 48 kHz stereo s16, 20 ms frames of a sine, then it ends.

    ``paced`` releases frames in real time (needed when sending over a peer connection).
    """

    def __init__(self, *, freq_hz: float, n_frames: int, paced: bool = False) -> None:
        super().__init__()
        self.freq_hz = freq_hz
        self.n_frames = n_frames
        self.paced = paced
        self._sent = 0
        self._t0: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self._sent >= self.n_frames or self.readyState != "live":
            self.stop()
            raise MediaStreamError
        samples = 960  # 20 ms at 48 kHz
        if self.paced:
            self._t0 = self._t0 if self._t0 is not None else time.monotonic()
            await asyncio.sleep(max(0.0, self._t0 + self._sent * 0.02 - time.monotonic()))
        tone = _sine(self.freq_hz, samples, 48000, amplitude=0.3, phase_samples=self._sent * samples)
        pcm = (np.stack([tone, tone], axis=1) * 32767).astype(np.int16).reshape(1, -1)  # (1, 2n)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
        frame.sample_rate = 48000
        frame.pts = self._sent * samples
        frame.time_base = fractions.Fraction(1, 48000)
        self._sent += 1
        return frame


def test_track_source_resamples_and_rechunks_an_aiortc_track() -> None:
    track = SineTrack(freq_hz=500, n_frames=50)  # 1 s
    chunks = _run(_collect(TrackSource(track)))
    _assert_tiled(chunks)
    assert chunks[-1].end_of_segment and not any(c.end_of_segment for c in chunks[:-1])
    y = _valid_audio(chunks)
    assert abs(y.size - 16000) <= 16
    assert abs(_peak_hz(y) - 500) <= 2
    steady = y[200:-200]
    assert np.abs(np.diff(steady)).max() <= 2 * np.pi * 500 / 16000 * 0.3 * math.sqrt(2) * 1.05


def test_track_source_refuses_a_video_track() -> None:
    with pytest.raises(ValueError, match="audio track"):
        TrackSource(VideoStreamTrack())


def test_track_source_over_a_loopback_webrtc_connection() -> None:
    """A remote track received over real WebRTC (Opus, 48 kHz stereo) feeds TrackSource."""

    async def main() -> list[AudioChunk]:
        sender, receiver = RTCPeerConnection(), RTCPeerConnection()
        try:
            sender.addTrack(SineTrack(freq_hz=440, n_frames=25, paced=True))  # 0.5 s
            remote: asyncio.Future = asyncio.get_running_loop().create_future()
            receiver.on("track", lambda track: remote.done() or remote.set_result(track))
            await sender.setLocalDescription(await sender.createOffer())
            await receiver.setRemoteDescription(sender.localDescription)
            await receiver.setLocalDescription(await receiver.createAnswer())
            await sender.setRemoteDescription(receiver.localDescription)
            source = TrackSource(await asyncio.wait_for(remote, TIMEOUT_S))
            chunks = [await asyncio.wait_for(source.__anext__(), TIMEOUT_S) for _ in range(40)]
        finally:
            await sender.close()
            await receiver.close()
        # Closing the connection ends the remote track: the source drains and stops.
        chunks += await asyncio.wait_for(_collect(source), TIMEOUT_S)
        return chunks

    chunks = _run(main())
    _assert_tiled(chunks)
    assert chunks[-1].end_of_segment
    steady = _valid_audio(chunks[10:40])  # past Opus's start-up
    assert abs(_peak_hz(steady) - 440) <= 5


# ---------------------------------------------------------------------------------------------
# MicrophoneSource


def _has_input_device() -> bool:
    try:
        import sounddevice

        sounddevice.query_devices(kind="input")
        return True
    except Exception:  # OSError (no PortAudio) or PortAudioError (no device): none usable
        return False


def _has_portaudio() -> bool:
    try:
        import sounddevice  # noqa: F401  (loads the PortAudio library)

        return True
    except (ImportError, OSError):  # OSError: "PortAudio library not found"
        return False


def test_microphone_source_without_a_device_raises_a_clear_error() -> None:
    """Either cause is a clear AudioDeviceUnavailable naming the device asked for: without the
    PortAudio library (a fresh machine without libportaudio2) it says which package to install;
    with the library but no such device it says the device cannot record."""
    if _has_input_device():
        pytest.skip("an audio input device exists here; this test checks the error without one")
    library = _has_portaudio()
    with pytest.raises(AudioDeviceUnavailable, match="^no audio input device: the default input ") as info:
        MicrophoneSource()
    assert isinstance(info.value, AvatarInputError)
    with pytest.raises(AudioDeviceUnavailable, match="^no audio input device: device 'no such microphone' ") as info:
        MicrophoneSource(device="no such microphone")
    message = str(info.value)
    assert "\n" not in message
    if library:
        assert "cannot record 48000 Hz mono" in message and "sounddevice.query_devices()" in message
    else:
        assert "PortAudio library could not be loaded" in message and "libportaudio2" in message


# ---------------------------------------------------------------------------------------------
# The full-band copy (AudioChunk.playback): kept at 48 kHz beside the 16 kHz one, on the same clock


def _band_db(x: np.ndarray, sr_hz: int, lo_hz: float, hi_hz: float) -> float:
    """Energy in [lo, hi) relative to the whole signal, dB."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size))) ** 2
    f = np.fft.rfftfreq(x.size, 1 / sr_hz)
    return float(10 * np.log10(spectrum[(f >= lo_hz) & (f < hi_hz)].sum() / spectrum.sum()))


def _lag(a: np.ndarray, b: np.ndarray, max_lag: int = 8) -> int:
    """The shift of ``b`` against ``a`` (samples) that correlates best."""
    lags = range(-max_lag, max_lag + 1)
    n = min(a.size, b.size) - 2 * max_lag
    return max(lags, key=lambda k: float(np.dot(a[max_lag : max_lag + n], b[max_lag + k : max_lag + k + n])))


@pytest.mark.parametrize("rate_hz, high_hz", [(48000, 12000), (24000, 10000), (44100, 15000)])
def test_push_source_keeps_the_input_band_for_playback_beside_the_16k_copy(rate_hz: int, high_hz: int) -> None:
    """A TTS voice at 24 / 44.1 / 48 kHz keeps its tone above 8 kHz in the 48 kHz copy (the 16 kHz
    copy cannot hold it), both copies tile the same 10 ms chunks, and they are not shifted against
    each other (a 1 kHz tone: lag 0 at 16 kHz)."""
    n = rate_hz  # 1 s
    x = _sine(1000, n, rate_hz, 0.3) + _sine(high_hz, n, rate_hz, 0.3)

    async def main() -> list[AudioChunk]:
        source = PushSource()
        piece = rate_hz // 50  # 20 ms, as a TTS streams
        for i in range(0, n, piece):
            source.push_audio(x[i : i + piece], rate_hz)
        source.close()
        return await _collect(source)

    chunks = _run(main())
    _assert_tiled(chunks)
    assert all(c.playback is not None and c.playback.shape == (480,) and not c.playback.flags.writeable for c in chunks)
    wide = np.concatenate([c.playback for c in chunks])[: 3 * sum(c.valid_samples for c in chunks)]
    narrow = _valid_audio(chunks)
    assert abs(wide.size - 48000) <= 480 and abs(narrow.size - 16000) <= 160
    mid = slice(4800, 43200)
    assert _band_db(wide[mid], 48000, high_hz - 200, high_hz + 200) > -4.0  # half the energy is the high tone
    assert _band_db(narrow[1600:14400], 16000, 7500, 8000) < -40.0
    if rate_hz == 48000:  # 48 kHz passes through untouched
        np.testing.assert_allclose(wide, x[: wide.size], atol=1e-6)
    # same clock: the 48 kHz copy decimated (its 1 kHz tone) lines up with the 16 kHz copy
    lowpass = np.convolve(wide, np.hanning(31) / np.hanning(31).sum(), mode="same")[::3]
    assert _lag(narrow[1600:14400], lowpass[1600:14400]) == 0


def test_push_source_16k_push_gets_an_upsampled_playback_without_holding_samples_back() -> None:
    """A 16 kHz push has no band to keep: its 48 kHz copy is upsampled from it, and a 10 ms piece
    yields its chunk at once (nothing held back waiting for the next piece)."""
    x = _sine(440, 160, 16000)

    async def main() -> AudioChunk:
        source = PushSource()
        source.push_audio(x, 16000)
        chunk = await asyncio.wait_for(source.__anext__(), TIMEOUT_S)
        await source.aclose()
        return chunk

    chunk = _run(main())
    assert chunk.valid_samples == 160 and chunk.playback is not None and chunk.playback.shape == (480,)


def test_file_source_playback_is_the_file_at_48k() -> None:
    ref = decode_audio(DEMO_VOICE, sample_rate_hz=48000)
    chunks = _run(_collect(FileSource(DEMO_VOICE, realtime=False)))
    wide = np.concatenate([c.playback for c in chunks])
    n = min(ref.size, 3 * sum(c.valid_samples for c in chunks))
    assert abs(ref.size - n) <= 3
    np.testing.assert_allclose(wide[:n], ref[:n], atol=1e-6)
    assert all(c.playback is None for c in _run(_collect(FileSource(DEMO_VOICE, realtime=False, playback=False), limit=20)))
