"""ONNX export of the tiny bundle: every graph exports and matches PyTorch in ONNX Runtime, names
and dynamic axes follow the specs, and each kind of failure raises its own error."""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.bundle import load_bundle
from export.onnx import (DtypeMismatch, ExportError, InputNameMismatch, OutputNameMismatch, RuntimeFailure, ShapeMismatch,
                         ToleranceExceeded, TracedControlFlow, export_bundle, export_model, ort_session, sha256_file, validate_onnx)
from export.specs import SPECS, AudioEncoderGraph, ModelSpec, TensorSpec, spec_by_name, specs_for_bundle
from tests.tiny import tiny_bundle

NAMES = [s.name for s in SPECS]


@dataclass
class Exported:
    onnx_dir: Path
    report: dict
    graphs: dict[str, tuple[ModelSpec, nn.Module]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, one_thread) -> Exported:
    d = tmp_path_factory.mktemp("export")
    bundle_dir = tiny_bundle(d / "bundle")
    report = export_bundle(bundle_dir, d / "onnx")
    graphs = {s.name: (s, m) for s, m in specs_for_bundle(load_bundle(bundle_dir))}
    return Exported(d / "onnx", report, graphs)


def _run(sess, inputs: dict[str, torch.Tensor], names: list[str]) -> list[np.ndarray]:
    return sess.run(names, {k: v.numpy() for k, v in inputs.items()})


# -- every graph --
def test_every_spec_exports_with_a_report(exported: Exported):
    rep = exported.report
    assert set(rep["models"]) == set(NAMES)
    assert json.loads((exported.onnx_dir / "export_report.json").read_text()) == rep
    assert "ddim" in rep["not_exported"]
    for name, m in rep["models"].items():
        f = exported.onnx_dir / f"{name}.onnx"
        assert m["file"] == f.name and m["bytes"] == f.stat().st_size and m["sha256"] == sha256_file(f)
        assert m["atol"] == spec_by_name(name).atol
        assert set(m["max_abs_error"]) == set(spec_by_name(name).output_names)
        assert all(0.0 <= e < m["atol"] for e in m["max_abs_error"].values()), (name, m["max_abs_error"])
        assert len(m["checked_sizes"]) == 3 and {c["B"] for c in m["checked_sizes"]} == {1, 2, 3}


@pytest.mark.parametrize("name", NAMES)
def test_file_names_and_declared_shapes_follow_the_spec(exported: Exported, name: str):
    spec, module = exported.graphs[name]
    sess = ort_session(exported.onnx_dir / f"{name}.onnx")
    assert [i.name for i in sess.get_inputs()] == spec.input_names
    assert [o.name for o in sess.get_outputs()] == spec.output_names
    assert not set(spec.input_names) & set(spec.output_names)
    for arg in (*sess.get_inputs(), *sess.get_outputs()):
        axes = spec.dynamic_axes.get(arg.name, {})
        assert "B" in axes.values()
        for axis, sym in axes.items():
            assert arg.shape[axis] == sym
        assert all(isinstance(d, int) for i, d in enumerate(arg.shape) if i not in axes)
    if name in ("audio_encoder", "a2l"):
        assert "T" in spec.dynamic_axes[spec.input_names[0]].values()


