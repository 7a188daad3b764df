"""LPIPS image distance, offline: the shift-tolerant variant (ST-LPIPS) from ``stlpips-pytorch``.

**Which metric this is.** ST-LPIPS (Ghildyal & Liu, "Shift-tolerant Perceptual Similarity Metric",
ECCV 2022): LPIPS v0.1's recipe (unit-normalised backbone features, squared differences, learned
1x1 linear weights, spatial mean, summed over 5 layers) on an *anti-aliased* backbone — AlexNet
with a stride-1 first convolution, blur-pool downsampling with reflection padding — trained on
the BAPPS judgements. It is **not** the original LPIPS of Zhang et al. 2018 (the ``lpips``
package): its numbers are on a similar scale but are not comparable with LPIPS values published
by other papers. It is, by design, much less sensitive to small translations (a 1-pixel shift)
than the original, which suits a talking head whose generated frames may sit a pixel off the
reference. Lower is more similar; identical images give 0.

**Why this package.** The original ``lpips`` package takes its backbones from torchvision's
ImageNet download; nothing here can download them, and torchvision from PyPI does not import
beside this project's torch build. ``stlpips-pytorch==0.0.2`` ships *complete* weight files
(backbone + linear layers: AlexNet 9.9 MB, VGG16 59 MB) and defines its shift-tolerant backbones
itself, so no network access and no torchvision are needed. It imports three modules at module
level that it never uses on this path (torchvision, IPython, torchsummary); see
:func:`_import_stlpips` for how those are stubbed.

Licences: stlpips-pytorch is BSD-2-Clause; its ``models_lpf/downsample.py`` (the blur-pool,
from Adobe's antialiased-cnns) carries a CC BY-NC-SA 4.0 header.

API: :class:`LPIPS` (an ``nn.Module``; gradients flow to the inputs, so it can serve as a loss)
and :func:`lpips_distance` (no grad, one cached model per backbone).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import threading
import types
from pathlib import Path

import torch
from torch import nn

INSTALL_HINT = "pip install stlpips-pytorch==0.0.2"

_NETS = {"alex": "AlexNet", "vgg": "VGG16"}
# smallest side the backbone's reflection padding accepts (measured: below it torch raises)
_MIN_SIDE = {"alex": 21, "vgg": 18}
_STUB_LOCK = threading.Lock()


class _AbsentModule(types.ModuleType):
    """Stands in for a module that stlpips imports but never uses on the shift-tolerant path.

    Any attribute other than the few it must expose raises, naming the real package, so a code
    path that does need it fails loudly instead of silently doing the wrong thing.
    """

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise ImportError(f"{self.__name__}.{attr} is a stub installed by engine.eval.lpips only so that "
                          f"stlpips_pytorch can be imported; this code path needs the real {self.__name__.split('.')[0]}")


def _unused(name: str):
    def fn(*args, **kwargs):
        raise RuntimeError(f"{name} is a stub installed by engine.eval.lpips (stlpips imports it but the metric never calls it)")
    fn.__name__ = name.rsplit(".", 1)[-1]
    return fn


def _make_stubs() -> dict[str, types.ModuleType]:
    # exactly the names stlpips_pytorch 0.0.2 imports at module level:
    #   pretrained_networks.py, invariant_networks.py: ``from torchvision import models as tv``
    #     (used only by the non-shift-tolerant variants: tv.alexnet(pretrained=True) etc.)
    #   invariant_networks.py, models_lpf/downsample.py: ``from IPython import embed`` (a debugging leftover)
    #   stlpips.py: ``from torchsummary import summary`` (used only by print_network)
    tv = _AbsentModule("torchvision")
    tv.models = _AbsentModule("torchvision.models")  # ``from torchvision import models`` reads this attribute
    ipy = _AbsentModule("IPython")
    ipy.embed = _unused("IPython.embed")
    ts = _AbsentModule("torchsummary")
    ts.summary = _unused("torchsummary.summary")
    return {"torchvision": tv, "IPython": ipy, "torchsummary": ts}


def _import_stlpips() -> types.ModuleType:
    """Import ``stlpips_pytorch.stlpips``, with import stubs only where they are needed.

    stlpips imports torchvision, IPython and torchsummary at module level although the
    shift-tolerant metric uses none of them (it defines its own backbones and ships their weights).
    torchvision from PyPI does not import beside this project's torch build, and the other two are
    dead weight, so none is a dependency. For each of the three *that is not installed*, a stub
    module is put in ``sys.modules`` just for the duration of this import and removed right after:
    stlpips keeps its references to the stubs, but no other code can ever import them, and an
    installed real module is always used as is (if torchvision is installed but broken, the import
    fails with its error: uninstall it).
    """
    mod = sys.modules.get("stlpips_pytorch.stlpips")
    if mod is not None:
        return mod
    if importlib.util.find_spec("stlpips_pytorch") is None:
        raise ImportError(f"the LPIPS metric needs stlpips-pytorch (weights included, no download): {INSTALL_HINT}")
    with _STUB_LOCK:
        installed: dict[str, types.ModuleType] = {}
        try:
            for name, stub in _make_stubs().items():
                if name not in sys.modules and importlib.util.find_spec(name) is None:
                    sys.modules[name] = installed[name] = stub
            return importlib.import_module("stlpips_pytorch.stlpips")
        finally:
            for name, stub in installed.items():
                if sys.modules.get(name) is stub:
                    del sys.modules[name]


class _MaxPoolStride1(nn.Module):
    """Exact drop-in for ``nn.MaxPool2d(k, stride=1)`` (no padding, dilation 1): a max over k shifted
    slices along W, then along H. torch 2.13's CPU kernel for stride-1 max pooling on NCHW tensors is
    ~20x slower than this (10.7 ms against 0.5 ms for 64x62x62 on one thread), and the shift-tolerant
    backbones pool at stride 1 (then blur-downsample): this swap alone makes ST-LPIPS ~1.5x faster.
    """

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k
        w, h = x.shape[-1] - k + 1, x.shape[-2] - k + 1
        r = x[..., :w]
        for i in range(1, k):
            r = torch.maximum(r, x[..., i:i + w])
        out = r[..., :h, :]
        for i in range(1, k):
            out = torch.maximum(out, r[..., i:i + h, :])
        return out

    def extra_repr(self) -> str:
        return f"kernel_size={self.k}, stride=1"


def _swap_stride1_maxpools(module: nn.Module) -> int:
    """Replace every plain stride-1 ``nn.MaxPool2d`` under ``module`` by :class:`_MaxPoolStride1`."""
    n = 0
    for name, child in module.named_children():
        if (isinstance(child, nn.MaxPool2d) and child.stride in (1, (1, 1)) and child.padding in (0, (0, 0))
                and child.dilation in (1, (1, 1)) and not child.ceil_mode and not child.return_indices
                and isinstance(child.kernel_size, int)):
            setattr(module, name, _MaxPoolStride1(child.kernel_size))
            n += 1
        else:
            n += _swap_stride1_maxpools(child)
    return n


class LPIPS(nn.Module):
    """ST-LPIPS (shift-tolerant LPIPS) distance between two batches of images.

    ``LPIPS(net)(a, b)`` with ``a``, ``b`` of shape (B, 3, H, W), RGB, float in [-1, 1], same
    shape, returns a (B,) tensor: one distance per pair, >= 0, 0 for identical images. ``net`` is
    ``"alex"`` (default, as in the package's README) or ``"vgg"`` (VGG16, ~4-5x slower). H and W
    must be at least 21 px (alex) / 18 px (vgg); 64+ is sensible (the backbone downsamples 16x).
    Weights are read from the stlpips-pytorch package: no network access. Always in eval mode (``train()`` is a no-op, so
    the linear layers' dropout never runs). Parameters are frozen; gradients flow to the inputs.
    """

    def __init__(self, net: str = "alex", *, check_range: bool = True, fast_maxpool: bool = True) -> None:
        super().__init__()
        if net not in _NETS:
            raise ValueError(f"net must be one of {sorted(_NETS)}, got {net!r}")
        st = _import_stlpips()
        self.net_name = net
        self.name = f"ST-LPIPS (shift-tolerant), {_NETS[net]}"
        self.check_range = check_range
        # pretrained=False: stlpips would load its weights with strict=False, which would hide a
        # missing tensor; load them here, strictly and with weights_only.
        self.model = st.LPIPS(pretrained=False, net=net, variant="shift_tolerant", version="0.1", lpips=True,
                              spatial=False, verbose=False, eval_mode=True)
        self.weights_path = Path(st.__file__).parent / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        # stlpips registers each linear layer twice (``lin0`` and ``lins.0`` are the same module);
        # the file holds the ``linK`` names only: add the aliases so that the strict load passes.
        state.update({f"lins.{k[3]}{k[4:]}": v for k, v in state.items() if k[:3] == "lin" and k[3].isdigit()})
        self.model.load_state_dict(state, strict=True)
        self.model.requires_grad_(False)
        self.model.eval()
        if fast_maxpool:  # exact, see _MaxPoolStride1
            _swap_stride1_maxpools(self.model)

    def train(self, mode: bool = True) -> "LPIPS":
        # a metric: keep eval mode (no dropout) even inside a model that is put in train mode
        return super().train(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.dim() != 4 or a.shape[1] != 3:
            raise ValueError(f"expected two (B, 3, H, W) tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        if min(a.shape[2:]) < _MIN_SIDE[self.net_name]:
            raise ValueError(f"images of {a.shape[2]}x{a.shape[3]} px are too small for ST-LPIPS {self.net_name} "
                             f"(at least {_MIN_SIDE[self.net_name]} px a side, better 64+)")
        if self.check_range:
            lo = min(a.detach().min().item(), b.detach().min().item())
            hi = max(a.detach().max().item(), b.detach().max().item())
            if lo < -1.5 or hi > 1.5:  # loose: slightly-off decoder outputs pass, [0, 255] images do not
                raise ValueError(f"LPIPS expects images in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
        dtype = next(self.model.parameters()).dtype
        d = self.model(a.to(dtype), b.to(dtype))  # (B, 1, 1, 1)
        return d.reshape(a.shape[0])

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


@functools.lru_cache(maxsize=None)
def get_lpips(net: str = "alex") -> LPIPS:
    """The shared, cached :class:`LPIPS` model for ``net`` (built on first use)."""
    return LPIPS(net)


def lpips_distance(a: torch.Tensor, b: torch.Tensor, net: str = "alex") -> torch.Tensor:
    """ST-LPIPS distance, (B,) float32, between (B, 3, H, W) images in [-1, 1]; no gradients,
    cached model (see :class:`LPIPS`, whose ``name`` names the variant)."""
    with torch.no_grad():
        return get_lpips(net)(a, b)
