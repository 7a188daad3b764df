"""Mouth close-ups at the portrait's native resolution, and the detail kept (issue 13).

    python scripts/native_closeups.py --out docs/eval/native [--old-bundle DIR]
    python scripts/native_closeups.py --out docs/eval/mouth --row "patch (first)=engine/bundles/lower_face:patch" \
        --row "native, lower_face=runs/lower_face_bundle:native" --row "native, mouth (new)=engine/bundles/default:native"
    python scripts/native_closeups.py --out docs/eval/linear_a2l --row "GRU A2L, lip reference=runs/gru_bundle:native+plain" \
        --row "linear A2L, mouth-colour reference=engine/bundles/default:native"

For each portrait (hallo 1 at 1280 px and the demo astronaut, neither ever trained on) driven by
a real voice: the same frames rendered by the patch compositor (the first bundle's way: the whole
lower face decoded from a 128 px patch) and by the native path (the portrait's pixels warped, the
mouth interior generated). Writes ``closeups_<portrait>.jpg`` (rows: portrait, patch, native;
columns: frames over a sentence, the mouth box cut from the full-resolution frame, never resized)
and ``closeups.json``: the sharpness ratio (lower face's Laplacian energy over the upper face's,
output over portrait, at native resolution) and the mean mouth opening per path.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

PORTRAITS = {
    "hallo1": ("../shared/data/portraits/hallo__examples_reference_images_1.jpg", "../shared/data/speech/echomimic__assets_test_audios_jane.wav"),
    "astronaut": ("engine/assets/demo/astronaut.jpg", "../shared/data/speech/echomimic__assets_test_audios_walden.wav"),
}


def _box(inv: np.ndarray, x0: float, y0: float, x1: float, y1: float, s: int, shape) -> tuple[int, int, int, int]:
    c = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]) * s @ inv[:, :2].T + inv[:, 2]
    h, w = shape[:2]
    return max(int(c[:, 0].min()), 0), max(int(c[:, 1].min()), 0), min(int(c[:, 0].max()), w), min(int(c[:, 1].max()), h)


def sharpness_native(img: np.ndarray, lower: tuple, upper: tuple) -> float:
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    lap = cv2.Laplacian(g, cv2.CV_32F) ** 2
    lo = lap[lower[1] : lower[3], lower[0] : lower[2]].mean()
    up = lap[upper[1] : upper[3], upper[0] : upper[2]].mean()
    return float(lo / max(up, 1e-6))


def _labelled(rows: list[np.ndarray], labels: tuple[str, ...]) -> np.ndarray:
    """The rows stacked, each label in a white margin on the left (never over the pixels: a small
    portrait's mouth box is only ~40 px tall)."""
    h = rows[0].shape[0]
    scale = float(np.clip(h / 60.0, 0.35, 0.7))
    width = max(cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] for t in labels) + 12
    out = []
    for row, label in zip(rows, labels):
        margin = np.full((h, width, 3), 255, np.uint8)
        cv2.putText(margin, label, (6, h // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
        out.append(np.concatenate([margin, row], axis=1))
    return np.concatenate(out, axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/eval/native")
    ap.add_argument("--bundle", default=None, help="bundle of the native path (default: the shipped one)")
    ap.add_argument("--old-bundle", default=None, help="bundle of the patch path (default: the same)")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--row", action="append", default=[], metavar="LABEL=BUNDLE:COMPOSITOR",
                    help="a row of the close-ups (repeatable; replaces the default patch and native rows); COMPOSITOR: "
                         "patch, native (its default sampling), native-cubic or native-linear (the native path with bicubic or bilinear sampling)")
    a = ap.parse_args()
    from engine.audio.decode import decode_audio
    from engine.avatar import load_portrait, prepare_avatar
    from engine.bundle import load_bundle
    from engine.eval.articulation import opening_from_landmarks
    from engine.face.align import invert_transform
    from engine.compositor import InteriorConfig
    from engine.face.pixel_warp import PixelWarpConfig
    from engine.face.region import from_patch_units
    from engine.generator import FrameGenerator
    from engine.runtime import load_runtime

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_spec = [("patch (old)", a.old_bundle or a.bundle, "patch"), ("native (new)", a.bundle, "native")]
    if a.row:
        rows_spec = []
        for spec in a.row:
            label, _, rest = spec.partition("=")
            bundle, _, comp = rest.rpartition(":")
            if not label or not bundle or comp.removesuffix("+plain") not in ("patch", "native", "native-cubic", "native-linear"):
                raise SystemExit(f"--row {spec!r}: expected LABEL=BUNDLE:patch|native|native-cubic|native-linear[+plain] "
                                 "(+plain: the denoiser's reference keeps the warp's stretched lips inside the interior)")
            rows_spec.append((label, bundle, comp))
    runs = {label: load_bundle(b) for label, b, _ in rows_spec}
    comps = {label: c for label, _, c in rows_spec}
    rts = {k: load_runtime(b, "auto", threads=2) for k, b in runs.items()}
    report = {}
    for name, (portrait, audio) in PORTRAITS.items():
        img = load_portrait(portrait)
        wave = decode_audio(audio)
        n = min(a.frames, int(len(wave) / 16000 * 25) - 1)
        frames, rep = {}, {"portrait": portrait, "audio": audio, "frames": n, "image_px": list(img.shape[:2])}
        for kind, rt in rts.items():
            av = prepare_avatar(img, rt, crop_size_px=runs[kind].crop_size_px)
            comp = comps[kind].removesuffix("+plain")
            interior = InteriorConfig(reference_colour=None) if comps[kind].endswith("+plain") else InteriorConfig()
            g = FrameGenerator(rt, av, seed=0, blinks=False, compositor=comp.split("-")[0], interior=interior,
                               pixel_warp=PixelWarpConfig(cubic={"native-cubic": True, "native-linear": False}.get(comp)))
            feats = g.audio_features(wave, n)
            lms = g.landmarks(feats)
            t0 = time.perf_counter()
            frames[kind] = [g.frame(lms[f], g.audio_tokens(feats, f)) for f in range(n)]
            ms = 1000 * (time.perf_counter() - t0) / n
            inv = invert_transform(av.affine)
            s = av.crop_size_px
            lower = _box(inv, 0.25, 0.4375, 0.75, 0.9375, s, img.shape)
            upper = _box(inv, 0.25, 0.25, 0.75, 0.42, s, img.shape)
            mouth = _box(inv, 0.32, 0.58, 0.68, 0.80, s, img.shape)
            base = sharpness_native(img, lower, upper)
            lm_full = np.repeat(av.landmarks[None], n, axis=0).copy()
            lm_full[:, g.moving] = from_patch_units(lms.numpy())
            rep[kind] = {"bundle": str(runs[kind].path), "compositor": comps[kind], "region": runs[kind].region.name,
                         "crop_size_px": s, "ms_per_frame_2_threads": round(ms, 1),
                         "sampling": None if g.pixel_warp is None else ("bicubic" if g.pixel_warp.cubic else "bilinear"),
                         "warped_box_px": None if g.pixel_warp is None else list(g.pixel_warp.box_pixels.shape[:2]),
                         "sharpness_ratio": float(np.mean([sharpness_native(f, lower, upper) for f in frames[kind]]) / base),
                         "a2l_opening_std_px_at_256": float(opening_from_landmarks(lm_full).std() * 256),
                         "face_crop_side_px": float(s / np.sqrt(abs(np.linalg.det(av.affine[:, :2]))))}
        x0, y0, x1, y1 = mouth
        pick = np.linspace(n * 0.1, n * 0.9, 6).astype(int)
        rows = [np.concatenate([img[y0:y1, x0:x1]] * len(pick), axis=1)]
        rows += [np.concatenate([frames[k][i][y0:y1, x0:x1] for i in pick], axis=1) for k in runs]
        strip = _labelled(rows, ("portrait", *runs))
        cv2.imwrite(str(out / f"closeups_{name}.jpg"), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        report[name] = rep
        print(name, json.dumps(rep))
    (out / "closeups.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
