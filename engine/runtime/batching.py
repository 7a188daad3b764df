"""Cross-session batching: concurrent sessions' calls of one graph stacked along the batch axis, run once, split back.

Every session of a server shares one Runtime (``server/app.py``), and each session's pipeline calls the
denoiser from its own stage-A thread and the decoder from its own stage-B thread
(``engine/pipeline/pipeline.py``: one single-worker executor per stage and session). ``BatchingGraph`` wraps
one Graph with the same ``infer(feed) -> outputs``: calls that arrive together form one batch.

The scheme (leader / follower, one open group at a time):

1. A call whose feed cannot join the open group (none open, full, or other non-batch shapes) opens a new
   group and leads it; otherwise it joins the open group and waits for its leader.
2. The leader waits only for callers it expects: the threads that called this graph within the last
   ``active_window_ms`` (the sessions that are speaking now). Alone, it runs at once: no added wait, no copy
   (its own feed goes straight to the graph). Otherwise it waits until every expected caller has joined,
   the group is full (``max_batch`` rows), or ``max_wait_ms`` has passed, whichever comes first.
3. The leader closes the group, stacks each input along axis 0 (every input and output of the batched
   graphs has the batch first: ``export/specs.py``), runs the graph once outside the lock, and gives each
   caller its rows of every output (views of the batch's output). An exception reaches every caller of the
   batch. A new group may open and run while one is running (on a CPU, as the bare graph allows).

Two sessions whose calls are out of phase pull each other into phase when they run back to back (a server
at capacity): a leader's wait (up to ``max_wait_ms``) shortens the gap between them. Sessions paced by their
own audio clocks stay where their audio puts them: their calls meet in a batch only when they fall within
``max_wait_ms`` of each other (or, ``serial``, while a batch is in flight).

``serial``: one batch in flight at a time (a GPU's one stream; TensorRTGraph serialises its calls anyway). The
leader keeps its group open while the device is busy, so that every call that comes meanwhile joins the next
batch without any added wait: continuous batching, the way a GPU serving 16 sessions fills its batches.

``pad_to``: batch sizes to round a batch up to (the last row repeated, its outputs dropped), for backends that
capture a CUDA graph per input shape (engine/runtime/tensorrt.py keeps one: few shapes, few recaptures).

Whether it pays (docs/benchmarks/batching.json, ``python -m benchmarks.batching``; ONNX Runtime on this 2-core
CPU): the int8 denoiser gains 1.2x frames/s per core at batch 2 and 1.35x at 4; the decoder gains nothing
(0.9-1.0x), and two sessions' calls side by side on two cores beat one batch on one: whole frames of two
sessions ran 0.75-0.94x as fast batched. So on a CPU batching is off unless asked for (and then only the
denoiser: CPU_BATCHED_GRAPHS). On a GPU, where these small graphs are launch-bound and a batch of up to 16
should cost little more than one call (expected, not measured here: no GPU in this session; ``avatar bench gpu``
measures the torch path's batch curve), ``auto_batch_sessions`` turns it on for both graphs, serial and padded.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

from engine.runtime.base import check_feed

BATCHED_GRAPHS = ("denoiser", "decoder")  # the per-frame graphs: `steps` denoiser calls and one decoder call a frame
# on a CPU only the denoiser gains from a batch (int8: 1.2-1.4x frames/s at B = 2-4; the decoder 0.8-1.0x; docs/benchmarks/batching.json)
CPU_BATCHED_GRAPHS = ("denoiser",)
DEFAULT_MAX_WAIT_MS = 3.0  # a leader waits at most this long for the other sessions' calls (a frame is 40 ms at 25 fps)
DEFAULT_ACTIVE_WINDOW_MS = 100.0  # a thread that called within this long is an active caller (2.5 frames at 25 fps)
GPU_PAD_TO = (1, 2, 4, 8, 16)  # batch sizes a GPU runs (one captured CUDA graph per shape)


@dataclass
class _Call:
    feed: Mapping[str, np.ndarray]
    rows: int  # its batch size (leading dimension)
    thread: int
    result: dict[str, np.ndarray] | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Group:
    key: tuple  # the non-batch shapes and dtypes of every input: only equal keys stack
    calls: list[_Call] = field(default_factory=list)
    rows: int = 0
    closed: bool = False


class BatchingGraph:
    """A Graph whose concurrent ``infer`` calls run as one batch (see the module docstring). Thread-safe."""

    def __init__(self, graph: Any, max_batch: int, max_wait_ms: float = DEFAULT_MAX_WAIT_MS, *,
                 active_window_ms: float = DEFAULT_ACTIVE_WINDOW_MS, pad_to: Sequence[int] | None = None, serial: bool = False):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0 or active_window_ms < 0:
            raise ValueError(f"max_wait_ms and active_window_ms must be >= 0, got {max_wait_ms}, {active_window_ms}")
        _check_batch_first(graph)
        self.graph = graph
        self.name, self.backend, self.precision = graph.name, graph.backend, graph.precision
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_ms) / 1e3
        self.active_window_s = float(active_window_ms) / 1e3
        self.pad_to = tuple(sorted(int(p) for p in pad_to)) if pad_to else None
        self.serial = bool(serial)  # one batch in flight at a time (a GPU's one stream; TensorRTGraph locks anyway)
        self._running = 0  # batches in flight
        self._cond = threading.Condition(threading.Lock())
        self._open: _Group | None = None
        self._last_call: dict[int, float] = {}  # thread ident -> monotonic time of its last call
        # counters (read with stats())
        self._batches = 0
        self._frames = 0
        self._sizes: dict[int, int] = {}  # rows in a batch -> batches of that size
        self._wait_s = 0.0  # leaders' total wait for followers
        self._errors = 0

    @property
    def input_names(self) -> list[str]:
        return self.graph.input_names

    @property
    def output_names(self) -> list[str]:
        return self.graph.output_names

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feed(self.name, self.input_names, feed)  # a bad feed fails its own caller, never a batch
        arrays = {n: np.asarray(feed[n]) for n in self.input_names}
        rows = int(arrays[self.input_names[0]].shape[0]) if arrays[self.input_names[0]].ndim else 0
        key = tuple((n, a.shape[1:], a.dtype.str) for n, a in arrays.items())
        if rows < 1 or any(a.ndim == 0 or a.shape[0] != rows for a in arrays.values()):
            raise ValueError(f"{self.name}: every input needs the same leading batch size, got "
                             f"{ {n: a.shape for n, a in arrays.items()} }")
        call = _Call(arrays, rows, threading.get_ident())
        with self._cond:
            now = time.monotonic()
            self._last_call[call.thread] = now
            g = self._open
            if g is not None and not g.closed and g.key == key and g.rows + rows <= self.max_batch:
                g.calls.append(call)  # 1. a follower: the leader runs it
                g.rows += rows
                self._cond.notify_all()
            else:
                if g is not None and not g.closed:
                    g.closed = True  # it cannot take this call: its leader runs it now
                    self._cond.notify_all()
                g = self._open = _Group(key, [call], rows)
                try:
                    self._lead(g, now)
                except BaseException as e:  # interrupted while waiting: release whoever joined
                    g.closed = True
                    if self._open is g:
                        self._open = None
                    for c in g.calls[1:]:
                        c.error = e
                        c.done.set()
                    raise
        if call is not g.calls[0]:
            call.done.wait()
            if call.error is not None:
                raise call.error
            assert call.result is not None
            return call.result
        self._run(g)
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result

    def _lead(self, g: _Group, now: float) -> None:
        """2. Wait (lock held, released while waiting) for the callers expected, the batch full, or the deadline;
        ``serial``: first, with the group open, for the batch in flight (whoever comes meanwhile joins)."""
        deadline = now + self.max_wait_s
        while self.serial and self._running and not g.closed and g.rows < self.max_batch:
            self._cond.wait()  # the device is busy: gather while it is (no added latency)
        while not g.closed and g.rows < self.max_batch:
            expected = self._active(now)
            if len({c.thread for c in g.calls}) >= expected:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        g.closed = True
        if self._open is g:
            self._open = None
        while self.serial and self._running:  # closed (full, or taken over by a caller that did not fit) but the device is busy
            self._cond.wait()
        self._wait_s += time.monotonic() - now
        self._running += 1

    def _active(self, now: float) -> int:
        """Threads that called within the active window (forgetting older ones)."""
        horizon = now - self.active_window_s
        for t in [t for t, last in self._last_call.items() if last < horizon]:
            del self._last_call[t]
        return len(self._last_call)

    def _run(self, g: _Group) -> None:
        """3. Stack, run once, split (outside the lock); every caller gets its rows or the batch's exception."""
        calls = g.calls
        try:
            if len(calls) == 1 and self._padded(g.rows) == g.rows:
                outputs = self.graph.infer(calls[0].feed)  # a lone caller: its own feed, no copy
            else:
                outputs = self.graph.infer(self._stack(calls, g.rows))
            offset = 0
            for c in calls:
                c.result = {n: v[offset : offset + c.rows] for n, v in outputs.items()}  # its rows (views)
                offset += c.rows
        except BaseException as e:  # noqa: BLE001 - every caller of the batch gets the same exception
            for c in calls:
                c.error = e
        with self._cond:
            self._running -= 1
            self._batches += 1
            self._frames += g.rows
            self._sizes[g.rows] = self._sizes.get(g.rows, 0) + 1
            self._errors += calls[0].error is not None
            self._cond.notify_all()  # serial: the next group may run
        for c in calls[1:]:
            c.done.set()

    def _padded(self, rows: int) -> int:
        if self.pad_to is None:
            return rows
        return next((p for p in self.pad_to if p >= rows), rows)

    def _stack(self, calls: list[_Call], rows: int) -> dict[str, np.ndarray]:
        pad = self._padded(rows) - rows
        stacked: dict[str, np.ndarray] = {}
        for n in self.input_names:
            parts = [c.feed[n] for c in calls]
            if pad:
                parts.append(np.repeat(parts[-1][-1:], pad, axis=0))  # the last row again: outputs dropped
            stacked[n] = np.concatenate(parts, axis=0)  # (sum of rows [+ pad], ...)
        return stacked

    def stats(self) -> dict[str, Any]:
        """Batches run, frames (rows) through them, batches by size, leaders' mean wait, failed batches."""
        with self._cond:
            return {"graph": self.name, "max_batch": self.max_batch, "max_wait_ms": round(self.max_wait_s * 1e3, 3),
                    "batches": self._batches, "frames": self._frames, "by_size": dict(sorted(self._sizes.items())), "errors": self._errors,
                    "mean_wait_ms": round(self._wait_s / max(1, self._batches) * 1e3, 4), "pad_to": self.pad_to}


