"""Int8 variants of the graphs that dominate a frame (the denoiser, run ``steps`` times, and the
decoder), for ONNX Runtime on the CPU: static quantisation in QDQ format, calibrated on real inputs.

Recipe (measured in docs/runtime/precision.json; ``python -m benchmarks.precision`` re-measures it):
  1. calibration inputs: the feeds the two graphs actually receive when the fp32 graphs render the
     shipped demo (portrait + voice) frame by frame — ``record_demo_feeds`` wraps the runtime's
     graphs and keeps a copy of every feed; nothing in the generator changes;
  2. ``quant_pre_process`` (shape inference, ONNX Runtime's basic graph optimisations);
  3. ``quantize_static``: QDQ, weights int8 per output channel (symmetric), activations uint8
     (u8s8: ONNX Runtime's fast path on x86 with VNNI/AMX; s8s8 measured 2x slower here), MinMax
     ranges; the operators quantised are Conv, MatMul, Gemm and Resize (Resize on uint8 moves a
     quarter of the bytes of the fp32 upsampling; other elementwise operators stay fp32);
  4. a sensitivity scan: each convolution quantised alone (ranges calibrated once, then cached),
     the relative error of the graph's output on 16 calibration feeds; the most sensitive stay
     fp32, fewest first, until they account for half of the summed squared errors
     (``keep_fp32``). On the default bundle that keeps 3 of the denoiser's 25 convolutions (its
     input convolution and two at full latent resolution in the last up level; 8% of its FLOPs)
     and 2 of the decoder's 10 (its output convolution and the one after the last upsampling;
     17% of its FLOPs); the output error falls from 6.3% to 4.3% (denoiser) and from 2.2% to
     1.0% (decoder) of the output's standard deviation.
``check_variant`` then renders those demo frames again with the int8 graphs and compares the
generated patches with the fp32 render; ``export.onnx.export_bundle`` ships the variants only if
that difference is within ``MAX_PATCH_MAE``.
"""
from __future__ import annotations

import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from engine.bundle import sha256_file

PRECISION = "int8"
GRAPHS = ("denoiser", "decoder")
OP_TYPES = ["Conv", "MatMul", "Gemm", "Resize"]
CALIBRATION_FRAMES = 100  # demo frames whose feeds calibrate the ranges (4 s of speech; 400 denoiser feeds at 4 steps); the check renders them again
PROBE_FEEDS = 16  # feeds (spread over the calibration run) the sensitivity scan measures errors on
KEEP_ERROR_SHARE = 0.5  # the most sensitive convolutions stay fp32 until they account for this share of the summed squared error
MAX_PATCH_MAE = 2.0  # the largest mean absolute difference (grey levels, 0-255) of generated patches allowed to ship a variant


def variant_file(name: str, precision: str = PRECISION) -> str:
    return f"{name}.{precision}.onnx"


class _Recorder:
    """A runtime graph that keeps a copy of every feed (and of every output, if asked) before passing it on."""

    def __init__(self, graph: Any, feeds: list[dict[str, np.ndarray]], outputs: list[dict[str, np.ndarray]] | None = None):
        self.graph, self.feeds, self.outputs = graph, feeds, outputs
        self.name, self.backend, self.precision = graph.name, graph.backend, graph.precision

    @property
    def input_names(self) -> list[str]:
        return self.graph.input_names

    @property
    def output_names(self) -> list[str]:
        return self.graph.output_names

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.append({k: np.array(v, dtype=np.float32, copy=True) for k, v in feed.items()})
        y = self.graph.infer(feed)
        if self.outputs is not None:
            self.outputs.append({k: v.copy() for k, v in y.items()})
        return y


def render_demo(runtime: Any, *, frames: int, record: tuple[str, ...] = (), seed: int = 0) -> tuple[np.ndarray, dict[str, list], dict[str, list]]:
    """The shipped demo (portrait + voice) through ``runtime`` frame by frame: the frames (F, H, W, 3) uint8,
    and for each graph of ``record`` the feeds it received and the outputs it gave, call by call."""
    from engine.audio import decode_audio
    from engine.avatar import load_portrait, prepare_avatar
    from engine.cli import DEMO
    from engine.generator import FrameGenerator

    image = load_portrait(DEMO / "astronaut.jpg")
    wave = decode_audio(DEMO / "demo_voice.wav", sample_rate_hz=16000)
    avatar = prepare_avatar(image, runtime, crop_size_px=runtime.bundle.crop_size_px)
    feeds: dict[str, list] = {n: [] for n in record}
    outputs: dict[str, list] = {n: [] for n in record}
    saved = {n: runtime.graphs[n] for n in record}
    try:
        for n in record:
            runtime.graphs[n] = _Recorder(saved[n], feeds[n], outputs[n])
        gen = FrameGenerator(runtime, avatar, seed=seed)
        frames = max(1, min(frames, int(len(wave) / 16000 * runtime.bundle.fps)))
        feats = gen.audio_features(wave, frames)
        lms = gen.landmarks(feats)
        out = np.stack([gen.frame(lms[f], gen.audio_tokens(feats, f)) for f in range(frames)])
    finally:
        runtime.graphs.update(saved)
    return out, feeds, outputs


