"""The render-speed and frame-parts benchmarks run end to end on the shipped demo and write their
JSON (smoke runs: one render, few calls; their figures are not asserted, timings are for the reports)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "engine" / "assets" / "demo"


def test_render_speed_writes_each_variant(tmp_path: Path):
    from benchmarks.render_speed import main

    out = tmp_path / "render.json"
    rep = main(["--out", str(out), "--portraits", "demo", "--repeats", "1", "--voice", str(DEMO / "demo_voice.wav")])
    assert json.loads(out.read_text()) == rep
    demo = rep["renders"]["demo"]
    assert set(demo) == {"now", "now, no watermark"} and rep["repeats"] == 1
    for r in demo.values():
        assert r["frames"] == 247 and r["frames_per_s"] > 0 and r["cpu_ms_per_frame"] > 0 and r["video_kbit_s"] > 0
        assert {"encode", "compose"} <= set(r["stages_mean_ms"]) and len(r["frames_per_s_all"]) == 1
    with pytest.raises(SystemExit, match="unknown"):
        main(["--out", str(out), "--portraits", "nobody"])


def test_frame_parts_quick_run_reports_every_part(tmp_path: Path):
    from benchmarks.frame_parts import main

    out = tmp_path / "parts.json"
    rep = main(["--out", str(out), "--quick", "--portrait", str(DEMO / "astronaut.jpg"), "--voice", str(DEMO / "demo_voice.wav")])
    assert json.loads(out.read_text()) == rep and rep["quick"] and rep["calls"] == 2
    assert rep["warp"]["bicubic"] > 0 and rep["warp"]["bilinear"] > 0 and len(rep["warp"]["box_px"]) == 2
    assert set(rep["other_compose_parts"]) == {"decoder", "head_motion_full_frame_warp"}
    assert set(rep["paste_blend_400x500"]) == {"numpy", "cv2.blendLinear"} and set(rep["yuv_i420"]) == {"pyav_swscale", "opencv"}
    for v in rep["x264_veryfast_crf18"].values():
        assert v["kbit_s"] > 0 and v["cpu_ms_per_frame"] > 0
