"""The TensorRT backend: cache keys, profile checks, cache files and availability on any machine;
engine build and inference against ONNX Runtime on an NVIDIA GPU only (``gpu`` marker)."""
from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from engine.runtime.base import BackendUnavailable, RuntimeLoadError
from engine.runtime.tensorrt import (
    NO_GPU,
    NOT_INSTALLED,
    TensorRTGraph,
    check_shape,
    default_cache_dir,
    engine_cache_key,
    load_or_build,
    tensorrt_available,
    validate_profile,
    write_atomic,
)

PROFILE = {"x": ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8)), "scale": ((1,), (2,), (4,))}
KEY_ARGS = dict(onnx_sha256="ab" * 32, trt_version="10.3.0", gpu_name="NVIDIA A10G", compute_capability=(8, 6),
                precision="fp16", profile=PROFILE)


# -- cache key --
def test_cache_key_is_stable_and_ignores_profile_order() -> None:
    key = engine_cache_key(**KEY_ARGS)
    assert len(key) == 64 and key == engine_cache_key(**KEY_ARGS)
    reordered = {"scale": PROFILE["scale"], "x": tuple(list(s) for s in PROFILE["x"])}  # other order, lists not tuples
    assert engine_cache_key(**{**KEY_ARGS, "profile": reordered}) == key


