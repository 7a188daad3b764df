"""Does a batch of 2-4 frames raise frames/s per core for the per-frame graphs on this CPU? (issue 18, part 2)

For each precision (ONNX Runtime int8 and fp32), thread count (1, 2), graph (denoiser, decoder) and batch
B (1, 2, 4), ``Graph.infer`` is timed on the spec's sample inputs at batch B (numpy in and out included, as
the generator pays it). Batch sizes are interleaved call by call (round robin), so that the background
load of this shared machine falls on every batch size alike. Reported per (graph, B): median and p90 ms per
call, ms per frame (median / B), frames/s per core (B x 1000 / median / threads) and the gain over batch 1
(frames/s at B over frames/s at 1).

The alternative to batching on a CPU is running two sessions' calls side by side, each on its own core:
``concurrent_batch1`` times two threads that each call batch 1 on a 1-thread runtime at the same time (frames/s
of the pair). ``wrapper`` times engine.runtime.batching.BatchingGraph itself: its cost for a lone caller (a
no-op graph, and the real graphs interleaved with the bare ones), and two callers that it batches. ``sessions``
makes whole frames (FrameGenerator, the demo portrait and voice) for 1 and 2 sessions back to back on one
shared runtime, unbatched and batched (the denoiser; serial; the denoiser and decoder): frames/s of all
sessions, ms per frame, the batches formed. ``summary`` puts the gains side by side and says whether batching
pays here.

    python -m benchmarks.batching --out docs/benchmarks/batching.json [--bundle B] [--repeats N]

Writes the JSON and a plot beside it (.png).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

FORMAT = "avatar-bench-batching/1"
GRAPHS = ("denoiser", "decoder")
BATCHES = (1, 2, 4)


def sample_feed(runtime: Any, graph: str, batch: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """The spec's sample inputs of ``graph`` at batch ``batch`` (numpy, the dtypes of the spec)."""
    from types import SimpleNamespace

    from engine.runtime import graph_config
    from export.specs import spec_by_name

    spec = spec_by_name(graph)
    holder = SimpleNamespace(config=graph_config(spec, runtime.bundle.configs))
    return {k: v.numpy() for k, v in spec.sample_inputs(holder, {"B": batch}, seed=seed).items()}


def _stats(ts_ms: list[float]) -> dict[str, float]:
    a = np.asarray(ts_ms)
    return {"median_ms": round(float(np.median(a)), 3), "p90_ms": round(float(np.percentile(a, 90)), 3),
            "min_ms": round(float(a.min()), 3), "n": int(a.size)}


def time_batches(g: Any, feeds: Mapping[int, dict[str, np.ndarray]], *, repeats: int, warmup: int = 3) -> dict[int, dict[str, float]]:
    """``g.infer`` at every batch of ``feeds``, interleaved call by call: batch -> timing stats."""
    for _ in range(warmup):
        for f in feeds.values():
            g.infer(f)
    ts: dict[int, list[float]] = {b: [] for b in feeds}
    for _ in range(repeats):
        for b, f in feeds.items():
            t0 = time.perf_counter()
            g.infer(f)
            ts[b].append((time.perf_counter() - t0) * 1e3)
    return {b: _stats(v) for b, v in ts.items()}


def time_concurrent(g: Any, feed: dict[str, np.ndarray], *, callers: int, calls: int) -> dict[str, float]:
    """``callers`` threads each calling ``g.infer(feed)`` ``calls`` times at once: wall time and frames/s of them all."""
    barrier = threading.Barrier(callers + 1)
    per_call: list[float] = []
    lock = threading.Lock()

    def work() -> None:
        barrier.wait()
        mine = []
        for _ in range(calls):
            t0 = time.perf_counter()
            g.infer(feed)
            mine.append((time.perf_counter() - t0) * 1e3)
        with lock:
            per_call.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(callers)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    frames = callers * calls
    return {"callers": callers, "frames": frames, "wall_s": round(wall, 3), "frames_per_s": round(frames / wall, 2),
            "per_call": _stats(per_call)}


