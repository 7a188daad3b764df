"""``avatar bench models``: every graph of a bundle on every backend and precision available here.

For each graph (``export/specs.py``) at batch 1 — the audio encoder and A2L at T = 1 (a streaming
call), the audio encoder also at T = 25 (one second) — and each (backend, precision) this machine
and bundle offer (PyTorch fp32 and bf16, ONNX Runtime fp32 and int8; a reduced precision only for
the graphs it changes), ``Graph.infer`` is called ``repeats`` times after a warm-up: median and
p90 ms per call (numpy in and out included: what the generator pays).

Work per call is counted from the fp32 ONNX graph: the model's inputs are given concrete shapes,
shape inference fills in every tensor's shape (ONNX Runtime's symbolic shape inference, which
resolves the exporter's Shape/Reshape chains; ``onnx.shape_inference`` without ONNX Runtime), and
the multiply-accumulates of Conv, ConvTranspose, Gemm, MatMul, Einsum, GRU and LSTM nodes are
counted twice (GFLOP; elementwise operators, normalisations, softmax and grid sampling are not
counted). The same count serves every precision (an int8 graph does the same arithmetic). Where
the bundle has PyTorch weights, ``torch.utils.flop_counter.FlopCounterMode`` counts the module
too, as a cross-check (the two agree on every graph of the default bundle).

Achieved GFLOP/s is that count over the median time, and "% of peak" compares it with this CPU's
peak for the precision, measured in the same run at the same thread count: a large fp32 sgemm
(``torch.mm``), a bf16 ``torch.mm`` and an int8 ``torch._int_mm``. Small graphs are far below
peak: per-call overhead and memory-bound operators dominate them.

The per-frame cost per backend/precision is warp + steps x denoiser + decoder (the generator's
frame). It writes JSON and a bar chart (PNG) beside it.

    avatar bench models --out docs/benchmarks/models.json [--bundle B] [--threads N] [--repeats N]
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping

import numpy as np

FORMAT = "avatar-bench-models/1"
CALLS = (("encoder", {}), ("decoder", {}), ("audio_encoder", {"T": 1}), ("audio_encoder", {"T": 25}), ("a2l", {"T": 1}),
         ("denoiser", {}), ("warp", {}))  # (graph, dynamic sizes besides B = 1)
FRAME_GRAPHS = ("warp", "denoiser", "decoder")


# -- timing --
def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 5) -> dict[str, float]:
    """``fn()`` ``warmup`` times, then ``repeats`` timed calls: median, p90, min and mean in ms."""
    for _ in range(warmup):
        fn()
    ts = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts[i] = time.perf_counter() - t0
    ts *= 1e3
    return {"median_ms": round(float(np.median(ts)), 4), "p90_ms": round(float(np.percentile(ts, 90)), 4),
            "min_ms": round(float(ts.min()), 4), "mean_ms": round(float(ts.mean()), 4), "repeats": repeats}


# -- work per call --
def _dims(t: Any) -> list[int] | None:
    if not t.type.HasField("tensor_type") or not t.type.tensor_type.HasField("shape"):
        return None
    d = [x.dim_value if x.HasField("dim_value") else None for x in t.type.tensor_type.shape.dim]
    return None if any(v is None for v in d) else d


def onnx_gflop(path: str | Path, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """GFLOP of one call of the ONNX graph at ``input_shapes`` (2 x the multiply-accumulates of its
    Conv / ConvTranspose / Gemm / MatMul / Einsum / GRU / LSTM nodes), per operator type, and the
    nodes of those types whose shapes could not be inferred (not counted)."""
    import onnx

    model = onnx.load(str(path))
    for inp in model.graph.input:
        if inp.name in input_shapes:
            shape = inp.type.tensor_type.shape
            shape.ClearField("dim")
            for v in input_shapes[inp.name]:
                shape.dim.add().dim_value = int(v)
    model = _infer_shapes(model)
    shapes: dict[str, list[int]] = {i.name: list(i.dims) for i in model.graph.initializer}
    for t in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        d = _dims(t)
        if d is not None:
            shapes[t.name] = d
    by_op: dict[str, float] = {}
    uncounted: list[str] = []
    for node in model.graph.node:
        try:
            flops = _node_flops(node, shapes)
        except KeyError:  # a shape shape inference could not fill in
            uncounted.append(f"{node.op_type} {node.name}")
            continue
        if flops:
            by_op[node.op_type] = by_op.get(node.op_type, 0.0) + flops
    return {"gflop": round(sum(by_op.values()) / 1e9, 9), "by_op_gflop": {k: round(v / 1e9, 9) for k, v in sorted(by_op.items())},
            "uncounted_nodes": uncounted}


def _infer_shapes(model: Any) -> Any:
    """Every tensor's shape: ONNX Runtime's symbolic shape inference, which follows shapes through the
    Shape/Gather/Concat/Reshape chains the exporter writes; ``onnx.shape_inference`` (data propagation on)
    where ONNX Runtime is not installed (it leaves some of those chains unresolved: see ``uncounted_nodes``)."""
    import onnx

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    return SymbolicShapeInference.infer_shapes(model, auto_merge=True)


def _node_flops(node: Any, shapes: Mapping[str, list[int]]) -> float:
    """2 x multiply-accumulates of one node (0 for operators that are not counted). KeyError: a shape is unknown."""
    op = node.op_type
    attrs = {a.name: a for a in node.attribute}
    if op == "Conv":  # W (M, C/g, k...), Y (N, M, out...)
        w, y = shapes[node.input[1]], shapes[node.output[0]]
        return 2.0 * y[0] * y[1] * float(np.prod(y[2:])) * float(np.prod(w[1:]))
    if op == "ConvTranspose":  # X (N, C, in...), W (C, M/g, k...)
        x, w = shapes[node.input[0]], shapes[node.input[1]]
        return 2.0 * x[0] * x[1] * float(np.prod(x[2:])) * float(np.prod(w[1:]))
    if op == "Gemm":  # A (M, K) or transposed, Y (M, N)
        a, y = shapes[node.input[0]], shapes[node.output[0]]
        k = a[0] if "transA" in attrs and attrs["transA"].i else a[1]
        return 2.0 * y[0] * y[1] * k
    if op == "MatMul":  # A (..., M, K) @ B (..., K, N) -> Y (..., M, N)
        a, y = shapes[node.input[0]], shapes[node.output[0]]
        return 2.0 * float(np.prod(y)) * a[-1]
    if op == "Einsum":  # every index once: a contraction's multiply-accumulates
        eq = attrs["equation"].s.decode().replace(" ", "")
        lhs = eq.split("->")[0].split(",")
        size: dict[str, int] = {}
        for term, name in zip(lhs, node.input):
            for letter, d in zip(term, shapes[name]):
                size[letter] = max(size.get(letter, 1), d)
        return 2.0 * float(np.prod(list(size.values())))
    if op in ("GRU", "LSTM"):  # X (T, B, I), W (D, G*H, I), R (D, G*H, H): per step and direction, W x + R h
        x, w, r = shapes[node.input[0]], shapes[node.input[1]], shapes[node.input[2]]
        layout = attrs["layout"].i if "layout" in attrs else 0
        t, b = (x[0], x[1]) if layout == 0 else (x[1], x[0])
        return 2.0 * t * b * w[0] * w[1] * (w[2] + r[2])
    return 0.0


def torch_gflop(module: Any, inputs: Mapping[str, Any]) -> float:
    """GFLOP of one forward pass counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        module(*inputs.values())
    return round(counter.get_total_flops() / 1e9, 9)


