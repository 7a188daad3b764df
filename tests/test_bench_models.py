"""``avatar bench models``: the FLOP count against hand-computed graphs, and a whole run on a tiny exported bundle."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.models import onnx_gflop, per_frame
from engine.cli import main
from tests.tiny import tiny_bundle


def _graph(path: Path) -> Path:
    """x (N, 3, 16, 16) -> Conv 8x3x3x3 (pad 1) -> Reshape (N*8*16, 16) -> MatMul 16x5 -> Gemm 5x7, built by hand."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([-1, 16], np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((16, 5)).astype(np.float32), "m"),
             numpy_helper.from_array(rng.standard_normal((5, 7)).astype(np.float32), "g")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("MatMul", ["r", "m"], ["mm"]), helper.make_node("Gemm", ["mm", "g"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))  # ir 9: see FACTS.md
    return path


def test_flops_are_counted_from_the_graph_at_the_given_shapes(tmp_path: Path):
    path = _graph(tmp_path / "g.onnx")
    r = onnx_gflop(path, {"x": (2, 3, 16, 16)})
    conv = 2 * 2 * 8 * 16 * 16 * 3 * 3 * 3  # N * Cout * H * W * Cin * k * k MACs, x2
    rows = 2 * 8 * 16  # Reshape to (N*8*16, 16)
    matmul, gemm = 2 * rows * 16 * 5, 2 * rows * 5 * 7
    assert r["uncounted_nodes"] == []
    assert r["by_op_gflop"] == pytest.approx({"Conv": conv / 1e9, "MatMul": matmul / 1e9, "Gemm": gemm / 1e9}, rel=1e-6)
    assert r["gflop"] == pytest.approx((conv + matmul + gemm) / 1e9, rel=1e-5)


def test_per_frame_is_warp_plus_steps_denoisers_plus_decoder():
    rows = [{"backend": "onnxruntime", "precision": "fp32", "call": "warp", "median_ms": 1.0},
            {"backend": "onnxruntime", "precision": "fp32", "call": "denoiser", "median_ms": 5.0},
            {"backend": "onnxruntime", "precision": "fp32", "call": "decoder", "median_ms": 10.0},
            {"backend": "onnxruntime", "precision": "int8", "call": "denoiser", "median_ms": 2.0},
            {"backend": "onnxruntime", "precision": "int8", "call": "decoder", "median_ms": 6.0}]
    pf = per_frame(rows, steps=4)
    assert pf["onnxruntime/fp32"]["total_ms"] == pytest.approx(1 + 4 * 5 + 10)
    assert pf["onnxruntime/int8"]["total_ms"] == pytest.approx(1 + 4 * 2 + 6)  # warp has no int8 variant: its fp32 time


def test_bench_models_cli_writes_json_and_chart(tmp_path: Path):
    from export.onnx import export_bundle

    exported = tmp_path / "exported"
    export_bundle(tiny_bundle(tmp_path / "src"), exported, end_to_end_frames=0, int8_calibration_frames=4)
    out = tmp_path / "bench" / "models.json"
    assert main(["bench", "models", "--out", str(out), "--bundle", str(exported), "--threads", "1", "--repeats", "3"]) == 0
    r = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    m = r["machine"]
    assert m["threads"] == 1 and m["cpu_model"] and m["versions"]["onnxruntime"]
    assert {"fp32", "bf16", "int8"} <= set(r["peaks"])
    assert set(r["calls"]) == {"encoder", "decoder", "audio_encoder[T=1]", "audio_encoder[T=25]", "a2l[T=1]", "denoiser", "warp"}
    for c in r["calls"].values():  # the ONNX count and torch's FlopCounterMode agree
        assert c["flops"]["gflop"] == pytest.approx(c["flops"]["torch_flop_counter_gflop"], rel=1e-3)
    configs = {(x["backend"], x["precision"]) for x in r["results"]}
    assert {("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")} <= configs
    int8 = {x["graph"] for x in r["results"] if x["precision"] == "int8"}
    assert int8 == {"denoiser", "decoder"}  # only the graphs that have int8 variants
    for x in r["results"]:
        assert 0 < x["median_ms"] <= x["p90_ms"] and x["repeats"] == 3
        assert x["gflops_achieved"] > 0 and "percent_of_peak" in x
    assert {"onnxruntime/fp32", "onnxruntime/int8", "torch/fp32"} <= set(r["per_frame"])