@pytest.mark.parametrize("sizes", [{"B": 1, "T": 1}, {"B": 3, "T": 5}], ids=["B1T1", "B3T5"])
@pytest.mark.parametrize("name", NAMES)
def test_dynamic_batch_and_time_match_pytorch(exported: Exported, name: str, sizes: dict[str, int]):
    spec, module = exported.graphs[name]
    sess = ort_session(exported.onnx_dir / f"{name}.onnx")
    inputs = spec.sample_inputs(module, sizes, seed=11)
    with torch.no_grad():
        ref = module(**inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    shapes = spec.shapes(module, sizes)
    for out_name, r, o in zip(spec.output_names, ref, _run(sess, inputs, spec.output_names)):
        assert o.shape == tuple(r.shape) == shapes[out_name]
        assert np.abs(o - r.numpy()).max() < spec.atol


def test_trt_profiles_bracket_the_opt_shape(exported: Exported):
    for name, (spec, module) in exported.graphs.items():
        prof = spec.trt_shapes(module)
        assert list(prof) == spec.input_names
        for lo, opt, hi in prof.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    spec, a2l = exported.graphs["a2l"]
    lo, opt, hi = spec.trt_shapes(a2l)["state"]
    assert (lo[1], opt[1], hi[1]) == (1, 1, 8)  # batch is axis 1 of the GRU state
    assert spec.trt_shapes(a2l)["audio"][2][1] == 250


# -- streaming and adapters --
def test_a2l_step_by_step_equals_whole_sequence(exported: Exported):
    spec, a2l = exported.graphs["a2l"]
    sess = ort_session(exported.onnx_dir / "a2l.onnx")
    x = spec.sample_inputs(a2l, {"B": 2, "T": 10}, seed=5)
    state0 = torch.zeros_like(x["state"])
    with torch.no_grad():
        lm_ref, state_ref = a2l(x["audio"], x["reference"], None)  # the model's own zero start
    state, steps = state0.numpy(), []
    for t in range(10):
        lm, state = sess.run(["landmarks", "state_out"], {"audio": x["audio"][:, t : t + 1].numpy(), "reference": x["reference"].numpy(), "state": state})
        steps.append(lm)
    assert np.abs(np.concatenate(steps, axis=1) - lm_ref.numpy()).max() < spec.atol
    assert np.abs(state - state_ref.numpy()).max() < spec.atol


def test_audio_encoder_adapter_equals_the_model(exported: Exported):
    spec, graph = exported.graphs["audio_encoder"]
    assert isinstance(graph, AudioEncoderGraph)
    for t in (1, 2, 12):
        x = spec.sample_inputs(graph, {"B": 2, "T": t}, seed=t)["mel_windows"]
        with torch.no_grad():
            assert torch.equal(graph(x), graph.encoder(x))


# -- each failure has its own error --
def test_errors_are_distinct_export_errors():
    classes = [InputNameMismatch, OutputNameMismatch, DtypeMismatch, ShapeMismatch, ToleranceExceeded, RuntimeFailure, TracedControlFlow]
    assert len(set(classes)) == len(classes) and all(issubclass(c, ExportError) for c in classes)


def test_input_name_mismatch(exported: Exported, tmp_path: Path):
    spec, den = exported.graphs["denoiser"]
    renamed = dataclasses.replace(spec, inputs=tuple(dataclasses.replace(t, name="landmark") if t.name == "landmarks" else t for t in spec.inputs))
    with pytest.raises(InputNameMismatch, match=r"denoiser: Denoiser\.forward takes .*'landmarks'"):
        export_model(renamed, den, tmp_path / "d.onnx")  # refused before exporting: forward's argument is `landmarks`
    with pytest.raises(InputNameMismatch, match="denoiser.onnx has inputs"):
        validate_onnx(renamed, den, exported.onnx_dir / "denoiser.onnx")


def test_output_name_mismatch(exported: Exported, tmp_path: Path):
    spec, den = exported.graphs["denoiser"]
    eps = dataclasses.replace(spec, outputs=(dataclasses.replace(spec.outputs[0], name="eps"),))
    with pytest.raises(OutputNameMismatch, match=r"denoiser: denoiser.onnx has outputs \['v'\], the spec declares \['eps'\]"):
        validate_onnx(eps, den, exported.onnx_dir / "denoiser.onnx")
    a2l_spec, a2l = exported.graphs["a2l"]
    one = dataclasses.replace(a2l_spec, outputs=a2l_spec.outputs[:1])
    with pytest.raises(OutputNameMismatch, match="a2l: the module returns 2 outputs, the spec declares 1"):
        export_model(one, a2l, tmp_path / "a.onnx")
    reuse = dataclasses.replace(a2l_spec, outputs=(a2l_spec.outputs[0], dataclasses.replace(a2l_spec.outputs[1], name="state")))
    with pytest.raises(OutputNameMismatch, match=r"a2l: outputs \['state'\] reuse input names"):
        export_model(reuse, a2l, tmp_path / "a.onnx")


def test_shape_mismatch(exported: Exported, tmp_path: Path):
    spec, dec = exported.graphs["decoder"]
    small = dataclasses.replace(spec, outputs=(TensorSpec("image", ("B", 3, "S", "S")),))  # wrong: latent-sized image
    with pytest.raises(ShapeMismatch, match=r"decoder: output 'image' at sizes .*onnxruntime \(2, 3, 128, 128\).*spec \(2, 3, 32, 32\)"):
        export_model(small, dec, tmp_path / "dec.onnx")
    wspec, warp = exported.graphs["warp"]
    more = dataclasses.replace(wspec, static_dims=lambda c: {**wspec.static_dims(c), "N": c.n_points + 1})  # another config's landmark count
    with pytest.raises(ShapeMismatch, match="warp: 'src' is declared"):
        validate_onnx(more, warp, exported.onnx_dir / "warp.onnx")


def test_dtype_mismatch(exported: Exported):
    spec, den = exported.graphs["denoiser"]
    double_t = dataclasses.replace(spec, inputs=tuple(dataclasses.replace(t, dtype=torch.float64) if t.name == "t" else t for t in spec.inputs))
    with pytest.raises(DtypeMismatch, match=r"denoiser: 't' is tensor\(float\) in the file"):
        validate_onnx(double_t, den, exported.onnx_dir / "denoiser.onnx")


def test_tolerance_exceeded_when_the_module_changed_after_export(exported: Exported):
    spec, dec = exported.graphs["decoder"]
    changed = copy.deepcopy(dec)
    with torch.no_grad():
        changed.autoencoder.decoder.out.bias.add_(0.01)
    with pytest.raises(ToleranceExceeded, match=r"decoder: output 'image' at sizes .*max-abs error 0\.01 exceeds atol 0\.0001"):
        validate_onnx(spec, changed, exported.onnx_dir / "decoder.onnx")
    validate_onnx(spec, changed, exported.onnx_dir / "decoder.onnx", atol=0.02)  # within a looser tolerance


def test_runtime_failure_on_a_damaged_file(exported: Exported, tmp_path: Path):
    spec, dec = exported.graphs["decoder"]
    bad = tmp_path / "decoder.onnx"
    bad.write_bytes((exported.onnx_dir / "decoder.onnx").read_bytes()[:1000])
    with pytest.raises(RuntimeFailure, match="decoder: onnxruntime cannot load"):
        validate_onnx(spec, dec, bad)


@dataclass(frozen=True)
class _BranchConfig:
    channels: int = 3


class _Branchy(nn.Module):
    """Data-dependent Python control flow: the trace would keep only one branch."""

    config = _BranchConfig()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2.0
        return x - 1.0


def test_traced_control_flow_is_refused(tmp_path: Path):
    spec = ModelSpec(name="branchy", role="none", static_dims=lambda c: {"C": c.channels},
                     inputs=(TensorSpec("x", ("B", "C")),), outputs=(TensorSpec("y", ("B", "C")),))
    with pytest.raises(TracedControlFlow, match=r"branchy: the trace depends on tensor values in Python \(.*test_export\.py"):
        export_model(spec, _Branchy(), tmp_path / "b.onnx")
