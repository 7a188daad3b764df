"""Speed and quality of the reduced precisions of the two graphs that dominate a frame (denoiser,
decoder): ONNX Runtime int8 (the bundle's static-QDQ variants) and PyTorch bf16, against fp32.

The decision it records (``AUTO_PRECISION`` in engine/runtime/__init__.py follows it): a precision
may become a default only if the held-out evaluation's LPIPS changes by at most 1% (relative).

  speed    ms per call of warp, denoiser and decoder on real feeds (recorded from the demo), at 1
           and 2 threads; the precisions of one backend are interleaved call by call (this
           machine is shared: they see the same load, so their ratios are what to read; the two
           backends run one after the other); per frame = warp + steps x denoiser + decoder.
  demo     ``demo_frames`` frames of the shipped demo rendered by every configuration; ST-LPIPS
           of each one's generated patches (the decoder's outputs) against ONNX Runtime fp32's,
           and the largest pixel difference of the frames.
  eval     if prepared held-out clips are given (``--data``: folders written by `avatar prepare`),
           ``evaluate_selfrecon`` on each of them (``max_frames`` per segment, no cross-identity,
           no drift run) with every configuration: LPIPS (lower face, and full crop) of each
           precision and its relative change against fp32 on the same backend.

    python -m benchmarks.precision --bundle engine/bundles/default --data out/full --out docs/runtime/precision.json
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.models import machine_info, time_calls

CONFIGS = (("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("torch", "fp32"), ("torch", "bf16"))
TOLERANCE = 0.01  # largest relative change of the evaluation's LPIPS for a precision to become a default
GRAPHS = ("warp", "denoiser", "decoder")


def _label(backend: str, precision: str) -> str:
    return f"{backend}/{precision}"


def speed(bundle: Any, feeds: dict[str, list[dict[str, np.ndarray]]], *, threads: int, repeats: int = 60, warmup: int = 5) -> dict:
    """Median ms per call of each graph on each configuration (a real feed of each graph), the configurations
    interleaved call by call so that all of them see the same load from other processes; per frame; and each
    configuration's speed-up over ONNX Runtime fp32."""
    import torch

    from engine.runtime import load_runtime

    rts = {_label(b, p): load_runtime(bundle, b, threads=threads, precision=p, provider="cpu" if b == "onnxruntime" else None)
           for b, p in CONFIGS}
    torch.set_num_threads(threads)
    feed = {g: feeds[g][len(feeds[g]) // 2] for g in GRAPHS}  # a feed from mid-utterance
    times: dict[str, dict[str, list[float]]] = {lab: {g: [] for g in GRAPHS} for lab in rts}
    for backend in dict.fromkeys(b for b, _ in CONFIGS):  # one backend at a time: PyTorch's idle OpenMP workers spin and would slow ONNX Runtime
        same = {lab: rt for lab, rt in rts.items() if rt.backend == backend}
        for g in GRAPHS:
            for i in range(warmup + repeats):
                for lab, rt in same.items():
                    t0 = time.perf_counter()
                    rt[g].infer(feed[g])
                    if i >= warmup:
                        times[lab][g].append((time.perf_counter() - t0) * 1e3)
    out: dict[str, Any] = {"threads": threads, "repeats": repeats, "interleaved": "call by call among the precisions of one backend",
                           "load_average": [round(x, 2) for x in os.getloadavg()], "configs": {}}
    steps = bundle.steps
    for lab, rt in rts.items():
        ms = {g: round(float(np.median(v)), 3) for g, v in times[lab].items()}
        p90 = {g: round(float(np.percentile(v, 90)), 3) for g, v in times[lab].items()}
        frame = ms["warp"] + steps * ms["denoiser"] + ms["decoder"]
        out["configs"][lab] = {"graph_precision": {g: rt[g].precision for g in GRAPHS}, "ms_per_call": ms, "p90_ms_per_call": p90,
                               "ms_per_frame": round(frame, 2)}
    ref = out["configs"][_label("onnxruntime", "fp32")]
    for lab, c in out["configs"].items():
        c["speedup_vs_onnxruntime_fp32"] = {g: round(ref["ms_per_call"][g] / c["ms_per_call"][g], 2) for g in ("denoiser", "decoder")}
        c["speedup_vs_onnxruntime_fp32"]["frame"] = round(ref["ms_per_frame"] / c["ms_per_frame"], 2)
    return out


def demo_quality(bundle: Any, *, frames: int, lpips: Any) -> tuple[dict, dict[str, list[dict[str, np.ndarray]]]]:
    """Every configuration renders ``frames`` demo frames; ST-LPIPS of its patches against ONNX Runtime fp32's.
    Also returns the feeds the fp32 graphs received (for timing on real inputs)."""
    import torch

    from engine.runtime import load_runtime
    from export.quantize import render_demo

    patches: dict[str, np.ndarray] = {}
    images: dict[str, np.ndarray] = {}
    feeds: dict[str, list] = {}
    for b, p in CONFIGS:
        rt = load_runtime(bundle, b, threads=1, precision=p, provider="cpu" if b == "onnxruntime" else None)
        imgs, f, o = render_demo(rt, frames=frames, record=GRAPHS)
        if (b, p) == ("onnxruntime", "fp32"):
            feeds = f
        patches[_label(b, p)] = np.clip(np.stack([y["image"][0] for y in o["decoder"]]), -1, 1)  # (F, 3, P, P)
        images[_label(b, p)] = imgs.astype(np.int16)
    ref = _label("onnxruntime", "fp32")
    out: dict[str, Any] = {"frames": frames, "reference": ref, "configs": {}}
    for lab in patches:
        with torch.no_grad():
            d = torch.cat([lpips(torch.from_numpy(patches[lab][i:i + 25]), torch.from_numpy(patches[ref][i:i + 25]))
                           for i in range(0, frames, 25)]).flatten().numpy()
        pix = np.abs(images[lab] - images[ref])
        out["configs"][lab] = {"lpips_patch_vs_reference_mean": round(float(d.mean()), 5), "lpips_patch_vs_reference_max": round(float(d.max()), 5),
                               "patch_mean_abs_diff_grey": round(float(np.abs(patches[lab] - patches[ref]).mean() * 127.5), 4),
                               "frame_max_abs_pixel_diff": int(pix.max())}
    return out, feeds


def eval_quality(bundle: Any, data: list[str], *, max_frames: int) -> dict:
    """``evaluate_selfrecon`` with each configuration; LPIPS and its relative change against fp32 on the same backend."""
    from engine.eval.selfrecon import evaluate_selfrecon
    from engine.runtime import default_precision

    out: dict[str, Any] = {"data": data, "max_frames": max_frames, "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for b, p in CONFIGS:
            t0 = time.perf_counter()
            with default_precision(p):
                rep = evaluate_selfrecon(bundle, data, Path(tmp) / f"{b}_{p}", max_frames=max_frames, backend=b, threads=1,
                                         cross_identity=False, drift_seconds=0.0)
            ours = rep["summary"]["ours"]
            out["configs"][_label(b, p)] = {
                "runtime": rep["runtime"]["ours"] if "ours" in rep["runtime"] else rep["runtime"],
                "lpips_lower_face": ours.get("lpips_lower_face"), "lpips_full": ours.get("lpips_full"),
                "ssim_lower_face": ours.get("ssim_lower_face"), "psnr_lower_face_db": ours.get("psnr_lower_face_db"),
                "lip_landmark_error_px": ours.get("lip_landmark_error_px"),
                "segments_lpips_lower_face": {s["segment"]: s["ours"].get("lpips_lower_face") for s in rep["segments"]},
                "wall_s": round(time.perf_counter() - t0, 1)}
    for b, p in CONFIGS:
        if p == "fp32":
            continue
        c, ref = out["configs"][_label(b, p)], out["configs"][_label(b, "fp32")]
        for k in ("lpips_lower_face", "lpips_full"):
            if c.get(k) is not None and ref.get(k):
                c[f"{k}_relative_change"] = round((c[k] - ref[k]) / ref[k], 5)
        c["meets_tolerance"] = all(abs(c.get(f"{k}_relative_change", np.inf)) <= TOLERANCE for k in ("lpips_lower_face", "lpips_full")
                                   if ref.get(k))
    return out


def measure(out: str | Path, *, bundle: str | None = None, data: list[str] | None = None, demo_frames: int = 100, max_frames: int = 30,
            threads: tuple[int, ...] = (1, 2), parts: tuple[str, ...] = ("demo", "speed", "eval")) -> dict:
    from engine.bundle import load_bundle
    from engine.eval.lpips import LPIPS

    b = load_bundle(bundle)
    if "int8" not in b.graph_variants:
        raise ValueError(f"{b.path}: no int8 graphs: export the bundle first (avatar export --bundle {b.path} --out DIR)")
    t0 = time.perf_counter()
    lp = LPIPS()
    from engine.bundle import sha256_file

    report: dict[str, Any] = {"format": "avatar-precision/1", "bundle": str(b.path), "bundle_manifest_sha256": sha256_file(b.path / "manifest.json"),
                              "steps": b.steps, "tolerance_relative_lpips": TOLERANCE,
                              "machine": machine_info(1), "int8_export": (b.manifest.get("export") or {}).get("int8")}
    demo, feeds = demo_quality(b, frames=demo_frames, lpips=lp)
    if "demo" in parts:
        report["demo"] = demo
    if "speed" in parts:
        report["speed"] = {str(n): speed(b, feeds, threads=n) for n in threads}
    if data and "eval" in parts:
        report["eval"] = eval_quality(b, list(data), max_frames=max_frames)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON report")
    ap.add_argument("--bundle", help="an exported bundle with int8 graphs (default: the shipped bundle)")
    ap.add_argument("--data", nargs="+", help="folders written by `avatar prepare` with held-out clips (default: no evaluation)")
    ap.add_argument("--demo-frames", type=int, default=100)
    ap.add_argument("--max-frames", type=int, default=30, help="frames per held-out segment")
    ap.add_argument("--parts", nargs="+", default=["demo", "speed", "eval"], choices=("demo", "speed", "eval"))
    a = ap.parse_args(argv)
    r = measure(a.out, bundle=a.bundle, data=a.data, demo_frames=a.demo_frames, max_frames=a.max_frames, parts=tuple(a.parts))
    for n, sp in r.get("speed", {}).items():
        for lab, c in sp["configs"].items():
            print(f"{n} thread(s) {lab}: denoiser {c['ms_per_call']['denoiser']} ms, decoder {c['ms_per_call']['decoder']} ms, "
                  f"frame {c['ms_per_frame']} ms (x{c['speedup_vs_onnxruntime_fp32']['frame']} vs onnxruntime/fp32)")
    for lab, c in r.get("demo", {}).get("configs", {}).items():
        print(f"demo {lab}: LPIPS vs {r['demo']['reference']} {c['lpips_patch_vs_reference_mean']}")
    for lab, c in r.get("eval", {}).get("configs", {}).items():
        print(f"eval {lab}: LPIPS lower face {c['lpips_lower_face']:.5f}, full {c['lpips_full']:.5f}"
              + (f", change {100 * c['lpips_lower_face_relative_change']:+.2f}% / {100 * c['lpips_full_relative_change']:+.2f}%, "
                 f"meets the 1% tolerance: {c['meets_tolerance']}" if "meets_tolerance" in c else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
