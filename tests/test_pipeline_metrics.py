"""Pipeline metrics: histogram buckets and quantiles, counters, gauges, fps, JSON; the Prometheus export."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.pipeline.metrics import (
    DEFAULT_BUCKETS_MS,
    EXPORTED_COUNTERS,
    EXPORTED_STAGES,
    STAGE_BUCKETS_S,
    STANDARD_COUNTERS,
    Counter,
    Gauge,
    Histogram,
    PipelineMetrics,
    PrometheusExport,
)


class FakeClock:
    """A settable monotonic clock in seconds (virtual time for the fps window)."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_histogram_buckets_are_inclusive_and_cumulative() -> None:
    hist = Histogram(buckets_ms=(1.0, 10.0, 100.0))
    for v in (0.5, 1.0, 1.5, 10.0, 99.0, 250.0):
        hist.observe(v)
    state = hist.state()
    assert state["cumulative"] == [2, 4, 5, 6]  # le=1 holds 0.5 and 1.0 (inclusive); +Inf == count
    assert state["count"] == hist.count == 6
    assert state["sum_ms"] == pytest.approx(362.0)
    assert (state["min_ms"], state["max_ms"]) == (0.5, 250.0)
    with pytest.raises(ValueError, match="NaN"):
        hist.observe(float("nan"))
    with pytest.raises(ValueError, match="increasing"):
        Histogram(buckets_ms=(10.0, 1.0))


def test_default_buckets_are_log_spaced_ms() -> None:
    b = np.array(DEFAULT_BUCKETS_MS)
    assert b[0] == 0.1 and b[-1] == 10000.0 and np.all(np.diff(b) > 0)
    ratios = b[1:] / b[:-1]
    assert ratios.min() >= 2.0 and ratios.max() <= 2.5  # a 1-2-5 series


def test_quantiles_are_exact_over_the_recent_window() -> None:
    rng = np.random.default_rng(0)
    values = rng.lognormal(mean=2.0, sigma=0.5, size=5000)
    hist = Histogram(window=1000)
    for v in values:
        hist.observe(v)
    recent = values[-1000:]  # only the last `window` observations count for quantiles
    for q in (0.5, 0.95, 0.99):
        assert hist.quantile(q) == pytest.approx(np.percentile(recent, 100 * q))
    assert hist.count == 5000  # ... while the buckets and count cover the whole run
    assert Histogram().quantile(0.5) is None
    with pytest.raises(ValueError):
        hist.quantile(1.5)


def test_counter_and_gauge() -> None:
    counter = Counter()
    counter.inc()
    counter.inc(4)
    assert counter.value == 5
    with pytest.raises(ValueError, match="only goes up"):
        counter.inc(-1)
    gauge = Gauge()
    gauge.set(7)
    gauge.inc()
    gauge.dec(3)
    assert gauge.value == 5


def test_registry_is_thread_safe() -> None:
    metrics = PipelineMetrics()
    n_threads, n_each = 4, 5000

    def work(i: int) -> None:
        for k in range(n_each):
            metrics.stage("denoise").observe(k % 50)
            metrics.counter("frames_dropped").inc()
            metrics.gauge(f"queue_{i}").set(k)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert metrics.stage("denoise").count == n_threads * n_each
    assert metrics.stage("denoise").state()["cumulative"][-1] == n_threads * n_each
    assert metrics.counter("frames_dropped").value == n_threads * n_each
    assert metrics.stage("denoise") is metrics.stage("denoise")
    assert all(metrics.gauge(f"queue_{i}").value == n_each - 1 for i in range(n_threads))


def test_fps_over_a_sliding_window() -> None:
    clock = FakeClock()
    metrics = PipelineMetrics(fps_window_s=2.0, clock=clock)
    assert metrics.fps() == 0.0
    for _ in range(75):  # 3 s at 25 fps
        metrics.frame_out()
        clock.now_s += 0.04
    assert metrics.fps() == pytest.approx(25.0, rel=0.03)
    for _ in range(50):  # then 2 s at 10 fps: the window forgets the faster past
        metrics.frame_out()
        clock.now_s += 0.1
    assert metrics.fps() == pytest.approx(10.0, rel=0.03)
    clock.now_s += 5.0  # output stalls
    assert metrics.fps() == 0.0
    assert metrics.counter("frames_out").value == 125


def test_time_context_manager_observes_ms() -> None:
    metrics = PipelineMetrics()
    with metrics.time("decode"):
        sum(range(1000))
    st = metrics.stage("decode").state()
    assert st["count"] == 1 and 0.0 <= st["sum_ms"] < 1000.0


