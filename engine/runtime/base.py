"""The runtime interface: one exported graph behind ``infer(feed) -> outputs``, whatever runs it.

A backend is chosen once, at load (``engine.runtime.load_graphs``); the generator and the
pipeline only ever call ``Graph.infer`` with numpy arrays named as in ``export/specs.py`` and
get numpy arrays back, named the same way. Nothing above this layer branches on the backend.
"""
from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import numpy as np

from engine.errors import BundleError

BACKENDS = ("torch", "onnxruntime", "tensorrt")


class RuntimeLoadError(BundleError):
    """A graph cannot be loaded: missing file, wrong sha256, I/O that does not match its spec, or a
    backend that is not available on this machine. The message names the file and the cause."""


class BackendUnavailable(RuntimeLoadError):
    """The backend (or its execution provider / GPU) does not exist here."""


@runtime_checkable
class Graph(Protocol):
    """One model graph (``export/specs.py`` names its inputs and outputs)."""

    name: str  # the spec's name: encoder, decoder, audio_encoder, a2l, denoiser, warp
    backend: str  # one of BACKENDS
    precision: str  # "fp32", "bf16", "int8", "fp16"

    @property
    def input_names(self) -> list[str]: ...

    @property
    def output_names(self) -> list[str]: ...

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once. ``feed``: input name -> array (float32 unless the spec says otherwise),
        every input of the spec present. Returns output name -> array (float32, owned by the caller)."""
        ...


def check_feed(graph_name: str, input_names: list[str], feed: Mapping[str, np.ndarray]) -> None:
    """Every input present and nothing unknown; say which."""
    missing = [n for n in input_names if n not in feed]
    extra = [n for n in feed if n not in input_names]
    if missing or extra:
        raise KeyError(f"{graph_name}: feed is missing {missing} / has unknown {extra} (inputs: {input_names})")


class GraphIO:
    """The names half of a Graph: backends keep ``_inputs`` / ``_outputs`` (the spec's order)."""

    _inputs: list[str]
    _outputs: list[str]

    @property
    def input_names(self) -> list[str]:
        return self._inputs

    @property
    def output_names(self) -> list[str]:
        return self._outputs
