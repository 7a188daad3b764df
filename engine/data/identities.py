"""Which person each clip shows: clips of one person share an identity (for splits and cards).

The groups of the shared clips are listed by hand in ``identities.json`` (checked on their
contact sheets); GRID corpus clips (``s<N>_<sentence code>``) are speaker ``grid_s<N>``; any other
clip is its own identity, named after the clip.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

IDENTITIES_PATH = Path(__file__).resolve().parent / "identities.json"


@lru_cache(maxsize=1)
def _groups() -> dict[str, str]:
    groups = json.loads(IDENTITIES_PATH.read_text())
    return {clip: ident for ident, clips in groups.items() if not ident.startswith("_") for clip in clips}


def identity_of(clip: str) -> str:
    """The identity label of a clip (its file stem)."""
    g = _groups().get(clip)
    if g is not None:
        return g
    m = re.fullmatch(r"s(\d+)_[a-z0-9]{6}", clip)
    return f"grid_s{m.group(1)}" if m else clip
