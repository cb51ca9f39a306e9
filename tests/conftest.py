import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRACES = REPO / "data" / "traces"
SHARED = REPO.parent / "shared"


@pytest.fixture
def traces_dir() -> Path:
    return TRACES


@pytest.fixture
def reference() -> dict:
    import json

    path = SHARED / "reference" / "paper_mode_baselines.json"
    if not path.exists():
        path = REPO / "data" / "reference" / "paper_mode_baselines.json"
    return json.loads(path.read_text())["results"]
