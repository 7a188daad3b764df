"""`avatar inspect`: one contact-sheet PNG per prepared clip, to see that preparation is right.

Each sheet shows, for one clip:
1. frames sampled across all its segments: the aligned crop with its landmarks (lips red,
   eyes and irises blue, the rest green), segment and time in the corner;
2. consecutive frames from the loudest second of the longest segment, with the lower-face
   mask tinted;
3. under them, the log-mel of the same span on a linear time axis, with a tick at each
   frame's mel index joined to the frame above it (with a variable frame rate the ticks are
   unevenly spaced, and the joins show it).
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from engine.face.geometry import index_sets
from engine.face.mask import region_mask

TILE = 128  # tile side in the sheet, pixels
COLS = 10


def _load(shard: Path) -> tuple[np.ndarray, dict, dict]:
    crops = np.load(shard / "crops.npy", mmap_mode="r")
    with np.load(shard / "data.npz") as z:
        data = {k: z[k] for k in z.files}
    return crops, data, json.loads((shard / "meta.json").read_text())


def _draw_landmarks(tile: np.ndarray, lm: np.ndarray, scale: float, *, only: str | None = None) -> np.ndarray:
    """Landmarks (478, >=2) in crop pixels drawn on a tile; ``only`` names one index set."""
    s = index_sets()
    out = tile.copy()
    colours = np.tile(np.array([[60, 200, 60]], np.uint8), (len(lm), 1))
    for key, col in (("right_eye", (60, 120, 255)), ("left_eye", (60, 120, 255)), ("right_iris", (0, 220, 255)), ("left_iris", (0, 220, 255)), ("lips", (255, 50, 50))):
        colours[s[key]] = col
    keep = s[only] if only else np.arange(len(lm))
    for p, c in zip(lm[keep, :2] * scale, colours[keep]):
        cv2.circle(out, (int(round(p[0])), int(round(p[1]))), 1, tuple(int(v) for v in c), -1, lineType=cv2.LINE_AA)
    return out


def _label(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.35) -> None:
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def _mel_image(mel: np.ndarray, width: int, height: int) -> np.ndarray:
    """(T, 80) log-mel -> (height, width, 3) RGB, low frequencies at the bottom."""
    m = mel.T[::-1]  # (80, T), high bins on top
    lo, hi = np.percentile(m, 2), np.percentile(m, 99.5)
    u8 = np.clip((m - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    u8 = cv2.resize(u8, (width, height), interpolation=cv2.INTER_NEAREST)
    return cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_MAGMA), cv2.COLOR_BGR2RGB)


def contact_sheet(shards: list[Path]) -> np.ndarray:
    """The RGB sheet for one clip's shards (see module docstring)."""
    loaded = [_load(s) for s in shards]
    w = COLS * TILE
    # Row 1: frames sampled across all segments.
    flat = [(k, i) for k, (c, _, _) in enumerate(loaded) for i in range(len(c))]
    picks = [flat[j] for j in np.linspace(0, len(flat) - 1, COLS).round().astype(int)]
    row1 = []
    for k, i in picks:
        crops, data, meta = loaded[k]
        scale = TILE / crops.shape[1]
        tile = cv2.resize(np.asarray(crops[i]), (TILE, TILE), interpolation=cv2.INTER_AREA)
        tile = _draw_landmarks(tile, data["landmarks_crop"][i], scale)
        _label(tile, f"s{k} {data['time_s'][i]:.2f}s", (3, 11))
        row1.append(tile)
    # Row 2: consecutive frames around the loudest second of the longest segment.
    k = int(np.argmax([len(c) for c, _, _ in loaded]))
    crops, data, meta = loaded[k]
    energy = data["mel"][np.clip(data["mel_index"], 0, len(data["mel"]) - 1)].mean(1)  # (F,)
    n = len(crops)
    start = int(np.clip(np.argmax(np.convolve(energy, np.ones(COLS), mode="valid")) if n >= COLS else 0, 0, max(n - COLS, 0)))
    span = range(start, min(start + COLS, n))
    row2 = []
    size = crops.shape[1]
    for i in span:
        crop = np.asarray(crops[i]).astype(np.float32)
        mask = region_mask(data["landmarks_crop"][i], size)[..., None]
        tint = crop * (1 - 0.35 * mask) + np.array([255, 60, 200], np.float32) * 0.35 * mask
        tile = cv2.resize(tint.astype(np.uint8), (TILE, TILE), interpolation=cv2.INTER_AREA)
        tile = _draw_landmarks(tile, data["landmarks_crop"][i], TILE / size, only="lips")
        _label(tile, f"#{int(data['frame_index'][i])} {data['time_s'][i]:.2f}s", (3, 11))
        row2.append(tile)
    while len(row2) < COLS:
        row2.append(np.zeros((TILE, TILE, 3), np.uint8))
    # Row 3: the mel of that span, ticks at each frame's mel index joined to its tile.
    idx = data["mel_index"][list(span)]
    half = max((idx[-1] - idx[0]) / max(len(idx) - 1, 1) / 2, 1)
    m0, m1 = int(np.floor(idx[0] - half)), int(np.ceil(idx[-1] + half))
    mel = data["mel"][np.clip(np.arange(m0, m1 + 1), 0, len(data["mel"]) - 1)]
    used_w = len(idx) * TILE
    strip = np.zeros((110, w, 3), np.uint8)
    strip[30:110, :used_w] = _mel_image(mel, used_w, 80)
    for j, mi in enumerate(idx):
        x_tick = int(round((mi - m0 + 0.5) / (m1 - m0 + 1) * used_w))
        x_tile = j * TILE + TILE // 2
        cv2.line(strip, (x_tile, 0), (x_tick, 28), (255, 255, 255), 1, cv2.LINE_AA)
        cv2.line(strip, (x_tick, 28), (x_tick, 109), (255, 255, 255), 1)
    _label(strip, f"log-mel 80 bins, mel frames {m0 + meta['mel_start_index']}..{m1 + meta['mel_start_index']} (10 ms), tick = frame time", (used_w + 4 if used_w < w - 200 else 4, 60))
    header = np.full((36, w, 3), 30, np.uint8)
    fr = [json.loads((s / "meta.json").read_text()) for s in shards]
    _label(header, f"{meta['clip']}  identity {meta['identity']}  {len(shards)} segment(s), {sum(m['frames'] for m in fr)} frames, "
                   f"{meta['fps']:.2f} fps, source {meta['source_size'][0]}x{meta['source_size'][1]}, crop {size}px", (6, 22), 0.5)
    return np.concatenate([header, np.concatenate(row1, 1), np.concatenate(row2, 1), strip], 0)


def inspect(prepared: Path, *, out: Path | None = None, clips: list[str] | None = None) -> list[Path]:
    """Write one PNG per clip of a prepared folder; returns the paths written."""
    shards_dir = prepared / "shards"
    if not shards_dir.is_dir():
        raise FileNotFoundError(f"{prepared}: no shards/ folder; run `avatar prepare ... --out {prepared}` first")
    by_clip: dict[str, list[Path]] = {}
    for s in sorted(shards_dir.iterdir()):
        if (s / "meta.json").is_file():
            by_clip.setdefault(json.loads((s / "meta.json").read_text())["clip"], []).append(s)
    if clips:
        missing = sorted(set(clips) - set(by_clip))
        if missing:
            raise FileNotFoundError(f"no shards for clip(s) {', '.join(missing)} in {prepared}")
        by_clip = {c: by_clip[c] for c in clips}
    out = out or prepared / "inspect"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for clip, shards in by_clip.items():
        path = out / f"{clip}.png"
        cv2.imwrite(str(path), cv2.cvtColor(contact_sheet(shards), cv2.COLOR_RGB2BGR))
        written.append(path)
    return written
