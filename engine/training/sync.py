"""Train the sync expert (engine/models/sync.py) with a contrastive (InfoNCE) loss on prepared shards.

Each sample is a mouth window at frame ``t`` of a segment with audio and the audio window at the
same frame. The audio candidates of a mouth window are its own audio, the audio of every other
sample in the batch (other clips, other people) and ``negatives_per_sample`` windows of the SAME
segment's audio at ``min_offset_frames .. max_offset_frames`` frames away: without these the
easy answer is to match the speaker (voice to face) instead of the timing. The audio side is also
asked to pick its own mouth window among the batch's (symmetric CLIP loss).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.eval.sync_metric import sync_scores
from engine.models.io import config_from_dict, save_model
from engine.models.sync import SyncConfig, SyncExpert, mouth_from_patches
from engine.training.data import FrameStore
from engine.training.loop import TrainConfig, train


@dataclass(frozen=True)
class SyncBatch:
    mouth: torch.Tensor  # (B, frames, h, w) grayscale mouth windows in [-1, 1]
    mel: torch.Tensor  # (B, 1 + K, rows, 80): column 0 in sync, columns 1.. same segment at other offsets


class SyncSampler:
    """Draws contrastive batches from a :class:`FrameStore` (every window complete inside its segment)."""

    def __init__(self, store: FrameStore, cfg: SyncConfig, *, negatives_per_sample: int = 4, min_offset_frames: int = 2,
                 max_offset_frames: int = 15, shift_px: int = 3, brightness: float = 0.15, contrast: float = 0.15,
                 mel_gain: float = 1.0, mel_noise: float = 0.05, freq_mask_bins: int = 0, flip: bool = True, augment: bool = True):
        if store.patches is None:
            raise ValueError("the sync sampler needs a FrameStore with patches")
        if min_offset_frames < 1 or max_offset_frames < min_offset_frames:
            raise ValueError(f"need 1 <= min_offset_frames <= max_offset_frames, got {min_offset_frames}, {max_offset_frames}")
        self.store, self.cfg = store, cfg
        self.k, self.min_off, self.max_off = negatives_per_sample, min_offset_frames, max_offset_frames
        self.shift_px, self.brightness, self.contrast = shift_px, brightness, contrast
        self.mel_gain, self.mel_noise, self.freq_mask, self.flip, self.augment = mel_gain, mel_noise, freq_mask_bins, flip, augment
        half = cfg.frames // 2
        anchors, self.audio_ok = [], {}
        for si in store.audio_segments():
            s = store.segments[si]
            rows = s.mel_index[:, None] + np.arange(-cfg.mel_before_rows, cfg.mel_after_rows + 1)[None, :]  # (F, rows)
            ok = (rows.min(axis=1) >= 0) & (rows.max(axis=1) < len(s.mel))  # (F,) complete audio window
            frames = np.flatnonzero(ok)
            frames = frames[(frames >= half) & (frames < s.length - half)]
            if len(frames) < 2 * min_offset_frames + 1:
                continue
            self.audio_ok[si] = np.flatnonzero(ok)
            anchors.append(np.stack([np.full(len(frames), si), frames], axis=1))
        if not anchors:
            raise ValueError("no segment with audio is long enough for a sync window")
        self.anchors = np.concatenate(anchors)  # (N, 2): segment, frame in segment

    def _offset_frames(self, rng: np.random.Generator, seg: int, t: int) -> np.ndarray:
        """K frames of segment ``seg`` with complete audio, min..max offset frames away from ``t``."""
        ok = self.audio_ok[seg]
        d = np.abs(ok - t)
        cand = ok[(d >= self.min_off) & (d <= self.max_off)]
        if len(cand) == 0:  # a short segment: anything far enough
            cand = ok[d >= self.min_off]
        return rng.choice(cand, size=self.k, replace=len(cand) < self.k)

    def mouth_window(self, rng: np.random.Generator | None, seg: int, t: int) -> np.ndarray:
        """(frames, h, w) float32 mouth window centred on frame ``t`` of segment ``seg`` (augmented if rng)."""
        s, half = self.store.segments[seg], self.cfg.frames // 2
        patches = self.store.patches[s.start + t - half : s.start + t + half + 1]
        if rng is None or not self.augment:
            return mouth_from_patches(patches, self.cfg)
        sh = tuple(int(v) for v in rng.integers(-self.shift_px, self.shift_px + 1, 2))
        m = mouth_from_patches(patches, self.cfg, shift_px=sh)  # (frames, h, w)
        if self.flip and rng.random() < 0.5:
            m = m[:, :, ::-1]
        gain = 1.0 + rng.uniform(-self.contrast, self.contrast)
        bias = rng.uniform(-self.brightness, self.brightness)
        return np.clip(m * gain + bias, -1.0, 1.0)

    def batch(self, rng: np.random.Generator, batch_size: int) -> SyncBatch:
        pick = self.anchors[rng.integers(0, len(self.anchors), batch_size)]
        mouths, mels = [], []
        for seg, t in pick:
            mouths.append(self.mouth_window(rng, seg, t))
            frames = np.concatenate([[t], self._offset_frames(rng, seg, t)])  # (1 + K,)
            mels.append(self.store.mel_window(seg, frames, self.cfg.mel_before_rows, self.cfg.mel_after_rows))  # (1 + K, rows, 80)
        mel = np.stack(mels).astype(np.float32)  # (B, 1 + K, rows, 80)
        if self.augment:
            # loudness (an additive constant in log-mel, one per sample) and a little noise
            mel = mel + rng.uniform(-self.mel_gain, self.mel_gain, (batch_size, 1, 1, 1)).astype(np.float32)
            mel = mel + self.mel_noise * self.cfg.mel_scale * rng.standard_normal(mel.shape).astype(np.float32)
            if self.freq_mask:  # one band of up to freq_mask_bins mel bins per sample set to the window's mean
                width = rng.integers(0, self.freq_mask + 1, batch_size)
                lo = rng.integers(0, mel.shape[-1] - width + 1)
                bins = np.arange(mel.shape[-1])
                band = (bins[None, :] >= lo[:, None]) & (bins[None, :] < (lo + width)[:, None])  # (B, bins)
                mel = np.where(band[:, None, None, :], mel.mean(axis=(1, 2, 3), keepdims=True), mel)
        return SyncBatch(torch.from_numpy(np.ascontiguousarray(np.stack(mouths))), torch.from_numpy(mel))


def contrastive_loss(model: SyncExpert, batch: SyncBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """Symmetric InfoNCE: mouth -> all audio candidates (batch + own offsets), audio -> batch mouths."""
    b, n_cand = batch.mel.shape[:2]
    v = model.embed_video(batch.mouth).float()  # (B, D)
    a = model.embed_audio(batch.mel.flatten(0, 1)).float().view(b, n_cand, -1)  # (B, 1 + K, D)
    scale = model.logit_scale()
    logits_va = scale * v @ a.flatten(0, 1).T  # (B, B (1 + K))
    target_va = torch.arange(b) * n_cand
    logits_av = scale * a[:, 0] @ v.T  # (B, B)
    target_av = torch.arange(b)
    loss_va = F.cross_entropy(logits_va, target_va)
    loss_av = F.cross_entropy(logits_av, target_av)
    with torch.no_grad():
        own = (v[:, None, :] * a).sum(-1)  # (B, 1 + K) similarity to own audio at each offset
        metrics = {"loss_va": loss_va.item(), "loss_av": loss_av.item(),
                   "acc_offset": (own.argmax(1) == 0).float().mean().item(),  # in-sync audio beats the same clip's shifted audio
                   "acc_batch": (logits_va.argmax(1) == target_va).float().mean().item(),
                   "logit_scale": float(scale)}
    return 0.5 * (loss_va + loss_av), metrics


def train_sync(data_dirs: list[str], out_dir: str, model_cfg: dict, tcfg: TrainConfig, *, negatives_per_sample: int = 4,
               min_offset_frames: int = 2, max_offset_frames: int = 15, shift_px: int = 3, brightness: float = 0.15,
               contrast: float = 0.15, mel_gain: float = 1.0, mel_noise: float = 0.05, freq_mask_bins: int = 0, flip: bool = True,
               eval_max_offset_frames: int = 15) -> SyncExpert:
    cfg = config_from_dict(SyncConfig, model_cfg)
    store = FrameStore(data_dirs, split="train")
    sampler = SyncSampler(store, cfg, negatives_per_sample=negatives_per_sample, min_offset_frames=min_offset_frames,
                          max_offset_frames=max_offset_frames, shift_px=shift_px, brightness=brightness, contrast=contrast,
                          mel_gain=mel_gain, mel_noise=mel_noise, freq_mask_bins=freq_mask_bins, flip=flip)
    print(f"sync: {len(sampler.anchors)} training windows from {len(sampler.audio_ok)} segments with audio")
    torch.manual_seed(tcfg.seed)
    model = SyncExpert(cfg)
    dev = torch.device(tcfg.device)

    def make_batch(rng: np.random.Generator) -> SyncBatch:
        bt = sampler.batch(rng, tcfg.batch_size)
        return SyncBatch(bt.mouth.to(dev), bt.mel.to(dev))

    t0 = time.monotonic()
    model = train(name="sync", model=model, make_batch=make_batch, loss_fn=contrastive_loss, cfg=tcfg, out_dir=out_dir)
    train_s = time.monotonic() - t0
    model = model.float().cpu().eval()
    save_model(model, Path(out_dir) / "sync")
    report = evaluate_sync(model, data_dirs, max_offset_frames=eval_max_offset_frames, train_store=store)
    report["train_wall_s"] = round(train_s, 1)
    (Path(out_dir) / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    print("sync held-out:", {k: v for k, v in report.items() if not isinstance(v, (list, dict))})
    return model


def _segment_scores(model: SyncExpert, store: FrameStore, seg: int, mel_from: int | None = None, max_offset_frames: int = 15) -> dict:
    s = store.segments[seg]
    mouth = mouth_from_patches(store.patches[s.start : s.start + s.length], model.config)  # (F, h, w)
    a = store.segments[seg if mel_from is None else mel_from]
    n = min(s.length, a.length)  # a mismatched pair is cut to the shorter
    return sync_scores(model, mouth[:n], a.mel, a.mel_index[:n], max_offset_frames=max_offset_frames)


def _summary(rows: list[dict]) -> dict:
    off = np.array([r["offset_frames"] for r in rows])
    return {"segments": len(rows), "lse_d": float(np.mean([r["lse_d"] for r in rows])),
            "lse_c": float(np.mean([r["lse_c"] for r in rows])), "frac_offset_within_1": float(np.mean(np.abs(off) <= 1)),
            "frac_offset_zero": float(np.mean(off == 0))}


@torch.no_grad()
def evaluate_sync(model: SyncExpert, data_dirs: list[str], *, max_offset_frames: int = 15, train_segments: int = 8,
                  train_store: FrameStore | None = None) -> dict:
    """LSE-D / LSE-C of ground-truth video on the held-out split (per segment and mean), plus two
    references: the same held-out video against another held-out segment's audio (no sync exists,
    so LSE-C should be near 0) and a few training segments (to see overfitting)."""
    try:
        store = FrameStore(data_dirs, split="eval")
    except ValueError:  # no held-out clip among these shards
        return {"segments": 0}
    segs = [i for i in store.audio_segments() if store.segments[i].length >= model.config.frames]
    if not segs:
        return {"segments": 0}
    rows = [_segment_scores(model, store, i, max_offset_frames=max_offset_frames) for i in segs]
    report = {**_summary(rows), "max_offset_frames": max_offset_frames,
              "per_segment": [{"segment": store.segments[i].name, "frames": store.segments[i].length, "offset_frames": r["offset_frames"],
                               "lse_d": round(r["lse_d"], 4), "lse_c": round(r["lse_c"], 4)} for i, r in zip(segs, rows)]}
    if len(segs) > 1:
        mism = [_segment_scores(model, store, i, mel_from=segs[(k + 1) % len(segs)], max_offset_frames=max_offset_frames)
                for k, i in enumerate(segs)]
        report["mismatched_audio"] = _summary(mism)
    del store
    tr = train_store if train_store is not None else FrameStore(data_dirs, split="train")
    tsegs = [i for i in tr.audio_segments() if tr.segments[i].length > 2 * max_offset_frames]
    tsegs = [tsegs[j] for j in np.linspace(0, len(tsegs) - 1, min(train_segments, len(tsegs))).astype(int)]
    if tsegs:
        report["train_subset"] = _summary([_segment_scores(model, tr, i, max_offset_frames=max_offset_frames) for i in tsegs])
    return report
