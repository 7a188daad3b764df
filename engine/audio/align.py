"""Map video frames to mel frames using each frame's own timestamp, never a nominal fps.

Convention: a video frame with presentation time ``t`` (``pts * time_base``, measured from the
first video frame, which is where ``decode_audio(..., align_to_video=True)`` puts audio sample
0) is shown over ``[t, t + its duration)``. Its mel window is centred on ``t`` itself, the
frame's pts, not on the middle of that interval: this needs no knowledge of the frame's
duration, so it is exact for constant and variable frame rates alike. Mel frame ``k`` is
centred at ``k * hop_ms / 1000`` s (see :mod:`engine.audio.mel`), so the centre of the window
for time ``t`` is ``round(t * 1000 / hop_ms)``.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

# Mel frames taken before and after the centre frame by default: 8 + 1 + 8 = 17 frames, 170 ms.
DEFAULT_BEFORE_FRAMES = 8
DEFAULT_AFTER_FRAMES = 8


def mel_index_for_time(t_s: np.ndarray, *, hop_ms: float = 10.0) -> np.ndarray:
    """Nearest mel frame index for each time in seconds: ``round(t * 1000 / hop_ms)``, int64.

    Halves round up (``floor(x + 0.5)``) so that the mapping is monotone and does not depend on
    the parity of the index. Indices are not clipped (negative times give negative indices).
    """
    if hop_ms <= 0:
        raise ValueError(f"hop_ms must be positive, got {hop_ms}")
    t_s = np.asarray(t_s, dtype=np.float64)
    # 1e-9 absorbs float error in times that sit exactly on a frame centre (0.37 * 100 etc.).
    return np.floor(t_s * (1000.0 / hop_ms) + 0.5 + 1e-9).astype(np.int64)


def mel_windows_for_frames(
    frame_times_s: np.ndarray,
    n_mel_frames: int,
    *,
    hop_ms: float = 10.0,
    before: int = DEFAULT_BEFORE_FRAMES,
    after: int = DEFAULT_AFTER_FRAMES,
) -> np.ndarray:
    """Mel frame indices around each video frame, shape ``(F, before + 1 + after)`` int64.

    Row ``f`` is ``c - before, ..., c, ..., c + after`` with ``c = mel_index_for_time(t_f)``,
    clipped to ``[0, n_mel_frames - 1]`` (edge frames repeat at the ends of the clip). Column
    ``before`` is the centre. ``frame_times_s`` are the actual per-frame presentation times in
    seconds (``frame.time`` minus the first frame's time), any spacing: variable frame rate works
    as is. Gather the windows with ``mel[windows]`` for a ``(T, n_mels)`` log-mel to get
    ``(F, before + 1 + after, n_mels)``.
    """
    frame_times_s = np.asarray(frame_times_s, dtype=np.float64)
    if frame_times_s.ndim != 1:
        raise ValueError(f"frame_times_s must be 1-D (F,), got shape {frame_times_s.shape}")
    if not np.all(np.isfinite(frame_times_s)):
        raise ValueError("frame_times_s contains NaN or infinite times")
    if n_mel_frames < 1:
        raise ValueError(f"n_mel_frames must be at least 1, got {n_mel_frames}")
    if before < 0 or after < 0:
        raise ValueError(f"before and after must be >= 0, got {before}, {after}")
    centres = mel_index_for_time(frame_times_s, hop_ms=hop_ms)  # (F,)
    offsets = np.arange(-before, after + 1, dtype=np.int64)  # (W,)
    windows = centres[:, None] + offsets[None, :]  # (F, W)
    return np.clip(windows, 0, n_mel_frames - 1)


def frame_times_constant(n_frames: int, fps: int | float | Fraction | str) -> np.ndarray:
    """Presentation times ``i / fps`` in seconds for ``i < n_frames``, float64 ``(n_frames,)``.

    ``fps`` is taken as an exact rational: a ``Fraction`` (what PyAV gives as
    ``stream.average_rate``), an int, a string such as ``"30000/1001"``, or a float, which is
    snapped to the nearest fraction with a denominator up to 1001 (so ``30000 / 1001`` as a
    float is read back as 30000/1001; pass a Fraction for anything finer). Each time is
    computed as ``(i * den) / num`` with a single rounding, so frame 10**6 at 30000/1001 fps
    is still within 1 ulp of its true time.
    """
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    if isinstance(fps, float):
        rate = Fraction(fps).limit_denominator(1001)
    else:
        rate = Fraction(fps)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    i = np.arange(n_frames, dtype=np.int64)
    return (i * rate.denominator).astype(np.float64) / float(rate.numerator)
