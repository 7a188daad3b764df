"""Pipeline metrics: per-stage latency histograms, counters, gauges, output fps; their Prometheus export.

Two layers:

- :class:`PipelineMetrics`, one per pipeline (a session, a render): milliseconds, exact recent
  quantiles, :meth:`PipelineMetrics.snapshot` as a JSON-able dict (logs, the server's
  ``GET /sessions/{id}`` that the web page and ``avatar bench server`` read, benchmarks). Stages
  run in executor threads, so every metric takes a lock; an update costs a few hundred ns.
  Histograms keep both fixed buckets (cumulative over the whole run) and the last ``window``
  observations, from which p50/p95/p99 are computed exactly: recent quantiles, not bucket guesses.
- :class:`PrometheusExport`, one per process (the server): ``prometheus_client`` series in one
  registry that every attached pipeline adds to (``metrics.export_to(export)``). Stable names in
  seconds, histograms with fixed buckets, labels of bounded cardinality (``stage`` only, whose
  values are the code's stage names; no per-session label), so the series outlive the sessions
  that fed them: a closed session's frames stay counted and its latencies stay in the histograms.
  Per-session state (gauges, recent quantiles) is in the JSON, not here. With ``process=True`` the
  client's process, platform and GC collectors are in the registry too (``process_*``: resident
  memory, CPU seconds, open fds; ``python_gc_*``). Exported names (prefix ``avatar_``):

  ``avatar_stage_seconds{stage}`` (histogram)      one call of a stage: features (audio features and
                                                   A2L), denoise (warp, denoiser steps), compose (decoder,
                                                   compositing), idle (an idle frame)
  ``avatar_pipeline_latency_seconds`` (histogram)  a frame's audio due -> the frame out of the pipeline
  ``avatar_send_latency_seconds`` (histogram)      a frame's audio in -> its slot on the server's tracks
  ``avatar_<counter>_total`` (counter)             frames_out, frames_dropped, frames_degraded, idle_frames,
                                                   barge_ins, segments_finished, segments_interrupted,
                                                   stream_slots_skipped, stream_idle_dropped,
                                                   stream_speech_dropped, stream_video_superseded

  The one-process server runs its sessions in its own process, so one registry sees them all; with
  ``avatar serve --workers N`` the workers run prometheus_client's multiprocess mode
  (``PROMETHEUS_MULTIPROC_DIR``, set by server/workers.py) and the front reads them with a
  ``MultiProcessCollector``; with ``--ray`` the front sums the replicas' expositions (server/ray_serve.py).
"""
from __future__ import annotations

import math
import re
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry

# Upper bounds (ms) of the latency buckets: a 1-2-5 series, about log-spaced, 0.1 ms to 10 s.
DEFAULT_BUCKETS_MS: tuple[float, ...] = tuple(
    m * 10.0**e for e in range(-1, 4) for m in (1.0, 2.0, 5.0)
) + (10000.0,)
DEFAULT_WINDOW = 10000  # observations a histogram keeps for its quantiles
DEFAULT_FPS_WINDOW_S = 2.0  # the output frame rate is measured over this many seconds
# Counters every pipeline reports (present in snapshots at 0 before their first increment).
STANDARD_COUNTERS: tuple[str, ...] = (
    "frames_out",  # video frames delivered to the sink
    "frames_dropped",  # frame slots skipped because generation fell behind the clock
    "frames_degraded",  # frames generated with fewer sampler steps than configured
    "idle_frames",  # frames generated while nobody speaks
    "barge_ins",  # queued speech flushed by new speech or clear_buffer()
)
_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