def _check_batch_first(graph: Any) -> None:
    """ValueError unless every input and output of the graph's spec has the batch (``B``) first."""
    from export.specs import spec_by_name

    try:
        spec = spec_by_name(graph.name)
    except KeyError:
        return  # not an exported graph (a test's stand-in): the caller vouches for its layout
    bad = [t.name for t in (*spec.inputs, *spec.outputs) if not t.shape or t.shape[0] != "B"]
    if bad:
        raise ValueError(f"{graph.name}: cannot batch across callers: {bad} do not have the batch dimension first")


def graph_max_batch(graph: Any) -> int | None:
    """The largest batch the graph runs (a TensorRT engine's profile max), None where unbounded."""
    profile = getattr(graph, "profile", None)
    if not profile:
        return None
    return min(int(mx[0]) for (_mn, _opt, mx) in profile.values())


def on_gpu(runtime: Any) -> bool:
    """TensorRT, ONNX Runtime on CUDA / TensorRT, or PyTorch graphs on a CUDA device."""
    return runtime.backend == "tensorrt" or getattr(runtime, "provider", "cpu") != "cpu" or \
        any(str(getattr(g, "device", "cpu")).startswith("cuda") for g in runtime.graphs.values())


def auto_batch_sessions(runtime: Any, max_sessions: int) -> int:
    """How many sessions' calls to batch when not told: ``max_sessions`` on a GPU (capped by the engines' profiles),
    1 (off) on a CPU, where a batch of B costs about B calls (docs/benchmarks/batching.json)."""
    if max_sessions <= 1 or not on_gpu(runtime):
        return 1
    caps = [m for m in (graph_max_batch(runtime.graphs[n]) for n in BATCHED_GRAPHS if n in runtime.graphs) if m is not None]
    return max(1, min([max_sessions, *caps]))


