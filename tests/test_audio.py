"""Audio front end: decoding any container, log-mel features, and audio/video alignment.

Every media file here is synthesised with PyAV into ``tmp_path``; the last tests read two real
clips from ../shared/data and skip with a reason where it is absent.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from engine.audio import (
    LogMel,
    MelConfig,
    audio_start_offset_s,
    decode_audio,
    frame_times_constant,
    log_mel,
    mel_filterbank,
    mel_index_for_time,
    mel_windows_for_frames,
)
from engine.errors import EmptyAudioError, NoAudioStreamError, UnreadableMediaError

SR_HZ = 16000  # decode rate used throughout
HOP_MS = 10.0  # mel hop of the default MelConfig


# ---------------------------------------------------------------------------------------------
# Writers


def _sine(freq_hz: float, n: int, sr_hz: int, amplitude: float = 0.5) -> np.ndarray:
    """A sine of n samples, float32 ``(n,)``."""
    return (amplitude * np.sin(2 * np.pi * freq_hz * np.arange(n) / sr_hz)).astype(np.float32)


def _audio_frame(block: np.ndarray, fmt: str, layout: str, sr_hz: int, pts: int) -> av.AudioFrame:
    """Wrap a float block ``(C, n)`` in [-1, 1] as an AudioFrame of the encoder's format."""
    if fmt.startswith("s16"):
        data = np.round(block * 32767).astype(np.int16)  # (C, n)
    elif fmt.startswith("s32"):
        data = np.round(block * 2147483520).astype(np.int32)  # (C, n)
    else:
        data = block.astype(np.float32)  # (C, n)
    if not fmt.endswith("p"):  # packed: interleave channels
        data = data.T.reshape(1, -1)  # (1, n * C)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=layout)
    frame.sample_rate = sr_hz
    frame.pts = pts
    frame.time_base = Fraction(1, sr_hz)
    return frame


def _encode_audio(container: av.container.OutputContainer, stream: av.AudioStream,
                  wave: np.ndarray, sr_hz: int, layout: str) -> None:
    """Encode ``wave`` ``(C, N)`` into ``stream`` frame by frame, then flush the encoder."""
    fmt = stream.codec_context.format.name
    step = stream.codec_context.frame_size or 1024
    for start in range(0, wave.shape[1], step):
        frame = _audio_frame(wave[:, start:start + step], fmt, layout, sr_hz, start)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def write_audio(path: Path, wave: np.ndarray, sr_hz: int, codec: str, *,
                container_format: str | None = None, options: dict[str, str] | None = None) -> Path:
    """Write an audio-only file; ``wave`` is ``(C, N)`` float32 with C of 1 or 2."""
    layout = "mono" if wave.shape[0] == 1 else "stereo"
    with av.open(str(path), "w", format=container_format, options=options or {}) as container:
        stream = container.add_stream(codec, rate=sr_hz)
        stream.layout = layout
        container.start_encoding()  # writes the header even when no sample follows
        _encode_audio(container, stream, wave, sr_hz, layout)
    return path


def write_av_clip(path: Path, frame_pts: list[int], time_base: Fraction, *, white_index: int,
                  burst_start_s: float | None, sr_hz: int = 48000, with_audio: bool = True) -> Path:
    """An mp4 with 64x64 H.264 video at the given pts and AAC audio starting at time 0.

    Frame ``white_index`` is white and every other frame black. The audio is silent except for
    a 1 kHz burst of 150 ms starting at ``burst_start_s`` on the presentation timeline.
    """
    end_s = float(frame_pts[-1] * time_base) + 0.3
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=30, options={"preset": "ultrafast"})
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        video.codec_context.time_base = time_base
        if with_audio:
            audio = container.add_stream("aac", rate=sr_hz)
            audio.layout = "mono"
            wave = np.zeros(int(end_s * sr_hz), dtype=np.float32)  # (N,)
            if burst_start_s is not None:
                i0 = int(round(burst_start_s * sr_hz))
                burst = _sine(1000.0, int(0.15 * sr_hz), sr_hz)
                wave[i0:i0 + burst.size] = burst
            _encode_audio(container, audio, wave[None], sr_hz, "mono")
        for i, pts in enumerate(frame_pts):
            level = 255 if i == white_index else 0
            image = np.full((64, 64, 3), level, dtype=np.uint8)  # (H, W, 3)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = pts
            frame.time_base = time_base
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
    return path