# The Prometheus export (seconds). Stage calls: 0.5 ms to 2.5 s, about doubling; latencies: around the 40 ms frame
# period and the 150 ms budget finely, then coarsely to 10 s.
STAGE_BUCKETS_S: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
LATENCY_BUCKETS_S: tuple[float, ...] = (0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
# pipeline stages exported as latencies, each a histogram of its own (name, help); every other stage is a label value
LATENCY_STAGES: dict[str, tuple[str, str]] = {
    "latency": ("pipeline_latency_seconds", "Audio in (when a frame's audio is due in real time) to the frame out of the "
                                            "pipeline; a frame ready before its audio is due counts 0."),
    "send_latency": ("send_latency_seconds", "Audio in (a frame's first sample arrived) to the frame's slot on the "
                                             "server's media clock."),
}
EXPORTED_STAGES: tuple[str, ...] = ("features", "denoise", "compose", "idle")  # present (at 0) from the start
EXPORTED_COUNTERS: tuple[str, ...] = STANDARD_COUNTERS + (
    "segments_finished",  # source segments whose last audio went out
    "segments_interrupted",  # source segments cut by clear_buffer()
    "stream_slots_skipped",  # media-clock slots skipped by the server's tracks (late frames)
    "stream_idle_dropped",  # idle frames dropped ahead of the clock to take back delay
    "stream_speech_dropped",  # speech frames dropped after waiting too long for their slot
    "stream_video_superseded",  # video frames replaced before the encoder took them
)


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"metric name {name!r} must match [a-zA-Z_][a-zA-Z0-9_]*")
    return name


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(float(x), digits)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default 'linear' method)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class Counter:
    """A monotonically increasing count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0.0
        self.sink: Callable[[float], None] | None = None  # also told every increment (the Prometheus export)

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up, got inc({amount})")
        with self._lock:
            self._value += amount
        sink = self.sink
        if sink is not None:
            sink(amount)

    @property
    def value(self) -> float:
        with self._lock:
            return self._value


class Gauge:
    """A value that goes up and down (a queue depth, a latency target)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0.0

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def inc(self, amount: float = 1) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1) -> None:
        with self._lock:
            self._value -= amount

    @property
    def value(self) -> float:
        with self._lock:
            return self._value


