"""engine.runtime.batching: concurrent callers stacked into one batch, split back; a lone caller untouched.

A stand-in graph (sleeps, records the batch sizes it ran, fails on request) checks the scheduling; the shipped
bundle's denoiser and decoder (ONNX Runtime CPU, fp32 and int8) check that batched results equal unbatched ones;
two FrameGenerators, and two live Pipelines, sharing a batched runtime make the frames they make unbatched;
the server wraps its runtime when asked (``--batch-sessions``), and not by default on a CPU.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Mapping

import numpy as np
import pytest

from engine.runtime.batching import BatchingGraph, auto_batch_sessions, batch_runtime, batching_stats

JOIN_S = 10.0  # every thread of a test ends within this


class FakeGraph:
    """out = 2 x + y[:, None]; ``delay_s`` per call; raises when any row of x is NaN; records each batch size."""

    name, backend, precision = "fake", "test", "fp32"

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    @property
    def input_names(self) -> list[str]:
        return ["x", "y"]

    @property
    def output_names(self) -> list[str]:
        return ["out"]

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.lock:
            self.sizes.append(len(feed["x"]))
        if self.delay_s:
            time.sleep(self.delay_s)
        if np.isnan(feed["x"]).any():
            raise RuntimeError("fake: NaN in the batch")
        return {"out": 2 * feed["x"] + feed["y"][:, None]}


def _feed(v: float, rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, 3), v, np.float32), "y": np.full((rows,), v, np.float32)}


def _run_threads(n: int, target) -> list:
    """``target(i, barrier)`` in n threads; their results (or exceptions) by index; each thread ends within JOIN_S."""
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def work(i: int) -> None:
        try:
            results[i] = target(i, barrier)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "a caller is still blocked"
    return results


def _together(g: BatchingGraph, n: int, warm, then, *, max_wait_s: float = 1.0, before=None) -> list:
    """n threads each call ``warm(i)`` once (no waiting: they become g's active callers), then, released together,
    ``then(i)`` with g waiting up to ``max_wait_s`` for the callers it expects; ``before()`` runs in between."""
    g.max_wait_s = 0.0

    def call(i: int, barrier: threading.Barrier):
        g.infer(warm(i))
        barrier.wait()
        if i == 0:
            g.max_wait_s = max_wait_s
            if before is not None:
                before()
        barrier.wait()
        return then(i)

    return _run_threads(n, call)


def test_lone_caller_runs_at_once_and_adds_under_a_millisecond():
    bare = FakeGraph()
    g = BatchingGraph(bare, max_batch=4, max_wait_ms=200.0)  # a long wait that a lone caller must never pay
    f = _feed(1.0)
    for _ in range(20):
        g.infer(f)
        bare.infer(f)
    ts = {"bare": [], "wrapped": []}
    for _ in range(300):
        for k, fn in (("bare", bare.infer), ("wrapped", g.infer)):
            t0 = time.perf_counter()
            fn(f)
            ts[k].append(time.perf_counter() - t0)
    added_ms = (np.median(ts["wrapped"]) - np.median(ts["bare"])) * 1e3
    assert added_ms < 1.0, added_ms
    assert max(ts["wrapped"]) < 0.1  # never the 200 ms wait
    out = g.infer(f)["out"]
    np.testing.assert_array_equal(out, 2 * f["x"] + f["y"][:, None])
    s = g.stats()
    assert set(s["by_size"]) == {1} and s["errors"] == 0


def test_concurrent_callers_form_one_batch_and_get_their_own_rows():
    fake = FakeGraph(delay_s=0.002)
    g = BatchingGraph(fake, max_batch=8, active_window_ms=10_000.0)
    res = _together(g, 3, lambda i: _feed(100.0 + i), lambda i: g.infer(_feed(float(i), rows=1 + i % 2)),  # rows 1 or 2
                    before=fake.sizes.clear)
    for i, r in enumerate(res):
        assert not isinstance(r, BaseException), r
        f = _feed(float(i), rows=1 + i % 2)
        np.testing.assert_array_equal(r["out"], 2 * f["x"] + f["y"][:, None])
    assert fake.sizes == [4], fake.sizes  # 1 + 2 + 1 rows, one call: the leader waited for the two it expected


def test_many_threads_many_calls_each_get_their_own_outputs_within_max_batch():
    fake = FakeGraph(delay_s=0.001)
    g = BatchingGraph(fake, max_batch=3, max_wait_ms=5.0)

    def call(i: int, barrier: threading.Barrier):
        barrier.wait()
        for k in range(25):
            v = float(1000 * i + k)
            out = g.infer(_feed(v))["out"]
            assert out.shape == (1, 3)
            np.testing.assert_array_equal(out, np.full((1, 3), 3 * v, np.float32))
        return True

    res = _run_threads(5, call)
    assert all(r is True for r in res), res
    s = g.stats()
    assert s["frames"] == 5 * 25 and sum(k * v for k, v in s["by_size"].items()) == 125
    assert max(fake.sizes) <= 3 and max(fake.sizes) > 1  # batched, never beyond max_batch


def test_an_error_reaches_every_caller_of_its_batch_only():
    fake = FakeGraph(delay_s=0.002)
    g = BatchingGraph(fake, max_batch=8, active_window_ms=10_000.0)
    res = _together(g, 3, lambda i: _feed(1.0), lambda i: g.infer(_feed(float("nan") if i == 1 else float(i))))
    assert all(isinstance(r, RuntimeError) and "NaN" in str(r) for r in res), res
    assert g.stats()["errors"] == 1
    g.max_wait_s = 0.0  # the threads above are still active callers: do not wait for them
    np.testing.assert_array_equal(g.infer(_feed(2.0))["out"], np.full((1, 3), 6.0, np.float32))  # the wrapper still works


def test_a_bad_feed_fails_only_its_caller():
    fake = FakeGraph(delay_s=0.002)
    g = BatchingGraph(fake, max_batch=8, active_window_ms=10_000.0)
    res = _together(g, 3, lambda i: _feed(1.0),
                    lambda i: g.infer({"x": np.zeros((1, 3), np.float32)} if i == 0 else _feed(float(i))), max_wait_s=0.2)  # 0: no y
    assert isinstance(res[0], KeyError)
    for i in (1, 2):
        np.testing.assert_array_equal(res[i]["out"], np.full((1, 3), 3.0 * i, np.float32))


def test_the_wait_for_an_expected_caller_is_bounded_by_max_wait():
    g = BatchingGraph(FakeGraph(), max_batch=4, max_wait_ms=30.0, active_window_ms=10_000.0)
    t = threading.Thread(target=g.infer, args=(_feed(1.0),))
    t.start()
    t.join(JOIN_S)  # another thread called: it is expected, but never calls again
    t0 = time.perf_counter()
    g.infer(_feed(2.0))
    waited = time.perf_counter() - t0
    assert 0.02 <= waited < 0.5, waited
    # once the other thread is no longer active (outside the window), a call runs at once again
    g2 = BatchingGraph(FakeGraph(), max_batch=4, max_wait_ms=200.0, active_window_ms=20.0)
    t = threading.Thread(target=g2.infer, args=(_feed(1.0),))
    t.start()
    t.join(JOIN_S)
    time.sleep(0.05)
    t0 = time.perf_counter()
    g2.infer(_feed(2.0))
    assert time.perf_counter() - t0 < 0.05


def test_pad_to_rounds_a_batch_up_and_drops_the_padding():
    fake = FakeGraph(delay_s=0.002)
    g = BatchingGraph(fake, max_batch=4, active_window_ms=10_000.0, pad_to=(1, 2, 4))
    res = _together(g, 3, lambda i: _feed(-1.0), lambda i: g.infer(_feed(float(i))), before=fake.sizes.clear)
    for i, r in enumerate(res):
        np.testing.assert_array_equal(r["out"], np.full((1, 3), 3.0 * i, np.float32))
    assert fake.sizes == [4]  # 3 rows run as 4
    assert g.stats()["by_size"].get(3) == 1  # counted as the 3 frames it carried


def test_serial_gathers_the_callers_that_come_while_a_batch_runs():
    fake = FakeGraph(delay_s=0.05)
    g = BatchingGraph(fake, max_batch=4, max_wait_ms=0.0, serial=True)
    running = threading.Event()
    first = threading.Thread(target=lambda: (running.set(), g.infer(_feed(9.0))))
    first.start()
    running.wait(JOIN_S)
    time.sleep(0.01)  # the lone first call is in flight (50 ms): the next callers gather behind it
    res = _run_threads(3, lambda i, barrier: g.infer(_feed(float(i))))
    first.join(JOIN_S)
    for i, r in enumerate(res):
        np.testing.assert_array_equal(r["out"], np.full((1, 3), 3.0 * i, np.float32))
    assert fake.sizes == [1, 3], fake.sizes  # never two batches in flight; the three ran as one


def test_refuses_a_graph_without_the_batch_first():
    class A2L(FakeGraph):
        name = "a2l"  # its GRU state is (L, B, H)

    with pytest.raises(ValueError, match="batch dimension first"):
        BatchingGraph(A2L(), max_batch=2)


# -- the shipped bundle's graphs on ONNX Runtime CPU --
@pytest.fixture(scope="module", params=["fp32", "int8"])
def runtime(request):
    from engine.runtime import load_runtime

    return load_runtime(None, "onnxruntime", threads=1, precision=request.param, provider="cpu")


@pytest.mark.parametrize("graph", ["denoiser", "decoder"])
def test_batched_calls_equal_unbatched_ones(runtime, graph: str):
    from benchmarks.batching import sample_feed

    bare = runtime[graph]
    g = BatchingGraph(bare, max_batch=4, active_window_ms=10_000.0)
    feeds = [sample_feed(runtime, graph, 1, seed=s) for s in range(3)]
    alone = [bare.infer(f) for f in feeds]
    res = _together(g, 3, lambda i: feeds[i], lambda i: g.infer(feeds[i]))
    assert 3 in g.stats()["by_size"]  # the second round ran as one batch of 3
    for i, r in enumerate(res):
        assert not isinstance(r, BaseException), r
        for n in bare.output_names:
            assert r[n].shape == alone[i][n].shape and r[n].dtype == np.float32
            np.testing.assert_allclose(r[n], alone[i][n], rtol=0, atol=1e-6)  # bit-identical with ONNX Runtime 1.31


def test_batch_runtime_wraps_the_per_frame_graphs_only(runtime):
    assert batch_runtime(runtime, 1) is runtime
    assert auto_batch_sessions(runtime, 4) == 1  # a CPU runtime: off (docs/benchmarks/batching.json)
    b = batch_runtime(runtime, 4, 2.0, graphs=("denoiser", "decoder"))
    assert isinstance(b["denoiser"], BatchingGraph) and isinstance(b["decoder"], BatchingGraph)
    assert b["warp"] is runtime["warp"] and b["encoder"] is runtime["encoder"]
    assert runtime["denoiser"] is not b["denoiser"]  # the original runtime is unchanged
    assert b["denoiser"].precision == runtime["denoiser"].precision and b.describe()["graphs"] == runtime.describe()["graphs"]
    assert set(batching_stats(b)) == {"denoiser", "decoder"} and batching_stats(runtime) == {}
    assert b["denoiser"].max_batch == 4 and b["denoiser"].pad_to is None and not b["denoiser"].serial
    cpu = batch_runtime(runtime, 4)  # on a CPU, by default, only the denoiser (where a batch pays here)
    assert isinstance(cpu["denoiser"], BatchingGraph) and cpu["decoder"] is runtime["decoder"]


def test_the_server_batches_when_asked_and_not_by_default_on_a_cpu(runtime):
    from engine.cli import build_parser
    from server.app import STATE, ServerConfig, create_app

    def served(**config):
        return create_app(runtime, ServerConfig(port=0, avatars_dir=None, **config))[STATE].runtime

    assert served(max_sessions=4) is runtime  # auto: off on a CPU
    assert served(max_sessions=1, batch_sessions=4) is runtime  # one session: nothing to batch
    rt = served(max_sessions=3, batch_sessions=4, batch_wait_ms=2.0)
    assert isinstance(rt["denoiser"], BatchingGraph) and rt["denoiser"].max_batch == 3 and rt["denoiser"].max_wait_s == 0.002
    assert rt["decoder"] is runtime["decoder"]  # on a CPU only the denoiser
    a = build_parser().parse_args(["serve", "--max-sessions", "3", "--batch-sessions", "3", "--batch-wait-ms", "2"])
    assert (a.batch_sessions, a.batch_wait_ms) == (3, 2.0)
    assert build_parser().parse_args(["serve"]).batch_sessions is None


def test_two_sessions_sharing_a_batched_runtime_make_the_frames_each_makes_alone():
    from engine.audio.decode import decode_audio
    from engine.avatar import load_portrait, prepare_avatar
    from engine.cli import DEMO
    from engine.generator import FrameGenerator
    from engine.runtime import load_runtime

    rt = load_runtime(None, "onnxruntime", threads=1, precision="fp32", provider="cpu")
    av = prepare_avatar(load_portrait(DEMO / "astronaut.jpg"), rt, crop_size_px=rt.bundle.crop_size_px)
    wave = decode_audio(DEMO / "demo_voice.wav")
    n = 12

    def frames(runtime, seed: int, offset: int) -> list[np.ndarray]:
        gen = FrameGenerator(runtime, av, seed=seed, blinks=False)
        feats = gen.audio_features(wave[offset * 640:], n)
        lm = gen.landmarks(feats)
        return [gen.frame(lm[f], gen.audio_tokens(feats, f)) for f in range(n)]

    alone = [frames(rt, 0, 10), frames(rt, 1, 30)]
    batched = batch_runtime(rt, 2, 20.0, graphs=("denoiser", "decoder"))
    res = _run_threads(2, lambda i, barrier: (barrier.wait(), frames(batched, i, (10, 30)[i]))[1])
    for i in range(2):
        assert not isinstance(res[i], BaseException), res[i]
        for a, b in zip(alone[i], res[i]):
            np.testing.assert_array_equal(a, b)
    s = batching_stats(batched)["denoiser"]
    assert s["frames"] == 2 * n * rt.bundle.steps and s["by_size"].get(2, 0) > 0, s  # the two sessions' steps were batched


def test_two_pipelines_on_a_batched_runtime_stream_what_each_streams_alone():
    """The real pipeline threads (stage A: denoiser, stage B: decoder, one each per session), offline, the shipped bundle."""
    from engine.avatar import load_portrait, prepare_avatar
    from engine.cli import DEMO
    from engine.pipeline.pipeline import Pipeline, PipelineConfig
    from engine.pipeline.sources import FileSource
    from engine.runtime import load_runtime
    from tests import aio

    rt = load_runtime(None, "onnxruntime", threads=1, precision="int8", provider="cpu")
    av = prepare_avatar(load_portrait(DEMO / "astronaut.jpg"), rt, crop_size_px=rt.bundle.crop_size_px)
    n = 30

    async def stream(runtime, seed: int) -> list[np.ndarray]:
        cfg = PipelineConfig(realtime=False, head_motion=False, watermark=False, seed=seed)
        out = []
        async with Pipeline(runtime, av, cfg) as p:
            p.start(FileSource(DEMO / "demo_voice.wav", realtime=False))
            async for f in p.frames():
                out.append((f.kind, f.image))
                if len(out) >= n:
                    break
        return out

    async def both(runtime) -> list:
        return await asyncio.gather(stream(runtime, 0), stream(runtime, 1))

    alone = aio.run(both(rt), timeout_s=240)  # unbatched: the same two sessions side by side
    batched_rt = batch_runtime(rt, 2, 20.0, graphs=("denoiser", "decoder"))
    batched = aio.run(both(batched_rt), timeout_s=240)
    for a, b in zip(alone, batched):
        assert len(a) == len(b) == n
        assert [k for k, _ in a] == [k for k, _ in b] and sum(k == "speech" for k, _ in a) > n // 2
        for (_, x), (_, y) in zip(a, b):
            np.testing.assert_array_equal(x, y)
    s = batching_stats(batched_rt)
    assert s["denoiser"]["errors"] == 0 and s["denoiser"]["by_size"].get(2, 0) > 0, s
