"""The watermark's payload: 32 bits that say which engine and bundle made a video, and a check code.

    bits  0-3    format version (VERSION)
    bits  4-23   the bundle's short hash: the first 20 bits of sha256(manifest.json as canonical JSON)
    bits 24-31   an id of the session or file (a render: from its inputs and seed; a live session: its own)
    bits 32-47   CRC-16/CCITT-FALSE over the 4 payload bytes

The CRC is what keeps random content from reading as a watermark: a wrong word passes it with
probability 2^-16, and a known version nibble adds a factor 1/16 (a false detection needs both).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

VERSION = 1  # 4 bits; bump when the pattern or the layout changes (the detector knows every version it reads)
KNOWN_VERSIONS = frozenset({1})
PAYLOAD_BITS = 32
CRC_BITS = 16
CODE_BITS = PAYLOAD_BITS + CRC_BITS  # 48 bits are embedded


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def manifest_hash(manifest: dict) -> str:
    """sha256 hex of a bundle manifest as canonical JSON (sorted keys, no spaces): stable under reformatting."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def short_hash(manifest_sha256: str) -> int:
    """The 20-bit bundle id carried by the watermark: the manifest hash's first 5 hex digits."""
    return int(manifest_sha256[:5], 16)


@dataclass(frozen=True)
class Payload:
    version: int  # 0-15
    bundle: int  # 0 .. 2^20 - 1: short_hash(manifest_hash(bundle.manifest))
    session: int  # 0-255

    def __post_init__(self) -> None:
        if not (0 <= self.version < 16 and 0 <= self.bundle < (1 << 20) and 0 <= self.session < 256):
            raise ValueError(f"payload out of range: {self}")

    @property
    def bundle_hex(self) -> str:
        return f"{self.bundle:05x}"

    def to_int(self) -> int:
        return (self.version << 28) | (self.bundle << 8) | self.session

    def code_bits(self) -> np.ndarray:
        """(48,) int8 in {-1, +1}: the payload's 32 bits then its CRC's 16, most significant first (+1 = bit 1)."""
        word = self.to_int()
        crc = crc16(word.to_bytes(4, "big"))
        value = (word << CRC_BITS) | crc
        bits = np.array([(value >> (CODE_BITS - 1 - i)) & 1 for i in range(CODE_BITS)], np.int8)
        return (2 * bits - 1).astype(np.int8)

    @classmethod
    def from_code_bits(cls, signs: np.ndarray) -> "Payload | None":
        """The payload whose CRC and version check out, or None."""
        bits = (np.asarray(signs) > 0).astype(np.int64)
        if bits.shape != (CODE_BITS,):
            raise ValueError(f"expected {CODE_BITS} bits, got {bits.shape}")
        value = 0
        for b in bits:
            value = (value << 1) | int(b)
        word, crc = value >> CRC_BITS, value & ((1 << CRC_BITS) - 1)
        if crc16(word.to_bytes(4, "big")) != crc:
            return None
        version = word >> 28
        if version not in KNOWN_VERSIONS:
            return None
        return cls(version, (word >> 8) & 0xFFFFF, word & 0xFF)
