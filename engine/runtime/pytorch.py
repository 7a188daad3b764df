"""The PyTorch backend: the bundle's own modules (the reference the exported graphs are checked against).

``precision="bf16"`` runs a bf16 copy of the module (weights cast once at load, channels-last
convolutions, outputs returned as float32): AMX / AVX512-BF16 run it several times faster than
fp32 where convolutions dominate. Inputs stay float32 as fed; a pre-hook on each layer that owns
weights casts what reaches it to bf16. So the denoiser's time ``t`` keeps its fp32 resolution
inside the sinusoidal embedding (in bf16, t = 0.7503 would become 0.75, a large phase error at
1000 t) and that fp32 embedding is cast at the first linear layer, without changing the model.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from engine.runtime.base import GraphIO, check_feed

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the precisions this backend runs


def _cast_to_weight_dtype(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: floating tensor arguments in the dtype of the module's own weights."""
    w = next(module.parameters(recurse=False))
    return tuple(a.to(w.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != w.dtype else a for a in args)


def reduced_precision_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` in ``dtype`` (the bundle's model is shared by other graphs and stays fp32),
    channels-last, with every weight-owning layer casting its inputs to ``dtype``."""
    m = copy.deepcopy(module).to(dtype).to(memory_format=torch.channels_last)
    for sub in m.modules():
        if any(p.is_floating_point() for p in sub.parameters(recurse=False)):
            sub.register_forward_pre_hook(_cast_to_weight_dtype)
    return m


class TorchGraph(GraphIO):
    """``spec.module_for(model)`` behind ``infer``: numpy in, numpy out, no autograd."""

    backend = "torch"

    def __init__(self, name: str, module: nn.Module, input_names: list[str], output_names: list[str], *, device: str = "cpu",
                 precision: str = "fp32"):
        if precision not in DTYPES:
            raise ValueError(f"{name}: the torch backend runs {sorted(DTYPES)}, not {precision!r}")
        self.name = name
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.device = torch.device(device)
        module = module.eval()
        self.module = (module if self.dtype == torch.float32 else reduced_precision_copy(module, self.dtype)).to(self.device)
        self._inputs, self._outputs = list(input_names), list(output_names)

    @torch.inference_mode()
    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feed(self.name, self._inputs, feed)
        args = [torch.as_tensor(np.ascontiguousarray(feed[n])).to(self.device) for n in self._inputs]
        y = self.module(*args)
        ys = tuple(y) if isinstance(y, (tuple, list)) else (y,)
        return {n: v.detach().float().cpu().numpy() for n, v in zip(self._outputs, ys)}