def measure_graph(runtime: Any, graph: str, *, repeats: int, threads: int) -> dict[str, Any]:
    g = runtime[graph]
    feeds = {b: sample_feed(runtime, graph, b) for b in BATCHES}
    stats = time_batches(g, feeds, repeats=repeats)
    base = stats[1]["median_ms"]
    out: dict[str, Any] = {"precision": g.precision, "by_batch": {}}
    for b, s in stats.items():
        out["by_batch"][str(b)] = {**s, "ms_per_frame": round(s["median_ms"] / b, 3),
                                   "frames_per_s_per_core": round(b * 1e3 / s["median_ms"] / threads, 2),
                                   "gain_vs_batch1": round(base * b / s["median_ms"], 3)}
    return out


def measure_wrapper(runtime: Any, graph: str, *, repeats: int, max_wait_ms: float) -> dict[str, Any]:
    """BatchingGraph around ``runtime[graph]``: a lone caller against the bare graph (interleaved), then two
    concurrent callers through the wrapper against two through the bare graph."""
    from engine.runtime.batching import BatchingGraph

    bare = runtime[graph]
    wrapped = BatchingGraph(bare, max_batch=4, max_wait_ms=max_wait_ms)
    feed = sample_feed(runtime, graph, 1)
    stats = time_batches_pair(bare, wrapped, feed, repeats=repeats)
    calls = max(10, repeats // 2)
    conc_bare = time_concurrent(bare, feed, callers=2, calls=calls)
    before = wrapped.stats()
    conc_wrapped = time_concurrent(wrapped, feed, callers=2, calls=calls)
    after = wrapped.stats()
    batches = after["batches"] - before["batches"]
    return {"max_wait_ms": max_wait_ms, "lone_caller": stats,
            "lone_overhead_ms": round(stats["wrapped"]["median_ms"] - stats["bare"]["median_ms"], 3),
            "two_callers_bare": conc_bare, "two_callers_wrapped": conc_wrapped,
            "two_callers_mean_batch": round((after["frames"] - before["frames"]) / max(1, batches), 2)}


def measure_sessions(runtime: Any, *, frames: int, rounds: int = 2, max_wait_ms: float = 3.0) -> dict[str, Any]:
    """Sessions making frames back to back on one shared runtime: 1 and 2 FrameGenerators (threads), the graphs
    unbatched, the denoiser batched (concurrent batches allowed, or serial: one in flight), the denoiser and decoder
    batched. Per mode: frames/s of all sessions, ms per frame (median, p90: what a frame's latency becomes) and the
    batches formed. Modes interleaved, ``rounds`` times."""
    from engine.audio.decode import decode_audio
    from engine.avatar import load_portrait, prepare_avatar
    from engine.cli import DEMO
    from engine.generator import FrameGenerator
    from engine.runtime.batching import batch_runtime, batching_stats

    av = prepare_avatar(load_portrait(DEMO / "astronaut.jpg"), runtime, crop_size_px=runtime.bundle.crop_size_px)
    wave = decode_audio(DEMO / "demo_voice.wav")
    modes = {"unbatched": lambda: runtime,
             "denoiser_batched": lambda: batch_runtime(runtime, 4, max_wait_ms, graphs=("denoiser",)),
             "denoiser_batched_serial": lambda: batch_runtime(runtime, 4, max_wait_ms, graphs=("denoiser",), serial=True),
             "denoiser_decoder_batched": lambda: batch_runtime(runtime, 4, max_wait_ms, graphs=("denoiser", "decoder"))}
    runs: dict[str, list] = {}

    def session(rt: Any, seed: int, times: list[float]) -> None:
        gen = FrameGenerator(rt, av, seed=seed, blinks=False)
        feats = gen.audio_features(wave[seed * 20 * 640:], frames)  # the sessions say different things
        lm = gen.landmarks(feats)
        for f in range(frames):
            t0 = time.perf_counter()
            gen.frame(lm[f], gen.audio_tokens(feats, f))
            times.append((time.perf_counter() - t0) * 1e3)

    for _ in range(rounds):
        for n_sessions in (1, 2):
            for mode, make in modes.items():
                rt = make()
                times: list[float] = []
                threads = [threading.Thread(target=session, args=(rt, i, times)) for i in range(n_sessions)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                runs.setdefault(f"{n_sessions}_session{'s' if n_sessions > 1 else ''}/{mode}", []).append(
                    (wall, times, {g: st["by_size"] for g, st in batching_stats(rt).items()}))
    out: dict[str, Any] = {"frames_per_session": frames, "rounds": rounds, "max_wait_ms": max_wait_ms, "by_mode": {}}
    for key, rs in runs.items():
        all_times = [t for _, ts, _ in rs for t in ts]
        n = sum(len(ts) for _, ts, _ in rs)
        sizes: dict[str, dict[int, int]] = {}
        for _, _, by in rs:
            for g, d in by.items():
                for k, v in d.items():
                    sizes.setdefault(g, {})[k] = sizes.setdefault(g, {}).get(k, 0) + v
        out["by_mode"][key] = {"frames_per_s": round(n / sum(w for w, _, _ in rs), 2), "frame_ms": _stats(all_times),
                               "batches_by_size": sizes}
    for n_s in ("1_session", "2_sessions"):
        base = out["by_mode"][f"{n_s}/unbatched"]["frames_per_s"]
        for mode in modes:
            e = out["by_mode"][f"{n_s}/{mode}"]
            e["throughput_vs_unbatched"] = round(e["frames_per_s"] / base, 3)
    return out


class _NoOp:
    """A graph that does nothing (the wrapper's own cost)."""

    name, backend, precision = "noop", "none", "fp32"
    input_names, output_names = ["x"], ["y"]

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": feed["x"]}


def wrapper_cost_us(calls: int = 20000) -> dict[str, float]:
    """Median µs per call of a no-op graph, bare and through BatchingGraph (a lone caller)."""
    from engine.runtime.batching import BatchingGraph

    bare = _NoOp()
    wrapped = BatchingGraph(bare, max_batch=4, max_wait_ms=3.0)
    feed = {"x": np.zeros((1, 4), np.float32)}
    out = {}
    for k, g in (("bare", bare), ("wrapped", wrapped)):
        ts = np.empty(calls)
        for i in range(calls):
            t0 = time.perf_counter()
            g.infer(feed)
            ts[i] = time.perf_counter() - t0
        out[f"{k}_median_us"] = round(float(np.median(ts)) * 1e6, 2)
    out["added_median_us"] = round(out["wrapped_median_us"] - out["bare_median_us"], 2)
    return out


def time_batches_pair(bare: Any, wrapped: Any, feed: dict[str, np.ndarray], *, repeats: int) -> dict[str, dict[str, float]]:
    for _ in range(3):
        bare.infer(feed)
        wrapped.infer(feed)
    ts: dict[str, list[float]] = {"bare": [], "wrapped": []}
    for _ in range(repeats):
        for k, g in (("bare", bare), ("wrapped", wrapped)):
            t0 = time.perf_counter()
            g.infer(feed)
            ts[k].append((time.perf_counter() - t0) * 1e3)
    return {k: _stats(v) for k, v in ts.items()}


def bench_batching(out: str | Path, *, bundle: str | None = None, repeats: int = 40, threads: tuple[int, ...] = (1, 2),
                   precisions: tuple[str, ...] = ("int8", "fp32"), steps: int | None = None, session_frames: int = 40) -> dict[str, Any]:
    import onnxruntime

    from engine.runtime import load_runtime
    from engine.runtime.cpu import cpu_model

    out = Path(out)
    load_before = os.getloadavg()
    t_start = time.time()
    configs: dict[str, Any] = {}
    concurrent: dict[str, Any] = {}
    wrapper: dict[str, Any] = {}
    sessions: dict[str, Any] = {}
    bundle_path = None
    for precision in precisions:
        for n in threads:
            rt = load_runtime(bundle, "onnxruntime", threads=n, precision=precision, provider="cpu")
            bundle_path, steps = str(rt.bundle.path), int(steps or rt.bundle.steps)
            key = f"{precision}/{n}thread{'s' if n != 1 else ''}"
            entry = {"precision": precision, "threads": n, "graphs": {}}
            for graph in GRAPHS:
                entry["graphs"][graph] = measure_graph(rt, graph, repeats=repeats, threads=n)
                print(f"{key} {graph}: " + ", ".join(f"B={b} {v['median_ms']:.2f} ms ({v['gain_vs_batch1']:.2f}x)"
                                                    for b, v in entry["graphs"][graph]["by_batch"].items()), flush=True)
            # one frame's batched model work: steps x denoiser + decoder, per frame
            per_frame = {b: sum((steps if g == "denoiser" else 1) * entry["graphs"][g]["by_batch"][str(b)]["ms_per_frame"] for g in GRAPHS)
                         for b in BATCHES}
            entry["frame"] = {str(b): {"ms_per_frame": round(per_frame[b], 3)} for b in BATCHES}
            f1 = entry["frame"]["1"]["ms_per_frame"]
            for b in BATCHES:
                entry["frame"][str(b)]["gain_vs_batch1"] = round(f1 / entry["frame"][str(b)]["ms_per_frame"], 3)
            configs[key] = entry
            if n == 1:  # the CPU's alternative to a batch: two sessions' batch-1 calls side by side on two 1-thread cores
                concurrent[precision] = {}
                for graph in GRAPHS:
                    feed = sample_feed(rt, graph, 1)
                    concurrent[precision][graph] = {"one_caller": time_concurrent(rt[graph], feed, callers=1, calls=repeats),
                                                    "two_callers": time_concurrent(rt[graph], feed, callers=2, calls=repeats)}
                if precision == precisions[0]:
                    for graph in GRAPHS:
                        wrapper[graph] = measure_wrapper(rt, graph, repeats=repeats, max_wait_ms=3.0)
                        print(f"wrapper {graph}: lone caller overhead {wrapper[graph]['lone_overhead_ms']:+.3f} ms, two callers "
                              f"{wrapper[graph]['two_callers_wrapped']['frames_per_s']} frames/s wrapped vs "
                              f"{wrapper[graph]['two_callers_bare']['frames_per_s']} bare", flush=True)
            if precision == precisions[0] and session_frames > 0:  # whole frames of 1 and 2 sessions, batched or not
                sessions[key] = measure_sessions(rt, frames=session_frames)
                for mode, v in sessions[key]["by_mode"].items():
                    print(f"sessions {key} {mode}: {v['frames_per_s']} frames/s ({v['throughput_vs_unbatched']}x), frame "
                          f"{v['frame_ms']['median_ms']} ms median, p90 {v['frame_ms']['p90_ms']} ms; {v['batches_by_size']}", flush=True)
            del rt
    result = {
        "format": FORMAT,
        "bundle": bundle_path,
        "steps": steps,
        "repeats": repeats,
        "interleaved": "call by call among the batch sizes of one (precision, threads)",
        "inputs": "export/specs.py sample inputs at batch B",
        "machine": {"cpu_model": cpu_model(), "logical_cpus": os.cpu_count(), "platform": platform.platform(),
                    "onnxruntime": onnxruntime.__version__, "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()],
                    "note": "a shared machine: other work (an evaluation, other test runs) ran alongside at times; see the load averages"},
        "seconds": round(time.time() - t_start, 1),
        "configs": configs,
        "concurrent_batch1": concurrent,
        "wrapper": {"lone_caller_noop_graph": wrapper_cost_us(), **wrapper},
        "sessions": sessions,
    }
    result["summary"] = summarise(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    return result


PAYS = 1.05  # a gain below this is within this shared machine's run-to-run noise


def summarise(r: Mapping[str, Any]) -> dict[str, Any]:
    """Per config: each graph's and the model work per frame's gain at B = 2 and 4 (graphs_gain); two 1-thread callers
    side by side against one (parallel_gain); whole frames of 2 sessions per batching mode against unbatched
    (sessions_gain). The verdict: batching pays on this CPU when the sessions gain at least PAYS with it."""
    s: dict[str, Any] = {"graphs_gain": {}, "parallel_gain": {}, "sessions_gain": {}}
    for key, e in r["configs"].items():
        s["graphs_gain"][key] = {"denoiser": {b: e["graphs"]["denoiser"]["by_batch"][b]["gain_vs_batch1"] for b in ("2", "4")},
                                 "decoder": {b: e["graphs"]["decoder"]["by_batch"][b]["gain_vs_batch1"] for b in ("2", "4")},
                                 "frame_model_work": {b: e["frame"][b]["gain_vs_batch1"] for b in ("2", "4")}}
    for p, c in r["concurrent_batch1"].items():
        s["parallel_gain"][p] = {g: round(v["two_callers"]["frames_per_s"] / v["one_caller"]["frames_per_s"], 3) for g, v in c.items()}
    for key, ss in r.get("sessions", {}).items():
        s["sessions_gain"][key] = {m.split("/", 1)[1]: v["throughput_vs_unbatched"] for m, v in ss["by_mode"].items()
                                   if m.startswith("2_sessions/") and not m.endswith("/unbatched")}
    # one session does the same work in every mode (a lone caller is never batched): the spread of its frames/s is the noise
    s["one_session_spread"] = {}
    for key, ss in r.get("sessions", {}).items():
        one = [v["frames_per_s"] for m, v in ss["by_mode"].items() if m.startswith("1_session/")]
        s["one_session_spread"][key] = round(max(one) / min(one), 3) if one else None
    best = max((g for v in s["sessions_gain"].values() for g in v.values()), default=None)
    noise = max((v for v in s["one_session_spread"].values() if v), default=1.0)
    s["batching_pays_here"] = best is not None and best >= max(PAYS, noise)
    s["verdict"] = (f"on this CPU batching {'pays' if s['batching_pays_here'] else 'does not pay'}: 2 sessions' frames/s with batching "
                    f"at best {best}x unbatched (one session's run-to-run spread: {noise}x); the denoiser alone gains per call, "
                    f"the decoder does not, the model work is a minority of a frame, and two sessions' calls side by side on two "
                    f"cores gain more than one batch on one") if best is not None else "no sessions measured"
    return s


def plot(r: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, graph in zip(axes, GRAPHS):
        for key, e in r["configs"].items():
            bb = e["graphs"][graph]["by_batch"]
            ax.plot(BATCHES, [bb[str(b)]["frames_per_s_per_core"] for b in BATCHES], marker="o", label=key)
        ax.set_title(f"{graph}: frames/s per core (ONNX Runtime CPU)", fontsize=9)
        ax.set_xlabel("batch")
        ax.set_xticks(BATCHES)
        ax.set_ylabel("frames / s / core")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[2]
    sessions = r.get("sessions", {})
    for i, (key, ss) in enumerate(sessions.items()):
        modes = list(ss["by_mode"])
        short = {"unbatched": "none", "denoiser_batched": "den", "denoiser_batched_serial": "den\nserial",
                 "denoiser_decoder_batched": "den+dec"}
        labels = [f"{m.split('_')[0]}s: {short.get(m.split('/', 1)[1], m)}" for m in modes]
        x = np.arange(len(modes))
        w = 0.8 / max(1, len(sessions))
        ax.bar(x + i * w, [ss["by_mode"][m]["frames_per_s"] for m in modes], w, label=key)
        ax.set_xticks(x + w * (len(sessions) - 1) / 2, labels, fontsize=6)
    ax.set_title("whole frames (int8): frames/s of all sessions, back to back", fontsize=9)
    ax.set_xlabel("sessions: graphs batched (den = denoiser)", fontsize=8)
    ax.set_ylabel("frames / s")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.suptitle(f"{r['machine']['cpu_model']}, {r['machine']['logical_cpus']} cores (shared): batching the per-frame graphs "
                 f"(median of {r['repeats']} interleaved calls)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/benchmarks/batching.json")
    p.add_argument("--bundle")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--precisions", nargs="+", default=["int8", "fp32"])
    p.add_argument("--session-frames", type=int, default=40, help="frames per session in the sessions measurement")
    a = p.parse_args(argv)
    r = bench_batching(a.out, bundle=a.bundle, repeats=a.repeats, threads=tuple(a.threads), precisions=tuple(a.precisions),
                       session_frames=a.session_frames)
    print(json.dumps(r["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
