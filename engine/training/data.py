"""Prepared shards (``avatar prepare``) loaded into memory for training and evaluation.

A :class:`FrameStore` holds every kept frame of the chosen shards: the lower-face patch
(engine/face/region.py), landmarks in crop units, pose, and per segment the log-mel, so that
trainers sample frames, neighbours and audio windows by index without touching the disk.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data.splits import split_of
from engine.face.region import LOWER_FACE, Region, extract_patch


@dataclass
class Segment:
    name: str
    clip: str
    start: int  # index of its first frame in the store
    length: int  # frames
    has_audio: bool
    mel: np.ndarray  # (T, 80) float32 log-mel (empty without audio)
    mel_index: np.ndarray  # (F,) row of ``mel`` centred on each frame
    wave: np.ndarray  # (N,) 16 kHz audio, sample 0 at the segment's first frame (empty without audio)
    time_s: np.ndarray  # (F,) frame times, seconds from the segment's first frame


class FrameStore:
    """All frames of the shards under ``dirs`` whose clip is in ``split`` ("train", "eval" or "all")."""

    def __init__(self, dirs: list[str | Path], *, split: str = "train", with_patches: bool = True, max_segments: int | None = None,
                 region: Region = LOWER_FACE):
        if split not in ("train", "eval", "all"):
            raise ValueError(f"split must be train, eval or all, got {split!r}")
        shard_dirs: list[Path] = []
        for d in dirs:
            root = Path(d) / "shards"
            if not root.is_dir():
                raise FileNotFoundError(f"no shards under {d} (run `avatar prepare` first)")
            shard_dirs.extend(sorted(p for p in root.iterdir() if (p / "meta.json").is_file()))
        patches, lms, poses, self.segments = [], [], [], []
        n = 0
        for sd in shard_dirs:
            meta = json.loads((sd / "meta.json").read_text())
            if split != "all" and split_of(meta["clip"]) != split:
                continue
            z = np.load(sd / "data.npz")
            if lms and float(meta["crop_size_px"]) != size:
                raise ValueError(f"{sd}: crops of {meta['crop_size_px']} px among crops of {size:.0f} px; prepare every folder with one --crop-size")
            size = float(meta["crop_size_px"])
            lm = (z["landmarks_crop"][:, :, :2] / size).astype(np.float32)  # (F, 478, 2) crop units
            f = len(lm)
            if with_patches:
                crops = np.load(sd / "crops.npy", mmap_mode="r")
                patches.append(np.ascontiguousarray(extract_patch(crops, region)))
            lms.append(lm)
            poses.append(z["pose_deg"].astype(np.float32))
            has_audio = bool(meta["has_audio"]) and "mel" in z.files and len(z["mel"]) > 0
            self.segments.append(Segment(meta["segment"], meta["clip"], n, f, has_audio,
                                         z["mel"].astype(np.float32) if has_audio else np.zeros((0, 80), np.float32),
                                         z["mel_index"].astype(np.int64) if has_audio else np.zeros(0, np.int64),
                                         z["audio"].astype(np.float32) if has_audio else np.zeros(0, np.float32),
                                         (z["time_s"] - z["time_s"][0]).astype(np.float64)))
            n += f
            if max_segments is not None and len(self.segments) >= max_segments:
                break
        if not self.segments:
            raise ValueError(f"no {split} segments in {', '.join(map(str, dirs))}")
        self.crop_size_px = int(size)
        self.region = region
        self.patches = np.concatenate(patches) if with_patches else None  # (N, P, P, 3) uint8
        self.landmarks = np.concatenate(lms)  # (N, 478, 2) crop units
        self.pose_deg = np.concatenate(poses)  # (N, 3)
        self.segment_of = np.concatenate([np.full(s.length, i, np.int64) for i, s in enumerate(self.segments)])
        self.index_in_segment = np.concatenate([np.arange(s.length) for s in self.segments])

    def __len__(self) -> int:
        return len(self.landmarks)

    def audio_segments(self) -> list[int]:
        return [i for i, s in enumerate(self.segments) if s.has_audio]

    def mel_window(self, seg: int, frames: np.ndarray, before: int, after: int) -> np.ndarray:
        """(len(frames), before + 1 + after, 80) log-mel windows of frames (indices in the segment)."""
        s = self.segments[seg]
        c = s.mel_index[frames][:, None] + np.arange(-before, after + 1)[None, :]
        return s.mel[np.clip(c, 0, len(s.mel) - 1)]

    def neighbour(self, rng: np.random.Generator, idx: np.ndarray, lo: int, hi: int, *, before_only: bool = False) -> np.ndarray:
        """Global index of a frame ``lo..hi`` frames away from each ``idx`` in the same segment.

        Offsets are drawn only from those that stay inside the segment (no clamping, which would
        pile samples on the segment's ends or on the frame itself). Where no offset is valid:
        -1 with ``before_only`` (no previous frame), else the frame farthest away in the segment.
        """
        out = np.empty(len(idx), np.int64)
        for k, g in enumerate(idx):
            seg = self.segments[self.segment_of[g]]
            j = int(self.index_in_segment[g])
            d = np.arange(lo, hi + 1)
            cand = j - d if before_only else np.concatenate([j - d, j + d])
            cand = cand[(cand >= 0) & (cand < seg.length)]
            if len(cand):
                out[k] = seg.start + int(rng.choice(cand))
            elif before_only:
                out[k] = -1
            else:
                out[k] = seg.start + (0 if j >= seg.length - 1 - j else seg.length - 1)
        return out
