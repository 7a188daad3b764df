"""`avatar train MODEL --data DIR.. --config FILE --out RUN`: read the config, call the trainer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine.models.io import config_from_dict
from engine.training.loop import train_config_from

LAMBDAS = (0.3, 1.0, 3.0, 10.0, 30.0)  # engine/training/a2l_linear.LAMBDAS and SMOOTHINGS, without importing torch here
SMOOTHINGS = (1.0, 0.7, 0.5, 0.35)


def run_training(model: str, *, data: list[str], config: Path, out: Path) -> None:
    if not config.is_file():
        raise FileNotFoundError(f"config file not found: {config}")
    spec = json.loads(config.read_text())
    unknown = sorted(set(spec) - {"model", "train", "options", "_comment"})
    if unknown:
        raise ValueError(f"{config}: unknown top-level keys {unknown} (expected model, train, options)")
    tcfg = train_config_from(spec.get("train", {}))
    opts = spec.get("options", {})
    allowed = {"autoencoder": {"kl_weight", "ssim_weight", "region", "init"}, "a2l": {"seq_frames", "velocity_weight", "shape_weight", "opening_weight", "opening_std_weight",
                       "neutral_reference_prob", "audio_encoder", "landmark_delay_frames"},
               "denoiser": {"autoencoder", "audio_encoder", "mask_weight", "ref_min", "ref_max", "prev_min", "prev_max", "prev_noise",
                            "p_no_previous", "landmark_jitter", "region", "init"}}
    linear = model == "a2l" and spec.get("model", {}).get("a2l", {}).get("arch") == "linear"  # fitted, not trained: its own options
    if model in allowed and not linear and set(opts) - allowed[model]:
        raise ValueError(f"{config}: unknown {model} options {sorted(set(opts) - allowed[model])}; known: {sorted(allowed[model])}")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config, out / "config.json")
    if model == "autoencoder":
        from engine.models.autoencoder import AutoencoderConfig
        from engine.training.autoencoder import train_autoencoder

        train_autoencoder(data, str(out), config_from_dict(AutoencoderConfig, spec.get("model", {})), tcfg, **opts)
    elif linear:
        from engine.training.a2l_linear import fit_linear_a2l

        if set(opts) - {"audio_encoder", "lambdas", "folds", "smoothings"} or "audio_encoder" not in opts:
            raise ValueError(f"{config}: a linear A2L takes the options audio_encoder (required), lambdas, folds, smoothings; got {sorted(opts)}")
        fit_linear_a2l(data, str(out), audio_encoder=opts["audio_encoder"], lambdas=tuple(opts.get("lambdas", LAMBDAS)),
                       folds=int(opts.get("folds", 5)), seed=tcfg.seed, smoothings=tuple(opts.get("smoothings", SMOOTHINGS)))
    elif model == "a2l":
        from engine.training.a2l import train_a2l

        train_a2l(data, str(out), spec.get("model", {}), tcfg, **opts)
    elif model == "denoiser":
        from engine.training.denoiser import train_denoiser

        train_denoiser(data, str(out), spec.get("model", {}), tcfg, **opts)
    elif model == "sync":
        from engine.training.sync import train_sync

        train_sync(data, str(out), spec.get("model", {}), tcfg, **opts)
    else:
        raise ValueError(f"unknown model {model!r}")
