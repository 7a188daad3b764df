"""What this CPU can do fast: the instruction-set flags that decide whether a reduced-precision
graph is worth running (``load_runtime(..., precision="auto")``).

Int8 (ONNX Runtime QDQ graphs) is fast with VNNI dot products (``avx512_vnni``, ``avx_vnni``) or
AMX tiles (``amx_int8``); without them ONNX Runtime's u8s8 kernels can be slower than fp32 and
may saturate. Bf16 (PyTorch) is fast with ``avx512_bf16`` or ``amx_bf16``; elsewhere PyTorch
emulates it, several times slower than fp32. Linux reads /proc/cpuinfo; elsewhere no flags are
known and ``auto`` stays at fp32.
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path

# precision -> flags of which any one makes it fast
FAST_FLAGS: dict[str, tuple[str, ...]] = {
    "int8": ("amx_int8", "avx512_vnni", "avx_vnni"),
    "bf16": ("amx_bf16", "avx512_bf16"),
}


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return platform.processor() or platform.machine(), frozenset()
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if model and flags:
            break
    return model or platform.machine(), flags


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), e.g. "Intel(R) Xeon(R) Processor"."""
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (/proc/cpuinfo ``flags``); empty where unknown."""
    return _cpuinfo()[1]


def fast_precision(precision: str, flags: frozenset[str] | None = None) -> bool:
    """True if this CPU (or ``flags``) has instructions that make ``precision`` fast; fp32 always is."""
    if precision == "fp32":
        return True
    have = cpu_flags() if flags is None else flags
    return any(f in have for f in FAST_FLAGS.get(precision, ()))
