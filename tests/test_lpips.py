"""ST-LPIPS (engine.eval.lpips) on real portraits from ../shared/data: zero on identical images,
ordered by the strength of a degradation, symmetric, (B,) per pair, tolerant of a 1-pixel shift
that pixel MSE punishes more than a blur; plus the import stubs and the missing-package message."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from engine.eval.lpips import INSTALL_HINT, LPIPS, lpips_distance
from tests.conftest import SHARED_DATA

torch.set_num_threads(1)

PORTRAITS = SHARED_DATA / "portraits"
N_IMAGES = 4
SIZE = 128


@pytest.fixture(scope="module")
def model() -> LPIPS:
    pytest.importorskip("stlpips_pytorch", reason=f"stlpips-pytorch is not installed ({INSTALL_HINT})")
    return LPIPS("alex")


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    """(x, x shifted right by 1 px): N_IMAGES real portraits, (N, 3, 128, 128) in [-1, 1], both cut
    from the same 136 px centre square, so the shift brings in real pixels (no wrap-around)."""
    import cv2

    paths = sorted(PORTRAITS.glob("*.png"))[:N_IMAGES]
    if len(paths) < N_IMAGES:
        pytest.skip(f"portraits not found in {PORTRAITS} (CI has ../shared/data beside the checkout)")
    big = []
    for p in paths:
        im = cv2.imread(str(p), cv2.IMREAD_COLOR)[:, :, ::-1]  # RGB
        h, w = im.shape[:2]
        s = min(h, w)
        im = np.ascontiguousarray(im[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s])
        big.append(cv2.resize(im, (SIZE + 8, SIZE + 8), interpolation=cv2.INTER_AREA))
    t = torch.from_numpy(np.stack(big)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return t[..., 4:4 + SIZE, 4:4 + SIZE].contiguous(), t[..., 4:4 + SIZE, 5:5 + SIZE].contiguous()


def _noisy(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    import cv2

    out = [cv2.GaussianBlur(np.ascontiguousarray(i.permute(1, 2, 0).numpy()), (0, 0), sigma) for i in x]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).mean(dim=(1, 2, 3))


@pytest.mark.shared_data
def test_identity_order_symmetry_shape(model: LPIPS, images) -> None:
    x, _ = images
    assert model.name == "ST-LPIPS (shift-tolerant), AlexNet"
    weak, strong = _noisy(x, 0.05, seed=1), _noisy(x, 0.2, seed=2)
    with torch.no_grad():
        d_same = model(x, x)
        d_weak, d_strong = model(x, weak), model(x, strong)
        d_strong_rev = model(strong, x)
    assert d_same.shape == d_weak.shape == (N_IMAGES,) and d_same.dtype == torch.float32
    assert d_same.abs().max().item() <= 1e-6
    assert (d_weak > 1e-3).all(), d_weak
    assert (d_strong > 2 * d_weak).all(), (d_strong, d_weak)
    torch.testing.assert_close(d_strong_rev, d_strong, rtol=1e-4, atol=1e-6)


@pytest.mark.shared_data
def test_shift_tolerant_where_pixel_mse_is_not(model: LPIPS, images) -> None:
    """A 1-px shift has a larger pixel MSE than a sigma=1 px blur, yet a far smaller ST-LPIPS."""
    x, shifted = images
    blurred = _blur(x, 1.0)
    assert (_mse(x, shifted) > _mse(x, blurred)).all()
    with torch.no_grad():
        d_shift, d_blur = model(x, shifted), model(x, blurred)
    assert (d_shift > 0).all()
    assert (d_blur > 5 * d_shift).all(), (d_blur, d_shift)  # measured: 20-40x on these portraits


@pytest.mark.shared_data
def test_batch_equals_pairs_and_cached_function(model: LPIPS, images) -> None:
    x, shifted = images
    y = _noisy(x, 0.1, seed=3)
    with torch.no_grad():
        batch = model(x, y)
        single = torch.cat([model(x[i:i + 1], y[i:i + 1]) for i in range(N_IMAGES)])
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lpips_distance(x, y), batch, rtol=1e-5, atol=1e-7)


@pytest.mark.shared_data
def test_fast_maxpool_is_exact(model: LPIPS, images) -> None:
    x, shifted = images
    ref = LPIPS("alex", fast_maxpool=False)
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in ref.modules())
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x[:2], shifted[:2]), ref(x[:2], shifted[:2]), rtol=1e-6, atol=1e-8)


def test_gradient_reaches_inputs(model: LPIPS) -> None:
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(2, 3, 64, 64, generator=g) * 2 - 1).requires_grad_(True)
    b = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    model(a, b).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training and not model.model.training  # stays in eval: no dropout


def test_bad_inputs(model: LPIPS) -> None:
    a = torch.zeros(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model(a, a + 255)
    with pytest.raises(ValueError, match="same shape"):
        model(a, torch.zeros(1, 3, 64, 32))
    with pytest.raises(ValueError, match="too small"):
        model(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="net must be"):
        LPIPS("squeeze")


def test_stubs_are_not_left_behind(model: LPIPS) -> None:
    """The torchvision/IPython/torchsummary stubs exist only for stlpips' own references."""
    inv = sys.modules["stlpips_pytorch.invariant_networks"]
    for name in ("torchvision", "IPython", "torchsummary"):
        if importlib.util.find_spec(name) is None:
            assert name not in sys.modules, f"stub for {name} leaked into sys.modules"
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError, match="stub"):
            inv.tv.alexnet  # a torchvision-backed code path fails loudly, not silently


def test_missing_package_names_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "stlpips_pytorch", None)  # find_spec() -> None: "not installed"
    monkeypatch.delitem(sys.modules, "stlpips_pytorch.stlpips", raising=False)
    with pytest.raises(ImportError, match="pip install stlpips-pytorch==0.0.2"):
        LPIPS()
