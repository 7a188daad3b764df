"""Voice activity: real webrtcvad on real speech (the espeak-ng demo voice) and on silence."""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import webrtcvad

from engine.audio.decode import decode_audio
from engine.pipeline.sources import CHUNK_SAMPLES, SAMPLE_RATE_HZ, Rechunker
from engine.pipeline.vad import Vad, VadConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_VOICE = REPO_ROOT / "engine" / "assets" / "demo" / "demo_voice.wav"  # speech, then 1 s of silence


@pytest.fixture(scope="module")
def voice_chunks() -> list[np.ndarray]:
    """The demo voice as (160,) float32 chunks (the last partial chunk dropped)."""
    wave_f32 = decode_audio(DEMO_VOICE, sample_rate_hz=SAMPLE_RATE_HZ)
    n = wave_f32.size // CHUNK_SAMPLES
    return [wave_f32[k * CHUNK_SAMPLES : (k + 1) * CHUNK_SAMPLES] for k in range(n)]


def _run(vad: Vad, chunks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Feed every chunk; returns (raw decisions, smoothed decisions) as bool arrays."""
    raw, smooth = [], []
    for chunk in chunks:
        smooth.append(vad.process(chunk))
        raw.append(vad.raw)
    return np.array(raw), np.array(smooth)


def _reference_smoothing(raw: np.ndarray, onset: int, hangover: int) -> np.ndarray:
    """The specification, written plainly: on after `onset` consecutive speech chunks,
    off after `hangover` consecutive non-speech chunks."""
    speaking, out = False, []
    for k in range(raw.size):
        if not speaking and k + 1 >= onset and raw[k + 1 - onset : k + 1].all():
            speaking = True
        elif speaking and k + 1 >= hangover and not raw[k + 1 - hangover : k + 1].any():
            speaking = False
        out.append(speaking)
    return np.array(out)


def test_speech_is_detected_and_trailing_silence_ends_it(voice_chunks: list[np.ndarray]) -> None:
    raw, speaking = _run(Vad(), voice_chunks)
    # The text takes the first ~8.5 s; the file ends with 1 s of silence.
    assert speaking[:850].mean() > 0.8
    assert not speaking[-50:].any()
    assert speaking[-1] == False  # noqa: E712 (numpy bool)
    # Smoothing removes flicker: fewer on/off switches than webrtcvad's raw decisions.
    assert np.count_nonzero(np.diff(speaking)) < np.count_nonzero(np.diff(raw))
    # The hangover bridges the short pauses between words: speaking longer than raw speech.
    assert speaking.sum() > raw.sum()


@pytest.mark.parametrize("onset_ms, hangover_ms", [(30, 300), (100, 150), (0, 0), (10, 10)])
def test_smoothing_follows_onset_and_hangover(
    voice_chunks: list[np.ndarray], onset_ms: int, hangover_ms: int
) -> None:
    config = VadConfig(onset_ms=onset_ms, hangover_ms=hangover_ms)
    raw, speaking = _run(Vad(config), voice_chunks)
    expected = _reference_smoothing(raw, config.onset_chunks, config.hangover_chunks)
    np.testing.assert_array_equal(speaking, expected)
    if config.onset_chunks == 1 and config.hangover_chunks == 1:
        np.testing.assert_array_equal(speaking, raw)  # no smoothing at all


def test_digital_and_quiet_silence_never_speak() -> None:
    vad = Vad()
    zeros = np.zeros(CHUNK_SAMPLES, np.float32)
    hiss = np.random.default_rng(0).normal(0, 1e-4, (200, CHUNK_SAMPLES)).astype(np.float32)  # -80 dBFS
    _, speaking = _run(vad, [zeros] * 200 + list(hiss))
    assert not speaking.any()


def test_float_conversion_matches_webrtcvad_on_the_original_int16(voice_chunks: list[np.ndarray]) -> None:
    """Vad's float32 -> int16 conversion gives webrtcvad what the 16-bit WAV itself holds."""
    with wave.open(str(DEMO_VOICE), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        pcm16 = w.readframes(w.getnframes())
    direct = webrtcvad.Vad(2)
    n_bytes = CHUNK_SAMPLES * 2
    reference = np.array(
        [direct.is_speech(pcm16[k * n_bytes : (k + 1) * n_bytes], 16000) for k in range(len(voice_chunks))]
    )
    raw, _ = _run(Vad(VadConfig(aggressiveness=2)), voice_chunks)
    assert (raw == reference).mean() >= 0.99


def test_accepts_audio_chunks_and_resets(voice_chunks: list[np.ndarray]) -> None:
    speech = np.concatenate(voice_chunks[100:200])  # 1 s in the middle of the text
    chunks = Rechunker().push(speech)
    vad = Vad()
    states = [vad.process(c) for c in chunks]
    assert states[-1] and vad.speaking
    vad.reset()
    assert not vad.speaking and not vad.raw
    # After a reset the onset applies again: the first chunk alone does not start speaking.
    assert vad.process(chunks[0]) is False


def test_config_validation_and_chunk_shape() -> None:
    assert VadConfig().aggressiveness == 2 and VadConfig().onset_chunks == 3
    assert VadConfig().hangover_chunks == 30 and VadConfig(hangover_ms=305).hangover_chunks == 31
    with pytest.raises(ValueError, match="aggressiveness"):
        VadConfig(aggressiveness=4)
    with pytest.raises(ValueError, match="onset_ms"):
        VadConfig(onset_ms=-10)
    with pytest.raises(ValueError, match="160"):
        Vad().process(np.zeros(320, np.float32))
