"""One training loop for every model: seeds, progress bar, checkpoints, resume, EMA, loss curves.

A trainer supplies ``make_batch(rng) -> batch`` and ``loss_fn(model, batch) -> (loss, metrics)``;
this loop owns everything else. A run directory holds ``checkpoint.pt`` (model, EMA, optimizer,
step, RNG states), ``log.jsonl`` (one line per logged step) and ``loss.png``. Starting a run
whose directory has a checkpoint resumes it; the same config gives the same result on the
same machine, whether or not it was interrupted at a checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm


class TrainingInterrupted(Exception):
    """The run stopped at its wall-time limit with a checkpoint; running it again resumes it."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps in total
    batch_size: int = 16  # samples per step
    lr: float = 2e-4  # AdamW peak learning rate (linear warm-up, cosine decay to 10 %)
    warmup_steps: int = 100  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm
    ema_decay: float = 0.0  # EMA of weights (0: off); the EMA weights are what gets exported
    seed: int = 0  # seeds model init, batches and noise
    threads: int = 2  # torch intra-op threads
    bf16_autocast: bool = False  # bf16 autocast for conv-heavy models (4x on AMX CPUs)
    device: str = "cpu"  # "cpu" or "cuda": the only change needed on a GPU machine
    log_every: int = 25  # steps between log lines
    checkpoint_every: int = 200  # steps between checkpoints
    max_minutes: float = 0.0  # stop (with a checkpoint) after this wall time; 0: no limit


def train_config_from(data: dict) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown train config fields {unknown}")
    return TrainConfig(**data)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a batch (tensors, tuples, lists, dicts of them) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: to_device(getattr(batch, f.name), device) for f in dataclasses.fields(batch)})
    return batch


def plot_curves(log_path: Path, png_path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in log_path.read_text().splitlines() if l.strip()]
    if not rows:
        return
    keys = [k for k in rows[-1] if k not in ("step", "lr", "elapsed_s", "samples_per_s")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        xs = [r["step"] for r in rows if k in r]
        ys = [r[k] for r in rows if k in r]
        ax.plot(xs, ys)
        ax.set_title(k)
        ax.set_xlabel("step")
        if all(y > 0 for y in ys):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


def train(
    *,
    name: str,
    model: nn.Module,
    make_batch: Callable[[np.random.Generator], Any],
    loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]],
    cfg: TrainConfig,
    out_dir: str | Path,
    extra_state: dict | None = None,
) -> nn.Module:
    """Train ``model`` in place; returns the model to export (the EMA copy when enabled)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    model.to(device).train()
    ema = None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    step = 0
    ckpt = out / "checkpoint.pt"
    log_path = out / "log.jsonl"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if cfg.ema_decay > 0:
            ema = copy.deepcopy(model).eval()
            if state.get("ema") is not None:
                ema.load_state_dict(state["ema"])
        step = int(state["step"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        print(f"[{name}] resumed from {ckpt} at step {step}")
        # rows logged after the checkpoint (an interrupted run) are dropped: they will be logged again
        rows = [l for l in log_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step] if log_path.is_file() else []
        log_path.write_text("".join(r + "\n" for r in rows))
    else:
        torch.manual_seed(cfg.seed)
        log_path.write_text("")
        ema = copy.deepcopy(model).eval() if cfg.ema_decay > 0 else None

    def save() -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                    "step": step, "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                    "config": dataclasses.asdict(cfg), **(extra_state or {})}, tmp)
        tmp.replace(ckpt)
        plot_curves(log_path, out / "loss.png", name)

    t0 = time.monotonic()
    acc: dict[str, list[float]] = {}
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {name}", dynamic_ncols=True, mininterval=2.0)
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        batch = to_device(make_batch(rng), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            loss, metrics = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"[{name}] loss is {loss.item()} at step {step}; last checkpoint kept at {ckpt}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1.0 - cfg.ema_decay)
                for be, bm in zip(ema.buffers(), model.buffers()):
                    be.copy_(bm)
        step += 1
        for k, v in {"loss": float(loss.item()), **metrics}.items():
            acc.setdefault(k, []).append(v)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = {"step": step, "lr": _lr_at(step - 1, cfg), "elapsed_s": round(time.monotonic() - t0, 1),
                   **{k: float(np.mean(v)) for k, v in acc.items()}}
            acc = {}
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.4g}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save()
        if cfg.max_minutes and time.monotonic() - t0 > 60 * cfg.max_minutes and step < cfg.steps:
            save()
            bar.close()
            raise TrainingInterrupted(f"[{name}] stopped at step {step} of {cfg.steps} after {cfg.max_minutes} min; "
                                      f"checkpoint {ckpt}: run the same command again to resume (nothing was exported)")
    bar.close()
    result = ema if ema is not None else model
    result.eval()
    return result
