"""Audio front end: decode any container to 16 kHz mono, log-mel features, video alignment."""
from __future__ import annotations

from engine.audio.align import (
    DEFAULT_AFTER_FRAMES,
    DEFAULT_BEFORE_FRAMES,
    frame_times_constant,
    mel_index_for_time,
    mel_windows_for_frames,
)
from engine.audio.decode import audio_start_offset_s, decode_audio
from engine.audio.mel import LogMel, MelConfig, log_mel, mel_filterbank

__all__ = [
    "DEFAULT_AFTER_FRAMES",
    "DEFAULT_BEFORE_FRAMES",
    "LogMel",
    "MelConfig",
    "audio_start_offset_s",
    "decode_audio",
    "frame_times_constant",
    "log_mel",
    "mel_filterbank",
    "mel_index_for_time",
    "mel_windows_for_frames",
]
