"""Decode the audio of any media file PyAV can open to mono float32 at a fixed sample rate.

Timing convention
-----------------
``decode_audio(path)`` returns audio whose sample 0 is the audio stream's first *presented*
sample: encoder priming (AAC's 1024-sample delay, Opus pre-skip) has already been removed by
FFmpeg through the container's edit list / skip-samples side data, and the stream's start time
already counts that removal. The audio stream need not start where the video starts, though
(a video track with an empty edit, an MPEG-PS whose streams start at different SCRs): to
line audio up with video frames, either

* call ``decode_audio(path, align_to_video=True)``: sample 0 is then at the video stream's first
  frame time (zeros are prepended when the audio starts later, samples dropped when it starts
  earlier), so a frame presented at ``frame.time`` is at audio time
  ``frame.time - first_frame.time`` seconds; or
* call ``decode_audio(path)`` and shift by hand: a frame at ``frame.time`` is at audio time
  ``frame.time - video_start_s - audio_start_offset_s(path)``, where ``video_start_s`` is the
  video stream's start time (the first frame's time).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from engine.errors import EmptyAudioError, NoAudioStreamError, UnreadableMediaError

# A decoded stream shorter than this fraction of its declared duration is reported as truncated.
TRUNCATION_MIN_FRACTION = 0.9
# ... unless it is short by no more than this many seconds (rounding, priming, last packet).
TRUNCATION_SLACK_S = 0.05


def _open(path: Path) -> av.container.InputContainer:
    """Open ``path`` for reading, mapping every failure to :class:`UnreadableMediaError`."""
    if not path.is_file():
        raise UnreadableMediaError(f"{path}: no such file")
    try:
        return av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise UnreadableMediaError(f"{path}: not a readable media container ({e})") from e


def _start_s(stream: av.stream.Stream) -> float | None:
    """The stream's declared start time in seconds, or None where the container gives none."""
    if stream.start_time is None or stream.time_base is None:
        return None
    return float(stream.start_time * stream.time_base)


