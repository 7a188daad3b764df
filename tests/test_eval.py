"""`avatar eval` end to end on a real clip placed under a held-out name, with a tiny bundle."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA
from tests.tiny import tiny_bundle

EVAL_NAME = "vox2__Audio_Source_00086"  # a held-out clip name (engine/data/splits.json)


@pytest.fixture(scope="module")
def heldout_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (SHARED_DATA / "grid_s1").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (CI has it beside the checkout)")
    from engine.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("eval")
    (root / "src").mkdir()
    shutil.copyfile(SHARED_DATA / "grid_s1" / "s1_bbal6n.mpg", root / "src" / f"{EVAL_NAME}.mpg")
    card = prepare([root / "src"], root / "prepared", PrepareConfig(), jobs=1, progress=False)
    assert card["clips_kept"] == 1
    return root / "prepared"


def test_eval_writes_report_with_baselines(heldout_shards, tmp_path):
    from engine.bundle import load_bundle
    from engine.eval.selfrecon import METHODS, evaluate_selfrecon

    rep = evaluate_selfrecon(load_bundle(tiny_bundle(tmp_path / "b")), [str(heldout_shards)], tmp_path / "r", max_frames=12, lpips=False)
    assert set(rep["summary"]) == set(METHODS) | {"ground_truth"}
    seg = rep["segments"][0]
    assert seg["frames"] == 12
    static = seg["static_portrait"]
    assert 0 < static["ssim_lower_face"] <= 1 and static["psnr_lower_face_db"] > 10
    assert json.loads((tmp_path / "r" / "report.json").read_text())["summary"] == rep["summary"]
    assert "| ours |" in (tmp_path / "r" / "report.md").read_text()
    assert len(list((tmp_path / "r").glob("strip_*.png"))) == 1


def test_eval_variants_full_frame_jitter_and_drift(heldout_shards, tmp_path):
    from engine.bundle import load_bundle
    from engine.eval.selfrecon import evaluate_selfrecon

    b = load_bundle(tiny_bundle(tmp_path / "b"))
    other = load_bundle(tiny_bundle(tmp_path / "b2", seed=1))
    rep = evaluate_selfrecon(b, [str(heldout_shards)], tmp_path / "r", max_frames=12, lpips=True, variants={"student1": (other, 1)},
                             drift_seconds=1.0, compositors={"student1": "patch"})
    assert rep["compositors"] == {"ours": "native", "student1": "patch"}
    a2l = rep["articulation"]["a2l_only:ours"]  # the A2L's own landmarks against ground truth's
    assert a2l["amplitude_ratio"] > 0 and -1 <= a2l["correlation"] <= 1 and a2l["gt_amplitude"] > 0
    assert "sharpness_ratio" in rep["summary"]["ours"] and rep["summary"]["static_portrait"]["sharpness_ratio"] == pytest.approx(1.0)
    assert set(rep["summary"]) == {"ours", "student1", "warp_only", "static_portrait", "ground_truth"}
    assert rep["steps"] == {"ours": 2, "student1": 1}
    ours = rep["summary"]["ours"]
    for k in ("psnr_full_db", "ssim_full", "lpips_full", "lpips_lower_face", "mouth_jitter_px"):
        assert k in ours, k
    assert rep["summary"]["static_portrait"]["mouth_jitter_px"] < rep["summary"]["ground_truth"]["mouth_jitter_px"]  # a still image barely jitters
    drift = rep["identity_drift"]
    assert "ours" in drift and "student1" not in drift and drift["ours"]["lpips_to_portrait_first_5s"] >= 0
    assert "cross_identity" not in rep  # one held-out segment: nobody else's audio
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| student1 | 1 |" in md and "Identity drift" in md


def test_eval_true_motion_rows_and_silence(heldout_shards, tmp_path):
    from engine.bundle import load_bundle
    from engine.eval.selfrecon import evaluate_selfrecon

    rep = evaluate_selfrecon(load_bundle(tiny_bundle(tmp_path / "b")), [str(heldout_shards)], tmp_path / "r", max_frames=30, lpips=False,
                             drift_seconds=0, true_motion=True)
    summ = rep["summary"]
    assert {"ours_true_motion", "warp_only_true_motion"} <= set(summ)
    # ground truth's own lips drive the warp: its lips land nearer the real ones than the still portrait's
    assert summ["warp_only_true_motion"]["lip_landmark_error_px"] < summ["static_portrait"]["lip_landmark_error_px"]
    seg = rep["segments"][0]
    assert 0 <= seg["silent_frames"] <= 30
    if "mouth_change_silent" in summ["static_portrait"]:  # the GRID clip opens with silence
        assert summ["static_portrait"]["mouth_change_silent"] == 0.0
    assert "ours_true_motion" in (tmp_path / "r" / "report.md").read_text()


def test_silent_frames_follow_the_vad():
    import numpy as np

    from engine.audio import decode_audio
    from engine.eval.selfrecon import silent_frames

    path = SHARED_DATA / "speech" / "espeak_en-us_16k.wav"
    if not path.is_file():
        pytest.skip(f"shared speech not found at {path}")
    speech = decode_audio(path)[:16000]  # 16 kHz mono float32
    wave = np.concatenate([np.zeros(16000, np.float32), speech, np.zeros(16000, np.float32)])
    t = np.arange(75) / 25.0
    s = silent_frames(wave, t)
    assert s[:20].all()  # the first second is silence
    assert not s[30:45].any()  # speech
    assert s[-5:].all()  # 300 ms hangover, then silence again


def test_eval_cli_needs_clips_or_data(tmp_path, capsys):
    from engine.cli import main

    assert main(["eval", "--out", str(tmp_path / "r")]) == 2
    assert "--clips" in capsys.readouterr().err
