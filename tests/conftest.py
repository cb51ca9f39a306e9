import os
from pathlib import Path

# Triton fixes interpreter mode when it is first imported, and importing SGLang
# (test_plugin collects before test_projection_kernel) imports Triton: set it
# before any test module is collected. The server subprocesses of the e2e tests
# inherit it, harmlessly: the stand-in backend runs no Triton kernel.
os.environ.setdefault("TRITON_INTERPRET", "1")

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