# -- the CPU's peaks --
def measure_peaks(threads: int, *, seconds: float = 1.0) -> dict[str, dict[str, float]]:
    """GFLOP/s (GOP/s for int8) of large matrix products at ``threads`` threads: fp32 sgemm, bf16 and
    int8 (``torch._int_mm``); the best of a few sizes, each timed for about ``seconds`` / 3."""
    import torch

    torch.set_num_threads(threads)
    out: dict[str, dict[str, float]] = {}
    g = torch.Generator().manual_seed(0)
    for name, dtype, sizes in (("fp32", torch.float32, (1024, 2048)), ("bf16", torch.bfloat16, (1024, 2048)), ("int8", torch.int8, (1024, 2048))):
        best: dict[str, float] = {}
        for n in sizes:
            if dtype == torch.int8:
                a = torch.randint(-64, 64, (n, n), dtype=torch.int8, generator=g)
                b = torch.randint(-64, 64, (n, n), dtype=torch.int8, generator=g)

                def fn(a=a, b=b):
                    return torch._int_mm(a, b)
            else:
                a = torch.randn(n, n, generator=g).to(dtype)
                b = torch.randn(n, n, generator=g).to(dtype)

                def fn(a=a, b=b):
                    return torch.mm(a, b)
            try:
                t0 = time.perf_counter()
                fn()
                once = max(time.perf_counter() - t0, 1e-6)
                r = time_calls(fn, repeats=max(3, min(50, int(seconds / 3 / once))), warmup=2)
            except RuntimeError as e:  # e.g. _int_mm unsupported on this build
                best = best or {"error": f"{type(e).__name__}: {e}"}
                continue
            gflops = 2.0 * n ** 3 / (r["median_ms"] / 1e3) / 1e9
            if gflops > best.get("gflops", 0.0):
                best = {"gflops": round(gflops, 1), "size": n, "median_ms": r["median_ms"]}
        out[name] = best
    return out


