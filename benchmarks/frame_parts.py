"""What the parts of a frame cost at 1280 px, each alternative beside the one chosen (issue 13).
Writes a JSON report; the figures quoted in engine/face/pixel_warp.py, engine/face/paste.py,
engine/media/mp4.py and the README's speed section come from it.

On the hallo 1 portrait (1280 px; ``--portrait`` for another) with the shipped bundle, landmarks
from the A2L on real speech, CPU time of this process (all threads) per call, median of repeats:
  warp        the native pixel warp of its box, bicubic against bilinear; beside it the compose stage's
              other large parts: the decoder (the bundle's runtime, 2 threads) and the head motion's
              full-frame warp
  paste       the paste-back's blend over a 400x500 box, numpy against cv2.blendLinear
  yuv         RGB -> I420 of a frame, PyAV's swscale against OpenCV
  x264        H.264 of 75 frames of a real render of the portrait (watermarked, head motion), CPU per
              frame and bitrate, for x264 veryfast as it was and with the cheaper motion search

    python -m benchmarks.frame_parts --out docs/benchmarks/mouth/frame_parts.json

Bounded: about a minute on 2 cores. Run it alone: CPU time is what it measures.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
HALLO = SHARED / "portraits" / "hallo__examples_reference_images_1.jpg"
VOICE = SHARED / "speech" / "echomimic__assets_test_audios_jane.wav"


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


CALLS, REPEATS, X264_FRAMES = 20, 5, 75  # --quick: 2, 1, 10 (a smoke run: the figures are then rough)


def cpu_ms(fn, *, n: int | None = None, repeats: int | None = None) -> float:
    """Median over ``repeats`` of the CPU milliseconds per call of ``fn`` (``n`` calls each)."""
    n, repeats = n or CALLS, repeats or REPEATS
    fn()
    runs = []
    for _ in range(repeats):
        c0 = _cpu_s()
        for _ in range(n):
            fn()
        runs.append(1000.0 * (_cpu_s() - c0) / n)
    return round(float(np.median(runs)), 2)


def _x264(frames: list[np.ndarray], options: dict[str, str]) -> dict:
    import av
    import cv2

    h, w = frames[0].shape[:2]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.mp4"
        c = av.open(str(path), "w")
        vs = c.add_stream("libx264", rate=Fraction(25), options=options)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        c0, t0 = _cpu_s(), time.perf_counter()
        for i, f in enumerate(frames):
            fr = av.VideoFrame.from_ndarray(cv2.cvtColor(f, cv2.COLOR_RGB2YUV_I420), format="yuv420p")
            fr.pts = i
            for p in vs.encode(fr):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        c.close()
        cpu, wall = _cpu_s() - c0, time.perf_counter() - t0
        kbit_s = 8 * path.stat().st_size / (len(frames) / 25) / 1000
    return {"options": options, "cpu_ms_per_frame": round(1000 * cpu / len(frames), 1),
            "wall_ms_per_frame": round(1000 * wall / len(frames), 1), "kbit_s": round(kbit_s, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--portrait", default=str(HALLO))
    ap.add_argument("--voice", default=str(VOICE), help="speech for the landmarks and the x264 frames' render")
    ap.add_argument("--quick", action="store_true", help="few calls and frames: checks the benchmark runs, its figures are rough")
    a = ap.parse_args(argv)
    global CALLS, REPEATS, X264_FRAMES
    if a.quick:
        CALLS, REPEATS, X264_FRAMES = 2, 1, 10
    import av
    import cv2

    from engine.audio import decode_audio
    from engine.avatar import load_portrait, prepare_avatar
    from engine.bundle import load_bundle
    from engine.face.pixel_warp import PixelWarpConfig, PortraitWarp
    from engine.face.region import from_patch_units
    from engine.generator import FrameGenerator
    from engine.render import render
    from engine.runtime import load_runtime

    b = load_bundle(None)
    rt = load_runtime(b, "auto", threads=2)
    img = load_portrait(a.portrait)
    avatar = prepare_avatar(img, rt, crop_size_px=b.crop_size_px)
    gen = FrameGenerator(rt, avatar, seed=0)
    feats = gen.audio_features(decode_audio(a.voice), 100)
    lms = gen.landmarks(feats)
    lm = gen.ref_all[0].clone()
    lm[gen.moving] = lms[50]
    lm_crop = from_patch_units(lm.numpy())
    rep: dict = {"portrait": Path(a.portrait).name, "image_px": list(img.shape[:2]), "unit": "ms of CPU per call, median",
                 "calls": CALLS, "repeats": REPEATS, "quick": a.quick}

    warps = {k: PortraitWarp(avatar.image, avatar.affine, avatar.landmarks, avatar.crop_size_px, gen.warp_idx,
                             PixelWarpConfig(cubic=k == "bicubic"), moving=gen.moving) for k in ("bicubic", "bilinear")}
    rep["warp"] = {"box_px": list(warps["bilinear"].box_pixels.shape[:2]), **{k: cpu_ms(lambda w=w: w.warp(lm_crop)) for k, w in warps.items()}}

    gen_hm = FrameGenerator(rt, avatar, seed=0, head_motion=True)
    x0, _, _ = gen.latent(lms[50], gen.audio_tokens(feats, 50))
    z = x0.numpy().astype(np.float32)
    rep["other_compose_parts"] = {"decoder": cpu_ms(lambda: gen.g_dec.infer({"z": z})),
                                  "head_motion_full_frame_warp": cpu_ms(lambda: gen_hm.sway.apply(avatar.image, 10, True))}

    rng = np.random.default_rng(0)
    crop, frame = (rng.integers(0, 256, (400, 500, 3), dtype=np.uint8) for _ in range(2))
    alpha = np.clip(rng.random((400, 500), dtype=np.float32) * 1.4 - 0.2, 0, 1).astype(np.float32)
    alpha[alpha < 1.0 / 255.0] = 0.0
    a3 = alpha[..., None]
    rep["paste_blend_400x500"] = {
        "numpy": cpu_ms(lambda: np.where(a3 > 0, np.round(a3 * crop.astype(np.float32) + (1 - a3) * frame.astype(np.float32)).astype(np.uint8), frame)),
        "cv2.blendLinear": cpu_ms(lambda: cv2.blendLinear(crop, frame, alpha, 1.0 - alpha))}
    rep["yuv_i420"] = {"pyav_swscale": cpu_ms(lambda: av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")),
                       "opencv": cpu_ms(lambda: cv2.cvtColor(img, cv2.COLOR_RGB2YUV_I420))}

    with tempfile.TemporaryDirectory() as d:  # real frames: the render's own output, decoded
        mp4 = Path(d) / "r.mp4"
        render(a.portrait, a.voice, mp4, progress=False, c2pa=False)
        with av.open(str(mp4)) as c:
            frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(X264_FRAMES), c.decode(video=0))]
    rep["x264_veryfast_crf18"] = {"as_before": _x264(frames, {"preset": "veryfast", "crf": "18"}),
                                  "now": _x264(frames, {"preset": "veryfast", "crf": "18", "x264-params": "me=dia:subme=1"})}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rep, indent=1) + "\n")
    print(json.dumps(rep, indent=1))
    return rep


if __name__ == "__main__":
    main()