def record_demo_feeds(bundle_dir: str | Path, graphs: tuple[str, ...] = GRAPHS, *, frames: int = CALIBRATION_FRAMES,
                      threads: int = 1) -> tuple[dict[str, list[dict[str, np.ndarray]]], "Reference"]:
    """The feeds ``graphs`` receive while the bundle's fp32 ONNX graphs render ``frames`` frames of the demo,
    and that render (the reference ``check_variant`` compares a variant with)."""
    from engine.runtime import load_runtime

    rt = load_runtime(bundle_dir, "onnxruntime", provider="cpu", precision="fp32", threads=threads)
    images, feeds, outputs = render_demo(rt, frames=frames, record=tuple(dict.fromkeys((*graphs, "decoder"))))
    return {n: feeds[n] for n in graphs}, Reference(images, _patches(outputs["decoder"]))


class Reference:
    """An fp32 render of the demo: frames (F, H, W, 3) uint8 and generated patches (F, 3, P, P) in grey levels."""

    def __init__(self, frames: np.ndarray, patches: np.ndarray):
        self.frames, self.patches = frames, patches


def _patches(decoder_outputs: list[dict[str, np.ndarray]]) -> np.ndarray:
    return (np.clip(np.stack([o["image"][0] for o in decoder_outputs]), -1, 1) + 1) * 127.5  # (F, 3, P, P), 0-255


class FeedReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over recorded feeds (duck-typed: the
    quantiser only calls ``get_next``; ``rewind`` starts over)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds, self.i = feeds, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self) -> None:
        self.i = 0


def _session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _relative_error(sess: Any, probes: list[dict[str, np.ndarray]], reference: list[list[np.ndarray]]) -> float:
    """RMS difference of ``sess``'s outputs on ``probes`` from ``reference``, over the reference's standard deviation."""
    got = np.concatenate([np.concatenate([y.ravel() for y in sess.run(None, f)]) for f in probes])
    ref = np.concatenate([np.concatenate([y.ravel() for y in r]) for r in reference])
    return float(np.sqrt(np.mean((got - ref) ** 2)) / max(float(ref.std()), 1e-12))


