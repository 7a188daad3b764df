"""The I/O contract of every exported graph, in one place.

One :class:`ModelSpec` per graph: its name (the ``.onnx`` file stem), the bundle model it comes
from, the module that is exported (the model itself when its ``forward`` is the graph, else a
small adapter below), its inputs and outputs (names, symbolic shapes, dtypes, how sample values
are drawn), the dynamic dimensions with their TensorRT (min, opt, max) sizes, and the tolerance
the export is checked with.

Shapes are tuples of symbols and integers. Symbols listed in ``ModelSpec.profile`` are dynamic
(``B`` batch everywhere; ``T`` frames for the audio encoder and A2L); every other symbol is a
static size read from the model's config by ``ModelSpec.static_dims``.

Names follow the house rule: an ONNX input name is the Python argument name of the exported
``forward`` (``export/onnx.py`` checks the signature), and no output reuses an input's name
(A2L's GRU state goes in as ``state`` and comes out as ``state_out``).

Graphs:
  encoder        image (B, 3, H, H) in [-1, 1]               -> z (B, C, S, S)      AutoencoderKL.encode
  decoder        z (B, C, S, S)                              -> image (B, 3, H, H)  AutoencoderKL.decode
  audio_encoder  mel_windows (B, T, W, M)                    -> features (B, T, D)  AudioEncoder.forward
  a2l            audio (B, T, D), reference (B, K, 2),
                 state (L, B, H)                             -> landmarks (B, T, K, 2), state_out (L, B, H)
  denoiser       z, t, masked, mask, reference, previous,
                 landmarks, audio                            -> v (B, C, S, S)      Denoiser.forward
  warp           x (B, C, S, S), src (B, N, 2), dst (B, N, 2) -> warped (B, C, S, S) engine.models.warp.warp

Not exported: the DDIM loop (a Python loop over steps; it calls the exported denoiser), the
sync expert (evaluation only, not on the render path) and the pixel-space mask/compositing
(numpy, per frame).

A2L streams: start an utterance with ``state`` = zeros (L, B, H) and feed ``state_out`` back
as the next call's ``state``; frame by frame (T = 1) equals the whole sequence at once.

Tolerances: every graph is checked at ``atol = 1e-4`` (max-abs error against PyTorch fp32 on
CPU, ONNX Runtime 1.31). Measured with random weights, both for the tiny bundle of
``tests/tiny.py`` and for the default configs: warp ~1.6e-5 (grid_sample), decoder ~3e-6,
the others <= 1.3e-6. Override ``ModelSpec.atol`` per model if a trained model needs more.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from engine.models.warp import warp

Dim = int | str  # a static size, or a symbol (dynamic if in ModelSpec.profile, else from the config)

BATCH_PROFILE = (1, 1, 8)  # TensorRT (min, opt, max) batch for every graph
EXPORT_SIZES: dict[str, int] = {"B": 2, "T": 7}  # sizes the export traces with (not 1: a traced 1 can be taken for broadcasting)
CHECK_SIZES: tuple[dict[str, int], ...] = ({"B": 1, "T": 1}, {"B": 3, "T": 12})  # further sizes every export is validated at


@dataclass(frozen=True)
class TensorSpec:
    name: str  # ONNX tensor name (for an input: the Python argument name of the exported forward)
    shape: tuple[Dim, ...]  # symbolic shape
    dtype: torch.dtype = torch.float32
    sample: str = "normal"  # sample values: "normal" N(0, 1), "unit" U(0, 1), "binary" {0, 1}, "points" U(0.2, 0.8) (patch units)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # graph name and file stem (<name>.onnx)
    role: str  # the bundle model it is built from (engine.bundle.ROLES)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    static_dims: Callable[[Any], dict[str, int]]  # the model's config -> sizes of the static symbols
    profile: Mapping[str, tuple[int, int, int]] = field(default_factory=lambda: {"B": BATCH_PROFILE})  # dynamic symbol -> TensorRT (min, opt, max)
    adapter: Callable[[nn.Module], nn.Module] | None = None  # bundle model -> exported module; None: the model itself
    atol: float = 1e-4  # max-abs error allowed against PyTorch

    # -- the contract, derived --
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return {t.name: t.dtype for t in (*self.inputs, *self.outputs)}

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s dynamic_axes: tensor name -> {axis: symbol}, for inputs and outputs."""
        axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str) and d in self.profile} for t in (*self.inputs, *self.outputs)}
        return {k: v for k, v in axes.items() if v}

    def module_for(self, model: nn.Module) -> nn.Module:
        """The module to export for a bundle model (eval mode)."""
        return (self.adapter(model) if self.adapter is not None else model).eval()

    def dims(self, model: nn.Module, sizes: Mapping[str, int] | None = None) -> dict[str, int]:
        """Every symbol's size: static ones from ``model.config``, dynamic ones from ``sizes`` (default: ``EXPORT_SIZES``)."""
        sizes = {**EXPORT_SIZES, **(sizes or {})}
        return {**self.static_dims(model.config), **{s: int(sizes[s]) for s in self.profile}}

    def shapes(self, model: nn.Module, sizes: Mapping[str, int] | None = None) -> dict[str, tuple[int, ...]]:
        """Concrete shapes of every input and output at ``sizes``."""
        d = self.dims(model, sizes)
        return {t.name: tuple(d[x] if isinstance(x, str) else x for x in t.shape) for t in (*self.inputs, *self.outputs)}

    def trt_shapes(self, model: nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimisation profile: input name -> (min, opt, max) shapes."""
        by_level = [self.shapes(model, {s: p[i] for s, p in self.profile.items()}) for i in range(3)]
        return {t.name: (by_level[0][t.name], by_level[1][t.name], by_level[2][t.name]) for t in self.inputs}

    def sample_inputs(self, model: nn.Module, sizes: Mapping[str, int] | None = None, *, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random inputs (in the order of ``inputs``) with shapes from the model's config and ``sizes``."""
        g = torch.Generator().manual_seed(seed)
        shapes = self.shapes(model, sizes)
        out: dict[str, torch.Tensor] = {}
        for t in self.inputs:
            shape = shapes[t.name]
            if t.sample == "normal":
                x = torch.randn(shape, generator=g)
            elif t.sample == "unit":
                x = torch.rand(shape, generator=g)
            elif t.sample == "binary":
                x = (torch.rand(shape, generator=g) > 0.5).float()
            elif t.sample == "points":
                x = 0.2 + 0.6 * torch.rand(shape, generator=g)
            else:
                raise ValueError(f"{self.name}.{t.name}: unknown sample kind {t.sample!r}")
            out[t.name] = x.to(t.dtype)
        return out


# -- adapters: a method that is not ``forward`` becomes the forward of a small module --
class EncoderGraph(nn.Module):
    """AutoencoderKL.encode: image (B, 3, H, H) in [-1, 1] -> scaled posterior mean z (B, C, S, S)."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder
        self.config = autoencoder.config

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(image)


class DecoderGraph(nn.Module):
    """AutoencoderKL.decode: scaled latent z (B, C, S, S) -> image (B, 3, H, H) in about [-1, 1]."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder
        self.config = autoencoder.config

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z)