def decode_frames(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Presentation times ``(F,)`` in seconds and mean grey levels ``(F,)`` of every frame."""
    times: list[float] = []
    levels: list[float] = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            times.append(float(frame.time))
            levels.append(float(frame.to_ndarray(format="gray").mean()))
    return np.asarray(times), np.asarray(levels)


def dominant_hz(wave: np.ndarray, sr_hz: int) -> float:
    """Frequency of the largest FFT peak of a Hann-windowed wave."""
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    return float(np.fft.rfftfreq(wave.size, 1.0 / sr_hz)[np.argmax(spectrum)])


# ---------------------------------------------------------------------------------------------
# Decoding


def test_decode_stereo_aac_mp4_resamples_and_mixes(tmp_path: Path) -> None:
    sr_in, dur_s = 44100, 1.0
    left = _sine(440.0, int(sr_in * dur_s), sr_in, amplitude=0.5)
    wave = np.stack([left, np.zeros_like(left)])  # (2, N): sine on the left, silence right
    path = write_audio(tmp_path / "stereo.mp4", wave, sr_in, "aac")

    mono = decode_audio(path)
    assert mono.dtype == np.float32 and mono.ndim == 1
    # AAC decodes to whole 1024-sample frames: FFmpeg removes the priming but not the tail
    # padding of the last frame, so allow up to one frame (1024 / 44100 s) of extra length.
    assert int(dur_s * SR_HZ) - 2 <= mono.size <= int(dur_s * SR_HZ) + 1024 * SR_HZ // sr_in + 2
    assert abs(dominant_hz(mono[: SR_HZ], SR_HZ) - 440.0) <= 2.0
    # Mixed down, not just the left channel taken: FFmpeg sums L and R at -3 dB each.
    amplitude = float(np.max(np.abs(mono[SR_HZ // 10: -SR_HZ // 10])))
    assert 0.30 < amplitude < 0.40, amplitude
    assert np.max(np.abs(mono)) <= 1.0


def test_decode_mono_wav_48k(tmp_path: Path) -> None:
    sr_in = 48000
    path = write_audio(tmp_path / "mono.wav", _sine(1000.0, sr_in, sr_in)[None], sr_in, "pcm_s16le")
    wave = decode_audio(path)
    assert abs(wave.size - SR_HZ) <= 2  # exactly 1 s, give or take the resampler's rounding
    assert abs(dominant_hz(wave, SR_HZ) - 1000.0) <= 2.0
    assert abs(float(np.max(np.abs(wave))) - 0.5) < 0.01  # mono passes through at unit gain
    assert audio_start_offset_s(path) == 0.0  # no video stream


@pytest.mark.parametrize(
    ("name", "codec", "container_format"),
    [("clip.mpg", "mp2", "mpeg"), ("clip.webm", "libopus", None), ("clip.ts", "aac", "mpegts")],
)
def test_decode_other_containers(tmp_path: Path, name: str, codec: str,
                                 container_format: str | None) -> None:
    wave_in = _sine(440.0, 48000, 48000)[None]  # (1, N): 1 s
    path = write_audio(tmp_path / name, wave_in, 48000, codec, container_format=container_format)
    wave = decode_audio(path, sample_rate_hz=8000)
    assert abs(wave.size - 8000) <= 8000 * 0.03
    assert abs(dominant_hz(wave, 8000) - 440.0) <= 3.0


# ---------------------------------------------------------------------------------------------
# Decoding errors: one class per cause, the file named in the message


def _assert_raises(error: type[Exception], path: Path, match: str | None = None) -> None:
    with pytest.raises(error, match=match) as info:
        decode_audio(path)
    assert path.name in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    _assert_raises(UnreadableMediaError, tmp_path / "nowhere.wav")


def test_text_file_named_mp4(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a movie\n" * 50)
    _assert_raises(UnreadableMediaError, path)


def _truncate(path: Path, fraction: float) -> Path:
    data = path.read_bytes()
    cut = path.with_name(f"cut_{path.name}")
    cut.write_bytes(data[: int(len(data) * fraction)])
    return cut


def _two_seconds() -> np.ndarray:
    return _sine(440.0, 2 * 48000, 48000)[None]  # (1, N)


def test_truncated_mp4_moov_at_end(tmp_path: Path) -> None:
    # FFmpeg's mp4 muxer writes the index (moov) last: cut at 40 % the file will not open.
    path = write_audio(tmp_path / "full.mp4", _two_seconds(), 48000, "aac")
    _assert_raises(UnreadableMediaError, _truncate(path, 0.4))


def test_truncated_mp4_faststart_fails_mid_stream(tmp_path: Path) -> None:
    # With the index first the cut file opens and decodes ~0.7 s before reading past the end.
    path = write_audio(tmp_path / "full.mp4", _two_seconds(), 48000, "aac",
                       options={"movflags": "faststart"})
    _assert_raises(UnreadableMediaError, _truncate(path, 0.4), match="truncated")


@pytest.mark.parametrize(("name", "codec"), [("full.wav", "pcm_s16le"), ("full.webm", "libopus")])
def test_truncated_file_declaring_more_is_refused(tmp_path: Path, name: str, codec: str) -> None:
    # These decode cleanly up to the cut; only the header's declared duration reveals the loss.
    path = write_audio(tmp_path / name, _two_seconds(), 48000, codec)
    _assert_raises(UnreadableMediaError, _truncate(path, 0.4), match="truncated")


def test_video_only_mp4(tmp_path: Path) -> None:
    path = write_av_clip(tmp_path / "silent_film.mp4", list(range(0, 400, 40)), Fraction(1, 1000),
                         white_index=0, burst_start_s=None, with_audio=False)
    _assert_raises(NoAudioStreamError, path)
    with pytest.raises(NoAudioStreamError):
        audio_start_offset_s(path)


def test_zero_length_audio(tmp_path: Path) -> None:
    # A valid WAV header with an empty data chunk.
    path = write_audio(tmp_path / "empty.wav", np.zeros((1, 0), np.float32), 48000, "pcm_s16le")
    _assert_raises(EmptyAudioError, path)


# ---------------------------------------------------------------------------------------------
# Log-mel


def test_mel_config_sizes() -> None:
    cfg = MelConfig()
    assert (cfg.hop_samples, cfg.win_samples) == (160, 400)


@pytest.mark.parametrize("n", [0, 1, 159, 160, 161, 16000, 16159])
def test_log_mel_frame_count(n: int) -> None:
    mel = log_mel(np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1)
    assert mel.shape == (n // 160 + 1, 80) and mel.dtype == np.float32


def test_log_mel_matches_torch_stft_reference() -> None:
    cfg = MelConfig()
    wave = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 8000)).astype(np.float32))
    ours = LogMel(cfg)(wave)  # (B, n_mels, T)
    stft = torch.stft(wave, cfg.n_fft, cfg.hop_samples, cfg.win_samples,
                      torch.hann_window(cfg.win_samples), center=True, pad_mode="constant",
                      return_complex=True)  # (B, n_freqs, T)
    mel_fb = torch.from_numpy(mel_filterbank(cfg))  # (n_mels, n_freqs)
    ref = torch.log(torch.clamp(mel_fb @ stft.abs() ** 2, min=cfg.log_floor))  # (B, n_mels, T)
    assert ours.shape == ref.shape == (2, 80, 8000 // 160 + 1)
    assert torch.allclose(ours, ref, atol=1e-3)


def test_log_mel_1khz_peak_in_right_band() -> None:
    cfg = MelConfig()
    mel = log_mel(_sine(1000.0, SR_HZ, SR_HZ), cfg)  # (T, n_mels)
    fb = mel_filterbank(cfg)  # (n_mels, n_freqs)
    bin_1khz = int(round(1000.0 * cfg.n_fft / cfg.sample_rate_hz))  # 32: exactly on a DFT bin
    expected = int(np.argmax(fb[:, bin_1khz]))
    assert int(np.argmax(mel[5:-5].mean(axis=0))) == expected
    # and that band's triangle peaks within one DFT bin of 1 kHz
    assert abs(int(np.argmax(fb[expected])) - bin_1khz) <= 1


def test_log_mel_deterministic_and_floored() -> None:
    module = LogMel()
    wave = torch.randn(1, 4000)
    assert torch.equal(module(wave), module(wave))
    silent = module(torch.zeros(1, 1600))
    assert torch.allclose(silent, torch.full_like(silent, float(np.log(1e-5))))


def test_log_mel_onnx_export_matches_torch(tmp_path: Path) -> None:
    pytest.importorskip("onnx", reason="torch.onnx.export needs the onnx package")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    module = LogMel().eval()
    path = tmp_path / "log_mel.onnx"
    torch.onnx.export(
        module, (torch.randn(1, 16000),), str(path), dynamo=False, opset_version=17,
        input_names=["wave"], output_names=["log_mel"],
        dynamic_axes={"wave": {0: "batch", 1: "samples"}, "log_mel": {0: "batch", 2: "frames"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wave = np.random.default_rng(1).standard_normal((2, 12345)).astype(np.float32) * 0.3
    (onnx_out,) = session.run(["log_mel"], {"wave": wave})
    with torch.inference_mode():
        torch_out = module(torch.from_numpy(wave)).numpy()
    assert onnx_out.shape == torch_out.shape == (2, 80, 12345 // 160 + 1)
    assert float(np.max(np.abs(onnx_out - torch_out))) < 1e-3


# ---------------------------------------------------------------------------------------------
# Alignment


def test_mel_index_for_time() -> None:
    t = np.array([0.0, 0.004, 0.005, 0.37, 1001 / 30000, 2.0])
    assert mel_index_for_time(t).tolist() == [0, 0, 1, 37, 3, 200]


def test_frame_times_constant_exact_rational() -> None:
    times = frame_times_constant(30001, Fraction(30000, 1001))
    assert times[30000] == pytest.approx(1001.0, abs=1e-9)  # 30000 frames is exactly 1001 s
    assert np.array_equal(frame_times_constant(5, 30000 / 1001), times[:5])  # float snapped
    assert np.array_equal(frame_times_constant(3, "25"), [0.0, 0.04, 0.08])


def test_mel_windows_shape_and_clipping() -> None:
    windows = mel_windows_for_frames(np.array([0.0, 0.5, 1.0]), 101, before=3, after=2)
    assert windows.shape == (3, 6)
    assert windows[0].tolist() == [0, 0, 0, 0, 1, 2]
    assert windows[1].tolist() == [47, 48, 49, 50, 51, 52]
    assert windows[2].tolist() == [97, 98, 99, 100, 100, 100]


@dataclass(frozen=True)
class _ClipCase:
    """A synthetic clip: its video timestamps and which frame carries the flash and the beep."""

    name: str  # test id
    time_base: Fraction  # video pts unit, seconds
    frame_pts: tuple[int, ...]  # presentation timestamps in time_base units
    white_index: int  # the white frame; the audio burst starts at its pts


def _constant_case(name: str, fps: Fraction, n: int = 50, k: int = 37) -> _ClipCase:
    time_base = Fraction(1, fps.numerator)
    return _ClipCase(name, time_base, tuple(i * fps.denominator for i in range(n)), k)


def _vfr_case(n: int = 50, k: int = 37, first_ms: int = 20) -> _ClipCase:
    # Durations alternate 30 ms and 50 ms, and the video starts 20 ms after the audio.
    pts = np.cumsum([first_ms] + [30 if i % 2 == 0 else 50 for i in range(n - 1)])
    return _ClipCase("vfr", Fraction(1, 1000), tuple(int(p) for p in pts), k)


ALIGN_CASES = [
    _constant_case("25fps", Fraction(25)),
    _constant_case("29.97fps", Fraction(30000, 1001)),
    _constant_case("30fps", Fraction(30)),
    _vfr_case(),
]


@pytest.mark.parametrize("case", ALIGN_CASES, ids=[c.name for c in ALIGN_CASES])
def test_white_frame_window_centres_on_audio_onset(tmp_path: Path, case: _ClipCase) -> None:
    burst_s = float(case.frame_pts[case.white_index] * case.time_base)  # on the pts timeline
    path = write_av_clip(tmp_path / f"{case.name}.mp4", list(case.frame_pts), case.time_base,
                         white_index=case.white_index, burst_start_s=burst_s)

    times_s, levels = decode_frames(path)  # (F,), (F,)
    assert times_s.size == len(case.frame_pts)
    white = int(np.argmax(levels))
    assert white == case.white_index and levels[white] > 200
    assert times_s[white] == pytest.approx(burst_s, abs=1e-4)

    expected_offset_s = -float(case.frame_pts[0] * case.time_base)  # audio starts at 0
    assert audio_start_offset_s(path) == pytest.approx(expected_offset_s, abs=1e-4)

    wave = decode_audio(path, align_to_video=True)  # sample 0 at the first frame's time
    mel = log_mel(wave)  # (T, n_mels)
    rel_times_s = times_s - times_s[0]  # (F,) seconds since the first frame
    windows = mel_windows_for_frames(rel_times_s, mel.shape[0], before=8, after=8)
    assert windows.shape == (times_s.size, 17)

    # Onset: first mel frame at half the burst's power. With windows centred on their frame
    # time, that is the first frame whose centre is at or after the burst start.
    power = np.exp(mel).sum(axis=1)  # (T,)
    plateau = float(np.median(power[power > 0.1 * power.max()]))
    onset = int(np.argmax(power >= 0.5 * plateau))
    centre = int(windows[white, 8])
    assert abs(centre - onset) <= 1, (centre, onset, rel_times_s[white])
    # Sharper: the half-power crossing, interpolated between mel frames, is where the white
    # frame's time falls on the mel axis, within a quarter of a mel frame (2.5 ms). This holds
    # only because FFmpeg drops the AAC encoder's 1024 priming samples (edit list + skip
    # samples), so decoded sample 0 is presentation time 0.
    below, above = power[onset - 1], power[onset]
    crossing = onset - 1 + (0.5 * plateau - below) / (above - below)  # fractional mel frame
    assert abs(crossing - rel_times_s[white] * 1000.0 / HOP_MS) < 0.25
    # and the silence before the burst really is silent (no misplaced audio)
    assert power[: max(onset - 3, 1)].max() < 0.01 * plateau


def test_audio_starting_after_video_is_padded(tmp_path: Path) -> None:
    # Video from 0 s; the audio stream's first sample is at 100 ms and a beep 100 ms later.
    sr_in = 48000
    wave = np.zeros(sr_in, dtype=np.float32)  # (N,)
    wave[4800:4800 + 2400] = _sine(1000.0, 2400, sr_in)
    path = tmp_path / "late_audio.mp4"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        video.codec_context.time_base = Fraction(1, 1000)
        audio = container.add_stream("aac", rate=sr_in)
        audio.layout = "mono"
        for start in range(0, wave.size, 1024):
            block = wave[None, start:start + 1024]  # (1, n)
            frame = _audio_frame(block, "fltp", "mono", sr_in, pts=4800 + start)
            container.mux(audio.encode(frame))
        container.mux(audio.encode(None))
        for i in range(30):
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            frame.pts = i * 40
            frame.time_base = Fraction(1, 1000)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))

    def onset_s(x: np.ndarray) -> float:
        return int(np.argmax(np.abs(x) > 0.02)) / SR_HZ

    raw = decode_audio(path)
    aligned = decode_audio(path, align_to_video=True)
    # Here the muxer keeps the 1024 priming samples and starts the stream 1024 samples early
    # (at 78 ms, the edit list rounded to the 1 ms movie timescale): the timeline stays right.
    assert onset_s(aligned) == pytest.approx(0.2, abs=0.001)
    assert onset_s(raw) + audio_start_offset_s(path) == pytest.approx(0.2, abs=0.001)
    assert np.all(aligned[: int(0.07 * SR_HZ)] == 0.0)  # padded with silence


# ---------------------------------------------------------------------------------------------
# Real clips from ../shared/data


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("clip", "is_vfr"),
    [("video-retalking__examples_face_1.mp4", True), ("smirk__samples_dafoe.mp4", False)],
)
def test_real_clip_windows(shared_data: Path, clip: str, is_vfr: bool) -> None:
    path = shared_data / "clips" / clip
    with av.open(str(path)) as container:
        fps = Fraction(container.streams.video[0].average_rate)
        times_s = np.asarray([float(f.time) for f in container.decode(video=0)])  # (F,)
    deltas_ms = np.diff(times_s) * 1000.0  # (F - 1,)
    # face_1 is variable frame rate: a 30 fps grid with about every third frame missing
    # (deltas of 33.3 ms and 66.7 ms, 22.13 fps on average); dafoe is constant 30000/1001.
    assert (np.ptp(deltas_ms) > 20.0) == is_vfr

    mel = log_mel(decode_audio(path, align_to_video=True))  # (T, n_mels)
    windows = mel_windows_for_frames(times_s - times_s[0], mel.shape[0])
    assert windows.shape[0] == times_s.size
    centres = mel_index_for_time(times_s - times_s[0])  # (F,) unclipped
    assert 0 <= centres[-1] < mel.shape[0]
    mean_step = (centres[-1] - centres[0]) / (times_s.size - 1)
    assert mean_step == pytest.approx(1000.0 / HOP_MS / float(fps), rel=0.01)
