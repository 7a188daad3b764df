"""The provenance watermark (engine/provenance): robustness, false positives, cost, and the library it
was measured against. Writes docs/benchmarks/watermark.json and a PNG plot beside it.

  content      the engine's own frames: ``render`` (no watermark) of a 2.1 s excerpt of the demo voice
               with the demo portrait (512 x 512) and two real portraits from ../shared/data/portraits
               (one scaled to 1280 x 1280, one 640 x 896); the first 50 frames (2 s) of each.
  robustness   each content marked with a payload, then attacked: H.264 and VP8 at 500 kbit/s and
               1 Mbit/s (PyAV encode, decode), rescale to 0.5x and to 720 px high, a 10 % crop (the
               central 90 % of each side), and two chains; decoded from the 50 frames by
               ``engine.provenance.watermark.detect``. Bit accuracy of the 32 payload bits (and of
               the 48 code bits), whether the payload decoded (CRC and version check), the margins.
  invisibility PSNR and SSIM (luma) of the marked frames against the unmarked.
  false        ../shared/data/clips (read at run time; unmarked real videos): up to 3 windows of 50
  positives    frames per clip through the window detector (as ``avatar verify`` runs it) and each
               clip's mean through the full one (stretched aspects too). Counted detections; the
               null distribution of the pattern score; and the CRC's behaviour on the words decoded
               at many wrong candidates: the fraction passing a k-bit part of the check should be
               2^-k if unmarked content gives random words, which is what bounds a false detection
               by trials x 2^-20.
  cost         ms per frame of the embed at 512 and 1280 px (the pipeline adds it to every frame),
               its one-off preparation, and the detector's time per 50-frame window.
  limits       on the demo only, attacks beyond the targets: where the mark stops decoding.
  alternative  invisible-watermark 0.2.0 (DWT-DCT, DWT-DCT-SVD, RivaGAN; 32 bits): ms per frame at
               512 px, PSNR, bit accuracy raw / after H.264 1 Mbit/s and 500 kbit/s / 0.5x / crop,
               decoded by a per-bit vote over the frames (RivaGAN: over 3 frames, its encoder costs
               seconds a frame here).

    python -m benchmarks.watermark [--out docs/benchmarks/watermark.json] [--clips ../shared/data/clips]

Bounded: about 5 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
import wave
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from engine.provenance.payload import PAYLOAD_BITS, Payload
from engine.provenance.watermark import Accumulator, Watermarker, correlate, detect, detect_mean, fold, _periods

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WINDOW = 50
PAYLOAD = Payload(1, 0x5D48E, 0x42)
PORTRAITS = (("demo 512x512", None, None), ("hallo_1 1280x1280", "hallo__examples_reference_images_1.jpg", (1280, 1280)),
             ("art_0 640x896", "SadTalker__examples_source_image_art_0.png", None))


# ---------------------------------------------------------------------------------------- media helpers


def read_frames(path: str | Path, n: int, fmt: str = "rgb24") -> list[np.ndarray]:
    import av

    out = []
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for f in c.decode(s):
            out.append(f.to_ndarray(format=fmt))
            if len(out) >= n:
                break
    return out


def codec_roundtrip(frames: list[np.ndarray], codec: str, bitrate: int, fps: int = 25) -> list[np.ndarray]:
    """Encode RGB frames with PyAV (libx264 preset veryfast, or libvpx) at ``bitrate`` bit/s, decode them back (RGB)."""
    import av

    buf = io.BytesIO()
    h, w = frames[0].shape[:2]
    with av.open(buf, "w", format="mp4" if codec == "libx264" else "webm") as c:
        s = c.add_stream(codec, rate=Fraction(fps))
        s.width, s.height, s.pix_fmt, s.bit_rate = w - w % 2, h - h % 2, "yuv420p", bitrate
        if codec == "libx264":
            s.options = {"preset": "veryfast"}
        for i, fr in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(fr[: h - h % 2, : w - w % 2]), format="rgb24")
            vf.pts = i
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    buf.seek(0)
    with av.open(buf) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _resize(frames, w, h):
    return [cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA if w < f.shape[1] else cv2.INTER_CUBIC) for f in frames]


def _crop(frames, keep: float):
    h, w = frames[0].shape[:2]
    ch, cw = int(round(h * keep)), int(round(w * keep))
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return [np.ascontiguousarray(f[y0 : y0 + ch, x0 : x0 + cw]) for f in frames]


def _to_720(frames):
    h, w = frames[0].shape[:2]
    return _resize(frames, int(round(w * 720 / h / 2)) * 2, 720)


ATTACKS = {
    "none": lambda f: f,
    "h264_500k": lambda f: codec_roundtrip(f, "libx264", 500_000),
    "h264_1m": lambda f: codec_roundtrip(f, "libx264", 1_000_000),
    "vp8_500k": lambda f: codec_roundtrip(f, "libvpx", 500_000),
    "vp8_1m": lambda f: codec_roundtrip(f, "libvpx", 1_000_000),
    "scale_0.5x": lambda f: _resize(f, f[0].shape[1] // 2, f[0].shape[0] // 2),
    "scale_720p": _to_720,
    "crop_10pct": lambda f: _crop(f, 0.9),
    "crop_10pct+h264_1m": lambda f: codec_roundtrip(_crop(f, 0.9), "libx264", 1_000_000),
    "scale_720p+vp8_500k": lambda f: codec_roundtrip(_to_720(f), "libvpx", 500_000),
}


def _rotate(frames, degrees: float):
    h, w = frames[0].shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return [cv2.warpAffine(f, m, (w, h), borderMode=cv2.BORDER_REFLECT) for f in frames]


# beyond the targets, on the demo only: where the mark stops decoding (the README's "what it does not survive")
LIMITS = {
    "h264_250k": lambda f: codec_roundtrip(f, "libx264", 250_000),
    "h264_150k": lambda f: codec_roundtrip(f, "libx264", 150_000),
    "scale_0.25x": lambda f: _resize(f, f[0].shape[1] // 4, f[0].shape[0] // 4),
    "crop_25pct": lambda f: _crop(f, 0.75),
    "crop_40pct": lambda f: _crop(f, 0.6),
    "rotate_0.5deg": lambda f: _rotate(f, 0.5),
    "rotate_2deg": lambda f: _rotate(f, 2.0),
    "hflip": lambda f: [np.ascontiguousarray(x[:, ::-1]) for x in f],
    "10_frames+h264_1m": lambda f: codec_roundtrip(f[:10], "libx264", 1_000_000),
    "jpeg_q50_per_frame": lambda f: [cv2.imdecode(cv2.imencode(".jpg", x, [cv2.IMWRITE_JPEG_QUALITY, 50])[1], cv2.IMREAD_UNCHANGED) for x in f],
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / max(np.mean((a.astype(np.float64) - b) ** 2), 1e-12)))


def ssim_luma(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of the luma (Gaussian window 1.5 px, the usual constants)."""
    x = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY).astype(np.float64)
    y = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY).astype(np.float64)
    g = lambda im: cv2.GaussianBlur(im, (11, 11), 1.5)  # noqa: E731
    mx, my = g(x), g(y)
    sxx, syy, sxy = g(x * x) - mx * mx, g(y * y) - my * my, g(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return float(np.mean(((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))))


# ---------------------------------------------------------------------------------------- content


def render_content(tmp: Path) -> dict[str, list[np.ndarray]]:
    """The engine's frames (no watermark) for each portrait: the first 50 of a 2.1 s render."""
    from engine.audio import decode_audio
    from engine.cli import DEMO
    from engine.render import render

    x = decode_audio(DEMO / "demo_voice.wav", sample_rate_hz=16000)[8000 : 8000 + int(2.1 * 16000)]
    voice = tmp / "voice.wav"
    with wave.open(str(voice), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(x, -1, 1) * 32767).round().astype(np.int16).tobytes())
    out = {}
    for name, fname, size in PORTRAITS:
        src = DEMO / "astronaut.jpg" if fname is None else SHARED / "portraits" / fname
        if fname is not None and not src.exists():
            print(f"skipping {name}: {src} is absent")
            continue
        if size is not None:
            im = cv2.imread(str(src))
            src = tmp / f"{name.split()[0]}.png"
            cv2.imwrite(str(src), cv2.resize(im, size, interpolation=cv2.INTER_AREA))
        mp4 = tmp / f"{name.split()[0]}.mp4"
        t = time.perf_counter()
        render(src, voice, mp4, watermark=False, c2pa=False, progress=False, threads=1)
        out[name] = read_frames(mp4, WINDOW)
        print(f"rendered {name}: {len(out[name])} frames in {time.perf_counter() - t:.1f} s", flush=True)
    return out


