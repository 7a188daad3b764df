"""The runtime interface: PyTorch and ONNX Runtime behind ``infer``, loading checks, backend parity.

A tiny random-weight bundle is exported once (``avatar export``) and run on both backends.
"""
from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from engine.bundle import load_bundle, sha256_file, write_manifest
from engine.cli import main
from engine.errors import BundleError
from engine.runtime import BackendUnavailable, RuntimeLoadError, load_runtime
from tests.synth import speech_like
from tests.tiny import tiny_bundle

PORTRAIT = "portraits/dreamtalk__data_src_img_cropped_f30.png"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny bundle exported to ONNX by the CLI: .pt and .onnx side by side, one manifest."""
    root = tmp_path_factory.mktemp("rt")
    src = tiny_bundle(root / "src")
    out = root / "exported"
    assert main(["export", "--bundle", str(src), "--out", str(out)]) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_manifest(d: Path) -> None:
    """Re-pin every file (as if a tool had rewritten the bundle on purpose)."""
    m = json.loads((d / "manifest.json").read_text())
    m["files"] = {n: sha256_file(d / n) for n in m["files"]}
    (d / "manifest.json").write_text(json.dumps(m))


def test_exported_bundle_lists_graphs_and_checks_end_to_end(exported: Path):
    b = load_bundle(exported)
    assert set(b.graphs) == {"encoder", "decoder", "audio_encoder", "a2l", "denoiser", "warp"}
    assert all(n in b.manifest["files"] for n in b.graphs.values())
    assert b.manifest["export"]["opset"] >= 17
    rep = json.loads((exported / "export_report.json").read_text())
    assert rep["end_to_end"]["max_abs_pixel_diff"] <= 2  # real inputs (the demo), both backends, raw frames


def test_auto_picks_onnxruntime_for_exported_and_torch_for_plain(exported: Path, tmp_path: Path):
    assert load_runtime(exported, threads=1).backend == "onnxruntime"
    assert load_runtime(tiny_bundle(tmp_path / "plain"), threads=1).backend == "torch"


def test_every_graph_gives_the_same_outputs_on_both_backends(exported: Path):
    from types import SimpleNamespace

    from export.specs import SPECS
    from engine.runtime import graph_config

    b = load_bundle(exported)
    rt_t, rt_o = load_runtime(b, "torch", threads=1, precision="fp32"), load_runtime(b, "onnxruntime", threads=1, precision="fp32")
    for spec in SPECS:
        if spec.role == "sync":
            continue
        feed = {k: v.numpy() for k, v in spec.sample_inputs(SimpleNamespace(config=graph_config(spec, b.configs)), {"B": 1, "T": 3}).items()}
        yt, yo = rt_t[spec.name].infer(feed), rt_o[spec.name].infer(feed)
        assert list(yt) == list(yo) == spec.output_names
        for n in spec.output_names:
            assert yt[n].dtype == yo[n].dtype == np.float32
            np.testing.assert_allclose(yo[n], yt[n], atol=1e-4, err_msg=f"{spec.name}.{n}")


def test_feed_with_a_missing_or_unknown_input_is_refused(exported: Path):
    g = load_runtime(exported, "onnxruntime", threads=1)["decoder"]
    with pytest.raises(KeyError, match=r"missing \['z'\]"):
        g.infer({"zz": np.zeros((1, 4, 8, 8), np.float32)})


def test_changed_onnx_file_is_refused_by_name(exported: Path, tmp_path: Path):
    d = _copy(exported, tmp_path / "b")
    f = d / "denoiser.onnx"
    f.write_bytes(f.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(BundleError, match=r"denoiser\.onnx: sha256 does not match"):
        load_bundle(d)


def test_onnx_whose_inputs_do_not_match_the_spec_is_refused_by_name(exported: Path, tmp_path: Path):
    d = _copy(exported, tmp_path / "b")
    shutil.copy(d / "decoder.onnx", d / "denoiser.onnx")  # a valid ONNX file, the wrong graph
    _rewrite_manifest(d)
    with pytest.raises(RuntimeLoadError, match=r"denoiser\.onnx: inputs \['z'\] do not match the denoiser spec"):
        load_runtime(d, "onnxruntime", threads=1, precision="fp32")


def test_onnx_with_wrong_static_size_is_refused(exported: Path, tmp_path: Path):
    import onnx

    d = _copy(exported, tmp_path / "b")
    m = onnx.load(str(d / "decoder.onnx"))
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 7  # latent channels 4 -> 7
    onnx.save(m, str(d / "decoder.onnx"))
    _rewrite_manifest(d)
    with pytest.raises(RuntimeLoadError, match=r"decoder\.onnx: .*input 'z' has shape"):
        load_runtime(d, "onnxruntime", threads=1, precision="fp32")


@pytest.mark.parametrize("name, message", [("warp.onnx", r"warp\.onnx: a graph file the manifest does not list"),
                                           ("denoiser.int8.onnx", r"denoiser\.int8\.onnx: a graph file \(int8\) the manifest does not list")])
def test_graph_files_the_manifest_does_not_list_are_refused(exported: Path, tmp_path: Path, name: str, message: str):
    d = _copy(exported, tmp_path / "b")
    m = json.loads((d / "manifest.json").read_text())
    del m["files"][name]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=message):
        load_bundle(d)


def test_onnx_only_bundle_runs_on_onnxruntime_and_says_why_not_torch(exported: Path, tmp_path: Path):
    d = _copy(exported, tmp_path / "b")
    for p in d.glob("*.pt"):
        p.unlink()
    m = json.loads((d / "manifest.json").read_text())
    extra = {k: v for k, v in m.items() if k not in ("format", "fps", "sample_rate_hz", "crop_size_px", "steps", "models", "files", "torch_version")}
    write_manifest(d, fps=m["fps"], sample_rate_hz=m["sample_rate_hz"], crop_size_px=m["crop_size_px"], steps=m["steps"], extra=extra)
    assert load_runtime(d, threads=1).backend == "onnxruntime"
    with pytest.raises(RuntimeLoadError, match=r"no PyTorch weights \(\.pt\)"):
        load_runtime(d, "torch", threads=1)


def test_plain_bundle_on_onnxruntime_says_to_export(tmp_path: Path):
    with pytest.raises(RuntimeLoadError, match="run `avatar export"):
        load_runtime(tiny_bundle(tmp_path / "plain"), "onnxruntime", threads=1)


def test_unknown_backend_and_missing_provider(exported: Path):
    with pytest.raises(ValueError, match="backend must be one of"):
        load_runtime(exported, "tflite")
    from engine.runtime.onnxruntime import available_providers

    if "CUDAExecutionProvider" in available_providers():
        pytest.skip("this machine has the CUDA execution provider")
    with pytest.raises(BackendUnavailable, match="no CUDAExecutionProvider"):
        load_runtime(exported, "onnxruntime", provider="cuda", threads=1)


def _wav(path: Path, seconds: float) -> Path:
    x = (speech_like(seconds, 16000) * 32767 * 0.5).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(x.tobytes())
    return path


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.int16)


@pytest.mark.shared_data
def test_render_is_the_same_on_torch_and_onnxruntime(exported: Path, shared_data, tmp_path: Path):
    """The issue's acceptance: ``--backend onnxruntime --seed 0`` equals ``--backend torch --seed 0``
    within tolerance (after H.264: mean absolute difference <= 0.5 of 255, PSNR >= 40 dB), and each
    backend is deterministic given the seed."""
    wav = _wav(tmp_path / "a.wav", 1.0)
    outs = {}
    for name, backend in (("t", "torch"), ("o", "onnxruntime"), ("o2", "onnxruntime")):
        outs[name] = tmp_path / f"{name}.mp4"
        assert main(["render", "--portrait", str(shared_data / PORTRAIT), "--audio", str(wav), "-o", str(outs[name]),
                     "--bundle", str(exported), "--backend", backend, "--seed", "0", "--threads", "1", "--precision", "fp32", "--quiet"]) == 0
    t, o, o2 = (_frames(outs[n]) for n in ("t", "o", "o2"))
    assert t.shape == o.shape and len(t) == 25
    assert np.array_equal(o, o2)
    d = np.abs(t - o).astype(np.float64)
    psnr = 10 * np.log10(255.0 ** 2 / max((d ** 2).mean(), 1e-12))
    assert d.mean() <= 0.5 and psnr >= 40.0, (d.mean(), psnr)


def test_tensorrt_backend_says_why_it_is_unavailable(exported: Path):
    from engine.runtime.tensorrt import tensorrt_available

    ok, reason = tensorrt_available()
    if ok:
        pytest.skip("TensorRT and a GPU exist here: tests/test_runtime_tensorrt.py runs the real engine")
    with pytest.raises(BackendUnavailable, match="tensorrt|CUDA"):
        load_runtime(exported, "tensorrt", threads=1)


# -- precision: int8 variants (ONNX Runtime), bf16 (PyTorch), auto --
def _sample_feed(b, name: str, seed: int = 0) -> dict[str, np.ndarray]:
    from types import SimpleNamespace

    from export.specs import spec_by_name
    from engine.runtime import graph_config

    spec = spec_by_name(name)
    return {k: v.numpy() for k, v in spec.sample_inputs(SimpleNamespace(config=graph_config(spec, b.configs)), {"B": 1}, seed=seed).items()}


def test_export_writes_int8_variants_listed_and_pinned(exported: Path):
    b = load_bundle(exported)
    assert b.graph_variants == {"int8": {"denoiser": "denoiser.int8.onnx", "decoder": "decoder.int8.onnx"}}
    for f in b.graph_variants["int8"].values():
        assert b.manifest["files"][f] == sha256_file(exported / f)
    rep = json.loads((exported / "export_report.json").read_text())["int8"]
    assert rep["shipped"] and rep["check"]["patch_mean_abs_diff"] <= 2.0
    assert rep["graphs"]["denoiser"]["quantize_linear_nodes"] > 0 and rep["graphs"]["denoiser"]["kept_fp32"]
    assert b.manifest["export"]["int8"]["recipe"]["format"] == "QDQ"


def test_int8_runs_the_variants_and_stays_close_to_fp32(exported: Path):
    b = load_bundle(exported)
    r32 = load_runtime(b, "onnxruntime", threads=1, precision="fp32")
    r8 = load_runtime(b, "onnxruntime", threads=1, precision="int8")
    assert r8.precision == "int8" and r8.describe()["precision"] == "int8"
    assert {n: g.precision for n, g in r8.graphs.items()} == {"encoder": "fp32", "decoder": "int8", "audio_encoder": "fp32", "a2l": "fp32",
                                                             "denoiser": "int8", "warp": "fp32"}
    assert r8["denoiser"].path.name == "denoiser.int8.onnx"
    from export.quantize import record_demo_feeds

    feeds, _ = record_demo_feeds(exported, frames=3)  # real inputs (calibrated ranges hold for them, not for N(0, 1) samples)
    for name, out in (("decoder", "image"), ("denoiser", "v")):
        for feed in feeds[name]:
            y32, y8 = r32[name].infer(feed)[out], r8[name].infer(feed)[out]
            assert y8.dtype == np.float32 and y8.shape == y32.shape
            assert np.sqrt(np.mean((y8 - y32) ** 2)) <= 0.1 * y32.std(), name  # random weights: loose
    big = {k: np.repeat(v, 3, axis=0) for k, v in feeds["decoder"][0].items()}
    assert r8["decoder"].infer(big)["image"].shape[0] == 3  # the batch axis stays dynamic


def test_bf16_copies_the_module_and_keeps_the_bundle_fp32(exported: Path):
    import torch

    b = load_bundle(exported)
    r32 = load_runtime(b, "torch", threads=1, precision="fp32")
    r16 = load_runtime(b, "torch", threads=1, precision="bf16")
    assert {n: g.precision for n, g in r16.graphs.items()}["denoiser"] == "bf16"
    assert r16["encoder"].precision == "fp32"
    assert all(p.dtype == torch.float32 for p in b.models["autoencoder"].parameters())  # the encoder shares it: untouched
    assert all(p.dtype == torch.bfloat16 for p in r16["decoder"].module.parameters())
    for name, out in (("decoder", "image"), ("denoiser", "v")):
        feed = _sample_feed(b, name)
        y32, y16 = r32[name].infer(feed)[out], r16[name].infer(feed)[out]
        assert y16.dtype == np.float32
        assert np.abs(y16 - y32).max() <= 0.05 * np.abs(y32).max() + 1e-3, name


def test_auto_precision_follows_the_cpu_flags_and_the_bundle(exported: Path, tmp_path: Path):
    from engine.runtime import AUTO_PRECISION, resolve_precision

    b = load_bundle(exported)
    want = AUTO_PRECISION["onnxruntime"]
    assert resolve_precision("auto", "onnxruntime", b, flags=frozenset({"avx512_vnni"})) == ("int8" if want == "int8" else "fp32")
    assert resolve_precision("auto", "onnxruntime", b, flags=frozenset({"avx2", "fma"})) == "fp32"  # no VNNI/AMX: fp32
    assert resolve_precision("auto", "onnxruntime", b, provider="cuda", flags=frozenset({"amx_int8"})) == "fp32"
    assert resolve_precision("auto", "torch", b, flags=frozenset()) == "fp32"
    assert resolve_precision("auto", "torch", b, flags=frozenset({"amx_bf16"})) == AUTO_PRECISION["torch"]
    plain = load_bundle(_copy(exported, tmp_path / "plain"))
    plain.manifest.pop("graph_variants")  # a bundle exported before int8 variants existed
    assert resolve_precision("auto", "onnxruntime", plain, flags=frozenset({"amx_int8"})) == "fp32"
    with pytest.raises(RuntimeLoadError, match="no int8 graphs in this bundle"):
        resolve_precision("int8", "onnxruntime", plain)


def test_precision_the_backend_does_not_run_is_refused(exported: Path):
    with pytest.raises(ValueError, match="torch backend runs precision fp32 or bf16, not 'int8'"):
        load_runtime(exported, "torch", threads=1, precision="int8")
    with pytest.raises(ValueError, match="bf16 runs on --backend torch"):
        load_runtime(exported, "onnxruntime", threads=1, precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        load_runtime(exported, "onnxruntime", threads=1, precision="int4")


def test_precision_from_the_environment_and_the_cli_flag(exported: Path, monkeypatch):
    import os

    from engine.runtime import default_precision

    monkeypatch.delenv("AVATAR_PRECISION", raising=False)
    with default_precision("int8"):
        assert load_runtime(exported, "onnxruntime", threads=1).precision == "int8"
    assert "AVATAR_PRECISION" not in os.environ  # restored
    monkeypatch.setenv("AVATAR_PRECISION", "fp32")
    assert load_runtime(exported, "onnxruntime", threads=1).precision == "fp32"
    assert load_runtime(exported, "onnxruntime", threads=1, precision="int8").precision == "int8"  # an argument wins


def test_variants_naming_unknown_graphs_or_changed_are_refused(exported: Path, tmp_path: Path):
    d = _copy(exported, tmp_path / "b")
    m = json.loads((exported / "manifest.json").read_text())
    m["graph_variants"]["int8"]["vocoder"] = "denoiser.int8.onnx"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="graph_variants.int8 names 'vocoder', a graph the bundle does not have"):
        load_bundle(d)
    f = d / "decoder.int8.onnx"  # a changed variant is caught like any other file
    m = json.loads((exported / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(m))
    f.write_bytes(f.read_bytes()[:-4] + b"abcd")
    with pytest.raises(BundleError, match=r"decoder\.int8\.onnx: sha256 does not match"):
        load_bundle(d)
