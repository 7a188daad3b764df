"""Log-mel spectrogram as an exportable ``nn.Module`` (no ``torch.stft``), plus a numpy helper.

Time convention: mel frame ``k`` is centred at sample ``k * hop_samples``, i.e. at
``k * hop_ms / 1000`` seconds on the audio timeline (sample 0 = 0 s). The wave is zero-padded by
``win_samples // 2`` on both sides, so a wave of ``N`` samples gives ``T = N // hop_samples + 1``
frames; this matches ``torch.stft(center=True, pad_mode="constant")`` with a Hann window of
``win_samples`` centred in ``n_fft``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MelConfig:
    """Log-mel features: 25 ms Hann windows every 10 ms, 80 Slaney mel bands up to 7.6 kHz."""

    sample_rate_hz: int = 16000  # rate the wave must already be at
    n_mels: int = 80  # number of mel bands
    win_ms: float = 25.0  # analysis (Hann) window length
    hop_ms: float = 10.0  # step between frame centres
    n_fft: int = 512  # DFT size; the window is zero-padded (centred) to this length
    fmin_hz: float = 55.0  # lowest mel filter edge
    fmax_hz: float = 7600.0  # highest mel filter edge
    log_floor: float = 1e-5  # mel power is clamped to at least this before the natural log

    @property
    def hop_samples(self) -> int:
        """Step between frames in samples (160 at 16 kHz, 10 ms)."""
        return int(round(self.sample_rate_hz * self.hop_ms / 1000.0))

    @property
    def win_samples(self) -> int:
        """Window length in samples (400 at 16 kHz, 25 ms)."""
        return int(round(self.sample_rate_hz * self.win_ms / 1000.0))

    @property
    def n_freqs(self) -> int:
        """Number of one-sided DFT bins, ``n_fft // 2 + 1``."""
        return self.n_fft // 2 + 1


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (Auditory Toolbox): linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3.0  # Hz per mel in the linear part
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(
        hz >= min_log_hz,
        min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep,
        hz / f_sp,
    )


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_hz_to_mel_slaney`."""
    mel = np.asarray(mel, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(
        mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), mel * f_sp
    )


def mel_filterbank(cfg: MelConfig) -> np.ndarray:
    """Slaney-normalised triangular mel filters, shape ``(n_mels, n_freqs)`` float32.

    Same construction as ``librosa.filters.mel(htk=False, norm="slaney")``: each triangle spans
    three consecutive mel points and is scaled to unit area (2 / bandwidth in Hz).
    """
    if not 0.0 <= cfg.fmin_hz < cfg.fmax_hz <= cfg.sample_rate_hz / 2:
        raise ValueError(f"need 0 <= fmin_hz < fmax_hz <= Nyquist, got {cfg}")
    fft_hz = np.linspace(0.0, cfg.sample_rate_hz / 2, cfg.n_freqs)  # (n_freqs,)
    mel_pts = np.linspace(
        _hz_to_mel_slaney(cfg.fmin_hz), _hz_to_mel_slaney(cfg.fmax_hz), cfg.n_mels + 2
    )
    hz_pts = _mel_to_hz_slaney(mel_pts)  # (n_mels + 2,)
    widths = np.diff(hz_pts)  # (n_mels + 1,)
    ramps = hz_pts[:, None] - fft_hz[None, :]  # (n_mels + 2, n_freqs)
    lower = -ramps[:-2] / widths[:-1, None]  # (n_mels, n_freqs) rising edge
    upper = ramps[2:] / widths[1:, None]  # (n_mels, n_freqs) falling edge
    weights = np.maximum(0.0, np.minimum(lower, upper))  # (n_mels, n_freqs)
    weights *= (2.0 / (hz_pts[2:] - hz_pts[:-2]))[:, None]  # Slaney area normalisation
    return weights.astype(np.float32)


def dft_basis(cfg: MelConfig) -> np.ndarray:
    """Windowed real and imaginary DFT rows as conv1d weights, shape ``(2 * n_freqs, 1, win)``.

    The periodic Hann window of ``win_samples`` sits centred in an ``n_fft`` frame; only its
    non-zero span is kept as the kernel, with the phase of each basis row taken at the sample's
    position inside the ``n_fft`` frame (phase does not change the power, but this keeps the
    real/imag parts identical to ``torch.stft``).
    """
    win = cfg.win_samples
    if win > cfg.n_fft:
        raise ValueError(f"win_samples ({win}) must not exceed n_fft ({cfg.n_fft})")
    n = np.arange(win, dtype=np.float64)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win)  # (win,) periodic Hann
    offset = (cfg.n_fft - win) // 2  # where the window starts inside the n_fft frame
    k = np.arange(cfg.n_freqs, dtype=np.float64)  # (n_freqs,)
    phase = 2.0 * np.pi * k[:, None] * (n[None, :] + offset) / cfg.n_fft  # (n_freqs, win)
    real = np.cos(phase) * window  # (n_freqs, win)
    imag = -np.sin(phase) * window  # (n_freqs, win)
    return np.concatenate([real, imag], axis=0)[:, None, :].astype(np.float32)


class LogMel(nn.Module):
    """Wave ``(B, N)`` float32 at ``cfg.sample_rate_hz`` -> natural-log mel ``(B, n_mels, T)``.

    ``T = N // hop_samples + 1`` and mel frame ``k`` is centred at time ``k * hop_ms / 1000`` s
    (the wave is zero-padded by ``win_samples // 2`` on both sides). The STFT is a strided
    ``conv1d`` with fixed DFT weights, so the module exports to ONNX (opset 17) with a dynamic
    length axis: Pad, Conv, Mul, Add, MatMul, Max, Log.
    """

    def __init__(self, cfg: MelConfig = MelConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("basis", torch.from_numpy(dft_basis(cfg)), persistent=False)
        self.register_buffer("mel_fb", torch.from_numpy(mel_filterbank(cfg)), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        half = cfg.win_samples // 2
        x = F.pad(wave.unsqueeze(1), (half, half))  # (B, 1, N + 2 * half)
        spec = F.conv1d(x, self.basis, stride=cfg.hop_samples)  # (B, 2 * n_freqs, T)
        real, imag = spec[:, : cfg.n_freqs], spec[:, cfg.n_freqs :]  # (B, n_freqs, T) each
        power = real * real + imag * imag  # (B, n_freqs, T)
        # (n_mels, n_freqs) @ (B, n_freqs, T) -> (B, n_mels, T)
        mel = torch.matmul(self.mel_fb, power)
        return torch.log(torch.clamp(mel, min=cfg.log_floor))  # (B, n_mels, T)


@functools.lru_cache(maxsize=4)
def _module(cfg: MelConfig) -> LogMel:
    return LogMel(cfg).eval()


def log_mel(wave: np.ndarray, cfg: MelConfig = MelConfig()) -> np.ndarray:
    """Numpy convenience: wave ``(N,)`` -> log-mel ``(T, n_mels)`` float32, time first.

    The transposed layout (time first) is the one used for storage; frame ``t`` is centred at
    ``t * hop_ms / 1000`` s as in :class:`LogMel`.
    """
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"log_mel expects a 1-D wave (N,), got shape {wave.shape}")
    with torch.inference_mode():
        mel = _module(cfg)(torch.from_numpy(wave)[None])  # (1, n_mels, T)
    return np.ascontiguousarray(mel[0].T.numpy())  # (T, n_mels)


def log_mel_valid(wave: np.ndarray, cfg: MelConfig = MelConfig()) -> np.ndarray:
    """Log-mel of the frames that lie wholly inside ``wave`` (no padding): ``(T, n_mels)`` with
    ``T = (N - win) // hop + 1`` and frame ``j`` centred at sample ``win // 2 + j * hop``.

    For streaming: the rows equal :func:`log_mel`'s rows of a longer wave that contains this
    excerpt (zero-pad the excerpt where it lies before the wave's start, as ``log_mel`` does).
    """
    wave = np.asarray(wave, dtype=np.float32)
    half = cfg.win_samples // 2
    if wave.ndim != 1 or len(wave) < 2 * half:
        raise ValueError(f"log_mel_valid needs a 1-D wave of at least {2 * half} samples, got shape {wave.shape}")
    with torch.inference_mode():
        m = _module(cfg)
        spec = F.conv1d(torch.from_numpy(wave)[None, None], m.basis, stride=cfg.hop_samples)  # (1, 2 * n_freqs, T)
        real, imag = spec[:, : cfg.n_freqs], spec[:, cfg.n_freqs :]
        mel = torch.matmul(m.mel_fb, real * real + imag * imag)  # (1, n_mels, T)
        out = torch.log(torch.clamp(mel, min=cfg.log_floor))
    return np.ascontiguousarray(out[0].T.numpy())  # (T, n_mels)
