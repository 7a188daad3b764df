"""Model bundles: a folder of models with a manifest that says what they are and pins their bytes.

``manifest.json``: format version, fps, sample rate, crop size, default denoising steps, the
role -> file stem of each model, and the sha256 of every file. Loading checks every hash and
refuses a bundle whose bytes differ from its manifest, naming the file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from engine.errors import BundleError

DEFAULT_BUNDLE = Path(__file__).resolve().parent / "bundles" / "default"
FORMAT = "avatar-bundle/1"
ROLES = ("autoencoder", "audio_encoder", "a2l", "denoiser", "sync")
REQUIRED = ("autoencoder", "audio_encoder", "a2l", "denoiser")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(bundle_dir: str | Path, *, fps: int, sample_rate_hz: int, crop_size_px: int, steps: int, extra: dict | None = None) -> dict:
    """(Re)write ``manifest.json`` over the model files present in ``bundle_dir``."""
    import torch

    d = Path(bundle_dir)
    models = {r: r for r in ROLES if (d / f"{r}.json").is_file() and ((d / f"{r}.pt").is_file() or (extra or {}).get("graphs"))}
    missing = [r for r in REQUIRED if r not in models]
    if missing:
        raise BundleError(f"{d}: missing model files for {missing} (need <role>.json and <role>.pt, or exported graphs)")
    files = sorted(p.name for p in d.iterdir() if p.is_file() and p.name != "manifest.json")
    manifest = {"format": FORMAT, "fps": fps, "sample_rate_hz": sample_rate_hz, "crop_size_px": crop_size_px, "steps": steps,
                "models": models, "torch_version": torch.__version__, **(extra or {}),
                "files": {name: sha256_file(d / name) for name in files}}
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


@dataclass
class Bundle:
    path: Path
    manifest: dict
    models: dict[str, nn.Module] = field(default_factory=dict)  # role -> PyTorch model (where the bundle has its .pt)
    configs: dict[str, Any] = field(default_factory=dict)  # role -> architecture config (always)

    @property
    def graphs(self) -> dict[str, str]:
        """Exported graph name -> ONNX file name (``avatar export`` writes them; empty for a PyTorch-only bundle)."""
        return dict(self.manifest.get("graphs", {}))

    @property
    def graph_variants(self) -> dict[str, dict[str, str]]:
        """Reduced-precision graphs: precision -> {graph name -> ONNX file name}, e.g.
        ``{"int8": {"denoiser": "denoiser.int8.onnx"}}`` (``avatar export`` writes them). A graph not
        listed under a precision runs from its fp32 file (``graphs``)."""
        return {p: dict(files) for p, files in self.manifest.get("graph_variants", {}).items()}

    @property
    def fps(self) -> int:
        return int(self.manifest["fps"])

    @property
    def steps(self) -> int:
        return int(self.manifest["steps"])

    @property
    def blink_prior(self):
        """The bundle's fitted blink prior (motion_prior.json), else the defaults."""
        from engine.motion.blink import BlinkPrior

        f = self.path / "motion_prior.json"
        return BlinkPrior.load(f) if f.is_file() else BlinkPrior()

    @property
    def articulation(self):
        """The bundle's calibrated articulation layer (articulation.json), else none (gain 1)."""
        from engine.motion.articulation import ArticulationConfig

        f = self.path / "articulation.json"
        return ArticulationConfig.load(f) if f.is_file() else ArticulationConfig()

    @property
    def a2l_centre(self):
        """The session centring of the A2L's features (a2l_centre.json), else None (off)."""
        from engine.motion.feature_centre import FeatureCentreConfig

        f = self.path / "a2l_centre.json"
        return FeatureCentreConfig.load(f) if f.is_file() else None

    @property
    def head_motion(self):
        """The bundle's library of real head motion (head_motion.json), else None (procedural sway)."""
        from engine.motion.head import HeadMotionLibrary

        f = self.path / "head_motion.json"
        return HeadMotionLibrary.load(f) if f.is_file() else None

    @property
    def crop_size_px(self) -> int:
        return int(self.manifest["crop_size_px"])

    @property
    def region(self):
        """The patch the autoencoder and the denoiser work on (engine/face/region.py): manifest "region", default lower_face."""
        from engine.face.region import region_named

        return region_named(self.manifest.get("region"))

    def __getattr__(self, name: str):
        models = self.__dict__.get("models", {})
        if name in models:
            return models[name]
        raise AttributeError(name)


