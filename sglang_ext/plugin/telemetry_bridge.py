"""Open the per-rank step telemetry when --balancer-log is set.

The import is guarded: telemetry is optional for serving, and a failure to open
the log must never keep a scheduler from starting.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def open_telemetry(cfg, dp_rank: int, source: str = "sglang"):
    """A `StepTelemetry` for this rank, or None (no --balancer-log, or it cannot open)."""
    if not cfg.log_dir:
        return None
    try:
        from sglang_ext.telemetry import StepTelemetry
    except ImportError:
        logger.warning("sglang-ext: sglang_ext.telemetry is unavailable; --balancer-log ignored")
        return None
    try:
        return StepTelemetry(cfg.log_dir, dp_rank, source=source)
    except Exception:  # noqa: BLE001
        logger.exception("sglang-ext: cannot open telemetry under %s", cfg.log_dir)
        return None
