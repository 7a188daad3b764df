"""`avatar bench server` end to end on a tiny bundle and 1.5 s of speech, one session: a real
`avatar serve` process and a real aiortc client; the report's fields are there and consistent
(no timing is asserted: speed is measured, not tested)."""
from __future__ import annotations

import json
import wave

import numpy as np
import pytest

from benchmarks.server import histogram_quantile
from engine.audio import decode_audio
from engine.cli import DEMO, main
from tests.tiny import tiny_bundle


def test_bench_server_writes_json_and_plot(tmp_path):
    b = tiny_bundle(tmp_path / "b")
    speech = tmp_path / "speech.wav"
    x = decode_audio(DEMO / "demo_voice.wav", sample_rate_hz=16000)[: int(1.5 * 16000)]
    with wave.open(str(speech), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.round(x * 32767).astype("<i2").tobytes())
    out = tmp_path / "bench" / "server.json"
    assert main(["bench", "server", "--out", str(out), "--sessions", "1", "--audio", str(speech), "--bundle", str(b),
                 "--backend", "torch", "--threads", "1"]) == 0
    r = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    assert [run["sessions"] for run in r["runs"]] == [1] and r["sessions_holding_25fps"] in (0, 1)
    (s,) = r["runs"][0]["per_session"]
    assert "error" not in s, s
    assert s["frames"] > 40 and 0 < s["first_frame_ms"] < 20_000 and s["fps_received"] > 0
    assert s["audio_roundtrip_ms_unchecked"] is not None and s["server_pipeline_latency_ms"]["p50_ms"] > 0
    assert set(r["runs"][0]["cpu_cores_used"]) == {"server", "clients"}
    m = r["runs"][0]["server_metrics"]  # the server's /metrics, read after the run
    assert m["sessions_started"] == 1 and m["frames_out"] >= s["frames"] - 5
    assert m["pipeline_latency"]["count"] > 0 and m["pipeline_latency"]["p50_ms"] >= 0
    assert m["send_latency"]["count"] > 0 and m["process_resident_memory_mib"] > 50 and m["process_open_fds"] > 0
    assert r["sessions_holding_25fps"] == int(r["runs"][0]["all_hold_25fps"])


def test_histogram_quantile_interpolates_inside_the_bucket():
    inf = float("inf")
    buckets = [(0.1, 10.0), (0.2, 30.0), (0.5, 40.0), (inf, 40.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.15)  # rank 20: halfway through (0.1, 0.2]
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1) and histogram_quantile(0.05, buckets) == pytest.approx(0.02)
    assert histogram_quantile(1.0, buckets) == pytest.approx(0.5)
    assert histogram_quantile(0.99, [(0.1, 1.0), (inf, 2.0)]) == 0.1  # in +Inf: its lower bound
    assert histogram_quantile(0.5, [(0.1, 0.0), (inf, 0.0)]) is None


def test_bench_server_scale_out_with_two_workers(tmp_path):
    """`avatar bench server --workers 2`: the table row, the server's process tree (front + 2 workers), the capacity model."""
    b = tiny_bundle(tmp_path / "b")
    speech = tmp_path / "speech.wav"
    x = decode_audio(DEMO / "demo_voice.wav", sample_rate_hz=16000)[: int(1.5 * 16000)]
    with wave.open(str(speech), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.round(x * 32767).astype("<i2").tobytes())
    out = tmp_path / "bench" / "scale_out.json"
    assert main(["bench", "server", "--out", str(out), "--sessions", "1", "--workers", "2", "--audio", str(speech), "--bundle", str(b),
                 "--backend", "torch", "--threads", "1"]) == 0
    r = json.loads(out.read_text())
    (row,) = r["table"]
    assert row["mode"] == "2 workers" and row["sessions"] == 1 and row["fps_received_min"] > 0
    assert row["server_processes"] >= 3 and 0 <= row["front_cores"] <= row["server_cores"], row  # the front and its 2 workers
    assert r["sessions_holding_25fps"]["2 workers"] in (0, 1)
    full = json.loads(open(r["reports"]["2 workers"]).read())
    assert full["runs"][0]["server_metrics"]["sessions_started"] == 1 and full["runs"][0]["server_metrics"]["frames_out"] > 0
    cm = r["capacity_model"]
    assert cm["projected"] and cm["machines"]["16_cores"]["projected"] and cm["machines"]["h100_16_cores"]["projected"]
    assert cm["machines"]["2_cores"]["sessions"] >= 1 and cm["machines"]["64_cores"]["sessions"] > cm["machines"]["16_cores"]["sessions"]
