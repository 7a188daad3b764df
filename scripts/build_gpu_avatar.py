"""Write ``benchmarks/assets/gpu_avatar.npz``: the demo avatar and a clip of the demo voice, prepared
with the engine's normal code (mediapipe, OpenCV, PyAV: here, not on the GPU machine), for the
torch-only per-frame path of ``benchmarks/gpu.py`` (``benchmarks/gpu_path.py``).

It checks that path against ``engine.generator.FrameGenerator`` on the same inputs (audio features,
articulated landmarks, the denoised latent of a frame) and stores the path's own output after a few
frames (batch 1, fp32, CPU) as the reference the GPU run compares with.

    .venv/bin/python scripts/build_gpu_avatar.py [--seconds 4] [--out benchmarks/assets/gpu_avatar.npz]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_path import ASSET, AvatarAsset, FramePath, load_models, manifest_sha256, run_frames  # noqa: E402
from engine.audio import decode_audio, frame_times_constant, log_mel, mel_index_for_time  # noqa: E402
from engine.avatar import load_portrait, prepare_avatar  # noqa: E402
from engine.cli import DEMO  # noqa: E402
from engine.face.region import from_patch_units, patch_mask, warp_indices  # noqa: E402
from engine.generator import FrameGenerator  # noqa: E402
from engine.runtime import load_runtime  # noqa: E402

CHECK_FRAMES = 8


def build(out: Path, *, seconds: float) -> AvatarAsset:
    torch.manual_seed(0)
    rt = load_runtime(None, "torch")
    bundle = rt.bundle
    avatar = prepare_avatar(load_portrait(DEMO / "astronaut.jpg"), rt)
    gen = FrameGenerator(rt, avatar, compositor="patch", blinks=False)
    gen.feature_centre = None  # the torch path leaves out the session centring of the A2L's features (gpu_path's docstring)
    wave = decode_audio(DEMO / "demo_voice.wav")
    n = int(seconds * bundle.fps)
    mel = log_mel(wave[: int(seconds * 16000) + 1600])  # 100 ms more: the last frames' windows and lookahead
    mel_index = mel_index_for_time(frame_times_constant(n, bundle.fps))
    feats = gen.audio_features_from_mel(mel, mel_index)  # (F, D)
    lms = gen.landmarks(feats)  # (F, K, 2) articulated
    s = avatar.crop_size_px
    ref_all = avatar.landmarks_patch_units()  # (478, 2)
    masks = []
    for lm in lms.numpy():
        lm_all = ref_all.copy()
        lm_all[gen.moving] = lm
        masks.append(np.maximum(gen.avatar_mask, patch_mask(from_patch_units(lm_all) * s, s, region=avatar.region)))
    art = gen.articulation
    asset = AvatarAsset(
        latent=avatar.latent.numpy().astype(np.float32), ref_landmarks=ref_all.astype(np.float32),
        moving=gen.moving.astype(np.int64), warp_idx=np.asarray(warp_indices(), np.int64),
        px_mask=np.max(masks, axis=0).astype(np.float32), crop=avatar.crop, mel=mel.astype(np.float32),
        mel_index=mel_index.astype(np.int64), art_gain=float(art.config.gain), art_max_opening=float(art.config.max_opening_ratio),
        art_up=art.up.astype(np.int64), art_lo=art.lo.astype(np.int64),
        art_corners=(art.corners if art.corners is not None else np.zeros(0)).astype(np.int64),
        art_basis=(art.basis if art.basis is not None else np.zeros((0, 0))).astype(np.float32),
        art_basis_mean=(art.basis_mean if art.basis_mean is not None else np.zeros(0)).astype(np.float32),
        a2l_reference=gen.a2l_reference[0].numpy().astype(np.float32),
        region_box=np.array([avatar.region.x0, avatar.region.y0, avatar.region.size], np.float32),
        bundle_manifest_sha256=manifest_sha256(), check_frames=CHECK_FRAMES, check_lm=np.zeros((1, 2), np.float32),
        check_x0=np.zeros(1, np.float32), check_crop=np.zeros((1, 1, 3), np.uint8))

    # the path against the generator, on the generator's inputs
    _, models = load_models()
    path = FramePath(models, asset, batch=1, steps=bundle.steps)
    with torch.no_grad():
        k = torch.arange(10, n - 2)
        mine = torch.stack([path.audio(k[i : i + 1])[0] for i in range(len(k))])
        err_audio = float((mine - feats[k]).abs().max())
        state = path.init_state()
        gru, lm_mine = state[2], []
        for i in range(n):
            lm, gru = path.landmarks(feats[i : i + 1], gru)
            lm_mine.append(lm[0])
        err_lm = float((torch.stack(lm_mine) - lms).abs().max())
        f = 40  # one frame from a fresh start (no previous output), with that frame's own mask
        gen.reset()
        x0_gen, _, _ = gen.latent(lms[f], gen.audio_tokens(feats, f))
        path.px_mask = torch.from_numpy(masks[f])
        tokens = torch.stack([feats[max(i, 0)] for i in range(f - path.n_tokens + 1, f + 1)])[None]
        m = path.latent_mask()
        x0 = m * path.sample(path.conditions(lms[f][None], tokens, torch.zeros_like(path.latent))) + (1 - m) * path.latent
        err_x0 = float((x0 - x0_gen).abs().max())
    print(f"the torch path against FrameGenerator: audio features {err_audio:.2e}, landmarks {err_lm:.2e}, latent {err_x0:.2e} (max abs)")
    if max(err_audio, err_lm, err_x0) > 1e-4:
        raise SystemExit("the torch path disagrees with the generator")

    path = FramePath(models, asset, batch=1, steps=bundle.steps)
    _, _, _, x0, lm, crops = run_frames(path, CHECK_FRAMES)
    asset.check_lm, asset.check_x0, asset.check_crop = lm[0].numpy(), x0[0].numpy(), crops[0].numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    asset.save(out)
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB): {n} frames, {len(asset.warp_idx)} warp landmarks, "
          f"mask {float((asset.px_mask > 0).mean()):.2f} of the patch")
    return asset


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds of the demo voice to keep")
    ap.add_argument("--out", type=Path, default=ASSET)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    build(a.out, seconds=a.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
