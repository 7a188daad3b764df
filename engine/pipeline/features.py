"""Streaming audio features: 16 kHz samples in, one smoothed audio feature per video frame out.

The offline path (``FrameGenerator.audio_features``) computes the log-mel of a whole file and
runs the audio encoder over every frame at once. Here the same numbers come out frame by frame
while audio arrives:

- mel row ``r`` (centred at sample ``160 r``) is computed as soon as its 25 ms window is in
  (``engine.audio.mel.log_mel_valid`` on the excerpt; before the start the wave is zeros, as
  ``log_mel`` pads it);
- frame ``k``'s mel window is rows ``c_k - mel_before .. c_k + mel_after`` (``c_k`` the row at
  the frame's time), clipped at row 0 as offline;
- the audio encoder's temporal filter sees frames ``k - context .. k + lookahead``; the graph is
  called on exactly those frames (clipped at frame 0, and at the last frame once the stream has
  ended), so its edge clamping equals the offline one.

So frame ``k`` is ready once the samples up to ``need_samples(k)`` have arrived: the lookahead
in samples is ``lookahead_ms`` (82.5 ms for the default bundle at 25 fps). That is the latency
the audio side adds; everything else is compute.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from engine.audio.align import mel_index_for_time
from engine.audio.mel import MelConfig, log_mel_valid

HOP = MelConfig().hop_samples  # 160 samples: 10 ms
HALF_WIN = MelConfig().win_samples // 2  # 200 samples: half a 25 ms window


class StreamingFeatures:
    """Samples in (``push``), per-frame features out (``feature(k)``), equal to the offline ones."""

    def __init__(self, runtime, *, fps: int, keep_s: float = 3.0):
        self.g = runtime["audio_encoder"]
        c = runtime.bundle.configs["audio_encoder"]
        self.before, self.after = c.mel_before, c.mel_after
        self.context, self.lookahead = c.filter_context_frames, c.filter_lookahead_frames
        self.fps = fps
        self.keep_rows = int(keep_s * 100)
        self.samples = np.zeros(0, np.float32)  # the tail of the wave ...
        self.sample_base = 0  # ... starting at this absolute sample
        self.n_samples = 0  # samples pushed so far (absolute)
        self.mel = np.zeros((0, c.n_mels), np.float32)  # computed rows ...
        self.mel_base = 0  # ... starting at this absolute row
        self.ended = False
        self.feats: deque[tuple[int, np.ndarray]] = deque(maxlen=64)  # (frame, feature) recently computed

    # -- timing --
    def centre_row(self, k: int) -> int:
        return int(mel_index_for_time(np.array([k / self.fps]))[0])

    def need_samples(self, k: int) -> int:
        """Samples that must have arrived before frame ``k`` can be computed."""
        return HOP * (self.centre_row(k + self.lookahead) + self.after) + HALF_WIN

    @property
    def lookahead_ms(self) -> float:
        return 1000.0 * (self.need_samples(0)) / 16000.0

    def n_frames_total(self) -> int | None:
        """Frames the stream holds once ended (the last partial frame counts): ceil(N * fps / 16000)."""
        if not self.ended:
            return None
        return max(1, -(-self.n_samples * self.fps // 16000))

    def ready(self, k: int) -> bool:
        total = self.n_frames_total()
        if total is not None:
            return k < total
        return self.n_samples >= self.need_samples(k)

    # -- input --
    def push(self, pcm: np.ndarray) -> None:
        self.samples = np.concatenate([self.samples, np.asarray(pcm, np.float32)])
        self.n_samples += len(pcm)

    def end(self) -> None:
        """The stream has ended: rows past the end see zeros (``log_mel``'s padding), frames clamp at the last one."""
        self.ended = True

    # -- mel rows --
    def _last_row(self) -> int:
        """The last row offline ``log_mel`` has for the wave so far: N // hop (only meaningful once ended)."""
        return self.n_samples // HOP

    def _rows_until(self, r_end: int) -> None:
        """Compute rows up to ``r_end`` (exclusive) if their windows are in (or the stream ended)."""
        r0 = self.mel_base + len(self.mel)
        if r_end <= r0:
            return
        start, stop = HOP * r0 - HALF_WIN, HOP * (r_end - 1) + HALF_WIN  # absolute samples of the excerpt
        if max(start, 0) < self.sample_base:
            raise RuntimeError(f"mel rows from {r0}: samples from {start} are gone (kept from {self.sample_base})")
        lo, hi = max(start, self.sample_base), min(stop, self.sample_base + len(self.samples))
        seg = np.zeros(stop - start, np.float32)
        seg[lo - start : hi - start] = self.samples[lo - self.sample_base : hi - self.sample_base]
        self.mel = np.concatenate([self.mel, log_mel_valid(seg)])
        self._trim()

    def _trim(self) -> None:
        drop = len(self.mel) - self.keep_rows
        if drop > 0:
            self.mel = self.mel[drop:]
            self.mel_base += drop
        first_needed = HOP * (self.mel_base + len(self.mel)) - HALF_WIN  # the next row's first sample
        cut = first_needed - self.sample_base
        if cut > 16000:  # keep the arrays short; drop in large steps
            self.samples = self.samples[cut:]
            self.sample_base += cut

    def _window(self, j: int, last_row: int | None) -> np.ndarray:
        rows = np.arange(self.centre_row(j) - self.before, self.centre_row(j) + self.after + 1)
        rows = np.clip(rows, 0, last_row if last_row is not None else None)
        return self.mel[rows - self.mel_base]

    # -- features --
    def feature(self, k: int) -> np.ndarray:
        """Frame ``k``'s smoothed feature (D,). Frames must be asked in order (each once)."""
        if not self.ready(k):
            raise RuntimeError(f"frame {k} is not ready: {self.n_samples} samples in, {self.need_samples(k)} needed")
        total = self.n_frames_total()
        j_hi = k + self.lookahead if total is None else min(k + self.lookahead, total - 1)
        j_lo = max(0, k - self.context)
        last_row = self._last_row() if self.ended else None
        r_end = self.centre_row(j_hi) + self.after + 1
        self._rows_until(r_end if last_row is None else min(r_end, last_row + 1))
        wins = np.stack([self._window(j, last_row) for j in range(j_lo, j_hi + 1)])  # (T, W, M)
        feats = self.g.infer({"mel_windows": wins[None].astype(np.float32)})["features"][0]  # (T, D)
        f = feats[k - j_lo]
        self.feats.append((k, f))
        return f

    def tokens(self, k: int, n: int) -> np.ndarray:
        """The last ``n`` features up to frame ``k`` (clipped at frame 0) as (1, n, D): the denoiser's audio tokens."""
        have = dict(self.feats)
        idx = np.clip(np.arange(k - n + 1, k + 1), 0, None)
        return np.stack([have[int(i)] for i in idx])[None]
