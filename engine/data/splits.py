"""The recorded evaluation split (engine/data/splits.json): clips never trained on."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

SPLITS_PATH = Path(__file__).resolve().parent / "splits.json"


@lru_cache(maxsize=1)
def eval_clips() -> frozenset[str]:
    return frozenset(json.loads(SPLITS_PATH.read_text())["eval_clips"])


def split_of(clip: str) -> str:
    """``"eval"`` for a held-out clip, else ``"train"``."""
    return "eval" if clip in eval_clips() else "train"
