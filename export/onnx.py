"""Export the graphs of ``export/specs.py`` to ONNX and check each against PyTorch.

``export_model`` traces the module with the TorchScript exporter (``dynamo=False``), stamps the
spec's shapes on the graph outputs, and validates the file with ONNX Runtime (CPU) at the export
sizes and at every size of ``CHECK_SIZES`` (another batch, another T): names, dtypes, declared
and actual shapes, and the max-abs error of every output against the PyTorch module.
``export_bundle`` does that for every graph of a bundle and writes ``export_report.json``.

Each failure has its own class (all derive from :class:`ExportError`) and names the model.
"""
from __future__ import annotations

from engine.bundle import sha256_file

import inspect
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
import torch
from torch import nn

from export import quantize
from export.specs import CHECK_SIZES, EXPORT_SIZES, ModelSpec, specs_for_bundle

DEFAULT_OPSET = 17  # LayerNormalization needs 17; GridSample (warp) 16
REPORT_FORMAT = "avatar-onnx-export/1"


# -- errors: one class per cause --
class ExportError(Exception):
    """Base class: a graph could not be exported, or its file does not match its spec or PyTorch."""


class InputNameMismatch(ExportError):
    """The exported forward's arguments, or the file's inputs, differ from the spec's input names."""


class OutputNameMismatch(ExportError):
    """The module's outputs or the file's outputs differ from the spec's output names (or one reuses an input's name)."""


class DtypeMismatch(ExportError):
    """A tensor of the file has another element type than the spec declares."""


class ShapeMismatch(ExportError):
    """A declared or actual shape differs from the spec's (e.g. a batch axis that was not made dynamic)."""


class ToleranceExceeded(ExportError):
    """ONNX Runtime's output differs from PyTorch's by more than the tolerance."""


class RuntimeFailure(ExportError):
    """ONNX Runtime could not load or run the file."""


class TracedControlFlow(ExportError):
    """Tracing met Python-side data-dependent control flow in project code (the trace would bake one branch in)."""


# -- helpers --
_ORT_TYPES = {torch.float32: "tensor(float)", torch.float16: "tensor(float16)", torch.float64: "tensor(double)",
              torch.int64: "tensor(int64)", torch.int32: "tensor(int32)", torch.bool: "tensor(bool)"}
_TORCH_DIR = os.path.dirname(torch.__file__)


