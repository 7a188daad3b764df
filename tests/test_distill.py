"""Progressive distillation: the target is exactly "two teacher DDIM steps in one", and a short
round on a fixed batch brings the student's N-step samples toward the teacher's 2N-step ones."""
from __future__ import annotations

import numpy as np
import torch

from engine.sampling import alpha_sigma, ddim_sample
from engine.training.distill import _v, distill_round, teacher_target
from engine.training.loop import TrainConfig
from tests.tiny import DEN, tiny_models


def _cond(b: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c, s, k, a, d = DEN.latent_channels, DEN.latent_size, DEN.n_landmarks, DEN.audio_tokens, DEN.audio_dim
    mask = torch.zeros(b, 1, s, s)
    mask[..., s // 2 :, s // 4 : 3 * s // 4] = 1
    x = torch.randn(b, c, s, s, generator=g)
    return {"x": x, "masked": x * (1 - mask), "mask": mask, "reference": torch.randn(b, c, s, s, generator=g),
            "previous": torch.zeros(b, c, s, s), "landmarks": 0.2 + 0.6 * torch.rand(b, k, 2, generator=g),
            "audio": torch.randn(b, a, d, generator=g)}


def _teacher() -> torch.nn.Module:
    m = tiny_models(0)["denoiser"]
    with torch.no_grad():
        m.out.weight.normal_(0, 0.05)
    return m.eval()


def _sampler(model):
    def d(z, t, c):
        return _v(model, z, t, c)

    return d


def test_target_equals_two_teacher_ddim_steps():
    teacher, bt = _teacher(), _cond(3)
    z = torch.randn_like(bt["x"])
    for n in (1, 2, 4):  # from t = 1: one student step with the target lands where two teacher steps land
        t = torch.ones(3)
        v_target = teacher_target(teacher, z, t, n, bt)
        a, s = alpha_sigma(t)
        if n == 1:
            x_student = a[:, None, None, None] * z - s[:, None, None, None] * v_target
            x_teacher = ddim_sample(_sampler(teacher), z, bt, steps=2)
            torch.testing.assert_close(x_student, x_teacher, atol=2e-4, rtol=1e-3)
        else:  # the student's first step of n reaches the teacher's z after its first two steps of 2n
            a1, s1 = alpha_sigma(t - 1.0 / n)
            x_hat = a[:, None, None, None] * z - s[:, None, None, None] * v_target
            eps_hat = (z - a[:, None, None, None] * x_hat) / s[:, None, None, None]
            z_student = a1[:, None, None, None] * x_hat + s1[:, None, None, None] * eps_hat
            # the teacher's first two DDIM steps of 2n, by hand
            v = _v(teacher, z, t, bt)
            ah, sh = alpha_sigma(t - 0.5 / n)
            xh = a[:, None, None, None] * z - s[:, None, None, None] * v
            z1 = ah[:, None, None, None] * xh + sh[:, None, None, None] * (z - a[:, None, None, None] * xh) / s[:, None, None, None]
            v1 = _v(teacher, z1, t - 0.5 / n, bt)
            xh1 = ah[:, None, None, None] * z1 - sh[:, None, None, None] * v1
            z2 = a1[:, None, None, None] * xh1 + s1[:, None, None, None] * (z1 - ah[:, None, None, None] * xh1) / sh[:, None, None, None]
            torch.testing.assert_close(z_student, z2, atol=2e-4, rtol=1e-3)


def test_a_short_round_moves_the_student_toward_the_teacher(tmp_path):
    teacher, bt = _teacher(), _cond(4, seed=1)

    def make_batch(rng: np.random.Generator) -> dict:
        return {k: v.clone() for k, v in bt.items()}

    z = torch.randn(bt["x"].shape, generator=torch.Generator().manual_seed(5))
    ref = ddim_sample(_sampler(teacher), z, bt, steps=2)  # the teacher at 2 steps
    before = (ddim_sample(_sampler(teacher), z, bt, steps=1) - ref).pow(2).mean().item()  # the teacher at 1 step
    cfg = TrainConfig(steps=150, batch_size=4, lr=1e-3, warmup_steps=1, threads=1, log_every=20, checkpoint_every=1000)
    student = distill_round(teacher, make_batch, 1, cfg, tmp_path / "round")
    after = (ddim_sample(_sampler(student.eval()), z, bt, steps=1) - ref).pow(2).mean().item()
    assert after < 0.7 * before, (before, after)
    assert (tmp_path / "round" / "checkpoint.pt").is_file() and (tmp_path / "round" / "log.jsonl").is_file()
