"""Train the audio encoder and A2L together: audio -> lip and jaw landmarks, on speech shards.

Each sample is a run of ``seq_frames`` frames of one segment: log-mel windows in, the moving
landmarks (engine/face/region.moving_indices) in patch units out, with a random frame of the same
segment as the reference (the avatar's own landmarks at inference). Held-out report: mean lip
landmark error in pixels of the 256 px crop, beside the static baseline (the reference itself).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from engine.face.geometry import OPENING_PAIRS, index_sets
from engine.face.region import moving_indices, to_patch_units
from engine.models.a2l import A2LConfig, AudioToLandmarks
from engine.models.audio_encoder import AudioEncoder, AudioEncoderConfig
from engine.models.io import config_from_dict, save_model
from engine.training.data import FrameStore
from engine.training.loop import TrainConfig, train


class AudioToLandmarkStack(torch.nn.Module):
    """The two models trained as one (saved as two)."""

    def __init__(self, enc: AudioEncoder, a2l: AudioToLandmarks):
        super().__init__()
        self.encoder, self.a2l = enc, a2l

    def forward(self, mel_windows, reference):
        return self.a2l(self.encoder(mel_windows), reference)[0]


def _sequences(store: FrameStore, seq_frames: int) -> list[int]:
    return [i for i in store.audio_segments() if store.segments[i].length >= seq_frames]


def segment_embeddings(store: FrameStore, lookahead_rows: int) -> dict[int, np.ndarray]:
    """Speech embeddings (F, 96) of every audio segment (engine/audio/speech_embedding.py)."""
    from engine.audio.speech_embedding import speech_embeddings

    return {i: speech_embeddings(store.segments[i].wave, store.segments[i].time_s, lookahead_rows=lookahead_rows) for i in store.audio_segments()}


def make_sample(store: FrameStore, seg: int, start: int, seq: int, ref: int, enc_cfg: AudioEncoderConfig, idx: np.ndarray,
                embeddings: dict[int, np.ndarray] | None = None, delay: int = 0):
    """Audio of frames [start, start + seq) and the landmarks ``delay`` frames earlier (a model that
    answers ``delay`` frames late sees that much more audio after each frame it draws)."""
    s = store.segments[seg]
    frames = np.arange(start, start + seq)
    if enc_cfg.input_kind == "speech_embedding":
        mel = embeddings[seg][frames]  # (T, 96)
    else:
        mel = store.mel_window(seg, frames, enc_cfg.mel_before, enc_cfg.mel_after)  # (T, W, 80)
    lm = to_patch_units(store.landmarks[s.start + np.maximum(frames - delay, 0)][:, idx])  # (T, K, 2)
    reference = to_patch_units(store.landmarks[s.start + ref][idx])  # (K, 2)
    return mel, lm, reference


def augment_mel(rng: np.random.Generator, mel: torch.Tensor, enc_cfg: AudioEncoderConfig) -> torch.Tensor:
    """Voice and channel augmentation of (B, T, W, n_mels) log-mel windows, for unseen speakers:
    a random warp of the mel axis (vocal-tract length, +-12 %), loudness (+-1 in log units),
    a random spectral tilt, frequency masks (SpecAugment) and a little noise."""
    b, _, _, n = mel.shape
    out = torch.empty_like(mel)
    bins = np.arange(n, dtype=np.float64)
    for i in range(b):
        alpha = rng.uniform(0.88, 1.12)
        src = np.clip(bins / alpha, 0, n - 1)  # output bin k reads input bin k / alpha
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        f = torch.from_numpy((src - lo).astype(np.float32))
        x = mel[i][..., lo] * (1 - f) + mel[i][..., hi] * f
        x = x + float(rng.uniform(-1.0, 1.0)) + torch.from_numpy(np.linspace(-1, 1, n, dtype=np.float32)) * float(rng.uniform(-0.5, 0.5))
        for _ in range(2):
            w = int(rng.integers(0, 9))
            k = int(rng.integers(0, n - w + 1))
            x[..., k : k + w] = enc_cfg.mel_mean
        out[i] = x
    return out + 0.1 * torch.randn_like(out)


def opening_columns(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns of the upper and lower landmark of each OPENING_PAIRS pair in the predicted set ``idx``."""
    pos = {int(i): k for k, i in enumerate(idx)}
    return np.array([pos[u] for u, _ in OPENING_PAIRS]), np.array([pos[l] for _, l in OPENING_PAIRS])


