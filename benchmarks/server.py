"""``avatar bench server``: `avatar serve` and N concurrent `avatar client` sessions on this machine.

For each N in ``--sessions``, a fresh ``avatar serve --max-sessions N`` process starts (its own
process: the server's CPU is counted apart from the clients'), N Python clients
(``clients.python.client.run_client``, aiortc) connect at once and each speaks the same speech
file as live audio, and every client's report is kept: connect-to-first-frame, fps received,
timestamp gaps, the audio round trip (audio-in to frame-out as the client sees it, both jitter
buffers included; null where the waveforms' correlation peak is under 0.3, as when an overloaded
server drops audio, with the raw estimate kept as ``audio_roundtrip_ms_unchecked``) and the server's own numbers for that session (pipeline latency, steps used,
degraded frames). A session "holds 25 fps" when it receives at least 24 frames per second of
wall time with at most 2 % of the timestamps skipped.

Caveat, written into the JSON: the clients run on the same two cores as the server (decoding
the video and encoding the microphone cost CPU a remote browser would spend elsewhere), so the
capacity here is a lower bound for the server alone; ``cpu_cores_used`` shows the split.
After each run the server's ``GET /metrics`` (prometheus_client) is read into ``server_metrics``:
the pipeline and send latencies over all its sessions (p50 / p95 estimated from the histograms'
buckets, as Prometheus's ``histogram_quantile`` does), frame counters, and the process's resident
memory, CPU time and open fds. Writes JSON and a PNG beside it.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_SPEECH = REPO.parent / "shared" / "data" / "speech" / "echomimic__assets_test_audios_jane.wav"
DEMO_VOICE = REPO / "engine" / "assets" / "demo" / "demo_voice.wav"
HOLD_FPS = 24.0  # received frames per second of wall time for "holds 25 fps"
HOLD_GAPS = 0.02  # fraction of timestamps skipped at most
MIN_CORRELATION = 0.3  # below this the round trip's correlation peak is not trusted (dropped audio, overload): reported as null


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), children excluded."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds of ``pid`` and each of its live descendants (worker processes; with Ray: raylet, GCS, replicas)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, todo = {pid}, [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        todo += kids
    out: dict[int, float] = {}
    for p in tree:
        try:
            out[p] = _cpu_s(p)
        except (OSError, IndexError, ValueError):
            continue
    return out


def _tree_delta_s(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the tree spent between two readings (a process that started meanwhile counts from 0)."""
    return sum(v - before.get(p, 0.0) for p, v in after.items())


def start_server(*args: str, timeout_s: float = 120.0, stderr: Any = subprocess.DEVNULL) -> tuple[subprocess.Popen, str]:
    """``avatar serve --port 0 --avatars-dir '' ARGS...`` in a subprocess (no kept uploads prepared in
    the background while something is measured); (the process, its URL) once it listens. ``stderr``:
    where its log goes (a file object to keep it)."""
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--port", "0", "--avatars-dir", "", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    t_end = time.monotonic() + timeout_s
    line = ""
    while "listening on" not in line:
        if proc.poll() is not None or time.monotonic() > t_end:
            proc.kill()
            raise RuntimeError(f"avatar serve did not start within {timeout_s:g} s (exit {proc.poll()})")
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
    return proc, line.split("listening on ")[1].split()[0]


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _clients(url: str, n: int, audio: Path, steps: int | None) -> list[dict]:
    from clients.python.client import ClientError, run_client

    async def one(i: int) -> dict:
        try:
            return await run_client(url, audio, steps=steps)
        except ClientError as e:
            return {"error": str(e)}
        except Exception as e:  # one client's failure is a result of the run, not the end of the benchmark
            return {"error": f"{type(e).__name__}: {e}"}

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of a Prometheus histogram from its cumulative (upper bound, count) buckets, +Inf
    last, interpolated linearly inside the bucket as Prometheus's ``histogram_quantile`` does (the
    +Inf bucket answers its lower bound); None without observations."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    rank = q * total
    lo_bound, lo_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lo_bound
            return lo_bound + (bound - lo_bound) * ((rank - lo_count) / (count - lo_count) if count > lo_count else 1.0)
        lo_bound, lo_count = bound, count
    return lo_bound


