"""`avatar prepare` and `avatar inspect` end to end on small real videos made from real portraits."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.audio import log_mel, mel_index_for_time
from engine.cli import main
from engine.data.prepare import PrepareConfig, prepare
from tests.synth import load_rgb, portrait_video, speech_like, write_clip

A = "portraits/hallo__examples_reference_images_2.jpg"
B = "portraits/SadTalker__examples_source_image_people_0.png"
CFG = PrepareConfig(crop_size_px=128)


@pytest.fixture
def clips(shared_data: Path, tmp_path: Path) -> Path:
    """Four clips: clean; a camera cut (A then B); a lost face mid-way; silent audio stream absent."""
    a, b = load_rgb(shared_data / A), load_rgb(shared_data / B)
    d = tmp_path / "src"
    d.mkdir()
    write_clip(d / "clean.mp4", portrait_video(a, 50), 25, speech_like(2.0))
    write_clip(d / "cut.mp4", portrait_video(a, 40) + portrait_video(b, 40), 25, speech_like(3.2, seed=1))
    lost = portrait_video(a, 75)
    for i in range(30, 40):
        lost[i] = np.full_like(lost[i], 90)
    write_clip(d / "lost.mp4", lost, 25, speech_like(3.0, seed=2))
    write_clip(d / "mute.mp4", portrait_video(a, 30), 25, None)
    (d / "notavideo.mp4").write_text("this is text, not a video")
    return d


@pytest.mark.shared_data
def test_prepare_end_to_end(clips: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    card = prepare([clips], out, CFG, jobs=1, progress=False)
    recs = {c["clip"]: c for c in card["clips"]}
    assert card["clips_total"] == 5 and card["clips_kept"] == 3

    # the clean clip: one segment, every frame kept, arrays consistent
    assert recs["clean"]["status"] == "kept" and recs["clean"]["frames_kept"] == 50
    shard = out / "shards" / "clean__s00"
    crops = np.load(shard / "crops.npy")
    data = np.load(shard / "data.npz")
    meta = json.loads((shard / "meta.json").read_text())
    assert crops.shape == (50, 128, 128, 3) and crops.dtype == np.uint8
    assert data["landmarks_crop"].shape == (50, 478, 3) and data["affine"].shape == (50, 2, 3)
    assert data["pose_deg"].shape == (50, 3)
    np.testing.assert_allclose(data["time_s"], np.arange(50) / 25, atol=1e-6)
    # mel rows are centred on the frames' times, and equal a mel of the shard's own audio
    assert meta["mel_start_index"] + data["mel_index"][10] == mel_index_for_time(np.array([0.4]))[0]
    own = log_mel(data["audio"])  # the shard's audio starts at audio_start_s = 0 for this clip
    assert meta["audio_start_s"] == 0.0 and meta["mel_start_index"] == 0
    k = int(data["mel_index"][25])
    np.testing.assert_allclose(data["mel"][k], own[k], atol=1e-4)

    # the camera cut is found and splits the clip; the two halves are different people
    assert recs["cut"]["camera_cuts"] == 1 and len(recs["cut"]["segments"]) == 2
    s0 = np.load(out / "shards" / "cut__s00" / "data.npz")["time_s"]
    d1 = np.load(out / "shards" / "cut__s01" / "data.npz")
    m1 = json.loads((out / "shards" / "cut__s01" / "meta.json").read_text())
    assert s0[-1] < 1.6 <= d1["time_s"][0]
    # a segment that starts mid-clip: its mel rows and audio are offset consistently
    np.testing.assert_array_equal(m1["mel_start_index"] + d1["mel_index"], mel_index_for_time(d1["time_s"]))
    assert m1["audio_start_s"] == pytest.approx(d1["time_s"][0], abs=1 / 16000)
    assert len(d1["audio"]) == pytest.approx(len(d1["time_s"]) * 0.04 * 16000, abs=2)

    # the lost face splits the clip, and the dropped frames are counted with their reason
    assert recs["lost"]["frames_dropped"].get("no_face") == 10 and len(recs["lost"]["segments"]) == 2

    # bad files: dropped with their own error, no shard written
    assert "NoAudioStreamError" in recs["mute"]["reason"] and recs["mute"]["status"] == "dropped"
    assert "UnreadableMediaError" in recs["notavideo"]["reason"]
    assert not list((out / "shards").glob("mute__*")) and not list((out / "shards").glob("notavideo__*"))
    assert not (out / ".tmp").exists() or not any((out / ".tmp").iterdir())

    md = (out / "data_card.md").read_text()
    assert "3 kept of 5" in md and "no_face 10" in md and "notavideo" in md

    # resume: a second run does no work; a changed configuration redoes everything
    again = prepare([clips], out, CFG, jobs=1, progress=False)
    assert again["run"]["clips_processed"] == 0 and again["clips_kept"] == 3
    mtime = (shard / "crops.npy").stat().st_mtime
    # a lost shard or a deleted record redoes just that clip
    import shutil

    shutil.rmtree(out / "shards" / "lost__s01")
    (out / "clips" / "mute.json").unlink()
    again = prepare([clips], out, CFG, jobs=1, progress=False)
    assert again["run"]["clips_processed"] == 2 and again["clips_kept"] == 3
    assert (out / "shards" / "lost__s01" / "crops.npy").is_file()

    # inspect draws one sheet per kept clip
    assert main(["inspect", str(out)]) == 0
    assert sorted(p.stem for p in (out / "inspect").glob("*.png")) == ["clean", "cut", "lost"]
    assert (shard / "crops.npy").stat().st_mtime == mtime


@pytest.mark.shared_data
def test_prepare_parallel_and_refuse_multiple(shared_data: Path, tmp_path: Path) -> None:
    """Two worker processes; a clip with two faces is refused when asked."""
    a, b = load_rgb(shared_data / A), load_rgb(shared_data / B)
    d = tmp_path / "src"
    d.mkdir()
    write_clip(d / "one.mp4", portrait_video(a, 30), 25, speech_like(1.2))
    # the larger face (A, 320 px) on the left, a smaller one (B, 200 px) on the right
    pair = [np.concatenate([x, np.pad(y, ((0, 120), (0, 0), (0, 0)))], 1) for x, y in zip(portrait_video(a, 30, size=320), portrait_video(b, 30, size=200))]
    write_clip(d / "two.mp4", pair, 25, speech_like(1.2))
    out = tmp_path / "p"
    card = prepare([d], out, PrepareConfig(crop_size_px=128, on_multiple="refuse"), jobs=2, progress=False)
    recs = {c["clip"]: c for c in card["clips"]}
    assert recs["one"]["status"] == "kept"
    assert recs["two"]["status"] == "dropped" and "MultipleFacesError" in recs["two"]["reason"]
    card = prepare([d / "two.mp4"], tmp_path / "q", PrepareConfig(crop_size_px=128), jobs=1, progress=False)
    assert card["clips_kept"] == 1 and "picked the largest" in json.dumps(card["notes"])
    lm = np.load(tmp_path / "q" / "shards" / "two__s00" / "data.npz")["landmarks_image"]
    assert lm[:, :, 0].max() < 320  # the larger face, on the left


def test_cli_errors_are_plain(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["prepare", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no video files" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "run `avatar prepare" in capsys.readouterr().err


@pytest.mark.shared_data
def test_prepare_real_clips(shared_data: Path, tmp_path: Path) -> None:
    """Two real clips: the talk-show camera cut and the variable-frame-rate clip."""
    clips = shared_data / "clips"
    out = tmp_path / "real"
    card = prepare([clips / "smirk__samples_dafoe.mp4", clips / "video-retalking__examples_face_1.mp4"], out, CFG, jobs=2, progress=False)
    recs = {c["clip"]: c for c in card["clips"]}
    assert recs["smirk__samples_dafoe"]["camera_cuts"] >= 1 and len(recs["smirk__samples_dafoe"]["segments"]) >= 2
    assert card["variable_frame_rate_clips"] == ["video-retalking__examples_face_1"]
    data = np.load(out / "shards" / "video-retalking__examples_face_1__s00" / "data.npz")
    meta = json.loads((out / "shards" / "video-retalking__examples_face_1__s00" / "meta.json").read_text())
    # VFR: mel rows follow the true frame times, not a nominal rate
    np.testing.assert_array_equal(data["mel_index"] + meta["mel_start_index"], mel_index_for_time(data["time_s"]))
    assert set(np.diff(data["mel_index"]).tolist()) <= {3, 4, 6, 7}
