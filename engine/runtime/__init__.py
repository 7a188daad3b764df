"""Runtimes behind one interface: ``load_runtime(bundle, backend)`` gives every graph of a
bundle as a ``Graph`` (``infer(feed) -> outputs``), run by PyTorch, ONNX Runtime or TensorRT.

The backend is chosen here, once; everything above (generator, pipeline, server) calls
``runtime["denoiser"].infer({...})`` and never asks which backend it is. The graphs and their
I/O contract are those of ``export/specs.py`` (the one place that names them).

``auto`` picks ONNX Runtime when the bundle carries exported graphs (with the CUDA execution
provider where ONNX Runtime has one, else the CPU), otherwise PyTorch.

Precision, chosen once at load like the backend (``precision=``, else ``$AVATAR_PRECISION``, else
``auto``): ``fp32``; ``int8`` (ONNX Runtime on the CPU: the bundle's static-QDQ variants of the
graphs that dominate a frame, ``manifest["graph_variants"]["int8"]``); ``bf16`` (PyTorch: bf16
copies of the denoiser and the decoder); ``fp16`` (TensorRT's engines). Graphs without a variant
run in fp32; ``Runtime.describe()`` names each graph's precision. ``auto`` takes the precision of
``AUTO_PRECISION`` for the backend when this CPU has the instructions that make it fast
(``engine.runtime.cpu``) and the bundle has what it needs, else fp32; the choices and their
measured speed and quality are in docs/runtime/precision.json (``python -m benchmarks.precision``).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterator

from engine.bundle import Bundle, load_bundle
from engine.runtime.base import BACKENDS, BackendUnavailable, Graph, RuntimeLoadError
from engine.runtime.cpu import fast_precision

PRECISIONS = ("auto", "fp32", "int8", "bf16", "fp16")
REDUCED_GRAPHS = ("denoiser", "decoder")  # the graphs a reduced precision applies to: per frame, `steps` denoiser calls and one decoder call
# backend -> what ``auto`` runs on a CPU that has the instructions for it. docs/runtime/precision.json: int8 met the 1%
# held-out LPIPS tolerance (-0.04% on the 2-step default bundle, -0.57% on the 4-step teacher) at 1.2-1.4x fp32's speed
# per frame. bf16 met it too (-0.07% and +0.04%) but stays opt-in: the torch backend is the fp32 reference the exported graphs
# are checked against, and bf16 speeds up only its decoder (its denoiser is overhead-bound), still slower than ONNX Runtime.
AUTO_PRECISION = {"onnxruntime": "int8", "torch": "fp32", "tensorrt": "fp16"}

_ONNX_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)", "int32": "tensor(int32)"}


def default_threads() -> int:
    """The cores this process may run on (os.sched_getaffinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def graph_config(spec: Any, configs: dict[str, Any]) -> Any:
    """The config a spec reads its static sizes from (the warp graph's is derived from the autoencoder's)."""
    if spec.name == "warp":
        from export.specs import WarpConfig
        from engine.face.region import warp_indices

        c = configs["autoencoder"]
        return WarpConfig(latent_channels=c.latent_channels, latent_size=c.latent_size, n_points=len(warp_indices()))
    return configs[spec.role]


@dataclass
class Runtime:
    """Every graph of one bundle on one backend."""

    bundle: Bundle
    backend: str  # torch | onnxruntime | tensorrt
    graphs: dict[str, Graph] = field(default_factory=dict)
    provider: str = "cpu"  # onnxruntime: cpu | cuda | tensorrt
    threads: int = 1
    precision: str = "fp32"  # the precision asked for after resolving auto (graphs without a variant run fp32: see graphs' .precision)

    def __getitem__(self, name: str) -> Graph:
        try:
            return self.graphs[name]
        except KeyError:
            raise KeyError(f"no graph {name!r} in this runtime (have {sorted(self.graphs)})") from None

    def describe(self) -> dict:
        return {"backend": self.backend, "provider": self.provider, "threads": self.threads, "bundle": str(self.bundle.path),
                "precision": self.precision, "graphs": {n: g.precision for n, g in self.graphs.items()}}


def _specs() -> list:
    from export.specs import SPECS

    return [s for s in SPECS if s.role != "sync"]


@contextmanager
def default_precision(precision: str | None) -> Iterator[None]:
    """Within the block, ``load_runtime(precision=None)`` runs ``precision`` (by ``$AVATAR_PRECISION``, restored after;
    None: no change). For callers that load a runtime deep inside (``avatar render``, ``avatar eval``)."""
    if precision is None:
        yield
        return
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    before = os.environ.get("AVATAR_PRECISION")
    os.environ["AVATAR_PRECISION"] = precision
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("AVATAR_PRECISION", None)
        else:
            os.environ["AVATAR_PRECISION"] = before


def resolve_precision(precision: str | None, backend: str, bundle: Bundle, *, provider: str = "cpu", device: str = "cpu",
                      flags: frozenset[str] | None = None) -> str:
    """The precision ``load_runtime`` runs: ``precision`` (None: ``$AVATAR_PRECISION``, else auto) checked against
    the backend and the bundle, ``auto`` resolved for this CPU (or ``flags``). ValueError / RuntimeLoadError say why not."""
    precision = precision or os.environ.get("AVATAR_PRECISION") or "auto"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    on_cpu = provider == "cpu" if backend == "onnxruntime" else device == "cpu"
    if precision == "auto":
        want = AUTO_PRECISION.get(backend, "fp32")
        if backend == "tensorrt":
            return want
        usable = on_cpu and fast_precision(want, flags) and (backend != "onnxruntime" or want == "fp32" or want in bundle.graph_variants)
        return want if usable else "fp32"
    allowed = {"torch": ("fp32", "bf16"), "onnxruntime": ("fp32", "int8"), "tensorrt": ("fp32", "fp16")}[backend]
    if precision not in allowed:
        raise ValueError(f"the {backend} backend runs precision {' or '.join(allowed)}, not {precision!r}"
                         + {"int8": " (int8 graphs run on --backend onnxruntime)", "bf16": " (bf16 runs on --backend torch)",
                            "fp16": " (fp16 is TensorRT's)"}.get(precision, ""))
    if backend == "onnxruntime" and precision == "int8":
        if not on_cpu:
            raise ValueError(f"int8 graphs are calibrated and measured for ONNX Runtime's CPU provider, not {provider!r}")
        if "int8" not in bundle.graph_variants:
            raise RuntimeLoadError(f"{bundle.path}: no int8 graphs in this bundle (its manifest has no graph_variants.int8): "
                                   f"re-export it with `avatar export --bundle {bundle.path} --out DIR`")
    return precision


def load_runtime(bundle: Bundle | str | None = None, backend: str = "auto", *, threads: int | None = None, provider: str | None = None,
                 device: str = "cpu", cache_dir: str | None = None, precision: str | None = None) -> Runtime:
    """Load every render graph of ``bundle`` on ``backend`` (auto | torch | onnxruntime | tensorrt) at ``precision``
    (auto | fp32 | int8 | bf16 | fp16; None: ``$AVATAR_PRECISION``, else auto: see the module docstring)."""
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    threads = int(threads or default_threads())
    if backend == "auto":
        backend = "onnxruntime" if b.graphs and _has_onnxruntime() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    specs = _specs()
    rt = Runtime(b, backend, threads=threads)
    if backend == "torch":
        import torch

        rt.precision = resolve_precision(precision, backend, b, device=device)
        torch.set_num_threads(threads)
        missing = sorted({s.role for s in specs} - set(b.models))
        if missing:
            raise RuntimeLoadError(f"{b.path}: no PyTorch weights (.pt) for {missing}: use --backend onnxruntime with this bundle")
        for s in specs:
            module = s.module_for(b.models[s.role])
            from engine.runtime.pytorch import TorchGraph

            rt.graphs[s.name] = TorchGraph(s.name, module, s.input_names, s.output_names, device=device,
                                           precision=rt.precision if s.name in REDUCED_GRAPHS else "fp32")
        return rt
    missing = [s.name for s in specs if s.name not in b.graphs]
    if missing:
        raise RuntimeLoadError(f"{b.path}: no exported graphs for {missing}: run `avatar export --bundle {b.path} --out DIR` "
                               f"and load DIR, or use --backend torch")
    if backend == "onnxruntime":
        from engine.runtime.onnxruntime import OrtGraph, available_providers

        if provider is None:
            provider = "cuda" if "CUDAExecutionProvider" in available_providers() else "cpu"
        rt.provider = provider
        rt.precision = resolve_precision(precision, backend, b, provider=provider)
        variants = b.graph_variants.get(rt.precision, {})
        for s in specs:
            holder = SimpleNamespace(config=graph_config(s, b.configs))
            dims = s.dims(holder)
            inputs = {t.name: (tuple(None if isinstance(d, str) and d in s.profile else (dims[d] if isinstance(d, str) else d) for d in t.shape),
                               _ONNX_TYPES[str(t.dtype).removeprefix("torch.")]) for t in s.inputs}
            fname, graph_precision = (variants[s.name], rt.precision) if s.name in variants else (b.graphs[s.name], "fp32")
            rt.graphs[s.name] = OrtGraph(b.path / fname, name=s.name, inputs=inputs, outputs=s.output_names,
                                         provider=provider, threads=threads, precision=graph_precision, cache_dir=cache_dir)
        return rt
    from engine.runtime.tensorrt import TensorRTGraph

    rt.provider = "tensorrt"
    rt.precision = resolve_precision(precision, backend, b, device="cuda")
    for s in specs:
        holder = SimpleNamespace(config=graph_config(s, b.configs))
        rt.graphs[s.name] = TensorRTGraph(b.path / b.graphs[s.name], name=s.name, input_names=s.input_names, output_names=s.output_names,
                                          profile=s.trt_shapes(holder), cache_dir=cache_dir, fp16=rt.precision == "fp16")
    return rt


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["AUTO_PRECISION", "BACKENDS", "PRECISIONS", "BackendUnavailable", "Graph", "Runtime", "RuntimeLoadError", "default_precision",
           "default_threads", "load_runtime", "resolve_precision"]
