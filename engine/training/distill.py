"""Progressive distillation of the DDIM teacher (Salimans & Ho 2022, "Progressive distillation
for fast sampling of diffusion models", algorithm 2), round by round: a student with N/2 steps
learns to do in one DDIM step what the teacher does in two, then becomes the next round's
teacher: 8 -> 4 -> 2 -> 1 steps.

Per sample in a round with a student of N steps (times t_i = i / N, the grid ``ddim_times`` uses):
  1. x: the latent of a training frame, with its conditioning (``build_batch``, as the teacher was trained);
     t = i / N for a random i in 1..N; z_t = alpha_t x + sigma_t eps
  2. two teacher DDIM steps t -> t' = t - 1/(2N) -> t'' = t - 1/N (eq. 12 of Song et al. with eta 0):
       x^ = alpha_t z_t - sigma_t v_teacher(z_t, t); z_t' = alpha_t' x^ + sigma_t' (z_t - alpha_t x^) / sigma_t
       x^' likewise at (z_t', t');                    z_t'' = alpha_t'' x^' + sigma_t'' (z_t' - alpha_t' x^') / sigma_t'
  3. the target the student must reach in one step from z_t to z_t'' (algorithm 2):
       x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)
     (at t'' = 0: x~ = x^'); as a velocity: v~ = (alpha_t z_t - x~) / sigma_t
  4. loss: MSE between the student's v and v~ (the "SNR + 1" weighting of section 4), weighted
     ``1 + mask_weight * mask`` like the teacher's training (only the mask is repainted).

Each round is one ``train()`` run (checkpoints, exact resume, EMA, log and curve) in
``OUT/round_<N>steps``; the student's EMA weights are saved there as ``denoiser.{json,pt}``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from engine.models.denoiser import Denoiser
from engine.sampling import alpha_sigma
from engine.training.loop import TrainConfig, train


def _b(x: torch.Tensor) -> torch.Tensor:
    return x[:, None, None, None]


def _v(model: Denoiser, z: torch.Tensor, t: torch.Tensor, bt: dict) -> torch.Tensor:
    return model(z, t, bt["masked"], bt["mask"], bt["reference"], bt["previous"], bt["landmarks"], bt["audio"])


@torch.no_grad()
def teacher_target(teacher: Denoiser, z: torch.Tensor, t: torch.Tensor, n_student: int, bt: dict) -> torch.Tensor:
    """The velocity v~ a one-step student must predict at (z_t, t) to land where two teacher DDIM steps land (steps 2-3)."""
    dt = 1.0 / n_student
    t1, t2 = (t - 0.5 * dt).clamp_min(0.0), (t - dt).clamp_min(0.0)
    a, s = alpha_sigma(t)
    a1, s1 = alpha_sigma(t1)
    a2, s2 = alpha_sigma(t2)
    x_hat = _b(a) * z - _b(s) * _v(teacher, z, t, bt)
    z1 = _b(a1) * x_hat + _b(s1 / s) * (z - _b(a) * x_hat)
    x_hat1 = _b(a1) * z1 - _b(s1) * _v(teacher, z1, t1, bt)
    z2 = _b(a2) * x_hat1 + _b(s2 / s1) * (z1 - _b(a1) * x_hat1)
    r = s2 / s  # 0 at t'' = 0
    x_tilde = (z2 - _b(r) * z) / _b(a2 - r * a)
    return (_b(a) * z - x_tilde) / _b(s)


def distill_round(teacher: Denoiser, make_batch, n_student: int, tcfg: TrainConfig, out_dir: Path, *, mask_weight: float = 4.0) -> Denoiser:
    """One round: a student of ``n_student`` steps (initialised from the teacher) distilled from it."""
    teacher = copy.deepcopy(teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher).train()
    for p in student.parameters():
        p.requires_grad_(True)

    def batch(rng: np.random.Generator) -> dict:
        bt = make_batch(rng)
        i = rng.integers(1, n_student + 1, len(bt["x"]))
        bt["t"] = torch.from_numpy((i / n_student).astype(np.float32))
        bt["eps"] = torch.from_numpy(rng.standard_normal(bt["x"].shape).astype(np.float32))
        return bt

    def loss_fn(m: Denoiser, bt: dict):
        a, s = alpha_sigma(bt["t"])
        z = _b(a) * bt["x"] + _b(s) * bt["eps"]  # 1.
        target = teacher_target(teacher, z, bt["t"], n_student, bt)  # 2.-3.
        v = _v(m, z, bt["t"], bt)
        w = 1.0 + mask_weight * bt["mask"]  # 4.
        loss = (w * (v.float() - target) ** 2).mean() / (1.0 + mask_weight * bt["mask"].mean())
        return loss, {"t_mean": float(bt["t"].mean())}

    return train(name=f"distill_{n_student}steps", model=student, make_batch=batch, loss_fn=loss_fn, cfg=tcfg, out_dir=out_dir)


def distill(bundle_dir: str | Path, data_dirs: list[str], out_dir: str | Path, *, teacher_steps: int = 8, target_steps: int = 2,
            tcfg: TrainConfig = TrainConfig(), mask_weight: float = 4.0, **opts) -> dict[int, Path]:
    """Rounds teacher_steps/2, /4, ... down to ``target_steps``; returns steps -> the student's model stem."""
    from engine.bundle import load_bundle
    from engine.models.io import save_model
    from engine.training.data import FrameStore
    from engine.training.denoiser import LatentTable, _file_hash, build_batch

    if teacher_steps < 2 or target_steps < 1 or teacher_steps & (teacher_steps - 1) or target_steps & (target_steps - 1) or target_steps >= teacher_steps:
        raise ValueError(f"teacher_steps and target_steps must be powers of two with target < teacher, got {teacher_steps}, {target_steps}")
    b = load_bundle(bundle_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = FrameStore(data_dirs, split="train", region=b.region)
    key = _file_hash(b.path / "autoencoder.pt", b.path / "audio_encoder.pt") + f"-{len(store)}"
    cache = Path(opts.pop("latent_cache", out / "latent_cache.npz"))
    table = LatentTable(store, b.autoencoder, b.audio_encoder, cache, key)
    usable = np.nonzero(table.usable)[0]
    model = b.denoiser

    def make_batch(rng: np.random.Generator) -> dict:
        idx = usable[rng.integers(0, len(usable), tcfg.batch_size)]
        return build_batch(store, table, rng, idx, model.config, opts)

    students: dict[int, Path] = {}
    n = teacher_steps // 2
    while n >= target_steps:
        rdir = out / f"round_{n}steps"
        stem = rdir / "denoiser"
        if (stem.with_suffix(".pt")).is_file() and (rdir / "done.json").is_file():
            from engine.models.denoiser import DenoiserConfig
            from engine.models.io import load_model

            model = load_model(Denoiser, DenoiserConfig, stem)  # this round finished in an earlier run
        else:
            model = distill_round(model, make_batch, n, tcfg, rdir, mask_weight=mask_weight)
            save_model(model, stem)
            (rdir / "done.json").write_text(json.dumps({"student_steps": n, "teacher_steps": 2 * n, "train": tcfg.__dict__}) + "\n")
        students[n] = stem
        n //= 2
    return students
