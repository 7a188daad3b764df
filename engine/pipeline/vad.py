"""Voice activity: webrtcvad's per-10 ms decision, smoothed with an onset and a hangover.

webrtcvad (the WebRTC project's GMM detector) decides per frame in about 2 µs, so the pipeline
calls :meth:`Vad.process` inline on the event loop for every 10 ms chunk. Its raw decisions
flicker inside words and fire on clicks; the smoothing here turns them into a ``speaking``
state that starts only after ``onset_ms`` of consecutive speech frames and ends only after
``hangover_ms`` of consecutive non-speech frames (the gaps between words stay "speaking").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import webrtcvad

from engine.pipeline.sources import CHUNK_MS, CHUNK_SAMPLES, SAMPLE_RATE_HZ, AudioChunk


@dataclass(frozen=True)
class VadConfig:
    """Voice activity detection settings."""

    aggressiveness: int = 2  # webrtcvad mode 0-3: higher calls less audio speech (fewer false alarms)
    onset_ms: int = 30  # consecutive speech this long turns speaking on (rounded up to 10 ms chunks)
    hangover_ms: int = 300  # consecutive non-speech this long turns speaking off (rounded up to chunks)

    def __post_init__(self) -> None:
        if self.aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"aggressiveness must be 0, 1, 2 or 3, got {self.aggressiveness!r}")
        if self.onset_ms < 0 or self.hangover_ms < 0:
            raise ValueError(
                f"onset_ms and hangover_ms must be >= 0, got {self.onset_ms} and {self.hangover_ms}"
            )

    @property
    def onset_chunks(self) -> int:
        """Consecutive speech chunks needed to start speaking (at least 1)."""
        return max(1, math.ceil(self.onset_ms / CHUNK_MS))

    @property
    def hangover_chunks(self) -> int:
        """Consecutive non-speech chunks that end speaking (at least 1)."""
        return max(1, math.ceil(self.hangover_ms / CHUNK_MS))


class Vad:
    """Smoothed voice activity over 10 ms chunks of 16 kHz mono audio. Synchronous and cheap.

    Not thread-safe: one instance per audio stream, fed in order.
    """

    def __init__(self, config: VadConfig | None = None) -> None:
        self.config = config or VadConfig()
        self._vad = webrtcvad.Vad(self.config.aggressiveness)
        self.speaking = False  # the smoothed state after the last chunk
        self.raw = False  # webrtcvad's own decision on the last chunk
        self._run = 0  # consecutive chunks whose raw decision disagrees with ``speaking``

    def reset(self) -> None:
        """Forget the state (a new stream, or after a barge-in): not speaking.

        webrtcvad's own adaptive state (noise estimates, its internal hangover) is reset too.
        """
        self._vad = webrtcvad.Vad(self.config.aggressiveness)
        self.speaking = False
        self.raw = False
        self._run = 0

    def is_speech(self, pcm: np.ndarray) -> bool:
        """webrtcvad's raw decision for one (160,) float32 chunk in [-1, 1]; no smoothing."""
        x = np.asarray(pcm)
        if x.shape != (CHUNK_SAMPLES,):
            raise ValueError(f"Vad takes 10 ms chunks of {CHUNK_SAMPLES} samples, got shape {x.shape}")
        pcm16 = (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2")  # little-endian int16
        return bool(self._vad.is_speech(pcm16.tobytes(), SAMPLE_RATE_HZ))

    def process(self, chunk: AudioChunk | np.ndarray) -> bool:
        """Feed the next chunk (an AudioChunk or its (160,) pcm); returns the smoothed ``speaking``."""
        pcm = chunk.pcm if isinstance(chunk, AudioChunk) else chunk
        self.raw = self.is_speech(pcm)
        if self.raw == self.speaking:
            self._run = 0
            return self.speaking
        self._run += 1
        needed = self.config.hangover_chunks if self.speaking else self.config.onset_chunks
        if self._run >= needed:
            self.speaking = not self.speaking
            self._run = 0
        return self.speaking
