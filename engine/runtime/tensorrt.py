"""The native TensorRT backend: one exported ONNX graph built into a TensorRT 10 engine, cached on disk.

Build: the ONNX file is parsed with TensorRT's ONNX parser into an explicit-batch network and
built with one optimisation profile (input name -> (min, opt, max) shapes, from
``ModelSpec.trt_shapes``), in fp16 (the default) or strict fp32 (TF32 off).

Cache: the serialized engine is stored as ``<cache_dir>/<name>-<key16>.engine``; the key
(:func:`engine_cache_key`) covers everything an engine depends on: the ONNX bytes, the TensorRT
version, the GPU model and compute capability, the precision and the profile. Files are written
atomically; a cached file that does not deserialize is rebuilt with a warning.

Run: device buffers are torch CUDA tensors and work goes to a private torch CUDA stream
(``execute_async_v3``). The first call at new input shapes runs plainly; the next call at the
same shapes captures a CUDA graph, which later calls replay until the shapes change.

Import is free: ``tensorrt`` and CUDA are touched only when a graph is built, so this module
imports (and its pure helpers are tested) on machines without either.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from math import prod
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from engine.bundle import sha256_file
from engine.runtime.base import BackendUnavailable, RuntimeLoadError, check_feed

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
Profile = Mapping[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)
E = TypeVar("E")

CACHE_FORMAT = 1  # bump when the build settings below change, so that old cached engines are not reused
WORKSPACE_BYTES = 1 << 30  # builder workspace pool limit (scratch memory for tactics)
NOT_INSTALLED = "tensorrt is not installed (pip install '.[tensorrt]' on an NVIDIA machine)"
NO_GPU = "no CUDA GPU (torch.cuda.is_available() is False)"


# -- pure helpers (no TensorRT, no GPU) --
def tensorrt_available() -> tuple[bool, str]:
    """(True, "") when TensorRT >= 10 imports and torch sees a CUDA GPU; else (False, why)."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # not installed, or installed without its libraries (libnvonnxparser, ...)
        if isinstance(e, ModuleNotFoundError) and e.name == "tensorrt":
            return False, NOT_INSTALLED
        return False, f"tensorrt does not import ({e}); reinstall with pip install '.[tensorrt]' on an NVIDIA machine"
    version = str(getattr(trt, "__version__", "0"))
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 10:
        return False, f"tensorrt {version} is installed, this backend needs tensorrt>=10"
    import torch

    if not torch.cuda.is_available():
        return False, NO_GPU
    return True, ""