def read_metrics(url: str, *, timeout_s: float = 10.0) -> dict:
    """The server's ``GET /metrics`` summarised: latencies (ms, over every session it served), frame counters,
    process memory / CPU / fds. Names as in engine/pipeline/metrics.py."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"{url}/metrics", timeout=timeout_s) as r:
        text = r.read().decode()
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sm in family.samples:
            samples.setdefault(sm.name, []).append((sm.labels, sm.value))

    def one(name: str) -> float | None:
        vals = samples.get(name)
        return vals[0][1] if vals else None

    def latency(name: str) -> dict:
        buckets = [(float(lab["le"]), v) for lab, v in samples.get(f"{name}_bucket", [])]
        count, total = one(f"{name}_count"), one(f"{name}_sum")
        ms = lambda s: None if s is None else round(1000.0 * s, 1)  # noqa: E731
        return {"count": count, "mean_ms": ms(total / count) if count else None,
                "p50_ms": ms(histogram_quantile(0.5, buckets)), "p95_ms": ms(histogram_quantile(0.95, buckets))}

    rss = one("process_resident_memory_bytes")
    return {
        "pipeline_latency": latency("avatar_pipeline_latency_seconds"), "send_latency": latency("avatar_send_latency_seconds"),
        **{name: one(f"avatar_{name}_total") for name in ("sessions_started", "frames_out", "frames_dropped", "frames_degraded",
                                                          "stream_speech_dropped", "stream_slots_skipped")},
        "process_resident_memory_mib": None if rss is None else round(rss / 2**20, 1),
        "process_cpu_s": one("process_cpu_seconds_total"), "process_open_fds": one("process_open_fds"),
    }


def _session_row(r: dict) -> dict:
    if "error" in r:
        return {"error": r["error"], "holds_25fps": False}
    v, srv, lat = r.get("video", {}), r.get("server_session") or {}, r.get("latency") or {}
    c = srv.get("counters") or {}
    frames = v.get("frames", 0)
    row = {
        "first_frame_ms": r["connect"]["first_frame_ms"], "connected_ms": r["connect"]["connected_ms"],
        "fps_received": v.get("fps_received"), "pts_gaps": v.get("pts_gaps"), "frames": frames,
        "audio_roundtrip_ms": lat.get("audio_roundtrip_ms") if (lat.get("correlation") or 0) >= MIN_CORRELATION else None,
        "audio_roundtrip_ms_unchecked": lat.get("audio_roundtrip_ms"),
        "roundtrip_correlation": lat.get("correlation"),
        "server_pipeline_latency_ms": srv.get("pipeline_latency_ms"), "server_send_latency_ms": srv.get("send_latency_ms"),
        "server_pipeline_latency_p50_ms": (srv.get("pipeline_latency_ms") or {}).get("p50_ms"),
        "server_denoise_ms": srv.get("denoise_ms"), "server_compose_ms": srv.get("compose_ms"),
        "steps": srv.get("steps"),
        "frames_degraded_fraction": round(c.get("frames_degraded", 0) / c["frames_out"], 3) if c.get("frames_out") else None,
        "slots_skipped": c.get("stream_slots_skipped"), "speech_frames_dropped": c.get("stream_speech_dropped"),
    }
    row["holds_25fps"] = bool(frames and (row["fps_received"] or 0) >= HOLD_FPS and (row["pts_gaps"] or 0) <= HOLD_GAPS * frames)
    return row


def bench_server(out: str | Path, *, sessions: tuple[int, ...] = (1, 2, 3), audio: str | Path | None = None, bundle: str | None = None,
                 backend: str = "auto", threads: int | None = None, steps: int | None = None, workers: int | None = None,
                 ray: str | None = None) -> dict:
    """``workers``: ``avatar serve --workers N`` (1: one process); ``ray``: ``--ray ADDRESS`` with ``workers`` replicas.
    The server's cores are those of its whole process tree (front, workers; with Ray also raylet, GCS and the replicas);
    ``front_cores`` the front process's alone."""
    audio = Path(audio) if audio else (SHARED_SPEECH if SHARED_SPEECH.is_file() else DEMO_VOICE)
    runs: list[dict] = []
    result: dict = {}
    hosts = max(1, workers or 1)
    for n in sessions:
        per_host = max(1, -(-n // hosts)) if (ray or hosts > 1) else n  # --max-sessions is per worker / replica there
        args = ["--max-sessions", str(per_host), "--backend", backend]
        args += ["--bundle", bundle] if bundle else []
        args += ["--threads", str(threads)] if threads else []
        args += ["--steps", str(steps)] if steps else []
        args += ["--workers", str(hosts)] if (workers or ray) else []
        args += ["--ray", ray] if ray else []
        proc, url = start_server(*args, timeout_s=120.0 if hosts == 1 and not ray else 600.0)
        try:
            tree0, cpu0_me, t0 = _tree_cpu_s(proc.pid), _cpu_s(os.getpid()), time.monotonic()
            reports = asyncio.run(_clients(url, n, audio, steps))
            wall = time.monotonic() - t0
            tree1, cpu_me = _tree_cpu_s(proc.pid), _cpu_s(os.getpid()) - cpu0_me
            cpu_srv, cpu_front, n_procs = _tree_delta_s(tree0, tree1), tree1[proc.pid] - tree0[proc.pid], len(tree1)
            server_metrics = read_metrics(url)
        finally:
            stop_server(proc)
        rows = [_session_row(r) for r in reports]
        ok = [r for r in rows if "error" not in r]

        def mean(key: str) -> float | None:
            vals = [r[key] for r in ok if r.get(key) is not None]
            return round(float(np.mean(vals)), 2) if vals else None

        runs.append({
            "sessions": n, "mode": _mode(workers, ray), "server_processes": n_procs,
            "front_cores": round(cpu_front / wall, 2), "all_hold_25fps": all(r["holds_25fps"] for r in rows),
            "fps_received_mean": mean("fps_received"),
            "fps_received_min": min((r["fps_received"] or 0 for r in ok), default=None),
            "first_frame_ms_mean": mean("first_frame_ms"), "audio_roundtrip_ms_mean": mean("audio_roundtrip_ms"),
            "server_pipeline_latency_p50_ms_mean": mean("server_pipeline_latency_p50_ms"),
            "frames_degraded_fraction_mean": mean("frames_degraded_fraction"),
            "cpu_cores_used": {"server": round(cpu_srv / wall, 2), "clients": round(cpu_me / wall, 2)},
            "wall_s": round(wall, 1), "server_metrics": server_metrics, "per_session": rows,
        })
        print(f"{n} session(s): fps min {runs[-1]['fps_received_min']}, first frame {runs[-1]['first_frame_ms_mean']} ms, "
              f"audio round trip {runs[-1]['audio_roundtrip_ms_mean']} ms, holds 25 fps: {runs[-1]['all_hold_25fps']}, "
              f"cores: server {runs[-1]['cpu_cores_used']['server']} (front {runs[-1]['front_cores']}), "
              f"clients {runs[-1]['cpu_cores_used']['clients']}", flush=True)
        result = _write(out, runs, audio=audio, bundle=bundle, backend=backend, threads=threads, steps=steps)  # after every run
    return result


def _mode(workers: int | None, ray: str | None) -> str:
    if ray:
        return f"ray {max(1, workers or 1)} replicas"
    return "one process" if (workers or 1) == 1 else f"{workers} workers"


def bench_scale_out(out: str | Path, *, sessions: tuple[int, ...] = (1, 2, 3), workers: tuple[int, ...] = (1, 2),
                    ray_replicas: tuple[int, ...] = (), ray_address: str = "local", **kw) -> dict:
    """``bench_server`` for each worker count (1: one process) and each Ray replica count, into one table
    (``out``, e.g. docs/benchmarks/scale_out.json), with the capacity model (projected) beside it; each mode's
    full report goes to ``<out stem>_<mode>.json``."""
    out = Path(out)
    modes = [(w, None) for w in workers] + [(r, ray_address) for r in ray_replicas]
    table: list[dict] = []
    reports: dict[str, str] = {}
    for w, ray in modes:
        mode = _mode(w, ray)
        path = out.with_name(f"{out.stem}_{mode.replace(' ', '_')}.json")
        r = bench_server(path, sessions=sessions, workers=w, ray=ray, **kw)
        reports[mode] = str(path)
        for run in r["runs"]:
            table.append({"mode": mode, "sessions": run["sessions"], "all_hold_25fps": run["all_hold_25fps"],
                          "fps_received_min": run["fps_received_min"], "fps_received_mean": run["fps_received_mean"],
                          "server_cores": run["cpu_cores_used"]["server"], "front_cores": run["front_cores"],
                          "client_cores": run["cpu_cores_used"]["clients"], "server_processes": run["server_processes"],
                          "audio_roundtrip_ms_mean": run["audio_roundtrip_ms_mean"]})
        result = {"benchmark": "scale_out", "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                  "hold_rule": f"fps_received >= {HOLD_FPS} and timestamps skipped <= {HOLD_GAPS:.0%}",
                  "caveat": "the clients run on the same cores as the server; server_cores counts the server's whole process tree "
                            "(front, workers; with Ray also raylet, GCS and the replicas), front_cores the front process alone",
                  "sessions_holding_25fps": {m: max((t["sessions"] for t in table if t["mode"] == m and t["all_hold_25fps"]), default=0)
                                             for m in dict.fromkeys(t["mode"] for t in table)},
                  "table": table, "reports": reports, "capacity_model": capacity_model()}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")  # after every mode
    return result


DOCS = REPO / "docs"


def capacity_model(docs: Path = DOCS) -> dict:
    """Sessions per machine, PROJECTED from the per-frame costs measured on this 2-core machine (docs/benchmarks/server.json:
    the server's cores for one session at 25 fps; docs/runtime/bench_models_1thread.json: the models' ms per frame and GFLOP)."""
    def load(rel: str) -> dict:
        p = docs / rel
        return json.loads(p.read_text()) if p.is_file() else {}

    server, models = load("benchmarks/server.json"), load("runtime/bench_models_1thread.json")
    one = next((r for r in server.get("runs", []) if r["sessions"] == 1), None)
    cores_per_session = (one or {}).get("cpu_cores_used", {}).get("server", 1.15)  # measured: whole session, one process
    per_frame = models.get("per_frame", {}).get("onnxruntime/int8", {})
    model_ms = per_frame.get("total_ms", 24.0)  # warp + 2 denoiser steps + decoder, int8, one thread
    model_cores = model_ms * 25 / 1000.0  # cores the models take per session at 25 fps
    other_cores = max(0.0, cores_per_session - model_cores)  # features, compositing, VP8 / Opus, aiortc, glue
    front_per_session = 0.02  # cores the front spends per session (signalling and forwarding only; measure with --workers)
    machines = {}
    for cores in (2, 16, 64):
        workers = max(1, int(cores / 1.2))
        usable = cores - (0.0 if cores <= 2 else 0.5)  # the front and the OS
        n = int(usable // (cores_per_session + front_per_session))
        machines[f"{cores}_cores"] = {"sessions": n, "workers": workers, "projected": cores > 2,
                                      "basis": f"{usable:g} usable cores / ({cores_per_session:g} cores per session measured in one "
                                               f"process + {front_per_session:g} front); one worker per 1.2 cores removes the one-"
                                               "process ceiling of ~1.4 cores (server.json: 2-3 sessions stall there)"}
    # H100 host (16 cores, as lent here): the models move to the GPU, the CPU keeps the rest of each session
    h100_cpu_sessions = int((16 - 0.5) // (other_cores + front_per_session)) if other_cores > 0 else None
    machines["h100_16_cores"] = {
        "sessions": h100_cpu_sessions, "projected": True,
        "bound": "the host CPU's share only; the GPU side is unmeasured (each worker process has its own CUDA context and batches "
                 "only its own sessions), so run --workers N --max-sessions 2 there and measure",
        "basis": f"per session {other_cores:.2f} cores stay on the CPU ({cores_per_session:g} measured minus {model_cores:.2f} for the "
                 f"int8 models at {model_ms:g} ms per frame); 15.5 usable cores; not measured: no GPU run of the batched path "
                 "exists yet (scripts/gpu_check.sh, `avatar bench gpu`, writes the GPU side: sessions at 25 fps per GPU)"}
    return {"projected": True, "cores_per_session_measured": cores_per_session, "model_cores_per_session": round(model_cores, 3),
            "other_cores_per_session": round(other_cores, 3), "front_cores_per_session_assumed": front_per_session,
            "sources": ["docs/benchmarks/server.json", "docs/runtime/bench_models_1thread.json"], "machines": machines}


def _write(out: str | Path, runs: list[dict], **setup) -> dict:
    capacity = max((r["sessions"] for r in runs if r["all_hold_25fps"]), default=0)
    result = {
        "benchmark": "server", "audio": str(setup["audio"]), "bundle": setup["bundle"] or "default", "backend": setup["backend"],
        "threads": setup["threads"], "steps": setup["steps"], "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "hold_rule": f"fps_received >= {HOLD_FPS} and timestamps skipped <= {HOLD_GAPS:.0%}",
        "sessions_holding_25fps": capacity,
        "caveat": "the clients run on the same CPU as the server: their video decoding and audio encoding take cores a remote "
                  "browser would not; cpu_cores_used shows the split",
        "runs": runs,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, out.with_suffix(".png"))
    return result


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    n = [r["sessions"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for r in runs:
        fps = [s.get("fps_received") or 0 for s in r["per_session"]]
        a.scatter([r["sessions"]] * len(fps), fps, color="tab:blue", alpha=0.7)
    a.axhline(HOLD_FPS, color="tab:red", ls="--", lw=1, label=f"{HOLD_FPS:g} fps")
    a.set(xlabel="concurrent sessions", ylabel="fps received per session", xticks=n, ylim=(0, 27))
    a.legend(loc="lower left")
    for key, label in (("audio_roundtrip_ms_mean", "audio round trip (client)"), ("server_pipeline_latency_p50_ms_mean", "server pipeline p50"),
                       ("first_frame_ms_mean", "connect to first frame")):
        b.plot(n, [r[key] or np.nan for r in runs], marker="o", label=label)
    b.set(xlabel="concurrent sessions", ylabel="ms", xticks=n)
    b.legend(fontsize=8)
    fig.suptitle(f"avatar serve + avatar client on {result['cpus']} CPU cores (clients on the same cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
