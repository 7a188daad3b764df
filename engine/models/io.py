"""Save and load a model as two files: ``<name>.json`` (architecture config) and ``<name>.pt``.

The config is a frozen dataclass written as JSON beside the weights (never a pickle), so a
bundle can be read, diffed and checked without importing training code.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def config_to_dict(cfg: Any) -> dict:
    return {"kind": type(cfg).__name__, **dataclasses.asdict(cfg)}


def config_from_dict(cls: type, data: dict) -> Any:
    data = dict(data)
    kind = data.pop("kind", cls.__name__)
    if kind != cls.__name__:
        raise ValueError(f"config kind {kind!r} does not match {cls.__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config fields {unknown}")
    for k, v in data.items():  # JSON has no tuples
        if isinstance(v, list):
            data[k] = tuple(v)
    return cls(**data)


def save_model(model: nn.Module, stem: str | Path, *, half: bool = False) -> tuple[Path, Path]:
    """Write ``stem.json`` (``model.config``) and ``stem.pt`` (state dict; fp16 if ``half``)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    cfg_path, w_path = stem.with_suffix(".json"), stem.with_suffix(".pt")
    cfg_path.write_text(json.dumps(config_to_dict(model.config), indent=1) + "\n")
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save(state, w_path)
    return cfg_path, w_path


def load_config(config_cls: type, stem: str | Path) -> Any:
    """The architecture config in ``stem.json``."""
    cfg_path = Path(stem).with_suffix(".json")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"model file missing: {cfg_path}")
    return config_from_dict(config_cls, json.loads(cfg_path.read_text()))


def load_model(cls: type[M], config_cls: type, stem: str | Path, *, map_location: str = "cpu") -> M:
    """Build ``cls(config)`` from ``stem.json`` and load ``stem.pt`` (weights cast to fp32)."""
    stem = Path(stem)
    cfg_path, w_path = stem.with_suffix(".json"), stem.with_suffix(".pt")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"model file missing: {p}")
    cfg = config_from_dict(config_cls, json.loads(cfg_path.read_text()))
    model = cls(cfg)
    state = torch.load(w_path, map_location=map_location, weights_only=True)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state)
    model.eval()
    return model