# ---------------------------------------------------------------------------------------- measurements


def robustness(content: dict[str, list[np.ndarray]]) -> tuple[dict, dict, dict]:
    truth = PAYLOAD.code_bits()
    rob, vis, cost = {}, {}, {}
    for name, frames in content.items():
        wm = Watermarker(PAYLOAD)
        t = time.perf_counter()
        wm.prepare(frames[0])
        prep_ms = 1000 * (time.perf_counter() - t)
        times, marked = [], []
        for f in frames:
            t = time.perf_counter()
            marked.append(wm.embed(f))
            times.append(1000 * (time.perf_counter() - t))
        vis[name] = {"psnr_db": round(float(np.mean([psnr(m, f) for m, f in zip(marked, frames)])), 2),
                     "ssim_luma": round(float(np.mean([ssim_luma(m, f) for m, f in zip(marked[:5], frames[:5])])), 5)}
        cost[name] = {"embed_ms_per_frame": round(float(np.median(times)), 3), "prepare_ms_once": round(prep_ms, 1)}
        rob[name] = {}
        for attack, fn in ATTACKS.items():
            att = fn(marked)
            t = time.perf_counter()
            d = detect(att)
            dt = time.perf_counter() - t
            ok = np.sign(d.bit_z) == truth
            rob[name][attack] = {
                "payload_bit_accuracy": float(np.mean(ok[:PAYLOAD_BITS])), "code_bit_accuracy": float(np.mean(ok)),
                "decoded": bool(d.found and d.payload == PAYLOAD), "bit_margin_sd": round(float(np.mean(d.bit_z * truth)), 2),
                "score": round(d.score, 1), "size": list(att[0].shape[1::-1]), "period_px": [round(p, 2) for p in d.period_px],
                "detect_s": round(dt, 2)}
            r = rob[name][attack]
            print(f"{name:18s} {attack:20s} acc {r['payload_bit_accuracy']:.3f} decoded {r['decoded']} margin {r['bit_margin_sd']} "
                  f"score {r['score']:.0f} ({dt:.1f} s)", flush=True)
    return rob, vis, cost