def _wav_declared_duration_s(path: Path) -> float | None:
    """Duration a RIFF/WAVE header declares (data chunk bytes / byte rate), or None if unknown.

    FFmpeg clamps a WAV stream's duration to the bytes actually present, so a truncated WAV
    is only detectable from the header itself.
    """
    with path.open("rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None  # RF64, Wave64 and friends: no 32-bit size to check
        byte_rate: int | None = None  # nAvgBytesPerSec from the fmt chunk
        for _ in range(64):  # a WAV has a handful of chunks before "data"
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            chunk_id, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if chunk_id == b"data":
                if not byte_rate or size in (0, 0xFFFFFFFF):  # 0 / -1: streamed, size unknown
                    return None
                return size / byte_rate
            if chunk_id == b"fmt ":
                body = f.read(size)
                if len(body) >= 12:
                    byte_rate = int.from_bytes(body[8:12], "little")
                f.seek(size % 2, os.SEEK_CUR)  # chunks are padded to an even size
            else:
                f.seek(size + size % 2, os.SEEK_CUR)
    return None


def _parse_hms_s(text: str) -> float | None:
    """Parse Matroska's ``HH:MM:SS.nnnnnnnnn`` DURATION tag to seconds (None if malformed)."""
    parts = text.strip().split(":")
    if len(parts) != 3:
        return None
    try:
        return int(parts[0]) * 3600 + int(parts[1]) * 60 + float(parts[2])
    except ValueError:
        return None


def _declared_duration_s(
    path: Path, container: av.container.InputContainer, stream: av.stream.Stream
) -> float | None:
    """The audio duration the container's header or index promises, in seconds, or None.

    Only containers whose per-stream duration is written by the muxer are trusted: MP4/MOV
    (sample tables), Matroska/WebM (the per-track DURATION tag FFmpeg and mkvmerge write) and
    WAV (the data chunk size). Elsewhere (MPEG-PS/TS, Ogg, MP3, ADTS) FFmpeg derives the
    duration from the data present or estimates it from the bit rate, which can neither reveal
    a truncation nor be trusted not to raise a false one (VBR MP3 without a Xing header).
    """
    formats = set(container.format.name.split(","))
    if formats & {"mov", "mp4"}:
        if stream.duration is None or stream.time_base is None or stream.duration <= 0:
            return None
        return float(stream.duration * stream.time_base)
    if formats & {"matroska", "webm"}:
        tags = {key.upper(): value for key, value in stream.metadata.items()}
        return _parse_hms_s(tags["DURATION"]) if "DURATION" in tags else None
    if "wav" in formats:
        return _wav_declared_duration_s(path)
    return None


def _video_start_s(container: av.container.InputContainer) -> float | None:
    """Start time of the first video stream in seconds (None when there is no video)."""
    if not container.streams.video:
        return None
    start = _start_s(container.streams.video[0])
    return 0.0 if start is None else start


def audio_start_offset_s(path: str | os.PathLike) -> float:
    """Audio stream start minus video stream start, in seconds (0.0 without a video stream).

    Positive: the audio begins after the first video frame. Add it to a time on the audio
    timeline of :func:`decode_audio` (``align_to_video=False``) to get a time relative to
    the first video frame. Raises the same errors as :func:`decode_audio` for a missing or
    unreadable file or one without audio.
    """
    path = Path(path)
    with _open(path) as container:
        if not container.streams.audio:
            raise NoAudioStreamError(f"{path}: the container has no audio stream")
        video_start_s = _video_start_s(container)
        if video_start_s is None:
            return 0.0
        audio_start_s = _start_s(container.streams.audio[0])
        return (0.0 if audio_start_s is None else audio_start_s) - video_start_s


class AudioBlocks:
    """The first audio stream of a file, decoded incrementally: an iterator of mono float32 blocks.

    ``for block in AudioBlocks(path, sample_rate_hz=16000): ...`` gives (n,) float32 blocks in
    [-1, 1] as FFmpeg's resampler releases them (a packet's worth, its buffered tail last); their
    concatenation is :func:`decode_audio`'s wave (``align_to_video=False``). Only the container's
    and the resampler's buffers are held: memory is flat in the file's length (``avatar render``
    of an hour of speech, engine/render.py). Iterate once.

    Raises what :func:`decode_audio` raises, where it is found: a missing or unreadable file or one
    without audio at the first block; a decoding failure where it happens; a truncation (the
    container declares more than was decoded) and EmptyAudioError after the last block.
    After the iteration: ``samples`` (blocks' total length), ``first_time_s`` (the first decoded
    frame's time), ``stream_start_s`` and ``video_start_s`` (the video stream's start, None without one).
    """

    def __init__(self, path: str | os.PathLike, *, sample_rate_hz: int = 16000) -> None:
        if sample_rate_hz <= 0:
            raise ValueError(f"sample_rate_hz must be positive, got {sample_rate_hz}")
        self.path = Path(path)  # the media file
        self.sample_rate_hz = sample_rate_hz  # of the blocks
        self.samples = 0  # yielded so far
        self.first_time_s: float | None = None  # pts of the first decoded frame, in seconds
        self.stream_start_s: float | None = None  # the audio stream's declared start, in seconds
        self.video_start_s: float | None = None  # the first video stream's start, in seconds (None: no video)
        self._started = False

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._started:
            raise RuntimeError("AudioBlocks is iterated once")
        self._started = True
        return self._blocks()

    def _blocks(self) -> Iterator[np.ndarray]:
        path = self.path
        with _open(path) as container:  # closed when the iteration ends, fails, or the iterator is dropped
            if not container.streams.audio:
                raise NoAudioStreamError(f"{path}: the container has no audio stream")
            stream = container.streams.audio[0]
            declared_s = _declared_duration_s(path, container, stream)
            self.video_start_s = _video_start_s(container)
            self.stream_start_s = _start_s(stream)
            resampler: av.AudioResampler | None = None
            resampler_input: tuple[str, str, int] | None = None  # (format, layout, rate) it expects
            decoded_s = 0.0  # decoded duration at the input rate, in seconds
            try:
                for packet in container.demux(stream):
                    for frame in packet.decode():
                        if frame.samples == 0:
                            continue
                        if self.first_time_s is None and frame.pts is not None:
                            self.first_time_s = float(frame.time)
                        decoded_s += frame.samples / frame.sample_rate
                        setup = (frame.format.name, frame.layout.name, frame.sample_rate)
                        out: list[av.AudioFrame] = []
                        if resampler is None or setup != resampler_input:
                            # First frame, or the layout or rate changed mid-stream: drain the old one.
                            if resampler is not None:
                                out += resampler.resample(None)
                            resampler = av.AudioResampler(format="flt", layout="mono", rate=self.sample_rate_hz)
                            resampler_input = setup
                        out += resampler.resample(frame)
                        yield from self._take(out)
                if resampler is not None:
                    yield from self._take(resampler.resample(None))  # the resampler's buffered tail
            except av.FFmpegError as e:
                raise UnreadableMediaError(
                    f"{path}: audio decoding failed after {decoded_s:.3f} s "
                    f"(file truncated or corrupt): {e}"
                ) from e
        if declared_s is not None and decoded_s < min(
            TRUNCATION_MIN_FRACTION * declared_s, declared_s - TRUNCATION_SLACK_S
        ):
            raise UnreadableMediaError(
                f"{path}: truncated: the audio stream declares {declared_s:.3f} s "
                f"but only {decoded_s:.3f} s could be decoded"
            )
        if self.samples == 0:
            raise EmptyAudioError(f"{path}: the audio stream decodes to zero samples")

    def _take(self, frames: list[av.AudioFrame]) -> Iterator[np.ndarray]:
        for f in frames:
            block = f.to_ndarray().reshape(-1)  # (1, n) packed mono -> (n,)
            if block.size:
                self.samples += block.size
                # Mixing stereo down adds channels (at -3 dB each), which can exceed full scale.
                yield np.clip(block, -1.0, 1.0).astype(np.float32, copy=False)


def audio_duration_s(path: str | os.PathLike) -> float | None:
    """The audio's duration as its container states it (header, index or FFmpeg's estimate), without
    decoding; None where unknown. Raises UnreadableMediaError / NoAudioStreamError as decode_audio."""
    path = Path(path)
    with _open(path) as container:
        if not container.streams.audio:
            raise NoAudioStreamError(f"{path}: the container has no audio stream")
        stream = container.streams.audio[0]
        declared = _declared_duration_s(path, container, stream)
        if declared is not None:
            return declared
        if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
            return float(stream.duration * stream.time_base)
        return container.duration / av.time_base if container.duration else None


def decode_audio(
    path: str | os.PathLike,
    *,
    sample_rate_hz: int = 16000,
    align_to_video: bool = False,
) -> np.ndarray:
    """Decode the first audio stream of ``path`` to mono float32 in [-1, 1], shape ``(N,)``.

    Channels are mixed down and the rate converted by FFmpeg's resampler
    (``av.AudioResampler(format="flt", layout="mono", rate=sample_rate_hz)``), flushed at the
    end so that no tail is lost. Sample 0 is the audio stream's first presented sample, or,
    with ``align_to_video=True``, the video stream's first frame time (see the module
    docstring).

    Raises:
        UnreadableMediaError: the file is missing, not a media container, fails to decode part
            way through, or decodes to less than 90 % of the duration its container declares
            (truncated; checked for MP4/MOV, Matroska/WebM and WAV, whose headers state it).
            Partial audio is never returned silently where the container says more was due;
            a cut MPEG-TS/PS, Ogg or MP3 carries no such promise and decodes to what is left.
        NoAudioStreamError: the container has no audio stream.
        EmptyAudioError: the audio stream decodes to zero samples.
    """
    blocks = AudioBlocks(path, sample_rate_hz=sample_rate_hz)
    chunks = list(blocks)  # each (n,) float32 at sample_rate_hz, clipped to [-1, 1]
    wave = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]  # (N,); AudioBlocks raised if there were none
    video_start_s = blocks.video_start_s
    if align_to_video and video_start_s is not None:
        audio_start_s = blocks.first_time_s if blocks.first_time_s is not None else (blocks.stream_start_s or 0.0)
        shift = int(round((audio_start_s - video_start_s) * sample_rate_hz))  # samples
        if shift > 0:  # audio starts after the first video frame: pad with silence
            wave = np.concatenate([np.zeros(shift, dtype=np.float32), wave])
        elif shift < 0:  # audio starts before the first video frame: drop the lead-in
            wave = wave[-shift:]
        if wave.size == 0:
            raise EmptyAudioError(
                f"{path}: no audio remains after aligning to the video's first frame "
                f"(audio starts {audio_start_s:.3f} s, video {video_start_s:.3f} s)"
            )
    return wave