# -- the machine --
def machine_info(threads: int) -> dict[str, Any]:
    import onnx
    import torch

    from engine.runtime import default_threads
    from engine.runtime.cpu import cpu_flags, cpu_model

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    flags = cpu_flags()
    return {"cpu_model": cpu_model(), "logical_cpus": os.cpu_count(), "cores_available": default_threads(), "threads": threads,
            "flags": sorted(f for f in flags if f.startswith(("amx", "avx512")) or f in ("avx2", "avx_vnni", "fma", "f16c")),
            "load_average": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform(), "python": platform.python_version(),
            "versions": {"torch": torch.__version__, "onnxruntime": ort_version, "onnx": onnx.__version__, "numpy": np.__version__},
            "torch_mkldnn": bool(torch.backends.mkldnn.is_available())}


# -- the benchmark --
def _configs(bundle: Any) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(backend, precision) pairs to run here, and the ones skipped with why."""
    from engine.runtime.cpu import fast_precision

    run, skipped = [], {}
    if bundle.models:
        run.append(("torch", "fp32"))
        if fast_precision("bf16"):
            run.append(("torch", "bf16"))
        else:
            skipped["torch/bf16"] = "no avx512_bf16/amx_bf16 on this CPU (PyTorch would emulate bf16)"
    else:
        skipped["torch"] = "the bundle has no PyTorch weights"
    try:
        import onnxruntime  # noqa: F401

        has_ort = True
    except ImportError:
        has_ort = False
        skipped["onnxruntime"] = "onnxruntime is not installed"
    if has_ort and bundle.graphs:
        run.append(("onnxruntime", "fp32"))
        if "int8" in bundle.graph_variants:
            run.append(("onnxruntime", "int8"))
        else:
            skipped["onnxruntime/int8"] = "the bundle has no int8 graphs (avatar export writes them)"
    elif has_ort:
        skipped["onnxruntime"] = "the bundle has no exported graphs (avatar export)"
    from engine.runtime.tensorrt import tensorrt_available

    ok, why = tensorrt_available()
    skipped["tensorrt"] = "not benchmarked by this CPU benchmark" if ok else why
    return run, skipped


def _call_id(graph: str, sizes: Mapping[str, int]) -> str:
    return graph + "".join(f"[{k}={v}]" for k, v in sizes.items())


def bench_models(out: str | Path, *, bundle: Any = None, threads: int | None = None, repeats: int = 50, warmup: int = 5,
                 plot: bool = True) -> dict:
    """Run the benchmark of the module docstring; write ``out`` (JSON) and ``out`` with .png (the chart). Returns the report."""
    import torch

    from engine.bundle import Bundle, load_bundle
    from engine.runtime import default_threads, graph_config, load_runtime
    from export.specs import spec_by_name

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    threads = int(threads or default_threads())
    out = Path(out)
    t_start = time.perf_counter()
    report: dict[str, Any] = {"format": FORMAT, "bundle": str(b.path), "steps": b.steps, "machine": machine_info(threads)}
    report["peaks"] = measure_peaks(threads)
    configs, skipped = _configs(b)
    report["skipped"] = skipped

    # inputs and work per call (the same for every backend and precision)
    calls: dict[str, dict[str, Any]] = {}
    for graph, sizes in CALLS:
        spec = spec_by_name(graph)
        holder = SimpleNamespace(config=graph_config(spec, b.configs))
        inputs = spec.sample_inputs(holder, {"B": 1, **sizes})
        entry: dict[str, Any] = {"graph": graph, "sizes": {"B": 1, **sizes}, "input_shapes": {k: list(v.shape) for k, v in inputs.items()},
                                 "feed": {k: v.numpy() for k, v in inputs.items()}}
        if graph in b.graphs:
            entry["flops"] = {"method": "fp32 ONNX graph at these input shapes, shape inference, 2 x MACs of Conv/Gemm/MatMul/Einsum/GRU/LSTM",
                              **onnx_gflop(b.path / b.graphs[graph], {k: tuple(v.shape) for k, v in inputs.items()})}
        if spec.role in b.models:
            torch_count = torch_gflop(spec.module_for(b.models[spec.role]), inputs)
            entry.setdefault("flops", {"method": "torch FlopCounterMode (matmuls and convolutions)", "gflop": torch_count})
            entry["flops"]["torch_flop_counter_gflop"] = torch_count
        calls[_call_id(graph, sizes)] = entry

    # time every call on every (backend, precision) where the graph runs at that precision
    results: list[dict[str, Any]] = []
    for backend, precision in configs:
        rt = load_runtime(b, backend, threads=threads, precision=precision, provider="cpu" if backend == "onnxruntime" else None)
        for cid, entry in calls.items():
            g = rt[entry["graph"]]
            if g.precision != precision:
                continue  # this precision leaves the graph in fp32: measured under fp32
            feed = entry["feed"]
            r = time_calls(lambda: g.infer(feed), repeats=repeats, warmup=warmup)
            row = {"call": cid, "graph": entry["graph"], "sizes": entry["sizes"], "backend": backend, "precision": precision, **r}
            gflop = entry.get("flops", {}).get("gflop")
            if gflop:
                row["gflop"] = gflop
                row["gflops_achieved"] = round(gflop / (r["median_ms"] / 1e3), 2)
                peak = report["peaks"].get(precision, {}).get("gflops")
                if peak:
                    row["percent_of_peak"] = round(100.0 * row["gflops_achieved"] / peak, 2)
            results.append(row)
        del rt
    torch.set_num_threads(threads)
    report["calls"] = {cid: {k: v for k, v in e.items() if k != "feed"} for cid, e in calls.items()}
    report["results"] = results
    report["per_frame"] = per_frame(results, b.steps)
    report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    if plot:
        plot_report(report, out.with_suffix(".png"))
    return report


def per_frame(results: list[dict[str, Any]], steps: int) -> dict[str, dict[str, float]]:
    """backend/precision -> ms per frame: warp + steps x denoiser + decoder (medians; a graph a precision
    leaves in fp32 counts at the same backend's fp32 time)."""
    med = {(r["backend"], r["precision"], r["call"]): r["median_ms"] for r in results}
    out: dict[str, dict[str, float]] = {}
    for backend, precision in sorted({(r["backend"], r["precision"]) for r in results}):
        parts = {}
        for g in FRAME_GRAPHS:
            ms = med.get((backend, precision, g), med.get((backend, "fp32", g)))
            if ms is None:
                break
            parts[g] = ms * (steps if g == "denoiser" else 1)
        else:
            out[f"{backend}/{precision}"] = {"warp_ms": round(parts["warp"], 3), f"denoiser_x{steps}_ms": round(parts["denoiser"], 3),
                                             "decoder_ms": round(parts["decoder"], 3), "total_ms": round(sum(parts.values()), 3),
                                             "frames_per_s": round(1e3 / sum(parts.values()), 1)}
    return out


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """Two panels: median ms per call (p90 as a whisker) for every graph and backend/precision; the per-frame cost, stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    labels = sorted({f"{r['backend']}/{r['precision']}" for r in results})
    calls = list(dict.fromkeys(r["call"] for r in results))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / max(len(labels), 1)
    for i, lab in enumerate(labels):
        rows = {r["call"]: r for r in results if f"{r['backend']}/{r['precision']}" == lab}
        xs = [j + (i - (len(labels) - 1) / 2) * width for j, c in enumerate(calls) if c in rows]
        med = [rows[c]["median_ms"] for c in calls if c in rows]
        p90 = [rows[c]["p90_ms"] - rows[c]["median_ms"] for c in calls if c in rows]
        ax1.bar(xs, med, width, yerr=[[0] * len(p90), p90], capsize=2, label=lab)
    ax1.set_xticks(range(len(calls)))
    ax1.set_xticklabels(calls, rotation=20, ha="right", fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("ms per call (median; whisker: p90), log scale")
    m = report["machine"]
    ax1.set_title(f"graphs at batch 1, {m['threads']} thread(s), {m['cpu_model']}", fontsize=9)
    ax1.legend(fontsize=8)
    pf = report["per_frame"]
    names = list(pf)
    bottom = np.zeros(len(names))
    for key in ("warp_ms", f"denoiser_x{report['steps']}_ms", "decoder_ms"):
        vals = np.array([pf[n][key] for n in names])
        ax2.bar(names, vals, bottom=bottom, label=key.removesuffix("_ms"))
        bottom += vals
    for x, tot in enumerate(bottom):
        ax2.text(x, tot, f"{tot:.1f}", ha="center", va="bottom", fontsize=8)
    ax2.set_ylabel("ms per frame")
    ax2.set_title(f"per frame: warp + {report['steps']} x denoiser + decoder", fontsize=9)
    ax2.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--bundle")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--repeats", type=int, default=50)
    a = ap.parse_args(argv)
    r = bench_models(a.out, bundle=a.bundle, threads=a.threads, repeats=a.repeats)
    print(summary(r))
    return 0


def summary(r: dict[str, Any]) -> str:
    """A few lines for the terminal: the peaks and the per-frame cost of each backend/precision."""
    peaks = ", ".join(f"{k} {v['gflops']:.0f}" for k, v in r["peaks"].items() if "gflops" in v)
    lines = [f"{r['machine']['cpu_model']}, {r['machine']['threads']} thread(s); peak GFLOP/s: {peaks}"]
    den = f"denoiser_x{r['steps']}_ms"
    for name, f in r["per_frame"].items():
        lines.append(f"{name}: {f['total_ms']:.1f} ms per frame ({f['frames_per_s']} frames/s): warp {f['warp_ms']:.2f}, "
                     f"denoiser x{r['steps']} {f[den]:.1f}, decoder {f['decoder_ms']:.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