def _outputs(y: Any) -> tuple[torch.Tensor, ...]:
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def ort_session(path: str | Path, *, threads: int = 1):
    """A CPU ONNX Runtime session with ``threads`` intra-op threads (1 by default: validation is a one-off)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check_spec(spec: ModelSpec, module: nn.Module) -> None:
    """Names before export: forward's arguments are the input names, outputs do not reuse them."""
    params = [p.name for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if params != spec.input_names:
        raise InputNameMismatch(f"{spec.name}: {type(module).__name__}.forward takes {params}, the spec declares inputs {spec.input_names}")
    reused = sorted(set(spec.output_names) & set(spec.input_names))
    if reused:
        raise OutputNameMismatch(f"{spec.name}: outputs {reused} reuse input names (name them apart, e.g. state -> state_out)")
    if len(set(spec.output_names)) != len(spec.output_names):
        raise OutputNameMismatch(f"{spec.name}: duplicate output names {spec.output_names}")


def _stamp_output_shapes(spec: ModelSpec, module: nn.Module, model: onnx.ModelProto) -> None:
    """Write the spec's output shapes on the graph (dynamic symbols as dim_param, the rest as dim_value)."""
    dims = spec.dims(module)
    by_name = {t.name: t for t in spec.outputs}
    for out in model.graph.output:
        t = by_name.get(out.name)
        if t is None:
            continue
        shape = out.type.tensor_type.shape
        shape.ClearField("dim")
        for d in t.shape:
            dim = shape.dim.add()
            if isinstance(d, str) and d in spec.profile:
                dim.dim_param = d
            else:
                dim.dim_value = int(dims[d] if isinstance(d, str) else d)


# -- export and validation --
def export_model(spec: ModelSpec, module: nn.Module, path: str | Path, *, opset: int = DEFAULT_OPSET, atol: float | None = None,
                 check_sizes: Iterable[Mapping[str, int]] = CHECK_SIZES) -> dict:
    """Export ``module`` (``spec.module_for(model)``) to ``path`` and validate it; returns the report.

    Raises an :class:`ExportError` subclass naming the model on any mismatch.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    check_spec(spec, module)
    inputs = spec.sample_inputs(module, EXPORT_SIZES)
    with torch.no_grad():
        n_out = len(_outputs(module(**inputs)))
    if n_out != len(spec.outputs):
        raise OutputNameMismatch(f"{spec.name}: the module returns {n_out} outputs, the spec declares {len(spec.outputs)} ({spec.output_names})")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.onnx.export(module, tuple(inputs.values()), str(path), input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False)
    export_s = time.perf_counter() - t0
    # torch's own shape checks (group_norm, rnn) warn while tracing and are harmless; project code must not
    ours = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning) and not os.path.abspath(w.filename).startswith(_TORCH_DIR)]
    if ours:
        where = "; ".join(f"{w.filename}:{w.lineno}: {str(w.message)[:120]}" for w in ours)
        raise TracedControlFlow(f"{spec.name}: the trace depends on tensor values in Python ({where})")
    model = onnx.load(str(path))
    _stamp_output_shapes(spec, module, model)
    model.metadata_props.add(key="avatar.spec", value=spec.name)
    onnx.save(model, str(path))
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{spec.name}: {path} is not a valid ONNX model: {e}") from None
    report = validate_onnx(spec, module, path, atol=atol, sizes=(EXPORT_SIZES, *check_sizes))
    return {"name": spec.name, "file": path.name, "opset": opset, "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "export_seconds": round(export_s, 3), **report,
            "inputs": {t.name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in spec.inputs},
            "outputs": {t.name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in spec.outputs},
            "dynamic_axes": {k: {str(a): s for a, s in v.items()} for k, v in spec.dynamic_axes.items()},
            "trt_shapes": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in spec.trt_shapes(module).items()}}


def validate_onnx(spec: ModelSpec, module: nn.Module, path: str | Path, *, atol: float | None = None,
                  sizes: Iterable[Mapping[str, int]] = (EXPORT_SIZES, *CHECK_SIZES), threads: int = 1) -> dict:
    """Check an ONNX file against its spec and the PyTorch module; returns max-abs errors per output.

    For each of ``sizes`` (dynamic symbol -> size) the same sample inputs go through PyTorch and
    ONNX Runtime; the outputs must have the spec's shapes and agree within ``atol``
    (default ``spec.atol``).
    """
    atol = spec.atol if atol is None else atol
    module.eval()
    try:
        sess = ort_session(path, threads=threads)
    except Exception as e:  # onnxruntime raises its own (unexported) exception classes
        raise RuntimeFailure(f"{spec.name}: onnxruntime cannot load {path}: {type(e).__name__}: {e}") from None
    # 1. names
    got_in, got_out = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
    if got_in != spec.input_names:
        raise InputNameMismatch(f"{spec.name}: {Path(path).name} has inputs {got_in}, the spec declares {spec.input_names}")
    if got_out != spec.output_names:
        raise OutputNameMismatch(f"{spec.name}: {Path(path).name} has outputs {got_out}, the spec declares {spec.output_names}")
    # 2. dtypes and declared input shapes (a dynamic symbol must stay a symbol, a static size must match)
    static = spec.dims(module)
    for t, arg in zip((*spec.inputs, *spec.outputs), (*sess.get_inputs(), *sess.get_outputs())):
        want_type = _ORT_TYPES.get(t.dtype)
        if arg.type != want_type:
            raise DtypeMismatch(f"{spec.name}: {t.name!r} is {arg.type} in the file, the spec declares {t.dtype} ({want_type})")
        want = [d if isinstance(d, str) and d in spec.profile else (static[d] if isinstance(d, str) else d) for d in t.shape]
        if list(arg.shape) != want:
            raise ShapeMismatch(f"{spec.name}: {t.name!r} is declared {list(arg.shape)} in the file, the spec says {want} (symbols are dynamic axes)")
    # 3. run at every size and compare
    errors = {n: 0.0 for n in spec.output_names}
    checked = []
    for seed, sz in enumerate(sizes):
        sz = {k: int(v) for k, v in sz.items() if k in spec.profile}
        inputs = spec.sample_inputs(module, sz, seed=seed)
        want_shapes = spec.shapes(module, sz)
        with torch.no_grad():
            ref = [y.detach().float().numpy() for y in _outputs(module(**inputs))]
        try:
            got = sess.run(spec.output_names, {k: v.numpy() for k, v in inputs.items()})
        except Exception as e:  # onnxruntime's own exception classes
            raise RuntimeFailure(f"{spec.name}: onnxruntime failed at sizes {sz}: {type(e).__name__}: {e}") from None
        for name, r, o in zip(spec.output_names, ref, got):
            if tuple(o.shape) != tuple(r.shape) or tuple(r.shape) != want_shapes[name]:
                raise ShapeMismatch(f"{spec.name}: output {name!r} at sizes {sz}: onnxruntime {tuple(o.shape)}, "
                                    f"PyTorch {tuple(r.shape)}, spec {want_shapes[name]}")
            err = float(np.max(np.abs(o.astype(np.float64) - r.astype(np.float64)))) if r.size else 0.0
            if not np.isfinite(err) or err > atol:
                raise ToleranceExceeded(f"{spec.name}: output {name!r} at sizes {sz}: max-abs error {err:.3g} exceeds atol {atol:g}")
            errors[name] = max(errors[name], err)
        checked.append(sz)
    return {"atol": atol, "max_abs_error": errors, "checked_sizes": checked}


def export_bundle(bundle_dir: str | Path, out_dir: str | Path, *, opset: int = DEFAULT_OPSET, end_to_end_frames: int = 8,
                  int8_calibration_frames: int | None = None) -> dict:
    """Write a complete bundle to ``out_dir``: the source bundle's files, one ``<graph>.onnx`` per
    graph (each checked against PyTorch), ``export_report.json``, and a manifest that lists the
    graphs and pins every file's sha256. Returns the report.

    After the per-graph checks on sampled inputs, the exported bundle renders
    ``end_to_end_frames`` frames of the shipped demo (portrait and voice: real inputs) with the
    PyTorch and the ONNX Runtime backends; the largest pixel difference goes in the report.

    Int8 variants (``export/quantize.py``): the denoiser and the decoder quantised, calibrated on
    ``int8_calibration_frames`` frames of the demo (default ``quantize.CALIBRATION_FRAMES``; 0: none),
    checked against the fp32 graphs on the demo, listed under the manifest's ``graph_variants.int8``
    if the generated patches differ by at most ``quantize.MAX_PATCH_MAE`` grey levels on average.
    """
    import shutil

    import onnxruntime

    from engine.bundle import load_bundle, write_manifest

    bundle = load_bundle(bundle_dir)
    missing = [r for r in ("autoencoder", "audio_encoder", "a2l", "denoiser") if r not in bundle.models]
    if missing:
        raise ExportError(f"{bundle.path}: no PyTorch weights for {missing}: export needs a bundle with .pt files")
    out = Path(out_dir)
    if out.resolve() == bundle.path.resolve():
        raise ExportError(f"{out}: the output folder is the source bundle; choose another")
    out.mkdir(parents=True, exist_ok=True)
    old_variants = {f for files in bundle.graph_variants.values() for f in files.values()}  # made anew below, or not at all
    for name in bundle.manifest["files"]:
        if name not in old_variants:
            shutil.copy2(bundle.path / name, out / name)
    not_exported = {"ddim": "the sampling loop stays in Python (engine/sampling/ddim.py) and calls the denoiser graph once per step"}
    if "sync" in bundle.models:
        not_exported["sync"] = "evaluation only (lip-sync metric and loss), not on the render path"
    models = {spec.name: export_model(spec, module, out / f"{spec.name}.onnx", opset=opset) for spec, module in specs_for_bundle(bundle)}
    report = {"format": REPORT_FORMAT, "bundle": str(bundle.path), "bundle_manifest_sha256": sha256_file(bundle.path / "manifest.json"),
              "opset": opset, "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
              "models": models,
              "not_exported": not_exported}
    (out / "export_report.json").write_text(json.dumps(report, indent=1) + "\n")
    keep = {k: v for k, v in bundle.manifest.items() if k not in ("format", "fps", "sample_rate_hz", "crop_size_px", "steps", "models", "files",
                                                                 "graphs", "graph_variants", "export")}
    export_info = {"opset": opset, "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                   "source_manifest_sha256": report["bundle_manifest_sha256"],
                   "shapes": {n: {"inputs": m["inputs"], "outputs": m["outputs"]} for n, m in models.items()}}
    extra = {**keep, "graphs": {n: m["file"] for n, m in models.items()}, "export": export_info}

    def manifest() -> None:
        (out / "export_report.json").write_text(json.dumps(report, indent=1) + "\n")
        write_manifest(out, fps=bundle.fps, sample_rate_hz=int(bundle.manifest["sample_rate_hz"]), crop_size_px=bundle.crop_size_px,
                       steps=bundle.steps, extra=extra)

    manifest()
    frames = quantize.CALIBRATION_FRAMES if int8_calibration_frames is None else int8_calibration_frames
    if frames > 0:
        q, fp32_render = quantize.quantize_bundle(out, calibration_frames=frames)
        extra["graph_variants"] = {quantize.PRECISION: q["files"]}
        manifest()  # the check loads the variants through the manifest
        q["check"] = quantize.check_variant(out, fp32_render)
        q["shipped"] = q["check"]["patch_mean_abs_diff"] <= quantize.MAX_PATCH_MAE
        if not q["shipped"]:
            warnings.warn(f"{out}: int8 graphs differ from fp32 by {q['check']['patch_mean_abs_diff']} grey levels on the demo "
                          f"(> {quantize.MAX_PATCH_MAE}): not shipped")
            del extra["graph_variants"]
            for f in q["files"].values():
                (out / f).unlink(missing_ok=True)
        else:
            export_info["int8"] = {"recipe": q["recipe"], "check": q["check"]}
        report["int8"] = q
        manifest()
    if end_to_end_frames > 0:
        report["end_to_end"] = end_to_end_check(out, frames=end_to_end_frames)
        manifest()
    return report


def end_to_end_check(bundle_dir: str | Path, *, frames: int = 8, seed: int = 0) -> dict:
    """Frames of the shipped demo generated by the PyTorch and the ONNX Runtime backends of one
    bundle: the largest and the mean absolute pixel difference (0-255) over ``frames`` frames."""
    from engine.audio import decode_audio
    from engine.avatar import load_portrait, prepare_avatar
    from engine.bundle import load_bundle
    from engine.cli import DEMO
    from engine.generator import FrameGenerator
    from engine.runtime import load_runtime

    bundle = load_bundle(bundle_dir)
    image = load_portrait(DEMO / "astronaut.jpg")
    wave = decode_audio(DEMO / "demo_voice.wav", sample_rate_hz=16000)
    out: dict[str, list[np.ndarray]] = {}
    for backend in ("torch", "onnxruntime"):
        rt = load_runtime(bundle, backend, threads=1, precision="fp32")
        gen = FrameGenerator(rt, prepare_avatar(image, rt, crop_size_px=bundle.crop_size_px), seed=seed)
        feats = gen.audio_features(wave, frames)
        lms = gen.landmarks(feats)
        out[backend] = [gen.frame(lms[f], gen.audio_tokens(feats, f)).astype(np.int16) for f in range(frames)]
    diff = np.abs(np.stack(out["torch"]) - np.stack(out["onnxruntime"]))
    return {"frames": frames, "seed": seed, "max_abs_pixel_diff": int(diff.max()), "mean_abs_pixel_diff": round(float(diff.mean()), 5)}
