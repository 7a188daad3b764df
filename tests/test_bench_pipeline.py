"""`avatar bench pipeline` end to end on a tiny bundle and 2 s of speech: the report's fields
are there and consistent (no timing is asserted: speed is measured, not tested)."""
from __future__ import annotations

import json

from engine.cli import main
from tests.tiny import tiny_bundle


def test_bench_pipeline_writes_json_and_histogram(tmp_path):
    b = tiny_bundle(tmp_path / "b")
    out = tmp_path / "bench" / "pipeline.json"
    assert main(["bench", "pipeline", "--out", str(out), "--bundle", str(b), "--duration", "2", "--threads", "1"]) == 0
    r = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    assert r["audio_s"] == 2.0 and r["fps_target"] == 25
    timeline = r["frame_kinds"]["speech"] + r["frame_kinds"]["idle"] + r["frame_kinds"]["dropped"]
    assert timeline == r["frames"] >= 50
    assert r["latency_ms"]["p50"] is not None and r["latency_ms"]["p50"] <= r["latency_ms"]["p95"] <= r["latency_ms"]["p99"]
    assert r["av_offset"]["max_abs_offset_frames"] == 0  # each frame re-emits its own span of the input
    assert r["first_frame_ms"] is not None and r["audio_lookahead_ms"] > 0