def sensitivity(pre: Path, feeds: list[dict[str, np.ndarray]], quantize: Callable[..., None], *, probes: int = PROBE_FEEDS) -> dict[str, float]:
    """Each convolution quantised alone (every other node fp32): the relative error of the graph's outputs on
    ``probes`` feeds spread over ``feeds``. ``quantize(dst, nodes_to_quantize=...)`` quantises with cached ranges."""
    import onnx

    convs = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"]
    probe = feeds[:: max(1, len(feeds) // probes)][:probes]
    fp32 = _session(pre)
    reference = [fp32.run(None, f) for f in probe]
    out: dict[str, float] = {}
    for c in convs:
        one = pre.with_name("one.onnx")
        quantize(one, nodes_to_quantize=[c])
        out[c] = round(_relative_error(_session(one), probe, reference), 5)
    return out


def keep_fp32(errors: dict[str, float], share: float = KEEP_ERROR_SHARE) -> list[str]:
    """The fewest convolutions, most sensitive first, whose squared one-at-a-time errors make up at least ``share``
    of the sum over all convolutions (errors of independent layers add roughly in quadrature)."""
    total = sum(e * e for e in errors.values())
    kept, acc = [], 0.0
    for name, e in sorted(errors.items(), key=lambda kv: -kv[1]):
        if total <= 0 or acc >= share * total:
            break
        kept.append(name)
        acc += e * e
    return sorted(kept)


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantiser logs a warning per rank-1 constant it declines to quantise per channel (GroupNorm's affine): harmless."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_graph(src: str | Path, dst: str | Path, feeds: list[dict[str, np.ndarray]]) -> dict:
    """Write the int8 QDQ variant of ``src`` to ``dst``, calibrated on ``feeds`` (see the module docstring). Returns its report."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not feeds:
        raise ValueError(f"{src}: no calibration feeds")
    src, dst = Path(src), Path(dst)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, _quiet_quantizer():
        pre, cache = Path(tmp) / "pre.onnx", Path(tmp) / "ranges.json"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)

        def quantize(out: Path, **kw: Any) -> None:  # the recipe; activation ranges calibrated once, then read from the cache
            quantize_static(str(pre), str(out), FeedReader(feeds), quant_format=QuantFormat.QDQ, op_types_to_quantize=OP_TYPES,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=str(cache), **kw)

        quantize(Path(tmp) / "all.onnx")  # calibrates (and is the all-int8 variant, for the report)
        errors = sensitivity(pre, feeds, quantize)
        kept = keep_fp32(errors)
        quantize(dst, nodes_to_exclude=kept)
        probe = feeds[:: max(1, len(feeds) // PROBE_FEEDS)][:PROBE_FEEDS]
        reference = [_session(pre).run(None, f) for f in probe]
        err_all = _relative_error(_session(Path(tmp) / "all.onnx"), probe, reference)
        err = _relative_error(_session(dst), probe, reference)
    model = onnx.load(str(dst))
    spec = next((p.value for p in onnx.load(str(src), load_external_data=False).metadata_props if p.key == "avatar.spec"), src.stem)
    model.metadata_props.add(key="avatar.spec", value=spec)
    model.metadata_props.add(key="avatar.precision", value=PRECISION)
    onnx.save(model, str(dst))
    ops = [n.op_type for n in model.graph.node]
    return {"file": dst.name, "source": src.name, "bytes": dst.stat().st_size, "sha256": sha256_file(dst),
            "calibration_feeds": len(feeds), "kept_fp32": kept, "conv_sensitivity": errors,
            "relative_error": round(err, 5), "relative_error_all_int8": round(err_all, 5),
            "quantize_linear_nodes": ops.count("QuantizeLinear"), "seconds": round(time.perf_counter() - t0, 2)}


def check_variant(bundle_dir: str | Path, reference: Reference, *, precision: str = PRECISION, threads: int = 1) -> dict:
    """The demo rendered with the ``precision`` graphs of a bundle (ONNX Runtime, CPU, through its manifest) against
    the fp32 ``reference`` of as many frames: mean and max absolute difference of the generated patches (the
    decoder's outputs, grey levels 0-255) and of the frames."""
    from engine.runtime import load_runtime

    rt = load_runtime(bundle_dir, "onnxruntime", provider="cpu", precision=precision, threads=threads)
    frames, _, outputs = render_demo(rt, frames=len(reference.frames), record=("decoder",))
    d_patch = np.abs(_patches(outputs["decoder"]) - reference.patches)
    d_frame = np.abs(frames.astype(np.int16) - reference.frames.astype(np.int16))
    return {"precision": precision, "frames": int(len(d_frame)), "patch_mean_abs_diff": round(float(d_patch.mean()), 4),
            "patch_max_abs_diff": round(float(d_patch.max()), 2), "frame_max_abs_pixel_diff": int(d_frame.max()),
            "frame_mean_abs_pixel_diff": round(float(d_frame.mean()), 5)}


def quantize_bundle(bundle_dir: str | Path, graphs: tuple[str, ...] = GRAPHS, *, calibration_frames: int = CALIBRATION_FRAMES,
                    threads: int = 1) -> tuple[dict, Reference]:
    """Write ``<graph>.int8.onnx`` beside each of ``graphs`` in an exported bundle (its manifest lists the fp32 graphs).
    Returns the report ({"files": {graph: file}, "graphs": {graph: report}, ...}; the caller lists the files in the
    manifest) and the fp32 render of the calibration frames, for ``check_variant``."""
    from engine.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    feeds, reference = record_demo_feeds(bundle.path, graphs, frames=calibration_frames, threads=threads)
    reports = {n: quantize_graph(bundle.path / bundle.graphs[n], bundle.path / variant_file(n), feeds[n]) for n in graphs}
    report = {"precision": PRECISION, "recipe": {"format": "QDQ", "weights": "int8 per channel", "activations": "uint8", "calibration": "MinMax",
                                                 "op_types": OP_TYPES,
                                                 "kept_fp32": f"the most sensitive Conv nodes, {KEEP_ERROR_SHARE:.0%} of the one-at-a-time error",
                                                 "calibration_inputs": f"the demo's first {len(reference.frames)} frames (fp32 graphs)"},
              "files": {n: r["file"] for n, r in reports.items()}, "graphs": reports}
    return report, reference