def test_snapshot_is_json_and_rounded() -> None:
    clock = FakeClock()
    metrics = PipelineMetrics(clock=clock)
    for v in (1.23456, 2.34567, 40.0):
        metrics.stage("denoise").observe(v)
    metrics.stage("unused")  # registered, never observed
    metrics.counter("barge_ins").inc()
    metrics.gauge("video_queue_depth").set(2)
    metrics.gauge("latency_target_ms").set(123.456789)
    for _ in range(3):
        metrics.frame_out()
        clock.now_s += 0.04
    snap = json.loads(json.dumps(metrics.snapshot()))  # JSON round trip (no numpy, no inf)
    assert set(STANDARD_COUNTERS) <= set(snap["counters"])
    assert snap["counters"]["barge_ins"] == 1 and snap["counters"]["frames_out"] == 3
    assert snap["gauges"] == {"latency_target_ms": 123.457, "video_queue_depth": 2}
    assert snap["fps"] == 25.0
    denoise = snap["stages"]["denoise"]
    assert denoise["count"] == 3 and denoise["min_ms"] == 1.235 and denoise["max_ms"] == 40.0
    assert denoise["p50_ms"] == 2.346 and denoise["mean_ms"] == pytest.approx(14.527, abs=1e-3)
    assert snap["stages"]["unused"]["count"] == 0 and snap["stages"]["unused"]["p95_ms"] is None


def _samples(export: PrometheusExport) -> dict[tuple[str, tuple], float]:
    """The export's exposition read back by prometheus_client's own parser: {(sample name, labels): value}."""
    body, content_type = export.exposition()
    assert content_type.startswith("text/plain") and body.endswith(b"\n")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sm in family.samples:
            out[(sm.name, tuple(sorted(sm.labels.items())))] = sm.value
    return out


def test_prometheus_export_in_seconds_with_stable_names() -> None:
    export = PrometheusExport(process=False)
    before = _samples(export)
    # every exported series is there (at 0) before any pipeline reported
    for stage in EXPORTED_STAGES:
        assert before[("avatar_stage_seconds_count", (("stage", stage),))] == 0
    for name in EXPORTED_COUNTERS:
        assert before[(f"avatar_{name}_total", ())] == 0
    assert before[("avatar_pipeline_latency_seconds_count", ())] == 0 and before[("avatar_send_latency_seconds_count", ())] == 0

    metrics = PipelineMetrics(export=export)
    for v in (0.05, 3.0, 3.0, 45.0, 20000.0):
        metrics.stage("denoise").observe(v)  # ms in, seconds out
    metrics.stage("latency").observe(120.0)
    metrics.stage("latency").observe(-30.0)  # a frame ready before its audio was due: 0 in the export
    metrics.counter("frames_dropped").inc(2)
    metrics.gauge("video_queue_depth").set(4)  # per-session state: not exported
    metrics.frame_out()
    got = _samples(export)
    assert got[("avatar_stage_seconds_count", (("stage", "denoise"),))] == 5
    assert got[("avatar_stage_seconds_sum", (("stage", "denoise"),))] == pytest.approx(20.05105)
    assert got[("avatar_stage_seconds_bucket", (("le", "0.005"), ("stage", "denoise")))] == 3
    assert got[("avatar_stage_seconds_bucket", (("le", "2.56"), ("stage", "denoise")))] == 4
    assert got[("avatar_stage_seconds_bucket", (("le", "+Inf"), ("stage", "denoise")))] == 5
    assert all(b < c for b, c in zip(STAGE_BUCKETS_S, STAGE_BUCKETS_S[1:]))
    assert got[("avatar_pipeline_latency_seconds_count", ())] == 2
    assert got[("avatar_pipeline_latency_seconds_sum", ())] == pytest.approx(0.12)
    assert got[("avatar_pipeline_latency_seconds_bucket", (("le", "0.02"),))] == 1  # the early frame, as 0
    assert got[("avatar_frames_dropped_total", ())] == 2 and got[("avatar_frames_out_total", ())] == 1
    assert not any("queue_depth" in name for name, _ in got)
    assert metrics.stage("latency").state()["min_ms"] == -30.0  # the pipeline's own snapshot keeps the signed value
    with pytest.raises(ValueError, match="metric name"):
        metrics.counter("frames dropped")


def test_prometheus_series_outlive_the_pipelines_and_take_no_session_label() -> None:
    """Sessions come and go; their observations add up in the same series, which never vanish."""
    export = PrometheusExport(process=False)
    names_before = {name for name, _ in _samples(export)}
    for i in range(20):  # twenty sessions, each reporting and then gone
        m = PipelineMetrics()
        m.stage("compose").observe(10.0)  # before the export is attached: not exported
        m.export_to(export)
        m.stage("compose").observe(10.0)
        m.stage("send_latency").observe(100.0)
        m.counter("segments_finished").inc()
        m.frame_out()
        del m
    got = _samples(export)
    assert got[("avatar_stage_seconds_count", (("stage", "compose"),))] == 20
    assert got[("avatar_send_latency_seconds_count", ())] == 20
    assert got[("avatar_segments_finished_total", ())] == 20 and got[("avatar_frames_out_total", ())] == 20
    assert {name for name, _ in got} == names_before  # the same series, no new ones per session
    assert all(set(dict(labels)) <= {"stage", "le"} for _, labels in got)  # bounded labels only
    m = PipelineMetrics(export=export)
    m.export_to(None)  # detached: nothing more goes out
    m.frame_out()
    assert _samples(export)[("avatar_frames_out_total", ())] == 20


def test_prometheus_export_has_process_metrics() -> None:
    got = _samples(PrometheusExport())
    names = {name for name, _ in got}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"} <= names
    assert got[("process_resident_memory_bytes", ())] > 10 * 2**20
