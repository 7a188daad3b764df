"""``avatar bench gpu`` (``python -m benchmarks.gpu``): the engine's per-frame path on one GPU, torch only.

Made for a bare CUDA machine lent for minutes (PyTorch and numpy, no network, no mediapipe, OpenCV,
PyAV or ONNX Runtime): it needs only the bundle's PyTorch models and the precomputed avatar
``benchmarks/assets/gpu_avatar.npz`` (``benchmarks/gpu_path.py`` is the path; ``scripts/gpu_check.sh``
is the one command to run there). It also runs on a CPU (``--device cpu``, small counts: the test).

For each mode and batch (B concurrent sessions, one batched step per frame), after
``warmup`` frames it times ``frames`` frames one by one (``torch.cuda.synchronize`` after each:
p50/p95 latency of one frame for all B sessions, the crops read back into pinned host memory),
the same number back to back with one synchronize at the end (throughput), and, in the eager
modes, each graph alone on that frame's inputs. GPU memory: ``torch.cuda.max_memory_allocated``
during the frames, above what the models and the avatar's tensors hold, divided by B. Sessions at
25 fps per GPU are projected from the batch curve. A time budget (``--budget-s``) stops it
cleanly: configurations that would not fit are skipped with the reason, a timing loop that
reaches the deadline keeps the frames it has (``complete: false``), and the JSON is written after
every configuration, so partial results survive even a kill.

Modes: fp32; bf16 (the models cast to bfloat16, as the engine's torch backend does: inputs cast at
each layer with weights, so the time embedding stays fp32); compile (``torch.compile`` of the whole
per-frame step: mode "reduce-overhead", i.e. CUDA graphs, on CUDA; the default mode on a CPU);
compile-bf16 (both). A compiled mode is compiled once with a dynamic batch size (dynamo compiles
B = 1, then the first B > 1 for all larger ones; CUDA graphs are recorded per B), with the A2L's
GRU traced too (dynamo's ``allow_rnn``: the step is one graph; if that fails the GRU runs eagerly
between compiled graphs, and a note says so). ``--compile-static`` compiles every batch size on its
own instead: static-shape kernels (on this project's CPU, the dynamic B = 2 step ran 1.5 x slower
than eager and the static B = 1 step about 2 x faster, one run each), at a compile per configuration.

JSON (``format`` "avatar-bench-gpu/1"):
  format, created (UTC ISO time), complete (every configuration measured in full), elapsed_s
  environment: device ("cuda" | "cpu"), name (GPU or CPU), torch, cuda (torch.version.cuda), cudnn,
      driver (nvidia-smi), capability ("9.0"), gpu_memory_mb, python, numpy, platform, threads,
      nvidia_smi (its one-line query or why not); on CUDA also tf32_matmul, tf32_cudnn, cudnn_benchmark
      (torch's defaults, left as they are: fp32 convolutions may use TF32)
  settings: batches, modes, frames, warmup, budget_s, steps, graphs (per-graph timings on),
      compile_static, frame_budget_ms (40: 25 fps), bundle, asset
  check: per precision, the path's output after ``check_frames`` frames (batch 1) against the
      CPU fp32 reference stored in the asset: frames, max_abs_landmarks (patch units), max_abs_latent,
      mean_abs_crop and max_abs_crop (0-255 pixel values); kept_fp32 and why where bf16 had to keep
      the A2L in fp32; {error} where the precision does not run at all (its modes are then skipped)
  results: one entry per (mode, batch), in the order run:
      mode, batch, precision, compiled, status ("ok" | "partial" | "skipped" | "error"),
      reason (skipped / error / what a partial lacks), seconds (wall time of the entry),
      compile_s (first call of a compiled step: compile + capture), allow_rnn (the GRU was compiled too),
      frame: {p50_ms, p95_ms, mean_ms, min_ms, max_ms, n, complete} latency of one batched frame,
          plus per_session_ms (p50 / B) and fps_at_p95 (1000 / p95)
      throughput: {ms_per_frame, n, frames_per_s (B x batches per second), sessions_at_25fps}
      graphs: name -> {p50_ms, p95_ms, mean_ms, min_ms, max_ms, n, complete}, for audio_encoder
          (mel windows of 10 frames), a2l (one step + articulation), warp, denoiser (one call),
          ddim (``steps`` denoiser calls and the update), decoder, compose (crop compositing),
          readback (device -> pinned host copy of the B crops); {} in the compiled modes
      memory: {peak_mb, base_mb (allocated before: the fp32 models), fixed_mb (this configuration's model
          copies and avatar tensors), per_session_mb ((peak - base - fixed) / B)} (CUDA; null on a CPU)
  projection: per mode (and "best"): latency_bound_sessions (the largest measured B whose frame
      p95 <= 40 ms; limited_by_largest_batch when even the largest did), throughput_sessions
      (max over B of floor(B x 40 ms / throughput ms per frame), at_batch), max_frames_per_s (session
      frames per second, back to back, the best B), batches_measured, memory_bound_sessions
      (90 % of the GPU's memory / the largest B's per-session memory), notes
  notes: what was skipped and why, what is not measured (the CPU side of a session: audio decode,
      VAD, H.264 encoding, WebRTC; the paste into the full portrait)

A PNG beside the JSON (matplotlib, Agg): ms per frame (p50 and p95) against B per mode, with the
40 ms line; sessions (throughput) against B. Without matplotlib the JSON says so and no PNG is written.

    python -m benchmarks.gpu --device cuda --out out/gpu_check/gpu.json [--budget-s 420]
    python -m benchmarks.gpu --device cpu --frames 5 --warmup 2 --batches 1 2 --threads 1
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

FORMAT = "avatar-bench-gpu/1"
MODES = ("fp32", "bf16", "compile", "compile-bf16")  # mode -> (precision, compiled): see _mode
FRAME_BUDGET_MS = 40.0  # one frame at 25 fps
GRAPHS = ("audio_encoder", "a2l", "warp", "denoiser", "ddim", "decoder", "compose", "readback")
DEFAULTS = {  # device kind -> defaults where an option is not given
    "cuda": {"batches": (1, 2, 4, 8, 16, 32), "modes": MODES, "frames": 200, "warmup": 20},
    "cpu": {"batches": (1, 2), "modes": ("fp32",), "frames": 10, "warmup": 2},
}
COMPILE_ESTIMATE_S = 90.0  # time kept free for a compiled configuration before its first one is measured
NOT_MEASURED = ("CPU side of a session (audio decode and log-mel, VAD, H.264 encoding, WebRTC) and the paste of the crop "
                "into the full portrait (cv2.warpAffine in the engine) are not part of the path; the pixel mask is fixed "
                "(the union over the asset's clip) where the generator rasterises one per frame on the CPU")


class DeviceUnavailable(RuntimeError):
    """The device asked for is not there (e.g. ``--device cuda`` where torch sees no CUDA)."""


def _mode(mode: str) -> tuple[str, bool]:
    """mode name -> (precision, compiled)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return ("bf16" if mode.endswith("bf16") else "fp32"), mode.startswith("compile")


