"""Runtimes behind one interface: ``load_runtime(bundle, backend)`` gives every graph of a
bundle as a ``Graph`` (``infer(feed) -> outputs``), run by PyTorch, ONNX Runtime or TensorRT.

The backend is chosen here, once; everything above (generator, pipeline, server) calls
``runtime["denoiser"].infer({...})`` and never asks which backend it is. The graphs and their
I/O contract are those of ``export/specs.py`` (the one place that names them).

``auto`` picks ONNX Runtime when the bundle carries exported graphs (with the CUDA execution
provider where ONNX Runtime has one, else the CPU), otherwise PyTorch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from engine.bundle import Bundle, load_bundle
from engine.runtime.base import BACKENDS, BackendUnavailable, Graph, RuntimeLoadError

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

    def __getitem__(self, name: str) -> Graph:
        try:
            return self.graphs[name]
        except KeyError:
            raise KeyError(f"no graph {name!r} in this runtime (have {sorted(self.graphs)})") from None

    def describe(self) -> dict:
        return {"backend": self.backend, "provider": self.provider, "threads": self.threads, "bundle": str(self.bundle.path),
                "graphs": {n: g.precision for n, g in self.graphs.items()}}


def _specs() -> list:
    from export.specs import SPECS

    return [s for s in SPECS if s.role != "sync"]


def load_runtime(bundle: Bundle | str | None = None, backend: str = "auto", *, threads: int | None = None, provider: str | None = None,
                 device: str = "cpu", cache_dir: str | None = None) -> Runtime:
    """Load every render graph of ``bundle`` on ``backend`` (auto | torch | onnxruntime | tensorrt)."""
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

        torch.set_num_threads(threads)
        missing = sorted({s.role for s in specs} - set(b.models))
        if missing:
            raise RuntimeLoadError(f"{b.path}: no PyTorch weights (.pt) for {missing}: use --backend onnxruntime with this bundle")
        for s in specs:
            module = s.module_for(b.models[s.role])
            from engine.runtime.pytorch import TorchGraph

            rt.graphs[s.name] = TorchGraph(s.name, module, s.input_names, s.output_names, device=device)
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
        for s in specs:
            holder = SimpleNamespace(config=graph_config(s, b.configs))
            dims = s.dims(holder)
            inputs = {t.name: (tuple(None if isinstance(d, str) and d in s.profile else (dims[d] if isinstance(d, str) else d) for d in t.shape),
                               _ONNX_TYPES[str(t.dtype).removeprefix("torch.")]) for t in s.inputs}
            rt.graphs[s.name] = OrtGraph(b.path / b.graphs[s.name], name=s.name, inputs=inputs, outputs=s.output_names,
                                         provider=provider, threads=threads, cache_dir=cache_dir)
        return rt
    from engine.runtime.tensorrt import TensorRTGraph

    rt.provider = "tensorrt"
    for s in specs:
        holder = SimpleNamespace(config=graph_config(s, b.configs))
        rt.graphs[s.name] = TensorRTGraph(b.path / b.graphs[s.name], name=s.name, input_names=s.input_names, output_names=s.output_names,
                                          profile=s.trt_shapes(holder), cache_dir=cache_dir)
    return rt


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["BACKENDS", "BackendUnavailable", "Graph", "Runtime", "RuntimeLoadError", "default_threads", "load_runtime"]