def openings(lm: torch.Tensor, up: np.ndarray, lo: np.ndarray) -> torch.Tensor:
    """(..., K, 2) landmarks -> (...) mean inner-lip opening (lower y - upper y)."""
    return (lm[..., lo, 1] - lm[..., up, 1]).mean(dim=-1)


def neutral_frames(store: FrameStore, segs: list[int], idx: np.ndarray) -> dict[int, int]:
    """Per segment, the frame (index in the segment) with the smallest mouth opening: the identity's
    closed-mouth neutral, which is what a portrait usually shows."""
    up, lo = opening_columns(idx)
    out = {}
    for i in segs:
        s = store.segments[i]
        lm = store.landmarks[s.start : s.start + s.length][:, idx]  # (F, K, 2)
        out[i] = int(np.argmin((lm[:, lo, 1] - lm[:, up, 1]).mean(axis=1)))
    return out


def lip_weights(idx: np.ndarray) -> np.ndarray:
    lips = set(index_sets()["lips"].tolist())
    return np.array([2.0 if i in lips else 1.0 for i in idx], np.float32)


def train_a2l(data_dirs: list[str], out_dir: str, model_cfg: dict, tcfg: TrainConfig, *, seq_frames: int = 50, velocity_weight: float = 2.0,
              shape_weight: float = 2.0, opening_weight: float = 0.0, opening_std_weight: float = 0.0, neutral_reference_prob: float = 0.0,
              audio_encoder: str | None = None, landmark_delay_frames: int = 0) -> None:
    """Train the audio encoder and the A2L (or, with ``audio_encoder`` = a model stem such as
    ``engine/bundles/default/audio_encoder``, only the A2L on that frozen encoder, so that a
    bundle's denoiser, conditioned on the encoder's features, keeps working).

    Against regression to the mean (issue 14): ``opening_weight`` weighs an L1 loss on the inner-lip
    opening and its frame-to-frame change; ``opening_std_weight`` one on the mismatch of the
    opening's spread over each sequence; ``neutral_reference_prob`` is how often the reference is
    the segment's most closed frame (a portrait's usual mouth) instead of a random frame.
    ``landmark_delay_frames``: the model draws each frame that many frames late, i.e. with that
    much more audio lookahead (to measure what lookahead buys; the live path uses 0)."""
    store = FrameStore(data_dirs, split="train", with_patches=False)
    segs = _sequences(store, seq_frames)
    if not segs:
        raise ValueError(f"no training segment with audio is {seq_frames} frames long")
    enc_spec = model_cfg.get("audio_encoder", {})
    embeddings = None
    if enc_spec.get("input_kind", "mel") == "speech_embedding":
        embeddings = segment_embeddings(store, enc_spec.get("mel_after", 3))
        mels = np.concatenate([embeddings[i] for i in segs])
    else:
        mels = np.concatenate([store.segments[i].mel for i in segs])
    if audio_encoder:
        from engine.models.io import load_model

        enc = load_model(AudioEncoder, AudioEncoderConfig, audio_encoder)
        enc_cfg = enc.config
    else:
        enc_cfg = config_from_dict(AudioEncoderConfig, {**enc_spec, "mel_mean": float(mels.mean()), "mel_std": float(mels.std())})
    idx = moving_indices()
    a2l_cfg = config_from_dict(A2LConfig, {**model_cfg.get("a2l", {}), "landmark_indices": [int(i) for i in idx], "feature_dim": enc_cfg.feature_dim})
    torch.manual_seed(tcfg.seed)
    if not audio_encoder:
        enc = AudioEncoder(enc_cfg)
    else:
        enc.requires_grad_(False)
    model = AudioToLandmarkStack(enc, AudioToLandmarks(a2l_cfg))
    up, lo = opening_columns(idx)
    neutral = neutral_frames(store, segs, idx)
    lengths = np.array([store.segments[i].length for i in segs], np.float64)
    p = lengths / lengths.sum()
    w = torch.from_numpy(lip_weights(idx))[None, None, :, None]
    print(f"a2l: {len(segs)} training segments, {int(lengths.sum())} frames")

    def make_batch(rng):
        out = []
        for _ in range(tcfg.batch_size):
            seg = segs[rng.choice(len(segs), p=p)]
            n = store.segments[seg].length
            ref = neutral[seg] if rng.random() < neutral_reference_prob else int(rng.integers(0, n))
            out.append(make_sample(store, seg, int(rng.integers(0, n - seq_frames + 1)), seq_frames, ref, enc_cfg, idx, embeddings,
                                   landmark_delay_frames))
        mel, lm, ref = (torch.from_numpy(np.stack(x)) for x in zip(*out))
        if embeddings is not None:  # embeddings: no spectral augmentation, a little noise
            return mel + 0.05 * enc_cfg.mel_std * torch.randn_like(mel), lm, ref
        return augment_mel(rng, mel, enc_cfg), lm, ref

    def loss_fn(m, batch):
        mel, lm, ref = batch
        pred = m(mel, ref)  # (B, T, K, 2)
        w_ = w.to(pred.device)
        pos = ((pred - lm).abs() * w_).mean()
        vel = (((pred[:, 1:] - pred[:, :-1]) - (lm[:, 1:] - lm[:, :-1])).abs() * w_).mean()
        cp, cl = pred - pred.mean(dim=2, keepdim=True), lm - lm.mean(dim=2, keepdim=True)  # shape without position
        shape = ((cp - cl).abs() * w_).mean()
        po, go = openings(pred, up, lo), openings(lm, up, lo)  # (B, T)
        opening = (po - go).abs().mean() + velocity_weight * ((po[:, 1:] - po[:, :-1]) - (go[:, 1:] - go[:, :-1])).abs().mean()
        spread = (po.std(dim=1) - go.std(dim=1)).abs().mean()
        loss = 100.0 * (pos + velocity_weight * vel + shape_weight * shape + opening_weight * opening + opening_std_weight * spread)
        return loss, {"pos_l1_patch_pct": 100.0 * pos.item(), "vel_l1_patch_pct": 100.0 * vel.item(), "shape_l1_patch_pct": 100.0 * shape.item(),
                      "opening_l1_patch_pct": 100.0 * opening.item(), "opening_std_gap_patch_pct": 100.0 * spread.item()}

    trained = train(name="a2l", model=model, make_batch=make_batch, loss_fn=loss_fn, cfg=tcfg, out_dir=out_dir)
    save_model(trained.encoder, Path(out_dir) / "audio_encoder")
    save_model(trained.a2l, Path(out_dir) / "a2l")
    report = evaluate_a2l(trained.encoder, trained.a2l, data_dirs, delay=landmark_delay_frames)
    (Path(out_dir) / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    print("a2l held-out:", json.dumps(report))


@torch.no_grad()
def evaluate_a2l(enc: AudioEncoder, a2l: AudioToLandmarks, data_dirs: list[str], *, crop_px: int = 256, delay: int = 0) -> dict:
    """Held-out lip landmark error (pixels at ``crop_px``) for whole segments, reference = the segment's first frame."""
    try:
        store = FrameStore(data_dirs, split="eval", with_patches=False)
    except ValueError:
        return {"segments": 0}
    embeddings = segment_embeddings(store, enc.config.mel_after) if enc.config.input_kind == "speech_embedding" else None
    idx = np.asarray(a2l.config.landmark_indices)
    lips = np.isin(idx, index_sets()["lips"])
    errs, base, opening_corr, amp, speed = [], [], [], [], []
    for seg in store.audio_segments():
        s = store.segments[seg]
        mel, lm, ref = make_sample(store, seg, 0, s.length, 0, enc.config, idx, embeddings, delay)
        pred = a2l(enc(torch.from_numpy(mel)[None]), torch.from_numpy(ref)[None])[0][0].numpy()  # (T, K, 2)
        scale = crop_px * 0.5  # patch units -> crop pixels (the patch is half the crop)
        errs.append(np.linalg.norm(pred[:, lips] - lm[:, lips], axis=-1).mean() * scale)
        base.append(np.linalg.norm(ref[None, lips] - lm[:, lips], axis=-1).mean() * scale)
        # mouth opening (inner lips 13 - 14) over time: correlation of prediction with ground truth
        i13, i14 = int(np.where(idx == 13)[0][0]), int(np.where(idx == 14)[0][0])
        go = lm[:, i14, 1] - lm[:, i13, 1]
        po = pred[:, i14, 1] - pred[:, i13, 1]
        opening_corr.append(float(np.corrcoef(go, po)[0, 1]) if go.std() > 0 and po.std() > 0 else 0.0)
        amp.append(float(po.std() / max(go.std(), 1e-9)))
        speed.append(float(np.abs(np.diff(po)).mean() / max(np.abs(np.diff(go)).mean(), 1e-9)))
    return {"segments": len(errs), "lip_error_px_at_256": float(np.mean(errs)), "static_reference_lip_error_px_at_256": float(np.mean(base)),
            "mouth_opening_correlation": float(np.mean(opening_corr)), "mouth_opening_std_ratio": float(np.mean(amp)),
            "mouth_opening_speed_ratio": float(np.mean(speed)),
            "audio_input": enc.config.input_kind, "clips": sorted({store.segments[i].clip for i in store.audio_segments()})}


@torch.no_grad()
def calibrate_articulation(enc: AudioEncoder, a2l: AudioToLandmarks, data_dirs: list[str], *, max_gain: float = 3.0,
                           basis_variance: float = 0.95):
    """Fit the articulation layer (engine/motion/articulation.py) on the training clips: the gain that
    makes the predicted inner-lip opening vary as much as the real one (per identity, the ratio of
    the real and predicted standard deviations pooled over its segments, the reference being each
    segment's most closed frame; then the median over identities, so that one speaker with many
    clips, GRID's, does not decide it), the largest real opening relative to the mouth's width
    (99th percentile), and the basis of real mouth motion: the principal components of the real
    displacements that hold ``basis_variance`` of their variance."""
    from engine.data.identities import identity_of
    from engine.motion.articulation import ArticulationConfig

    store = FrameStore(data_dirs, split="train", with_patches=False)
    idx = np.asarray(a2l.config.landmark_indices)
    up, lo = opening_columns(idx)
    pos = {int(i): k for k, i in enumerate(idx)}
    segs = store.audio_segments()
    neutral = neutral_frames(store, segs, idx)
    var: dict[str, list[float]] = {}
    ratios, disps = [], []
    for seg in segs:
        s = store.segments[seg]
        mel, lm, ref = make_sample(store, seg, 0, s.length, neutral[seg], enc.config, idx)
        pred = a2l(enc(torch.from_numpy(mel)[None]), torch.from_numpy(ref)[None])[0][0].numpy()  # (T, K, 2)
        go, po = (lm[:, lo, 1] - lm[:, up, 1]).mean(1), (pred[:, lo, 1] - pred[:, up, 1]).mean(1)
        v = var.setdefault(identity_of(s.clip), [0.0, 0.0])
        v[0] += float(go.var()) * len(go)
        v[1] += float(po.var()) * len(po)
        disps.append((lm - ref[None]).reshape(len(lm), -1))  # (T, K*2) real displacements from the closed mouth
        width = np.linalg.norm(lm[:, pos[291]] - lm[:, pos[61]], axis=-1)
        ratios.append(go / np.maximum(width, 1e-6))
    per_identity = [np.sqrt(g / max(p, 1e-12)) for g, p in var.values()]
    x = np.concatenate(disps)  # (N, K*2)
    mean = x.mean(0)
    _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
    explained = np.cumsum(sv ** 2) / np.sum(sv ** 2)
    k = int(np.searchsorted(explained, basis_variance) + 1)
    gain = float(np.clip(np.median(per_identity), 1.0, max_gain))
    return ArticulationConfig(gain=round(gain, 4), max_opening_ratio=round(float(np.percentile(np.concatenate(ratios), 99)), 4),
                              calibrated_on=f"{len(segs)} training segments ({len(var)} identities) of {', '.join(map(str, data_dirs))}; "
                                            f"basis: {k} components, {100 * explained[k - 1]:.1f} % of the real displacements' variance",
                              basis=tuple(tuple(round(float(v), 6) for v in row) for row in vt[:k]),
                              basis_mean=tuple(round(float(v), 6) for v in mean))