def limits(frames: list[np.ndarray]) -> dict:
    truth = PAYLOAD.code_bits()
    wm = Watermarker(PAYLOAD)
    marked = [wm.embed(f) for f in frames]
    out = {}
    for attack, fn in LIMITS.items():
        d = detect(fn(marked))
        out[attack] = {"decoded": bool(d.found and d.payload == PAYLOAD), "payload_bit_accuracy": float(np.mean((np.sign(d.bit_z) == truth)[:PAYLOAD_BITS])),
                       "bit_margin_sd": round(float(np.mean(d.bit_z * truth)), 2), "score": round(d.score, 1)}
        print(f"limit {attack:20s} {out[attack]}", flush=True)
    return out


def embed_cost() -> dict:
    """ms per frame of the embed at 512 and 1280 px on a real portrait (median of 50), the preparation once."""
    im = cv2.imread(str(SHARED / "portraits" / "hallo__examples_reference_images_1.jpg"))
    if im is None:
        im = cv2.imread(str(ROOT / "engine" / "assets" / "demo" / "astronaut.jpg"))
    out = {}
    for n in (512, 1280):
        x = np.ascontiguousarray(cv2.resize(im, (n, n), interpolation=cv2.INTER_AREA)[:, :, ::-1])
        wm = Watermarker(PAYLOAD)
        t = time.perf_counter()
        wm.prepare(x)
        prep = time.perf_counter() - t
        ts = []
        for _ in range(50):
            t = time.perf_counter()
            wm.embed(x)
            ts.append(time.perf_counter() - t)
        out[f"{n}x{n}"] = {"embed_ms_median": round(1000 * float(np.median(ts)), 3), "embed_ms_p95": round(1000 * float(np.percentile(ts, 95)), 3),
                           "prepare_ms_once": round(1000 * prep, 1)}
    return out