def batch_runtime(runtime: Any, max_batch: int, max_wait_ms: float = DEFAULT_MAX_WAIT_MS, *, graphs: Sequence[str] | None = None,
                  pad_to: Sequence[int] | None = None, serial: bool | None = None) -> Any:
    """A copy of ``runtime`` whose ``graphs`` are BatchingGraphs (the others shared as they are); ``max_batch`` <= 1: ``runtime``.
    ``max_batch`` is capped by each graph's own limit (a TensorRT profile). Defaults on a GPU: the denoiser and decoder,
    ``pad_to`` GPU_PAD_TO, serial; on a CPU: CPU_BATCHED_GRAPHS (where a batch pays here), no padding, not serial."""
    if max_batch <= 1:
        return runtime
    gpu = on_gpu(runtime)
    if graphs is None:
        graphs = BATCHED_GRAPHS if gpu else CPU_BATCHED_GRAPHS
    if pad_to is None and gpu:
        pad_to = GPU_PAD_TO
    if serial is None:
        serial = gpu
    wrapped = dict(runtime.graphs)
    for n in graphs:
        g = runtime.graphs[n]
        if isinstance(g, BatchingGraph):
            g = g.graph
        cap = graph_max_batch(g)
        mb = min(max_batch, cap) if cap is not None else max_batch
        pads = None
        if pad_to:  # the sizes up to this graph's max batch, and the max batch itself
            pads = tuple(sorted({p for p in pad_to if p <= mb} | {mb}))
        wrapped[n] = BatchingGraph(g, mb, max_wait_ms, pad_to=pads, serial=serial)
    return replace(runtime, graphs=wrapped)


def batching_stats(runtime: Any) -> dict[str, dict[str, Any]]:
    """graph name -> BatchingGraph.stats() for the runtime's batched graphs (empty when none)."""
    return {n: g.stats() for n, g in runtime.graphs.items() if isinstance(g, BatchingGraph)}


__all__ = ["BATCHED_GRAPHS", "CPU_BATCHED_GRAPHS", "BatchingGraph", "auto_batch_sessions", "batch_runtime", "batching_stats",
           "graph_max_batch", "on_gpu"]