@pytest.mark.parametrize("change", [
    {"onnx_sha256": "cd" * 32},
    {"trt_version": "10.4.0"},
    {"gpu_name": "NVIDIA L4"},
    {"compute_capability": (8, 9)},
    {"precision": "fp32"},
    {"profile": {**PROFILE, "x": ((1, 3, 8, 8), (2, 3, 8, 8), (8, 3, 8, 8))}},  # max batch
    {"profile": {**PROFILE, "scale": ((1,), (1,), (4,))}},  # opt
])
def test_cache_key_changes_with_each_component(change: dict) -> None:
    assert engine_cache_key(**{**KEY_ARGS, **change}) != engine_cache_key(**KEY_ARGS)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AVATAR_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "tensorrt"
    monkeypatch.delenv("AVATAR_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "avatar-engine" / "tensorrt"


# -- profile and shapes --
def test_validate_profile_accepts_and_normalises() -> None:
    out = validate_profile("g", ["x", "scale"], {"x": [[1, 3, 8, 8], [2, 3, 8, 8], [4, 3, 8, 8]], "scale": PROFILE["scale"]})
    assert out == PROFILE


@pytest.mark.parametrize("profile, match", [
    ({"x": PROFILE["x"]}, r"missing \['scale'\]"),
    ({**PROFILE, "y": PROFILE["scale"]}, r"unknown \['y'\]"),
    ({**PROFILE, "scale": ((1,), (4,))}, r"g\.scale: .*\(min, opt, max\)"),
    ({**PROFILE, "x": ((1, 3, 8, 8), (2, 3, 8), (4, 3, 8, 8))}, r"g\.x: .*same rank"),
    ({**PROFILE, "x": ((1, 3, 8, 8), (8, 3, 8, 8), (4, 3, 8, 8))}, r"g\.x: need 0 <= min <= opt <= max"),
    ({**PROFILE, "scale": ((2,), (1,), (4,))}, r"g\.scale: need 0 <= min <= opt <= max"),
    ({**PROFILE, "scale": ((-1,), (1,), (4,))}, r"g\.scale: need 0 <= min"),
])
def test_validate_profile_errors(profile: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_profile("g", ["x", "scale"], profile)


def test_check_shape() -> None:
    check_shape("g", "x", (4, 3, 8, 8), PROFILE["x"])
    with pytest.raises(ValueError, match=r"g: input 'x' has shape \(5, 3, 8, 8\), outside .*min \(1, 3, 8, 8\) \.\. max \(4, 3, 8, 8\)"):
        check_shape("g", "x", (5, 3, 8, 8), PROFILE["x"])
    with pytest.raises(ValueError, match="outside"):  # wrong rank
        check_shape("g", "x", (2, 3, 8), PROFILE["x"])


# -- cache files --
def test_write_atomic_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "g-0123.engine"
    write_atomic(path, b"one")
    write_atomic(path, memoryview(b"two"))
    assert path.read_bytes() == b"two" and [p.name for p in path.parent.iterdir()] == [path.name]


def _fake_deserialize(data: bytes) -> str | None:
    """Stands in for trt.Runtime.deserialize_cuda_engine: None for bytes it does not recognise."""
    return f"engine<{data.decode()}>" if data.startswith(b"ENGINE") else None


def test_load_or_build_builds_then_reuses(tmp_path: Path) -> None:
    path, builds = tmp_path / "g-0123.engine", []
    build = lambda: builds.append(1) or b"ENGINE-1"  # noqa: E731
    assert load_or_build(path, name="g", deserialize=_fake_deserialize, build=build) == "engine<ENGINE-1>"
    assert path.read_bytes() == b"ENGINE-1"
    assert load_or_build(path, name="g", deserialize=_fake_deserialize, build=build) == "engine<ENGINE-1>"
    assert len(builds) == 1


def test_load_or_build_rebuilds_a_corrupt_cache_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "g-0123.engine"
    path.write_bytes(b"\x00truncated")
    with caplog.at_level(logging.WARNING, logger="engine.runtime.tensorrt"):
        engine = load_or_build(path, name="g", deserialize=_fake_deserialize, build=lambda: b"ENGINE-2")
    assert engine == "engine<ENGINE-2>" and path.read_bytes() == b"ENGINE-2"
    assert "g: cached TensorRT engine" in caplog.text and "rebuilding" in caplog.text


def test_load_or_build_survives_an_unwritable_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="engine.runtime.tensorrt"):
        engine = load_or_build(blocker / "g-0123.engine", name="g", deserialize=_fake_deserialize, build=lambda: b"ENGINE-3")
    assert engine == "engine<ENGINE-3>" and "cannot write the TensorRT engine cache" in caplog.text


def test_load_or_build_fails_when_the_fresh_engine_does_not_load(tmp_path: Path) -> None:
    with pytest.raises(RuntimeLoadError, match="g: TensorRT cannot deserialize the engine it just built"):
        load_or_build(tmp_path / "g.engine", name="g", deserialize=_fake_deserialize, build=lambda: b"garbage")


# -- availability and load errors --
def test_unavailable_without_tensorrt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ModuleNotFoundError
    assert tensorrt_available() == (False, NOT_INSTALLED)
    onnx = tmp_path / "g.onnx"
    onnx.write_bytes(b"not parsed before the backend check")
    with pytest.raises(BackendUnavailable) as err:
        TensorRTGraph(onnx, name="g", input_names=["x", "scale"], output_names=["y"], profile=PROFILE)
    assert NOT_INSTALLED in str(err.value) and str(onnx) in str(err.value) and str(err.value).startswith("g: ")


def test_unavailable_without_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tensorrt_available() == (False, NO_GPU)
    onnx = tmp_path / "g.onnx"
    onnx.write_bytes(b"")
    with pytest.raises(BackendUnavailable, match=r"no CUDA GPU"):
        TensorRTGraph(onnx, name="g", input_names=["x", "scale"], output_names=["y"], profile=PROFILE)


def test_unavailable_with_old_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    ok, reason = tensorrt_available()
    assert not ok and "tensorrt 8.6.1" in reason and ">=10" in reason


def test_missing_onnx_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "g.onnx"
    with pytest.raises(RuntimeLoadError, match="ONNX file not found") as err:
        TensorRTGraph(missing, name="g", input_names=["x", "scale"], output_names=["y"], profile=PROFILE)
    assert not isinstance(err.value, BackendUnavailable) and str(missing) in str(err.value)


def test_bad_profile_is_refused_before_anything_else(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing \['scale'\]"):
        TensorRTGraph(tmp_path / "g.onnx", name="g", input_names=["x", "scale"], output_names=["y"], profile={"x": PROFILE["x"]})


# -- on an NVIDIA GPU --
def _export_tiny(path: Path) -> None:
    """A conv with two inputs and a dynamic batch, exported like export/onnx.py does."""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.conv(x)) * scale[:, None, None, None]  # (B, 4, 8, 8)

    torch.manual_seed(0)
    with torch.no_grad():
        torch.onnx.export(Tiny().eval(), (torch.randn(2, 3, 8, 8), torch.rand(2)), str(path), input_names=["x", "scale"],
                          output_names=["y"], dynamic_axes={"x": {0: "B"}, "scale": {0: "B"}, "y": {0: "B"}},
                          opset_version=17, dynamo=False)


@pytest.mark.gpu
@pytest.mark.parametrize("fp16, atol", [(False, 1e-4), (True, 1e-2)])
def test_engine_matches_onnxruntime(tmp_path: Path, fp16: bool, atol: float) -> None:
    ok, reason = tensorrt_available()
    if not ok:
        pytest.skip(reason)
    import onnxruntime as ort

    onnx_path, cache = tmp_path / "tiny.onnx", tmp_path / "cache"
    _export_tiny(onnx_path)
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    graph = TensorRTGraph(onnx_path, name="tiny", input_names=["x", "scale"], output_names=["y"], profile=PROFILE,
                          fp16=fp16, cache_dir=cache)
    assert (graph.backend, graph.precision) == ("tensorrt", "fp16" if fp16 else "fp32")
    assert graph.engine_path.parent == cache and graph.engine_path.is_file()
    rng = np.random.default_rng(0)
    for b in (2, 2, 2, 3, 2, 1, 4):  # plain run, capture, replay, new shape, back, profile min and max
        feed = {"x": rng.standard_normal((b, 3, 8, 8)).astype(np.float32), "scale": rng.random(b).astype(np.float32)}
        out = graph.infer(feed)
        assert out["y"].dtype == np.float32 and out["y"].shape == (b, 4, 8, 8)
        np.testing.assert_allclose(out["y"], ref.run(["y"], feed)[0], atol=atol, rtol=0)
    with pytest.raises(ValueError, match=r"tiny: input 'x' has shape \(5, 3, 8, 8\), outside"):
        graph.infer({"x": np.zeros((5, 3, 8, 8), np.float32), "scale": np.zeros(5, np.float32)})

    mtime = graph.engine_path.stat().st_mtime_ns  # a second graph loads the cached engine, no rebuild
    again = TensorRTGraph(onnx_path, name="tiny", input_names=["x", "scale"], output_names=["y"], profile=PROFILE,
                          fp16=fp16, cache_dir=cache)
    assert again.engine_path == graph.engine_path and graph.engine_path.stat().st_mtime_ns == mtime
    assert len(list(cache.glob("*.engine"))) == 1