class AudioEncoderGraph(nn.Module):
    """AudioEncoder.forward with the temporal filter's windows taken by index (``Tensor.unfold``
    over a dynamic length does not export with the TorchScript exporter). The clamped indices
    repeat the edge frames exactly as ``AudioEncoder.smooth`` pads them: the result is equal."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        if encoder.config.input_kind != "mel":
            raise ValueError(f"only input_kind 'mel' is exported, got {encoder.config.input_kind!r}")
        self.encoder = encoder
        self.config = encoder.config

    def forward(self, mel_windows: torch.Tensor) -> torch.Tensor:
        c, la = self.config.filter_context_frames, self.config.filter_lookahead_frames
        feats = self.encoder.frame_features(mel_windows)  # (B, T, D)
        t = feats.shape[1]
        idx = (torch.arange(t)[:, None] + torch.arange(-c, la + 1)[None, :]).clamp(0, t - 1)  # (T, K), oldest first
        return self.encoder.smooth_windows(feats[:, idx])  # windows (B, T, K, D) -> (B, T, D)


@dataclass(frozen=True)
class WarpConfig:
    latent_channels: int  # C of the warped latent
    latent_size: int  # S, its side
    n_points: int  # N, landmarks that steer the warp (engine.face.region.warp_indices)
    sigma: float = 0.04  # Gaussian radius of the flow, unit coordinates (engine.models.warp.warp's default)


class WarpGraph(nn.Module):
    """engine.models.warp.warp(x, src, dst) at latent resolution; no weights."""

    def __init__(self, config: WarpConfig):
        super().__init__()
        self.config = config

    @classmethod
    def from_autoencoder(cls, autoencoder: nn.Module) -> "WarpGraph":
        from engine.face.region import warp_indices

        c = autoencoder.config
        return cls(WarpConfig(latent_channels=c.latent_channels, latent_size=c.latent_size, n_points=len(warp_indices())))

    def forward(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        return warp(x, src, dst, sigma=self.config.sigma)


# -- the specs --
def _ae_dims(c: Any) -> dict[str, int]:
    return {"H": c.image_size_px, "C": c.latent_channels, "S": c.latent_size}


ENCODER = ModelSpec(
    name="encoder", role="autoencoder", adapter=EncoderGraph, static_dims=_ae_dims,
    inputs=(TensorSpec("image", ("B", 3, "H", "H")),),
    outputs=(TensorSpec("z", ("B", "C", "S", "S")),),
)

DECODER = ModelSpec(
    name="decoder", role="autoencoder", adapter=DecoderGraph, static_dims=_ae_dims,
    inputs=(TensorSpec("z", ("B", "C", "S", "S")),),
    outputs=(TensorSpec("image", ("B", 3, "H", "H")),),
)

AUDIO_ENCODER = ModelSpec(
    name="audio_encoder", role="audio_encoder", adapter=AudioEncoderGraph,
    static_dims=lambda c: {"W": c.window_rows, "M": c.n_mels, "D": c.feature_dim},
    profile={"B": BATCH_PROFILE, "T": (1, 25, 250)},  # T: video frames (opt: one second at 25 fps)
    inputs=(TensorSpec("mel_windows", ("B", "T", "W", "M")),),
    outputs=(TensorSpec("features", ("B", "T", "D")),),
)

A2L = ModelSpec(
    name="a2l", role="a2l",  # AudioToLandmarks.forward(audio, reference, state) is the graph, state given explicitly
    static_dims=lambda c: {"D": c.feature_dim, "K": c.n_landmarks, "L": c.layers, "H": c.hidden},
    profile={"B": BATCH_PROFILE, "T": (1, 1, 250)},  # T: frames per call (opt 1: streaming one frame at a time)
    inputs=(TensorSpec("audio", ("B", "T", "D")), TensorSpec("reference", ("B", "K", 2), sample="points"),
            TensorSpec("state", ("L", "B", "H"))),
    outputs=(TensorSpec("landmarks", ("B", "T", "K", 2)), TensorSpec("state_out", ("L", "B", "H"))),
)

DENOISER = ModelSpec(
    name="denoiser", role="denoiser",  # Denoiser.forward is the graph
    static_dims=lambda c: {"C": c.latent_channels, "S": c.latent_size, "K": c.n_landmarks, "A": c.audio_tokens, "D": c.audio_dim},
    inputs=(TensorSpec("z", ("B", "C", "S", "S")), TensorSpec("t", ("B",), sample="unit"),
            TensorSpec("masked", ("B", "C", "S", "S")), TensorSpec("mask", ("B", 1, "S", "S"), sample="binary"),
            TensorSpec("reference", ("B", "C", "S", "S")), TensorSpec("previous", ("B", "C", "S", "S")),
            TensorSpec("landmarks", ("B", "K", 2), sample="points"), TensorSpec("audio", ("B", "A", "D"))),
    outputs=(TensorSpec("v", ("B", "C", "S", "S")),),
)

WARP = ModelSpec(
    name="warp", role="autoencoder", adapter=WarpGraph.from_autoencoder,
    static_dims=lambda c: {"C": c.latent_channels, "S": c.latent_size, "N": c.n_points},
    inputs=(TensorSpec("x", ("B", "C", "S", "S")), TensorSpec("src", ("B", "N", 2), sample="points"),
            TensorSpec("dst", ("B", "N", 2), sample="points")),
    outputs=(TensorSpec("warped", ("B", "C", "S", "S")),),
)

SPECS: tuple[ModelSpec, ...] = (ENCODER, DECODER, AUDIO_ENCODER, A2L, DENOISER, WARP)


def spec_by_name(name: str) -> ModelSpec:
    for s in SPECS:
        if s.name == name:
            return s
    raise KeyError(f"no export spec named {name!r} (have {[s.name for s in SPECS]})")


def specs_for_bundle(bundle: Any) -> list[tuple[ModelSpec, nn.Module]]:
    """(spec, module to export) for every spec whose model the bundle holds (an ``engine.bundle.Bundle``)."""
    return [(s, s.module_for(bundle.models[s.role])) for s in SPECS if s.role in bundle.models]