# -- environment --
def nvidia_smi_query() -> dict[str, str]:
    """GPU name, driver and memory from nvidia-smi (no shell), or why not."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"error": "nvidia-smi not found"}
    try:
        r = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"nvidia-smi: {type(e).__name__}: {e}"}
    if r.returncode != 0:
        return {"error": f"nvidia-smi exit {r.returncode}: {r.stderr.strip()[:200]}"}
    first = r.stdout.strip().splitlines()[0] if r.stdout.strip() else ""
    parts = [p.strip() for p in first.split(",")]
    return {"line": first, "name": parts[0] if parts else "", "driver": parts[1] if len(parts) > 1 else "",
            "memory": parts[2] if len(parts) > 2 else ""}


def resolve_device(device: str) -> str:
    """``cuda`` or ``cpu``; DeviceUnavailable with a one-line reason where CUDA is asked for and absent."""
    import torch

    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        why = ("this torch is built without CUDA" if torch.version.cuda is None
               else f"torch (CUDA {torch.version.cuda}) sees no GPU: driver, CUDA_VISIBLE_DEVICES?")
        raise DeviceUnavailable(f"--device cuda, but CUDA is not available (torch {torch.__version__}: {why}); "
                                f"use --device cpu for a CPU run")
    return device


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                           "python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
                           "threads": torch.get_num_threads(), "nvidia_smi": nvidia_smi_query()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(name=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_mb=round(p.total_memory / 2**20),
                   driver=env["nvidia_smi"].get("driver"), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32, cudnn_benchmark=torch.backends.cudnn.benchmark)
    else:
        env.update(name=platform.processor() or platform.machine(), capability=None, gpu_memory_mb=None, driver=None)
    return env


# -- timing --
def _stats(ts_ms: list[float], wanted: int) -> dict[str, Any]:
    a = np.asarray(ts_ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p95_ms": round(float(np.percentile(a, 95)), 4),
            "mean_ms": round(float(a.mean()), 4), "min_ms": round(float(a.min()), 4), "max_ms": round(float(a.max()), 4),
            "n": len(a), "complete": len(a) >= wanted}


def time_each(fn: Callable[[], Any], sync: Callable[[], None], *, n: int, warmup: int, deadline: float) -> dict[str, Any] | None:
    """``fn()`` ``warmup`` times, then up to ``n`` timed calls, each synchronised: latency stats (None if none ran)."""
    for _ in range(warmup):
        fn()
    sync()
    ts: list[float] = []
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t0) * 1e3)
    return _stats(ts, n) if ts else None


def time_back_to_back(fn: Callable[[], Any], sync: Callable[[], None], *, n: int, deadline: float) -> dict[str, Any] | None:
    """``n`` calls with one synchronise at the end (stops early at the deadline): ms per call."""
    sync()
    t0, done = time.perf_counter(), 0
    while done < n and time.monotonic() <= deadline:
        for _ in range(min(10, n - done)):
            fn()
        done += min(10, n - done)
        sync()
    if not done:
        return None
    return {"ms_per_frame": round((time.perf_counter() - t0) * 1e3 / done, 4), "n": done, "complete": done >= n}


# -- one configuration --
class _Runner:
    """Models, asset and device for the whole run; ``measure(mode, batch)`` makes one results entry."""

    def __init__(self, device: str, *, bundle: str | None, asset: str | Path | None, steps: int | None):
        import torch

        from benchmarks.gpu_path import ASSET, AvatarAsset, load_models, manifest_sha256

        self.torch, self.device = torch, device
        self.asset_path = Path(asset) if asset else ASSET
        self.asset = AvatarAsset.load(self.asset_path)
        self.manifest, self.models = load_models(bundle)
        self.notes: list[str] = []
        if manifest_sha256(bundle) != self.asset.bundle_manifest_sha256:
            self.notes.append("the bundle's manifest differs from the one the asset was built with: the check compares "
                              "against another bundle's output (rebuild it: scripts/build_gpu_avatar.py)")
        self.steps = int(steps or self.manifest["steps"])
        for m in self.models.values():
            m.to(device)
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.compile_s: dict[str, float] = {}
        self.module_cache: dict = {}  # (role, precision) -> the module every batch size's path uses
        self.compiled_mode: str | None = None  # the mode whose compiled step dynamo holds
        self.keep_fp32: dict[str, tuple[str, ...]] = {}  # precision -> roles that stay fp32 (the check found them failing)
        self.allow_rnn = True  # dynamo traces the A2L's GRU (one graph per step); False after that failed once

    def path(self, batch: int, precision: str):
        from benchmarks.gpu_path import FramePath

        return FramePath(self.models, self.asset, batch=batch, device=self.device, precision=precision, steps=self.steps,
                         module_cache=self.module_cache, keep_fp32=self.keep_fp32.get(precision, ()))

    def check(self, precision: str) -> dict[str, Any]:
        """The path's output after the asset's check frames (batch 1) against the stored CPU fp32 reference.
        In bf16, an A2L that fails (a GRU without bf16 kernels here) is kept fp32 for the whole run, and said so."""
        from benchmarks.gpu_path import run_frames

        a = self.asset
        note = {}
        try:
            _, _, _, x0, lm, crops = run_frames(self.path(1, precision), a.check_frames)
        except Exception as e:
            if precision == "fp32":
                raise
            self.keep_fp32[precision] = ("a2l",)
            _, _, _, x0, lm, crops = run_frames(self.path(1, precision), a.check_frames)
            note = {"kept_fp32": ["a2l"], "why": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            self.notes.append(f"{precision}: the A2L runs in fp32 ({note['why']})")
        d_crop = np.abs(crops[0].cpu().numpy().astype(np.int16) - a.check_crop.astype(np.int16))
        return {"frames": a.check_frames, "max_abs_landmarks": float(np.abs(lm[0].cpu().numpy() - a.check_lm).max()),
                "max_abs_latent": float(np.abs(x0[0].cpu().numpy() - a.check_x0).max()),
                "mean_abs_crop": round(float(d_crop.mean()), 4), "max_abs_crop": int(d_crop.max()), **note}

    def measure(self, mode: str, batch: int, *, frames: int, warmup: int, graphs: bool, deadline: float,
                compile_static: bool = False) -> dict[str, Any]:
        torch = self.torch
        precision, compiled = _mode(mode)
        entry: dict[str, Any] = {"mode": mode, "batch": batch, "precision": precision, "compiled": compiled, "status": "ok"}
        cuda = self.device == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        key = f"{mode} B={batch}" if compile_static else mode
        if compiled and self.compiled_mode != key:  # a fresh start per compiled mode (or configuration, if static); a mode's
            torch._dynamo.reset()                    # batch sizes share one dynamic-batch compilation (B = 1 and the first B > 1)
            torch._dynamo.config.allow_rnn = self.allow_rnn
            self.compiled_mode = key
        path = self.path(batch, precision)
        state = list(path.init_state())
        fixed = torch.cuda.memory_allocated() if cuda else 0  # + this configuration's model copies and avatar tensors
        host = torch.empty((batch, *self.asset.crop.shape), dtype=torch.uint8, pin_memory=cuda)
        kw: dict[str, Any] = {"mode": "reduce-overhead"} if cuda else {}
        if compile_static:
            kw["dynamic"] = False
        step = [torch.compile(path.step, **kw) if compiled else path.step]
        if compiled and not cuda:
            entry["note"] = "CPU: plain torch.compile (CUDA graphs need CUDA)"
        mark = torch.compiler.cudagraph_mark_step_begin if (compiled and cuda) else None

        def frame() -> None:
            if mark is not None:
                mark()
            out = step[0](*state)
            # a CUDA graph's outputs are overwritten by its next replay: keep copies of the state
            state[:] = [t.clone() for t in out[:4]] if compiled else list(out[:4])
            host.copy_(out[5], non_blocking=cuda)

        with torch.no_grad():
            if compiled:
                t0 = time.perf_counter()
                try:
                    frame()
                except Exception as e:  # the GRU traced by dynamo (allow_rnn) is experimental: without it, it runs eagerly
                    if not self.allow_rnn:
                        raise
                    self.allow_rnn = False
                    self.notes.append(f"torch.compile with dynamo's allow_rnn failed ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:200] if str(e) else ''}); the GRU runs eagerly between compiled graphs")
                    torch._dynamo.reset()
                    torch._dynamo.config.allow_rnn = False
                    step[0] = torch.compile(path.step, **kw)
                    frame()
                self.sync()
                entry["compile_s"] = round(time.perf_counter() - t0, 2)
                entry["allow_rnn"] = self.allow_rnn
            fr = time_each(frame, self.sync, n=frames, warmup=warmup, deadline=deadline)
            if fr is None:
                return {**entry, "status": "partial", "reason": "the time budget ran out during the warm-up"}
            fr["per_session_ms"] = round(fr["p50_ms"] / batch, 4)
            fr["fps_at_p95"] = round(1000.0 / fr["p95_ms"], 2)
            entry["frame"] = fr
            tp = time_back_to_back(frame, self.sync, n=frames, deadline=deadline)
            if tp is not None:
                tp["frames_per_s"] = round(1000.0 * batch / tp["ms_per_frame"], 2)
                tp["sessions_at_25fps"] = math.floor(batch * FRAME_BUDGET_MS / tp["ms_per_frame"])
                entry["throughput"] = tp
            if cuda:
                peak = torch.cuda.max_memory_allocated()
                entry["memory"] = {"peak_mb": round(peak / 2**20, 2), "base_mb": round(base / 2**20, 2),
                                   "fixed_mb": round((fixed - base) / 2**20, 2),
                                   "per_session_mb": round((peak - fixed) / batch / 2**20, 3)}
            else:
                entry["memory"] = None
            entry["graphs"] = self._graphs(path, state, host, frames=frames, warmup=warmup, deadline=deadline) \
                if graphs and not compiled else {}
        incomplete = [k for k, v in [("frame", entry["frame"]), ("throughput", entry.get("throughput")),
                                     *entry["graphs"].items()] if v is None or not v["complete"]]
        if graphs and not compiled and len(entry["graphs"]) < len(GRAPHS):
            incomplete.append("graphs")
        if incomplete:
            entry["status"] = "partial"
            entry["reason"] = "the time budget ran out: " + ", ".join(incomplete) + " with fewer frames or none"
        return entry

    def _graphs(self, path, state: list, host, *, frames: int, warmup: int, deadline: float) -> dict[str, Any]:
        """Each stage alone on a real frame's inputs (eager): latency stats per graph."""
        k, tokens, gru, previous = state
        f = path.audio(k)
        lm, _ = path.landmarks(f, gru)
        cond = path.conditions(lm, tokens, previous)
        x0 = path.sample(cond)
        img = path.decode(x0)
        crops = path.compose(img)
        t_first = path.times[0].expand(path.batch)
        fns = {"audio_encoder": lambda: path.audio(k), "a2l": lambda: path.landmarks(f, gru), "warp": lambda: path.reference(lm),
               "denoiser": lambda: path.denoise(path.noise, t_first, cond), "ddim": lambda: path.sample(cond),
               "decoder": lambda: path.decode(x0), "compose": lambda: path.compose(img),
               "readback": lambda: host.copy_(crops, non_blocking=self.device == "cuda")}
        out: dict[str, Any] = {}
        for name in GRAPHS:
            if time.monotonic() > deadline:
                break
            r = time_each(fns[name], self.sync, n=frames, warmup=max(2, warmup // 4), deadline=deadline)
            if r is not None:
                out[name] = r
        return out


# -- projection --
def project(results: list[dict[str, Any]], *, gpu_memory_mb: float | None) -> dict[str, Any]:
    """Concurrent 25 fps sessions per device from each mode's measured batch curve (module docstring)."""
    out: dict[str, Any] = {}
    for mode in dict.fromkeys(r["mode"] for r in results):
        rows = sorted((r for r in results if r["mode"] == mode and r.get("frame")), key=lambda r: r["batch"])
        if not rows:
            continue
        ok = [r for r in rows if r["frame"]["p95_ms"] <= FRAME_BUDGET_MS]
        lat = max((r["batch"] for r in ok), default=0)
        tp = [(r["throughput"]["sessions_at_25fps"], r["batch"]) for r in rows if r.get("throughput")]
        best_tp = max(tp, default=(0, None))
        p: dict[str, Any] = {"latency_bound_sessions": lat, "limited_by_largest_batch": bool(ok) and lat == rows[-1]["batch"],
                             "throughput_sessions": best_tp[0], "at_batch": best_tp[1], "batches_measured": [r["batch"] for r in rows],
                             "max_frames_per_s": max((r["throughput"]["frames_per_s"] for r in rows if r.get("throughput")), default=0.0)}
        mem = rows[-1].get("memory")
        if gpu_memory_mb and mem and mem["per_session_mb"] > 0:
            p["memory_bound_sessions"] = math.floor(0.9 * gpu_memory_mb / mem["per_session_mb"])
        out[mode] = p
    if out:
        best = max(out, key=lambda m: (out[m]["latency_bound_sessions"], out[m]["throughput_sessions"], out[m]["max_frames_per_s"]))
        out["best"] = {"mode": best, **out[best]}
        out["notes"] = ("latency-bound: one batched step per 40 ms serves B sessions and its p95 fits in 40 ms; "
                        "throughput-bound: back-to-back batches (several streams per 40 ms), an upper bound; both count "
                        "the GPU path only (" + NOT_MEASURED + ")")
    return out


# -- the run --
def bench_gpu(out: str | Path, *, device: str = "cuda", batches: tuple[int, ...] | None = None, modes: tuple[str, ...] | None = None,
              frames: int | None = None, warmup: int | None = None, budget_s: float = 420.0, threads: int | None = None,
              steps: int | None = None, bundle: str | None = None, asset: str | Path | None = None, graphs: bool = True,
              compile_static: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure, write ``out`` (JSON, after every configuration) and its PNG; return the report (module docstring)."""
    t_start = time.monotonic()
    deadline = t_start + budget_s
    import torch

    device = resolve_device(device)
    if threads:
        torch.set_num_threads(int(threads))
    d = DEFAULTS[device]
    batches = tuple(batches or d["batches"])
    modes = tuple(modes or d["modes"])
    frames = int(frames or d["frames"])
    warmup = int(warmup if warmup is not None else d["warmup"])
    for m in modes:
        _mode(m)
    if any(b < 1 for b in batches) or frames < 1 or warmup < 0:
        raise ValueError("batches and frames must be >= 1, warmup >= 0")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    log(f"device: {env['name']} | torch {env['torch']} | CUDA {env['cuda']} | cuDNN {env['cudnn']} | "
        f"driver {env.get('driver') or env['nvidia_smi'].get('error')}")
    runner = _Runner(device, bundle=bundle, asset=asset, steps=steps)
    report: dict[str, Any] = {
        "format": FORMAT, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "complete": False,
        "elapsed_s": None, "environment": env,
        "settings": {"batches": list(batches), "modes": list(modes), "frames": frames, "warmup": warmup, "budget_s": budget_s,
                     "steps": runner.steps, "graphs": graphs, "compile_static": compile_static, "frame_budget_ms": FRAME_BUDGET_MS,
                     "bundle": str(bundle or "default"), "asset": str(runner.asset_path)},
        "check": {}, "results": [], "projection": {}, "notes": runner.notes}
    runner.notes.append(NOT_MEASURED)

    def write() -> None:
        report["elapsed_s"] = round(time.monotonic() - t_start, 2)
        report["projection"] = project(report["results"], gpu_memory_mb=env.get("gpu_memory_mb"))
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        os.replace(tmp, out)

    for precision in dict.fromkeys(_mode(m)[0] for m in modes):
        try:
            with torch.no_grad():
                report["check"][precision] = runner.check(precision)
        except Exception as e:  # a precision this device cannot run: say so, measure the rest
            report["check"][precision] = {"error": f"{type(e).__name__}: {e}"}
        log(f"check {precision}: {report['check'][precision]}")
    write()

    last_s: dict[str, float] = {}
    failed: dict[str, str] = {}  # mode -> its first error: larger batches of it are not tried
    for mode in modes:
        precision, compiled = _mode(mode)
        if "error" in report["check"].get(precision, {}):
            for b in batches:
                report["results"].append({"mode": mode, "batch": b, "status": "skipped",
                                          "reason": f"{precision} does not run here: {report['check'][precision]['error']}"})
            write()
            continue
        done = 0  # configurations of this mode measured so far
        for b in batches:
            if mode in failed:
                report["results"].append({"mode": mode, "batch": b, "status": "skipped", "reason": f"not tried after {failed[mode]}"})
                write()
                continue
            left = deadline - time.monotonic()
            # the last configuration of this mode, twice the batch, measures in about 2.5 x its time; a compiled
            # mode compiles for its first B, again (dynamic batch) for its second, then only records CUDA graphs
            c_last = runner.compile_s.get(mode, 0.0)
            need = 2.5 * max(last_s.get(mode, 0.0) - c_last, 0.0)
            if compiled:
                need += COMPILE_ESTIMATE_S if done == 0 else 1.5 * c_last if (done == 1 or compile_static) else 10.0
            if left < max(need, 1.0):
                report["results"].append({"mode": mode, "batch": b, "status": "skipped",
                                          "reason": f"time budget: {left:.0f} s left, about {need:.0f} s needed"})
                log(f"{mode} B={b}: skipped (budget: {left:.0f} s left, ~{need:.0f} s needed)")
                write()
                continue
            t0 = time.monotonic()
            try:
                entry = runner.measure(mode, b, frames=frames, warmup=warmup, graphs=graphs, deadline=deadline,
                                       compile_static=compile_static)
            except Exception as e:  # one configuration failing (out of memory, a compile error) ends only itself
                entry = {"mode": mode, "batch": b, "precision": precision, "compiled": compiled, "status": "error",
                         "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
                if device == "cuda":
                    torch.cuda.empty_cache()
            entry["seconds"] = round(time.monotonic() - t0, 2)
            if entry["status"] == "error":
                failed[mode] = f"the error at B={b}"
            last_s[mode] = entry["seconds"]
            done += 1
            if "compile_s" in entry:
                runner.compile_s[mode] = entry["compile_s"]
            report["results"].append(entry)
            log(_line(entry))
            write()
    report["complete"] = all(r["status"] == "ok" for r in report["results"]) and \
        len(report["results"]) == len(modes) * len(batches)
    write()
    plot = plot_report(report, out.with_suffix(".png"))
    if plot:
        report["notes"].append(plot)
        write()
    return report


def _line(e: dict[str, Any]) -> str:
    if not e.get("frame"):
        return f"{e['mode']} B={e['batch']}: {e['status']} ({e.get('reason', '')})"
    f, tp, mem = e["frame"], e.get("throughput") or {}, e.get("memory") or {}
    s = (f"{e['mode']} B={e['batch']}: frame p50 {f['p50_ms']:.2f} / p95 {f['p95_ms']:.2f} ms (n={f['n']}), "
         f"back-to-back {tp.get('ms_per_frame', float('nan')):.2f} ms -> {tp.get('sessions_at_25fps', '?')} sessions at 25 fps")
    if mem:
        s += f", {mem['per_session_mb']:.1f} MB/session"
    if "compile_s" in e:
        s += f", compile {e['compile_s']:.1f} s"
    if e["graphs"]:
        s += " | " + " ".join(f"{k} {v['p50_ms']:.2f}" for k, v in e["graphs"].items())
    return s + ("" if e["status"] == "ok" else f" [{e['status']}: {e.get('reason', '')}]")


def plot_report(report: dict[str, Any], path: Path) -> str | None:
    """The PNG (module docstring); returns a note when it cannot be drawn (matplotlib missing), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no PNG: matplotlib is not installed here"
    if not any(r.get("frame") for r in report["results"]):
        return "no PNG: no configuration was measured"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in report["settings"]["modes"]:
        rows = sorted((r for r in report["results"] if r["mode"] == mode and r.get("frame")), key=lambda r: r["batch"])
        if not rows:
            continue
        b = [r["batch"] for r in rows]
        line, = ax1.plot(b, [r["frame"]["p50_ms"] for r in rows], "o-", label=f"{mode} p50")
        ax1.plot(b, [r["frame"]["p95_ms"] for r in rows], "x--", color=line.get_color(), label=f"{mode} p95")
        tp = [(r["batch"], r["throughput"]["frames_per_s"] / 25.0) for r in rows if r.get("throughput")]
        if tp:
            ax2.plot(*zip(*tp), "o-", color=line.get_color(), label=mode)
    ax1.axhline(FRAME_BUDGET_MS, color="k", lw=0.8, ls=":", label="40 ms (25 fps)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (concurrent sessions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax1.set_ylabel("ms per batched frame")
    ax2.set_ylabel("sessions at 25 fps (back-to-back throughput)")
    env = report["environment"]
    fig.suptitle(f"per-frame path on {env['name']} (torch {env['torch']}, CUDA {env['cuda']}), {report['settings']['steps']} DDIM steps",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -- command line --
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda (default; exit 2 where absent) or cpu")
    p.add_argument("--out", default="out/gpu_check/gpu.json", help="JSON report; the PNG goes beside it")
    p.add_argument("--batches", type=int, nargs="+", help="concurrent sessions per step (default cuda: 1 2 4 8 16 32; cpu: 1 2)")
    p.add_argument("--modes", nargs="+", choices=MODES, help="default cuda: all; cpu: fp32")
    p.add_argument("--frames", type=int, help="timed frames per configuration after the warm-up (default cuda 200, cpu 10)")
    p.add_argument("--warmup", type=int, help="warm-up frames (default cuda 20, cpu 2)")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop cleanly before this many seconds, keeping partial results")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the bundle's)")
    p.add_argument("--bundle", help="model bundle folder (default: the shipped bundle)")
    p.add_argument("--asset", help="precomputed avatar (default: benchmarks/assets/gpu_avatar.npz)")
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="time the whole frame only, not each graph")
    p.add_argument("--compile-static", action="store_true",
                   help="compile each batch size on its own (static shapes: a compile per configuration) instead of one dynamic-batch compile per mode")


def run_args(a: argparse.Namespace, prog: str = "avatar bench gpu") -> int:
    try:
        r = bench_gpu(a.out, device=a.device, batches=a.batches, modes=a.modes, frames=a.frames, warmup=a.warmup,
                      budget_s=a.budget_s, threads=a.threads, steps=a.steps, bundle=a.bundle, asset=a.asset, graphs=a.graphs,
                      compile_static=a.compile_static)
    except DeviceUnavailable as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    best = r["projection"].get("best")
    if best:
        print(f"sessions at 25 fps ({best['mode']}): {best['latency_bound_sessions']}"
              f"{'+' if best['limited_by_largest_batch'] else ''} with p95 <= 40 ms, {best['throughput_sessions']} by throughput")
    print(f"{'complete' if r['complete'] else 'PARTIAL'} in {r['elapsed_s']} s; wrote {a.out}"
          + ("" if any("no PNG" in n for n in r["notes"]) else f" and {Path(a.out).with_suffix('.png')}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run_args(ap.parse_args(argv), prog="benchmarks.gpu")


if __name__ == "__main__":
    sys.exit(main())
