"""Shared test fixtures: where the real faces are."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT.parent / "shared" / "data").resolve()
LFW = DATA / "lfw"
CELEBA = DATA / "celeba-ids"

if not LFW.is_dir():  # the suite reads real faces; without them it cannot say anything true
    pytest.exit(f"face data not found at {LFW} (expected ../shared/data beside the checkout)", returncode=2)
