"""Pipeline metrics: histogram buckets and quantiles, counters, gauges, fps, JSON, Prometheus text."""
from __future__ import annotations

import json
import math
import re
import threading

import numpy as np
import pytest

from engine.pipeline.metrics import (
    DEFAULT_BUCKETS_MS,
    STANDARD_COUNTERS,
    Counter,
    Gauge,
    Histogram,
    PipelineMetrics,
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


_SAMPLE_RE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*)\})? '
    r"(?P<value>[-+]?(\d+(\.\d*)?([eE][-+]?\d+)?|Inf|NaN))$"
)


def _parse_prometheus(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """A strict reader of the 0.0.4 text format: TYPE lines and samples (name, labels, value)."""
    types: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types and kind in {"counter", "gauge", "histogram"}
            types[name] = kind
            continue
        m = _SAMPLE_RE.match(line)
        assert m, f"not a valid sample line: {line!r}"
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:\\.|[^"\\])*)"', m["labels"] or ""))
        family = re.sub(r"_(bucket|sum|count)$", "", m["name"])
        assert m["name"] in types or family in types, f"sample before its TYPE: {line!r}"
        samples.append((m["name"], labels, float(m["value"].replace("Inf", "inf"))))
    return types, samples


def test_prometheus_text_exposition() -> None:
    metrics = PipelineMetrics()
    for v in (0.05, 3.0, 3.0, 45.0, 20000.0):
        metrics.stage("denoise").observe(v)
    metrics.stage('odd "stage"\\name').observe(1.0)
    metrics.counter("frames_dropped").inc(2)
    metrics.gauge("video_queue_depth").set(4)
    types, samples = _parse_prometheus(metrics.prometheus_text(prefix="avatar_"))
    assert types["avatar_stage_latency_ms"] == "histogram"
    assert types["avatar_frames_dropped_total"] == "counter"
    assert types["avatar_video_queue_depth"] == "gauge" and types["avatar_fps"] == "gauge"

    buckets = [
        (lab["le"], v)
        for n, lab, v in samples
        if n == "avatar_stage_latency_ms_bucket" and lab["stage"] == "denoise"
    ]
    assert len(buckets) == len(DEFAULT_BUCKETS_MS) + 1 and buckets[-1][0] == "+Inf"
    les = [float(le.replace("+Inf", "inf")) for le, _ in buckets]
    counts = [v for _, v in buckets]
    assert les == sorted(les) and counts == sorted(counts)  # cumulative
    assert dict(buckets)["0.1"] == 1 and dict(buckets)["5.0"] == 3 and dict(buckets)["10000.0"] == 4
    values = {(n, tuple(sorted(lab.items()))): v for n, lab, v in samples}
    assert values[("avatar_stage_latency_ms_count", (("stage", "denoise"),))] == 5 == counts[-1]
    assert values[("avatar_stage_latency_ms_sum", (("stage", "denoise"),))] == pytest.approx(20051.05)
    assert values[("avatar_frames_dropped_total", ())] == 2
    assert values[("avatar_video_queue_depth", ())] == 4
    # the odd stage name is escaped, not broken
    assert ("avatar_stage_latency_ms_count", (("stage", 'odd \\"stage\\"\\\\name'),)) in values
    assert all(math.isfinite(v) or n.endswith("_bucket") for n, _, v in samples)

    with pytest.raises(ValueError, match="metric name"):
        metrics.counter("frames dropped")
