"""Sync expert: shapes, determinism, save/load, the LSE metric on a case with a known answer, and a
short run on real frames (two GRID clips from ../shared/data prepared in the test)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.eval.sync_metric import sync_scores
from engine.models.io import load_model, save_model
from engine.models.sync import SyncConfig, SyncExpert, mouth_from_patches
from tests.conftest import SHARED_DATA

torch.set_num_threads(1)

TINY = SyncConfig(downsample=4, embed_dim=32, video_channels=(8, 16, 32), audio_channels=(32, 32))


def _inputs(cfg: SyncConfig, b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.mouth_size_px
    mouth = torch.rand(b, cfg.frames, h, w, generator=g) * 2 - 1  # (B, frames, h, w)
    mel = torch.randn(b, cfg.mel_rows, cfg.mel_bins, generator=g) * 3 - 9  # (B, rows, 80)
    return mouth, mel


def test_shapes_and_unit_norm() -> None:
    model = SyncExpert(TINY).eval()
    mouth, mel = _inputs(TINY, 3)
    assert TINY.mouth_size_px == (16, 18)
    with torch.no_grad():
        v, a = model.embed_video(mouth), model.embed_audio(mel)
    assert v.shape == (3, 32) and a.shape == (3, 32)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(a.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="odd"):
        SyncExpert(SyncConfig(frames=4))


def test_mouth_from_patches_crops_the_box() -> None:
    cfg = SyncConfig()
    patches = np.zeros((2, 128, 128, 3), np.uint8)
    x0, y0, w, h = cfg.mouth_box_px
    patches[:, y0 : y0 + h, x0 : x0 + w] = 255
    m = mouth_from_patches(patches, cfg)
    assert m.shape == (2, h // 2, w // 2) and m.dtype == np.float32
    np.testing.assert_allclose(m, 1.0, atol=1e-5)  # exactly the white box
    shifted = mouth_from_patches(patches, cfg, shift_px=(4, 0))
    assert shifted.min() == pytest.approx(-1.0) and shifted.max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="expects 128"):
        mouth_from_patches(np.zeros((1, 64, 64, 3), np.uint8), cfg)


def test_determinism_and_save_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a = SyncExpert(TINY).eval()
    torch.manual_seed(0)
    b = SyncExpert(TINY).eval()
    mouth, mel = _inputs(TINY, 4)
    with torch.no_grad():
        va, aa = a.embed_video(mouth), a.embed_audio(mel)
        torch.testing.assert_close(va, b.embed_video(mouth), rtol=0, atol=0)
        torch.testing.assert_close(va, a.embed_video(mouth), rtol=0, atol=0)
    save_model(a, tmp_path / "sync")
    assert json.loads((tmp_path / "sync.json").read_text())["kind"] == "SyncConfig"
    c = load_model(SyncExpert, SyncConfig, tmp_path / "sync")
    assert c.config == TINY  # tuples survive the JSON round trip
    with torch.no_grad():
        torch.testing.assert_close(c.embed_video(mouth), va, rtol=0, atol=0)
        torch.testing.assert_close(c.embed_audio(mel), aa, rtol=0, atol=0)


class _HandMadeExpert:
    """Embeds a window as the (centred, normalised) per-frame brightness / per-frame mel energy.

    A mouth window of frames t-2..t+2 and a mel window of 20 rows (4 rows a frame) map to the same
    5-vector exactly when the audio carries the same per-frame signal, so the answer is known.
    """

    config = SyncConfig(frames=5, mel_rows=20)

    @staticmethod
    def _unit(x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(dim=1, keepdim=True)
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def embed_video(self, mouth: torch.Tensor) -> torch.Tensor:
        return self._unit(mouth.mean(dim=(2, 3)))  # (B, 5)

    def embed_audio(self, mel: torch.Tensor) -> torch.Tensor:
        return self._unit(mel.mean(dim=2).view(len(mel), 5, 4).mean(dim=2))  # (B, 5)


def _synthetic_segment(n: int, audio_lag_frames: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A mouth whose brightness follows a random signal s, and audio carrying s ``audio_lag_frames`` later."""
    rng = np.random.default_rng(seed)
    pad = 40
    s = rng.standard_normal(n + 2 * pad)  # s[pad + u]: the signal at frame u
    mouth = np.repeat(np.clip(0.3 * s[pad : pad + n], -1, 1)[:, None, None], 12, 1).repeat(12, 2).astype(np.float32)  # (F, 12, 12)
    mel_index = 4 * np.arange(n) + 10  # frame u owns rows 4u + 8 .. 4u + 11 (centre 4u + 10)
    mel = np.zeros((4 * n + 20, 80), np.float32)
    for u in range(-2, n + 3):  # rows 4u + 8.. of frame u sound what the mouth did at frame u - lag
        lo = 4 * u + 8
        if 0 <= lo < len(mel):
            mel[lo : lo + 4] = 0.3 * s[pad + u - audio_lag_frames] - 9.0
    return mouth, mel, mel_index


