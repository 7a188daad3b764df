"""The ONNX Runtime backend: one InferenceSession per exported graph.

Execution providers, chosen once at load: ``cpu`` (CPUExecutionProvider, graph optimisation
ALL, intra-op threads pinned: FACTS.md measured oversubscription costing 2-100x), ``cuda``
(CUDAExecutionProvider, inputs and outputs bound with IO binding so each call makes one copy
in and one out), ``tensorrt`` (TensorrtExecutionProvider with fp16 and an engine cache, CUDA and
CPU as fallbacks). Loading checks the file's inputs and outputs against the graph's spec
(names, dtypes, static sizes) and names the file on any mismatch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from engine.runtime.base import BackendUnavailable, GraphIO, RuntimeLoadError, check_feed

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def available_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


class OrtGraph(GraphIO):
    """One ``.onnx`` file run by ONNX Runtime."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, *, name: str, inputs: Mapping[str, tuple[tuple[int | None, ...], str]],
                 outputs: list[str], provider: str = "cpu", threads: int = 1, precision: str = "fp32",
                 cache_dir: str | Path | None = None):
        """``inputs``: name -> (shape with None for dynamic axes, ONNX type such as "tensor(float)"),
        from the spec; ``outputs``: the spec's output names."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed (pip install '.[cpu]', or '.[gpu]' on NVIDIA machines)") from None
        path = Path(path)
        if not path.is_file():
            raise RuntimeLoadError(f"{path}: graph file missing")
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, got {provider!r}")
        if PROVIDERS[provider] not in ort.get_available_providers():
            raise BackendUnavailable(f"{path}: ONNX Runtime here has no {PROVIDERS[provider]} (available: {ort.get_available_providers()})")
        self.name, self.path, self.provider, self.precision = name, path, provider, precision
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = max(1, int(threads))
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        # no busy-waiting between calls: spinning intra-op threads take the cores the rest of the
        # frame (numpy compositing, the video encoder, the event loop) needs
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = [PROVIDERS[provider]]
        if provider == "tensorrt":
            cache = Path(cache_dir or os.environ.get("AVATAR_CACHE_DIR", Path.home() / ".cache" / "avatar-engine")) / "ort-tensorrt"
            cache.mkdir(parents=True, exist_ok=True)
            providers = [("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                                        "trt_engine_cache_path": str(cache)}), "CUDAExecutionProvider"]
        if provider != "cpu":
            providers.append("CPUExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # onnxruntime's own exception classes (InvalidProtobuf, Fail, ...)
            raise RuntimeLoadError(f"{path}: ONNX Runtime cannot load it: {type(e).__name__}: {e}") from None
        self._check_io(inputs, outputs)
        self._inputs, self._outputs = list(inputs), list(outputs)
        self._binding = self.session.io_binding() if provider != "cpu" else None

    def _check_io(self, inputs: Mapping[str, tuple[tuple[int | None, ...], str]], outputs: list[str]) -> None:
        got = {i.name: i for i in self.session.get_inputs()}
        if sorted(got) != sorted(inputs):
            raise RuntimeLoadError(f"{self.path}: inputs {sorted(got)} do not match the {self.name} spec {sorted(inputs)}")
        for n, (shape, dtype) in inputs.items():
            g = got[n]
            if g.type != dtype:
                raise RuntimeLoadError(f"{self.path}: input {n!r} has type {g.type}, the {self.name} spec says {dtype}")
            if len(g.shape) != len(shape) or any(w is not None and isinstance(d, int) and d != w for d, w in zip(g.shape, shape)):
                raise RuntimeLoadError(f"{self.path}: input {n!r} has shape {g.shape}, the {self.name} spec says {list(shape)} (None: dynamic)")
        have_out = [o.name for o in self.session.get_outputs()]
        if sorted(have_out) != sorted(outputs):
            raise RuntimeLoadError(f"{self.path}: outputs {have_out} do not match the {self.name} spec {outputs}")

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feed(self.name, self._inputs, feed)
        if self._binding is None:
            ys = self.session.run(self._outputs, {n: np.ascontiguousarray(feed[n]) for n in self._inputs})
            return dict(zip(self._outputs, ys))
        b = self._binding  # GPU: inputs copied once to the device, outputs left there until the one copy back
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for n in self._inputs:
            b.bind_cpu_input(n, np.ascontiguousarray(feed[n]))
        for n in self._outputs:
            b.bind_output(n, "cuda")
        self.session.run_with_iobinding(b)
        return dict(zip(self._outputs, b.copy_outputs_to_cpu()))
