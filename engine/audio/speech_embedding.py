"""A pretrained speech embedding that ships offline: Google's `speech_embedding` as the ONNX files of
openwakeword 0.4.0 (its own log-mel front end, 32 bins, then a 96-d embedding of a 76-row window).

Per video frame f the window is the 76 mel rows (~0.76 s) ending ``lookahead_rows`` rows after the
frame's time: causal up to that lookahead, so it streams. Used as an alternative input to the audio
encoder (AudioEncoderConfig.input_kind = "speech_embedding"), compared in the A2L report.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

WINDOW_ROWS = 76  # mel rows per embedding window (fixed by the model)
EMBED_DIM = 96
HOP_S = 0.01
FIRST_ROW_S = 0.0125  # centre of mel row 0 (25 ms window at 16 kHz, no padding)


def _model_dir() -> Path:
    spec = importlib.util.find_spec("openwakeword")
    if spec is None or spec.origin is None:
        raise ImportError("the speech embedding needs openwakeword 0.4.0 (its ONNX files): pip install --no-deps openwakeword==0.4.0")
    d = Path(spec.origin).parent / "resources" / "models"
    if not (d / "embedding_model.onnx").is_file():
        raise ImportError(f"{d}: no embedding_model.onnx (only openwakeword 0.4.0 ships it)")
    return d


@lru_cache(maxsize=1)
def _sessions():
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    d = _model_dir()
    return (ort.InferenceSession(str(d / "melspectrogram.onnx"), opts, providers=["CPUExecutionProvider"]),
            ort.InferenceSession(str(d / "embedding_model.onnx"), opts, providers=["CPUExecutionProvider"]))


def speech_mel(wave_16k: np.ndarray) -> np.ndarray:
    """(N,) float audio in [-1, 1] -> (T, 32) mel rows (row k centred at 12.5 ms + k * 10 ms)."""
    mel_s, _ = _sessions()
    x = (np.clip(wave_16k, -1, 1) * 32767.0).astype(np.float32)[None]
    return np.squeeze(mel_s.run(None, {"input": x})[0]) / 10.0 + 2.0  # the transform openwakeword applies


def speech_embeddings(wave_16k: np.ndarray, frame_times_s: np.ndarray, *, lookahead_rows: int = 3, batch: int = 256) -> np.ndarray:
    """(F, 96) embeddings, one per frame time (seconds from sample 0)."""
    pad = np.zeros(int(WINDOW_ROWS * HOP_S * 16000), np.float32)  # silence before the start fills the first windows
    mel = speech_mel(np.concatenate([pad, wave_16k.astype(np.float32), np.zeros(1600, np.float32)]))
    shift = len(pad) / 16000.0
    end = np.round((np.asarray(frame_times_s) + shift - FIRST_ROW_S) / HOP_S).astype(int) + lookahead_rows  # last row of each window
    end = np.clip(end, WINDOW_ROWS - 1, len(mel) - 1)
    win = mel[end[:, None] - np.arange(WINDOW_ROWS - 1, -1, -1)[None, :]]  # (F, 76, 32)
    _, emb_s = _sessions()
    out = [emb_s.run(None, {"input_1": win[i : i + batch, :, :, None].astype(np.float32)})[0].reshape(-1, EMBED_DIM) for i in range(0, len(win), batch)]
    return np.concatenate(out).astype(np.float32)
