"""The training loop (resume is exact, curves are written) and short overfits on real data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.face.region import extract_patch
from engine.models.autoencoder import AutoencoderKL
from engine.training.autoencoder import to_tensor
from engine.training.loop import TrainConfig, TrainingInterrupted, train
from tests.synth import load_rgb
from tests.tiny import AE


def _toy_run(out, steps, seed=0, max_minutes=0.0):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    w_true = torch.tensor([[1.0, -2.0, 0.5, 3.0]])

    def make_batch(rng):
        x = torch.from_numpy(rng.standard_normal((16, 4)).astype(np.float32))
        return x, x @ w_true.T

    def loss_fn(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean(), {}

    cfg = TrainConfig(steps=steps, batch_size=16, lr=1e-2, warmup_steps=2, ema_decay=0.9, seed=seed, threads=1, log_every=1, checkpoint_every=2,
                      max_minutes=max_minutes)
    return train(name="toy", model=model, make_batch=make_batch, loss_fn=loss_fn, cfg=cfg, out_dir=out)


def test_resume_continues_exactly(tmp_path):
    full = _toy_run(tmp_path / "a", 6)
    for _ in range(3):  # interrupted three times (a wall-time limit stops it after one step, with a checkpoint) ...
        with pytest.raises(TrainingInterrupted, match="run the same command again"):
            _toy_run(tmp_path / "b", 6, max_minutes=1e-9)
    resumed = _toy_run(tmp_path / "b", 6)  # ... and run again to the end
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-7)
    rows = [json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "b" / "loss.png").stat().st_size > 1000


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    model = torch.nn.Linear(2, 1)
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        train(name="bad", model=model, make_batch=lambda rng: None, loss_fn=lambda m, b: (torch.tensor(float("nan"), requires_grad=True), {}),
              cfg=TrainConfig(steps=3, threads=1), out_dir=tmp_path)


def test_autoencoder_overfits_real_face_patches(shared_data, tmp_path):
    from engine.face.align import AlignConfig, fit_transform, warp_to_crop
    from engine.face.landmarks import landmarks_for_image

    patches = []
    for name in ["dreamtalk__data_src_img_cropped_f30.png", "SadTalker__examples_source_image_happy.png"]:
        img = load_rgb(shared_data / "portraits" / name)
        lm, _ = landmarks_for_image(img)
        m = fit_transform(lm, AlignConfig())
        patches.append(extract_patch(warp_to_crop(img, m, AlignConfig())))
    x = to_tensor(np.stack(patches))
    torch.manual_seed(0)
    model = AutoencoderKL(AE)

    def loss_fn(m, b):
        return (m.decoder(m.encode_dist(b)[0]) - b).abs().mean(), {}

    with torch.no_grad():
        before = loss_fn(model, x)[0].item()
    cfg = TrainConfig(steps=40, lr=3e-3, warmup_steps=5, threads=1, log_every=10, checkpoint_every=40)
    trained = train(name="ae", model=model, make_batch=lambda rng: x, loss_fn=loss_fn, cfg=cfg, out_dir=tmp_path)
    with torch.no_grad():
        after = loss_fn(trained, x)[0].item()
    assert after < 0.6 * before


def test_batches_move_to_the_training_device():
    from engine.training.loop import to_device

    from engine.training.sync import SyncBatch

    b = {"x": torch.zeros(2), "pair": (torch.ones(1), [torch.ones(1)]), "n": 3, "sync": SyncBatch(torch.zeros(1), torch.ones(1))}
    out = to_device(b, torch.device("cpu"))
    assert isinstance(out["sync"], SyncBatch) and torch.equal(out["sync"].mel, torch.ones(1))
    assert out["n"] == 3 and isinstance(out["pair"], tuple) and isinstance(out["pair"][1], list)
    assert out["x"].device.type == "cpu"


@pytest.mark.gpu
def test_toy_run_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    cfg = TrainConfig(steps=3, batch_size=4, threads=1, device="cuda", checkpoint_every=2, log_every=1)
    trained = train(name="cuda", model=model, make_batch=lambda rng: torch.from_numpy(rng.standard_normal((4, 4)).astype(np.float32)),
                    loss_fn=lambda m, b: (m(b).square().mean(), {}), cfg=cfg, out_dir=tmp_path)
    assert next(trained.parameters()).device.type == "cuda"