class Histogram:
    """Latencies in ms: cumulative fixed buckets, count, sum, min, max, and recent quantiles."""

    def __init__(
        self, *, buckets_ms: Sequence[float] = DEFAULT_BUCKETS_MS, window: int = DEFAULT_WINDOW
    ) -> None:
        bounds = tuple(float(b) for b in buckets_ms)
        if not bounds or any(b >= c for b, c in zip(bounds, bounds[1:])) or math.isinf(bounds[-1]):
            raise ValueError(f"buckets_ms must be finite and strictly increasing, got {buckets_ms}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.buckets_ms = bounds  # upper bounds (le) of the buckets; +Inf is implied
        self._lock = threading.Lock()
        self._bucket_counts = [0] * (len(bounds) + 1)  # per bucket (not cumulative); last is +Inf
        self._count = 0
        self._sum_ms = 0.0
        self._min_ms = math.inf
        self._max_ms = -math.inf
        self._recent: deque[float] = deque(maxlen=window)  # the last `window` observations
        self.sink: Callable[[float], None] | None = None  # also told every observation, in ms (the Prometheus export)

    def observe(self, value_ms: float) -> None:
        """Record one duration in milliseconds (NaN is refused)."""
        v = float(value_ms)
        if math.isnan(v):
            raise ValueError("Histogram.observe(NaN)")
        i = bisect_left(self.buckets_ms, v)  # first bound >= v: "le" is inclusive
        with self._lock:
            self._bucket_counts[i] += 1
            self._count += 1
            self._sum_ms += v
            self._min_ms = min(self._min_ms, v)
            self._max_ms = max(self._max_ms, v)
            self._recent.append(v)
        sink = self.sink
        if sink is not None:
            sink(v)

    @contextmanager
    def time(self) -> Iterator[None]:
        """``with hist.time(): ...`` observes the block's wall time in ms."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.observe((time.perf_counter() - t0) * 1000.0)

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    @property
    def sum_ms(self) -> float:
        with self._lock:
            return self._sum_ms

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0..1) of the last ``window`` observations, None if there are none."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
        with self._lock:
            values = sorted(self._recent)
        return _quantile(values, q) if values else None

    def state(self) -> dict[str, Any]:
        """A consistent copy: counts per bucket (cumulative), count, sum, min, max, quantiles."""
        with self._lock:
            per_bucket = list(self._bucket_counts)
            count, sum_ms = self._count, self._sum_ms
            min_ms, max_ms = self._min_ms, self._max_ms
            values = sorted(self._recent)
        cumulative, running = [], 0
        for c in per_bucket:
            running += c
            cumulative.append(running)
        q = (lambda p: _quantile(values, p)) if values else (lambda p: None)
        return {
            "cumulative": cumulative,  # len(buckets_ms) + 1, the last one is +Inf == count
            "count": count,
            "sum_ms": sum_ms,
            "min_ms": min_ms if count else None,
            "max_ms": max_ms if count else None,
            "p50_ms": q(0.50),
            "p95_ms": q(0.95),
            "p99_ms": q(0.99),
        }


class PipelineMetrics:
    """The registry a pipeline reports into; every method is safe to call from any thread.

    ``metrics.stage("denoise").observe(ms)`` (or ``with metrics.time("denoise"):``),
    ``metrics.counter("frames_dropped").inc()``, ``metrics.gauge("video_queue_depth").set(n)``,
    ``metrics.frame_out()`` for each delivered frame (counts ``frames_out`` and feeds ``fps``).
    """

    def __init__(
        self,
        *,
        fps_window_s: float = DEFAULT_FPS_WINDOW_S,
        histogram_window: int = DEFAULT_WINDOW,
        clock: Callable[[], float] = time.monotonic,
        export: PrometheusExport | None = None,
    ) -> None:
        if not fps_window_s > 0:
            raise ValueError(f"fps_window_s must be positive, got {fps_window_s}")
        self.fps_window_s = fps_window_s  # fps counts the frames output in this many seconds
        self.histogram_window = histogram_window  # observations kept per stage for quantiles
        self.clock = clock  # seconds, monotonic; injectable for tests and virtual time
        self._lock = threading.Lock()  # guards the registries and the frame times
        self._stages: dict[str, Histogram] = {}
        self._counters: dict[str, Counter] = {name: Counter() for name in STANDARD_COUNTERS}
        self._gauges: dict[str, Gauge] = {}
        self._frame_times: deque[float] = deque()  # output times within the fps window, seconds
        self._export: PrometheusExport | None = None
        if export is not None:
            self.export_to(export)

    # -- registries ----------------------------------------------------------------------------

    def stage(self, name: str) -> Histogram:
        """The latency histogram of stage ``name`` (created on first use)."""
        with self._lock:
            hist = self._stages.get(name)
            if hist is None:
                if not name:
                    raise ValueError("a stage needs a name")
                hist = self._stages[name] = Histogram(window=self.histogram_window)
                if self._export is not None:
                    hist.sink = self._export.stage_sink(name)
            return hist

    def time(self, stage: str) -> AbstractContextManager[None]:
        """``with metrics.time("decode"): ...``: observe the block's wall time into the stage."""
        return self.stage(stage).time()

    def counter(self, name: str) -> Counter:
        """The counter ``name`` (created on first use; the standard ones always exist)."""
        with self._lock:
            c = self._counters.get(name)
            if c is None:
                c = self._counters[_check_name(name)] = Counter()
                if self._export is not None:
                    c.sink = self._export.counter_sink(name)
            return c

    def gauge(self, name: str) -> Gauge:
        """The gauge ``name`` (created on first use), e.g. ``"video_queue_depth"``."""
        with self._lock:
            g = self._gauges.get(name)
            if g is None:
                g = self._gauges[_check_name(name)] = Gauge()
            return g

    def export_to(self, export: PrometheusExport | None) -> None:
        """Also report every observation and increment from now on into ``export`` (None: stop)."""
        with self._lock:
            self._export = export
            for name, hist in self._stages.items():
                hist.sink = None if export is None else export.stage_sink(name)
            for name, c in self._counters.items():
                c.sink = None if export is None else export.counter_sink(name)

    # -- frame rate ----------------------------------------------------------------------------

    def _prune_locked(self, now_s: float) -> None:
        while self._frame_times and self._frame_times[0] <= now_s - self.fps_window_s:
            self._frame_times.popleft()

    def frame_out(self, t_s: float | None = None) -> None:
        """A frame was delivered at ``t_s`` (seconds on ``clock``; now if None): counts frames_out."""
        now_s = self.clock() if t_s is None else t_s
        self._counters["frames_out"].inc()
        with self._lock:
            self._frame_times.append(now_s)
            self._prune_locked(now_s)

    def fps(self, now_s: float | None = None) -> float:
        """Frames per second over the last ``fps_window_s``: (n - 1) / (last - first); 0 if < 2 frames."""
        now_s = self.clock() if now_s is None else now_s
        with self._lock:
            self._prune_locked(now_s)
            times = list(self._frame_times)
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    # -- export --------------------------------------------------------------------------------

    def _copy_registries(self) -> tuple[dict[str, Histogram], dict[str, Counter], dict[str, Gauge]]:
        with self._lock:
            return dict(self._stages), dict(self._counters), dict(self._gauges)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able summary: fps, counters, gauges, and per stage count/mean/min/max/p50/p95/p99 (ms)."""
        stages, counters, gauges = self._copy_registries()
        out_stages: dict[str, dict[str, Any]] = {}
        for name in sorted(stages):
            st = stages[name].state()
            out_stages[name] = {
                "count": st["count"],
                "mean_ms": _round(st["sum_ms"] / st["count"]) if st["count"] else None,
                "min_ms": _round(st["min_ms"]),
                "max_ms": _round(st["max_ms"]),
                "p50_ms": _round(st["p50_ms"]),
                "p95_ms": _round(st["p95_ms"]),
                "p99_ms": _round(st["p99_ms"]),
                "sum_ms": _round(st["sum_ms"]),
            }

        def number(v: float) -> int | float | None:
            if not math.isfinite(v):
                return None  # JSON has no NaN or infinity
            return int(v) if float(v).is_integer() else round(v, 3)

        return {
            "fps": round(self.fps(), 2),
            "counters": {name: number(counters[name].value) for name in sorted(counters)},
            "gauges": {name: number(gauges[name].value) for name in sorted(gauges)},
            "stages": out_stages,
        }


class PrometheusExport:
    """The Prometheus series every attached :class:`PipelineMetrics` adds to, in ``self.registry``.

    ``export = PrometheusExport(); pipeline.metrics.export_to(export)`` for each session;
    ``body, content_type = export.exposition()`` for ``GET /metrics``. Names and labels are listed in
    the module's docstring; the series exist (at 0) from the start and never vanish.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, prefix: str = "avatar_", process: bool = True) -> None:
        if prefix and not _NAME_RE.match(prefix):
            raise ValueError(f"prefix {prefix!r} must match [a-zA-Z_][a-zA-Z0-9_]*")
        self.registry = CollectorRegistry() if registry is None else registry  # what exposition() writes
        self.prefix = prefix  # of every series' name
        if process:  # the client's defaults: process_* (RSS, CPU, fds, start time), python_info, python_gc_*
            prometheus_client.ProcessCollector(registry=self.registry)
            prometheus_client.PlatformCollector(registry=self.registry)
            prometheus_client.GCCollector(registry=self.registry)
        self._lock = threading.Lock()
        self._stages = prometheus_client.Histogram(
            f"{prefix}stage_seconds", "Wall time of one call of a pipeline stage, in seconds.", ["stage"],
            buckets=STAGE_BUCKETS_S, registry=self.registry)
        self._latencies = {stage: prometheus_client.Histogram(f"{prefix}{name}", help_, buckets=LATENCY_BUCKETS_S, registry=self.registry)
                           for stage, (name, help_) in LATENCY_STAGES.items()}
        self._counters: dict[str, prometheus_client.Counter] = {}
        for stage in EXPORTED_STAGES:
            self._stages.labels(stage=stage)
        for name in EXPORTED_COUNTERS:
            self._counter(name)

    def _counter(self, name: str) -> prometheus_client.Counter:
        with self._lock:
            c = self._counters.get(name)
            if c is None:  # prometheus_client appends _total
                c = self._counters[name] = prometheus_client.Counter(
                    f"{self.prefix}{_check_name(name)}", f"Count of {name.replace('_', ' ')}.", registry=self.registry)
            return c

    def stage_sink(self, stage: str) -> Callable[[float], None]:
        """What a pipeline's histogram of ``stage`` tells each observation (ms) to: a histogram in seconds."""
        latency = self._latencies.get(stage)
        if latency is not None:
            return lambda ms: latency.observe(max(0.0, ms) / 1000.0)
        child = self._stages.labels(stage=stage)
        return lambda ms: child.observe(ms / 1000.0)

    def counter_sink(self, name: str) -> Callable[[float], None]:
        """What a pipeline's counter ``name`` tells each increment to."""
        return self._counter(name).inc

    def exposition(self) -> tuple[bytes, str]:
        """(the registry in the Prometheus text format, its Content-Type)."""
        return prometheus_client.generate_latest(self.registry), prometheus_client.CONTENT_TYPE_LATEST