def default_cache_dir() -> Path:
    """``$AVATAR_CACHE_DIR/tensorrt``, else ``~/.cache/avatar-engine/tensorrt``."""
    root = os.environ.get("AVATAR_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "avatar-engine") / "tensorrt"


def engine_cache_key(*, onnx_sha256: str, trt_version: str, gpu_name: str, compute_capability: tuple[int, int],
                     precision: str, profile: Profile) -> str:
    """sha256 (hex) identifying an engine: same key, same engine. The profile's order does not matter."""
    payload = {
        "format": CACHE_FORMAT, "onnx_sha256": onnx_sha256, "tensorrt": trt_version, "gpu": gpu_name,
        "compute_capability": [int(compute_capability[0]), int(compute_capability[1])], "precision": precision,
        "profile": {n: [[int(d) for d in s] for s in profile[n]] for n in sorted(profile)},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def validate_profile(name: str, input_names: Sequence[str], profile: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Check that ``profile`` names every input and nothing else, and that each entry is three shapes of one
    rank with min <= opt <= max in every dimension. Returns it as tuples of ints; raises ValueError naming the graph."""
    missing = [n for n in input_names if n not in profile]
    extra = [n for n in profile if n not in input_names]
    if missing or extra:
        raise ValueError(f"{name}: the TensorRT profile is missing {missing} / names unknown {extra} (inputs: {list(input_names)})")
    out: dict[str, tuple[Shape, Shape, Shape]] = {}
    for n in input_names:
        entry = profile[n]
        if len(entry) != 3:
            raise ValueError(f"{name}.{n}: a profile entry is (min, opt, max) shapes, got {len(entry)} shapes: {entry}")
        mn, opt, mx = (tuple(int(d) for d in s) for s in entry)
        if not len(mn) == len(opt) == len(mx):
            raise ValueError(f"{name}.{n}: min {mn}, opt {opt} and max {mx} must have the same rank")
        if any(d < 0 for d in mn) or not all(a <= b <= c for a, b, c in zip(mn, opt, mx)):
            raise ValueError(f"{name}.{n}: need 0 <= min <= opt <= max in every dimension, got min {mn}, opt {opt}, max {mx}")
        out[n] = (mn, opt, mx)
    return out


def check_shape(name: str, input_name: str, shape: Shape, bounds: tuple[Shape, Shape, Shape]) -> None:
    """ValueError unless ``shape`` lies within the profile's min..max (same rank)."""
    mn, _, mx = bounds
    if len(shape) != len(mn) or not all(a <= s <= b for a, s, b in zip(mn, shape, mx)):
        raise ValueError(f"{name}: input {input_name!r} has shape {tuple(shape)}, outside the TensorRT profile range "
                         f"min {mn} .. max {mx} (rebuild the engine with a wider profile to run it)")


def write_atomic(path: Path, data: Any) -> None:
    """Write ``data`` (bytes-like) to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_build(engine_file: Path, *, name: str, deserialize: Callable[[bytes], E | None], build: Callable[[], bytes]) -> E:
    """The engine cached in ``engine_file`` if it deserializes; else ``build()``, cached atomically, then deserialized.
    An unusable cached file (truncated, another TensorRT build) is rebuilt with a warning; a cache that cannot be
    written only costs a rebuild next time (warning)."""
    if engine_file.is_file():
        try:
            engine, why = deserialize(engine_file.read_bytes()), "TensorRT cannot deserialize it"
        except (OSError, RuntimeError, TypeError, ValueError) as e:
            engine, why = None, f"{type(e).__name__}: {e}"
        if engine is not None:
            log.info("%s: TensorRT engine loaded from %s", name, engine_file)
            return engine
        log.warning("%s: cached TensorRT engine %s is unusable (%s): corrupt or incompatible; rebuilding", name, engine_file, why)
    data = build()
    try:
        write_atomic(engine_file, data)
    except OSError as e:
        log.warning("%s: cannot write the TensorRT engine cache %s (%s); using the engine from memory", name, engine_file, e)
    engine = deserialize(data)
    if engine is None:
        raise RuntimeLoadError(f"{name}: TensorRT cannot deserialize the engine it just built ({engine_file})")
    return engine


def _parser_error(err: Any) -> str:
    """One ONNX parser error as "node <name> (<op>): <description>" (node names are TensorRT >= 10)."""
    node = err.node_name() if hasattr(err, "node_name") else ""
    op = err.node_operator() if hasattr(err, "node_operator") else ""
    return f"node {node or err.node()}" + (f" ({op})" if op else "") + f": {err.desc()}"


# -- the backend --
class TensorRTGraph:
    """One exported graph run by TensorRT on one CUDA device (``Graph`` protocol). ``infer`` is serialized by a lock."""

    backend = "tensorrt"

    def __init__(self, onnx_path: Path | str, *, name: str, input_names: Sequence[str], output_names: Sequence[str],
                 profile: Mapping[str, Sequence[Sequence[int]]], fp16: bool = True, cache_dir: Path | str | None = None,
                 cuda_graphs: bool = True, device: int = 0):
        self.name = name
        self.precision = "fp16" if fp16 else "fp32"
        self.cuda_graphs = cuda_graphs
        self._input_names, self._output_names = list(input_names), list(output_names)
        self.profile = validate_profile(name, self._input_names, profile)
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise RuntimeLoadError(f"{name}: ONNX file not found: {onnx_path}")
        ok, reason = tensorrt_available()
        if not ok:
            raise BackendUnavailable(f"{name}: cannot run {onnx_path} with TensorRT: {reason}")

        import tensorrt as trt
        import torch

        self._trt, self._torch = trt, torch
        self._device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self._logger, "")  # ops the parser maps to plugins, if any
        props = torch.cuda.get_device_properties(self._device)
        key = engine_cache_key(onnx_sha256=sha256_file(onnx_path), trt_version=trt.__version__, gpu_name=props.name,
                               compute_capability=(props.major, props.minor), precision=self.precision, profile=self.profile)
        self.engine_path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{name}-{key[:16]}.engine"
        with torch.cuda.device(self._device):
            self._runtime = trt.Runtime(self._logger)  # kept alive as long as the engine
            self._engine = load_or_build(self.engine_path, name=name, deserialize=self._runtime.deserialize_cuda_engine,
                                         build=lambda: self._build(onnx_path))
            self._context = self._engine.create_execution_context()
            self._stream = torch.cuda.Stream(device=self._device)
        io = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        ins = [n for n in io if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in io if n not in ins]
        if sorted(ins) != sorted(self._input_names) or sorted(outs) != sorted(self._output_names):
            raise RuntimeLoadError(f"{name}: engine {self.engine_path} has inputs {ins} / outputs {outs}, "
                                   f"the spec says {self._input_names} / {self._output_names}")
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
                  trt.DataType.INT64: torch.int64, trt.DataType.INT8: torch.int8, trt.DataType.UINT8: torch.uint8,
                  trt.DataType.BOOL: torch.bool}
        self._dtypes: dict[str, Any] = {}
        for n in io:
            if self._engine.get_tensor_dtype(n) not in dtypes:
                raise RuntimeLoadError(f"{name}: tensor {n!r} has TensorRT type {self._engine.get_tensor_dtype(n)}, not supported here")
            self._dtypes[n] = dtypes[self._engine.get_tensor_dtype(n)]
        self._capacity: dict[str, tuple[Any, Any]] = {}  # name -> (flat device buffer, flat pinned host buffer), grown on demand
        self._dev: dict[str, Any] = {}  # name -> device view at the current shapes (its address is bound in the context)
        self._host: dict[str, Any] = {}  # name -> pinned host view at the current shapes
        self._shapes: dict[str, Shape] | None = None  # input shapes of the previous call
        self._graph: Any = None  # captured torch.cuda.CUDAGraph for self._shapes
        self._lock = threading.Lock()

    @property
    def input_names(self) -> list[str]:
        return list(self._input_names)

    @property
    def output_names(self) -> list[str]:
        return list(self._output_names)

    def _build(self, onnx_path: Path) -> bytes:
        """Parse the ONNX file and build a serialized engine with this graph's precision and profile."""
        trt = self._trt
        log.warning("%s: building a TensorRT %s engine from %s (minutes for a large model; cached in %s)",
                    self.name, self.precision, onnx_path, self.engine_path.parent)
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # TensorRT 10: every network is explicit batch (the flag is deprecated)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(onnx_path)):
            where = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeLoadError(f"{self.name}: TensorRT cannot parse {onnx_path}: {where or 'no error reported'}")
        net_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
        if sorted(net_inputs) != sorted(self._input_names):
            raise RuntimeLoadError(f"{self.name}: {onnx_path} has inputs {net_inputs}, the spec says {self._input_names}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if self.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        else:
            config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32 (TensorRT enables TF32 by default)
        opt = builder.create_optimization_profile()
        for n, (mn, op, mx) in self.profile.items():
            opt.set_shape(n, mn, op, mx)
        config.add_optimization_profile(opt)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeLoadError(f"{self.name}: TensorRT failed to build an engine from {onnx_path} (see its log above)")
        return bytes(serialized)

    def _bind(self, shapes: dict[str, Shape]) -> None:
        """New input shapes: set them, size the buffers, point TensorRT at them. Drops the captured CUDA graph."""
        torch, ctx = self._torch, self._context
        self._graph, self._shapes = None, None  # nothing valid until every step below succeeds
        for n, s in shapes.items():
            if not ctx.set_input_shape(n, s):
                raise ValueError(f"{self.name}: TensorRT rejected shape {s} for input {n!r}")
        out_shapes = {n: tuple(int(d) for d in ctx.get_tensor_shape(n)) for n in self._output_names}
        if any(d < 0 for s in out_shapes.values() for d in s):
            raise RuntimeError(f"{self.name}: output shapes {out_shapes} are data-dependent, which this backend does not support")
        for n, s in {**shapes, **out_shapes}.items():
            numel = max(prod(s), 1)
            if n not in self._capacity or self._capacity[n][0].numel() < numel:
                self._capacity[n] = (torch.empty(numel, dtype=self._dtypes[n], device=self._device),
                                     torch.empty(numel, dtype=self._dtypes[n], pin_memory=True))
            dev, host = self._capacity[n]
            self._dev[n], self._host[n] = dev[:prod(s)].view(s), host[:prod(s)].view(s)
            if not ctx.set_tensor_address(n, dev.data_ptr()):
                raise RuntimeError(f"{self.name}: TensorRT rejected the buffer address for {n!r}")
        self._shapes = shapes

    def _execute(self) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"{self.name}: TensorRT execution failed (see its log above)")

    def _run(self, same_shapes: bool) -> None:
        """Enqueue the graph on the private stream: plainly after a shape change (TensorRT must run once at new
        shapes before it can be captured), else by replaying a CUDA graph captured at the second call."""
        torch = self._torch
        if not (self.cuda_graphs and same_shapes):
            self._execute()
            return
        if self._graph is None:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                    self._execute()
            except RuntimeError as e:  # e.g. an engine with on-device control flow that cannot be captured
                log.warning("%s: CUDA graph capture failed (%s); running without CUDA graphs", self.name, e)
                self.cuda_graphs = False
                self._execute()
                return
            self._graph = graph
        self._graph.replay()  # on the current stream: self._stream (see infer)

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy ``feed`` to the GPU, run, return the outputs as float32 numpy arrays owned by the caller."""
        check_feed(self.name, self._input_names, feed)
        arrays = {n: np.asarray(feed[n]) for n in self._input_names}
        shapes = {n: tuple(int(d) for d in a.shape) for n, a in arrays.items()}
        for n in self._input_names:
            check_shape(self.name, n, shapes[n], self.profile[n])
        torch = self._torch
        with self._lock, torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            same = shapes == self._shapes
            if not same:
                self._bind(shapes)
            for n in self._input_names:
                self._host[n].numpy()[...] = arrays[n]  # casts to the engine's input type
                self._dev[n].copy_(self._host[n], non_blocking=True)
            self._run(same)
            for n in self._output_names:
                self._host[n].copy_(self._dev[n], non_blocking=True)
            self._stream.synchronize()
            return {n: self._host[n].numpy().astype(np.float32) for n in self._output_names}  # astype copies