@pytest.mark.parametrize("lag", [-4, 0, 3, 7])
def test_sync_scores_finds_a_known_offset(lag: int) -> None:
    mouth, mel, mel_index = _synthetic_segment(90, lag)
    r = sync_scores(_HandMadeExpert(), mouth, mel, mel_index, max_offset_frames=10)
    assert r["offset_frames"] == lag  # positive: the audio lags the video
    assert r["lse_d"] == pytest.approx(0.0, abs=1e-5)
    assert r["lse_c"] > 0.5
    assert len(r["distance_by_offset"]) == 21 and r["offsets"][10] == 0


def test_sync_scores_short_segment_and_real_model() -> None:
    """30 frames with offsets up to 15: every offset still has a frame pair; a trained-size model runs batched."""
    mouth, mel, mel_index = _synthetic_segment(30, 2, seed=1)
    model = SyncExpert(SyncConfig(patch_size_px=24, mouth_box_px=(0, 0, 24, 24))).eval()  # 12 x 12 mouth
    r = sync_scores(model, mouth, mel, mel_index, max_offset_frames=15, chunk=7)
    assert np.isfinite(r["distance_by_offset"]).all() and r["lse_c"] >= 0 and -15 <= r["offset_frames"] <= 15
    assert not model.training
    r2 = sync_scores(model, mouth, mel, mel_index, max_offset_frames=15, chunk=256)
    assert r2["distance_by_offset"] == pytest.approx(r["distance_by_offset"], abs=1e-5)


# --- real frames: two GRID clips prepared into shards (one named as a held-out clip) ---------------

GRID_CLIPS = ["s1_bbal6n.mpg", "s1_bbas1s.mpg"]
EVAL_NAME = "video-retalking__examples_face_3"  # in engine/data/splits.json, so the eval split is not empty


@pytest.fixture(scope="module")
def grid_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (SHARED_DATA / "grid_s1").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (CI has it beside the checkout)")
    from engine.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("sync")
    src = root / "src"
    src.mkdir()
    shutil.copyfile(SHARED_DATA / "grid_s1" / GRID_CLIPS[0], src / GRID_CLIPS[0])
    shutil.copyfile(SHARED_DATA / "grid_s1" / GRID_CLIPS[1], src / f"{EVAL_NAME}.mpg")
    card = prepare([src], root / "prepared", PrepareConfig(), jobs=1, progress=False)
    assert card["clips_kept"] == 2
    return root / "prepared"


@pytest.mark.shared_data
def test_overfit_a_real_batch(grid_shards: Path) -> None:
    from engine.training.data import FrameStore
    from engine.training.sync import SyncSampler, contrastive_loss

    store = FrameStore([grid_shards], split="all")
    sampler = SyncSampler(store, TINY, negatives_per_sample=3, augment=False)
    batch = sampler.batch(np.random.default_rng(0), 12)
    assert batch.mouth.shape == (12, 5, 16, 18) and batch.mel.shape == (12, 4, 20, 80)
    torch.manual_seed(0)
    model = SyncExpert(TINY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, metrics = contrastive_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert metrics["acc_offset"] > 0.8


@pytest.mark.shared_data
def test_train_sync_writes_model_and_eval(grid_shards: Path, tmp_path: Path) -> None:
    from dataclasses import asdict

    from engine.training.loop import TrainConfig
    from engine.training.sync import train_sync

    tcfg = TrainConfig(steps=3, batch_size=8, warmup_steps=1, threads=1, log_every=1, checkpoint_every=3)
    train_sync([str(grid_shards)], str(tmp_path / "run"), asdict(TINY), tcfg, negatives_per_sample=2, eval_max_offset_frames=5)
    model = load_model(SyncExpert, SyncConfig, tmp_path / "run" / "sync")
    assert model.config == TINY
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["segments"] == 1 and report["per_segment"][0]["segment"].startswith(EVAL_NAME)
    for k in ("lse_d", "lse_c", "frac_offset_within_1"):
        assert np.isfinite(report[k])
    assert report["train_subset"]["segments"] == 1
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 3