def _words(mean: np.ndarray, k: int = 20) -> list[np.ndarray]:
    """Code-bit sign words decoded at the ``k`` best-scoring (wrong, for unmarked content) scales."""
    h, w = mean.shape
    scored = sorted(((correlate(fold(mean, p, p), coarse=True)[1], p) for p in _periods(w, h)), reverse=True)[:k]
    out = []
    for _, p in scored:
        z, _, at = correlate(fold(mean, p, p))
        out.append(np.sign(z[1:, at[0], at[1]]))
    return out


def false_positives(clips_dir: Path, windows_per_clip: int = 3) -> dict:
    from engine.provenance.payload import crc16

    clips = sorted(p for p in clips_dir.iterdir() if p.suffix.lower() in (".mp4", ".mpg", ".mov", ".webm", ".mkv"))
    window_found, clip_found, scores, clip_scores, words, n_windows, trials = 0, 0, [], [], [], 0, 0
    t0 = time.perf_counter()
    for p in clips:
        lumas = read_frames(p, WINDOW * windows_per_clip, fmt="gray")
        total = Accumulator()
        for i in range(0, len(lumas) - WINDOW + 1, WINDOW):
            acc = Accumulator()
            for y in lumas[i : i + WINDOW]:
                acc.add(y)
                total.add(y)
            d = detect_mean(acc.mean(), frames=acc.n, anisotropic=False)
            n_windows += 1
            trials += d.trials
            window_found += d.found
            scores.append(d.score)
            words.extend(_words(acc.mean()))
        if total.n:
            d = detect_mean(total.mean(), frames=total.n, anisotropic=True)
            trials += d.trials
            clip_found += d.found
            clip_scores.append(d.score)
    # the CRC on random words: the fraction whose k lowest CRC bits match, for k = 1..10 (expected 2^-k)
    partial = {}
    for k in (1, 2, 4, 6, 8, 10):
        hit = 0
        for wd in words:
            bits = (wd > 0).astype(np.int64)
            value = int("".join(map(str, bits)), 2)
            word, crc = value >> 16, value & 0xFFFF
            hit += (crc16(word.to_bytes(4, "big")) ^ crc) & ((1 << k) - 1) == 0
        partial[str(k)] = {"observed": round(hit / max(len(words), 1), 5), "expected": 2.0**-k}
    ones = float(np.mean([(w > 0).mean() for w in words])) if words else 0.0
    return {
        "clips": len(clips), "windows": n_windows, "window_detections": int(window_found), "clip_detections": int(clip_found),
        "crc_trials": int(trials), "crc_trials_per_decode": round(trials / max(n_windows + len(clip_scores), 1), 1),
        "false_alarm_bound_per_trial": 2.0**-20,
        # a window decode makes at most 3 candidates x (1 + 8 Chase flips) = 27 trials; `avatar verify` at most
        # 3 windows x 27 + the whole-read mean with the stretched search (54) = 135
        "false_alarm_bound_per_window_decode": round(27 * 2.0**-20, 9), "false_alarm_bound_per_verify": round(135 * 2.0**-20, 9),
        "null_score": {"mean": round(float(np.mean(scores)), 1), "p99": round(float(np.percentile(scores, 99)), 1), "max": round(float(np.max(scores)), 1)},
        "null_score_clip_mean": {"mean": round(float(np.mean(clip_scores)), 1), "max": round(float(np.max(clip_scores)), 1)},
        "null_scores": [round(float(v), 1) for v in scores],
        "random_words": len(words), "fraction_of_ones": round(ones, 4), "crc_partial_match": partial,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def alternative(frames: list[np.ndarray]) -> dict:
    """invisible-watermark 0.2.0's methods on the demo's frames (32 random bits)."""
    try:
        from imwatermark import WatermarkDecoder, WatermarkEncoder
    except ImportError:
        return {"skipped": "invisible-watermark is not installed (pip install --no-deps invisible-watermark==0.2.0 PyWavelets)"}
    bits = np.random.default_rng(17).integers(0, 2, 32)
    out = {}
    for method, n in (("dwtDct", 10), ("dwtDctSvd", 10), ("rivaGan", 3)):
        if method == "rivaGan":
            WatermarkEncoder.loadModel()
        enc = WatermarkEncoder()
        enc.set_watermark("bits", [int(b) for b in bits])
        src = frames[:n]
        ts, marked = [], []
        for f in src:
            t = time.perf_counter()
            marked.append(np.ascontiguousarray(enc.encode(np.ascontiguousarray(f[:, :, ::-1]), method)[:, :, ::-1]))
            ts.append(time.perf_counter() - t)
        res = {"frames": n, "embed_ms_per_frame_512": round(1000 * float(np.median(ts)), 1),
               "psnr_db": round(float(np.mean([psnr(m, f) for m, f in zip(marked, src)])), 2)}
        dec = WatermarkDecoder("bits", 32)
        for attack in ("none", "h264_1m", "h264_500k", "scale_0.5x", "crop_10pct"):
            att = ATTACKS[attack](marked)
            votes = []
            for f in att:
                if f.shape[0] * f.shape[1] < 256 * 256:  # the library refuses frames under 256 x 256
                    f = cv2.resize(f, (512, 512), interpolation=cv2.INTER_CUBIC)
                votes.append(np.array(dec.decode(np.ascontiguousarray(f[:, :, ::-1]), method), np.float64))
            got = (np.mean(votes, axis=0) > 0.5).astype(int)
            res[attack] = float(np.mean(got == bits))
        out[method] = res
        print(f"invisible-watermark {method}: {res}", flush=True)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
    ax = axes[0]
    rob = result["robustness"]
    attacks = list(ATTACKS)
    names = list(rob)
    wbar = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        acc = [100 * rob[name][a]["payload_bit_accuracy"] for a in attacks]
        bars = ax.bar(np.arange(len(attacks)) + i * wbar, acc, wbar, label=name)
        for b, a in zip(bars, attacks):
            if not rob[name][a]["decoded"]:
                ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.3, "x", ha="center", color="red")
    alt = result.get("alternative", {})
    for j, (m, r) in enumerate((k, v) for k, v in alt.items() if isinstance(v, dict)):
        xs = [attacks.index(a) for a in ("none", "h264_1m", "h264_500k", "scale_0.5x", "crop_10pct")]
        ax.scatter(np.array(xs) + 0.4, [100 * r[a] for a in ("none", "h264_1m", "h264_500k", "scale_0.5x", "crop_10pct")],
                   marker="^v<"[j % 3], color="k", zorder=3, label=f"invisible-watermark {m}")
    ax.axhline(99, color="grey", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(attacks)) + 0.4, attacks, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(40, 101.5)
    ax.set_ylabel("payload bit accuracy, % (50 frames)")
    ax.set_title("watermark after attacks (x: payload did not decode)")
    ax.legend(fontsize=7, loc="lower left")
    ax = axes[1]
    fp = result["false_positives"]
    null = fp.get("null_scores", [])
    marked = [r["score"] for n in rob.values() for r in n.values()]
    bins = np.linspace(0, max(marked + null + [200]) * 1.05, 50)
    ax.hist(null, bins=bins, alpha=0.7, label=f"unmarked windows (n={len(null)})")
    ax.hist(marked, bins=bins, alpha=0.7, label=f"marked, attacked (n={len(marked)})")
    ax.set_xlabel("pattern score (sum of 49 squared z-scores)")
    ax.set_ylabel("count")
    ax.set_title(f"detections on unmarked clips: {fp['window_detections']}/{fp['windows']} windows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "watermark.json"))
    ap.add_argument("--clips", default=str(SHARED / "clips"), help="unmarked real videos for the false-positive rate")
    ap.add_argument("--no-alternative", action="store_true", help="skip invisible-watermark")
    a = ap.parse_args(argv)
    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        content = render_content(Path(tmp))
    rob, vis, per_content_cost = robustness(content)
    result = {"payload": {"version": PAYLOAD.version, "bundle": PAYLOAD.bundle_hex, "id": PAYLOAD.session, "code_bits": 48},
              "window_frames": WINDOW, "robustness": rob, "invisibility": vis,
              "cost": {"embed": embed_cost(), "per_content": per_content_cost,
                       "detect_s_per_window_marked": round(float(np.median([r["detect_s"] for n in rob.values() for r in n.values()])), 2)}}
    result["limits_demo"] = limits(content[next(iter(content))])
    clips = Path(a.clips)
    if clips.is_dir():
        fp = false_positives(clips)
        result["false_positives"] = fp
    else:
        result["false_positives"] = {"skipped": f"{clips} is absent", "window_detections": 0, "windows": 0}
    if not a.no_alternative:
        result["alternative"] = alternative(content[next(iter(content))])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
