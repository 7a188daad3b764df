"""The PyTorch backend: the bundle's own modules (the reference the exported graphs are checked against)."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from engine.runtime.base import GraphIO, check_feed


class TorchGraph(GraphIO):
    """``spec.module_for(model)`` behind ``infer``: numpy in, numpy out, no autograd."""

    backend = "torch"

    def __init__(self, name: str, module: nn.Module, input_names: list[str], output_names: list[str], *, device: str = "cpu"):
        self.name = name
        self.precision = "fp32"
        self.device = torch.device(device)
        self.module = module.eval().to(self.device)
        self._inputs, self._outputs = list(input_names), list(output_names)

    @torch.inference_mode()
    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feed(self.name, self._inputs, feed)
        args = [torch.as_tensor(np.ascontiguousarray(feed[n])).to(self.device) for n in self._inputs]
        y = self.module(*args)
        ys = tuple(y) if isinstance(y, (tuple, list)) else (y,)
        return {n: v.detach().float().cpu().numpy() for n, v in zip(self._outputs, ys)}