def load_bundle(path: str | Path | None = None, *, verify: bool = True) -> Bundle:
    """Load the bundle at ``path`` (default: the one shipped in the package), checking hashes."""
    from engine.models.a2l import A2LConfig, AudioToLandmarks
    from engine.models.audio_encoder import AudioEncoder, AudioEncoderConfig
    from engine.models.autoencoder import AutoencoderConfig, AutoencoderKL
    from engine.models.denoiser import Denoiser, DenoiserConfig
    from engine.models.io import load_model

    d = Path(path) if path is not None else DEFAULT_BUNDLE
    mpath = d / "manifest.json"
    if not mpath.is_file():
        raise BundleError(f"{d}: not a model bundle (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r}")
    for key in ("fps", "sample_rate_hz", "crop_size_px", "steps", "models", "files"):
        if key not in manifest:
            raise BundleError(f"{mpath}: no {key!r} entry")
    listed = set(manifest["files"])
    for stem in manifest["models"].values():
        if stem + ".json" not in listed:
            raise BundleError(f"{d / (stem + '.json')}: a model file the manifest does not list (and so cannot check)")
    if verify:
        for name, digest in manifest["files"].items():
            f = d / name
            if not f.is_file():
                raise BundleError(f"{f}: listed in the manifest but missing")
            if sha256_file(f) != digest:
                raise BundleError(f"{f}: sha256 does not match the manifest (the file was changed or corrupted)")
    kinds = {"autoencoder": (AutoencoderKL, AutoencoderConfig), "audio_encoder": (AudioEncoder, AudioEncoderConfig),
             "a2l": (AudioToLandmarks, A2LConfig), "denoiser": (Denoiser, DenoiserConfig)}
    try:
        from engine.models.sync import SyncConfig, SyncExpert

        kinds["sync"] = (SyncExpert, SyncConfig)
    except ImportError:
        pass
    from engine.models.io import load_config

    bundle = Bundle(d, manifest)
    for role, stem in manifest.get("models", {}).items():
        if role not in kinds:
            continue
        cls, cfg_cls = kinds[role]
        try:
            bundle.configs[role] = load_config(cfg_cls, d / stem)
            if (d / (stem + ".pt")).is_file():  # an exported bundle may carry ONNX graphs only
                bundle.models[role] = load_model(cls, cfg_cls, d / stem)
        except Exception as e:  # torch raises several kinds for a damaged file; name the file whatever it was
            raise BundleError(f"{d / stem}: cannot load the {role} model: {type(e).__name__}: {e}") from None
    for role in REQUIRED:
        if role not in bundle.configs:
            raise BundleError(f"{d}: the manifest names no {role} model")
    for name, fname in bundle.graphs.items():
        if fname not in listed:
            raise BundleError(f"{d / fname}: a graph file the manifest does not list (and so cannot check)")
    for precision, files in bundle.graph_variants.items():
        for name, fname in files.items():
            if name not in bundle.graphs:
                raise BundleError(f"{mpath}: graph_variants.{precision} names {name!r}, a graph the bundle does not have")
            if fname not in listed:
                raise BundleError(f"{d / fname}: a graph file ({precision}) the manifest does not list (and so cannot check)")
    _check_compatible(bundle)
    return bundle


def _check_compatible(b: Bundle) -> None:
    """The models of a bundle must fit together; say which fields disagree."""
    from engine.face.region import patch_box

    ae, enc, a2l, den = (b.configs[r] for r in REQUIRED)
    problems = []
    if enc.input_kind != "mel":
        problems.append(f"audio_encoder input_kind {enc.input_kind!r} (the render path supports 'mel')")
    if a2l.feature_dim != enc.feature_dim or den.audio_dim != enc.feature_dim:
        problems.append(f"audio feature sizes differ: audio_encoder {enc.feature_dim}, a2l {a2l.feature_dim}, denoiser {den.audio_dim}")
    if den.n_landmarks != a2l.n_landmarks:
        problems.append(f"denoiser n_landmarks {den.n_landmarks} != a2l {a2l.n_landmarks}")
    if den.latent_channels != ae.latent_channels or den.latent_size != ae.latent_size:
        problems.append(f"denoiser latent {den.latent_channels}x{den.latent_size} != autoencoder {ae.latent_channels}x{ae.latent_size}")
    if patch_box(b.crop_size_px, b.region)[2] != ae.image_size_px:
        problems.append(f"autoencoder image size {ae.image_size_px} != the {b.region.name} patch of a {b.crop_size_px} px crop")
    if problems:
        raise BundleError(f"{b.path}: models do not fit together: " + "; ".join(problems))
