"""Shared test helpers: where ../shared/data is, and a skip when it is absent."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder; skips the test with a reason where it is absent."""
    if not (SHARED_DATA / "clips").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (CI has it beside the checkout)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _c2pa_key_in_tmp(tmp_path_factory, monkeypatch):
    """Renders sign their C2PA manifest with a locally created key: in tests it lives in a temporary
    folder, never in the user's ~/.config."""
    monkeypatch.setenv("AVATAR_C2PA_DIR", str(tmp_path_factory.getbasetemp() / "c2pa"))
