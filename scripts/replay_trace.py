#!/usr/bin/env python3
"""Thin wrapper: `scripts/replay_trace.py ARGS` == `sglang-ext replay ARGS`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_ext.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["replay", *sys.argv[1:]]))
